"""Fixtures of the end-to-end tests: a fresh stack (database + topics) per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.stack import unique
from tests.e2e.harness import Stack, admin_sql, make_stack
from tests.e2e.proxy import TcpProxy
from tm.config import Settings


@pytest.fixture
def stack(settings: Settings, pg_up: None, kafka_up: None) -> Iterator[Stack]:
    yield from make_stack(settings)


@pytest.fixture
def proxy(settings: Settings, pg_up: None) -> Iterator[TcpProxy]:
    """A TCP proxy in front of PostgreSQL: point tm at it to cut, blackhole or freeze."""
    with TcpProxy(settings.postgres.host, settings.postgres.port) as p:
        yield p


@pytest.fixture
def database(settings: Settings, pg_up: None) -> Iterator[str]:
    """A fresh, empty database (nothing migrated), dropped afterwards."""
    name = unique("tm_cli")
    admin_sql(settings, f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        admin_sql(settings, f'DROP DATABASE "{name}" WITH (FORCE)')
