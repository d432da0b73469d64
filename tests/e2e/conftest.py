"""Fixtures of the end-to-end tests: a fresh stack (database + topics) per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness import unique
from harness.proxy import TcpProxy
from harness.stack import Stack, admin_sql, make_stack
from tm.config import Settings


@pytest.fixture
def stack(settings: Settings, pg_up: None, kafka_up: None) -> Iterator[Stack]:
    with make_stack(settings) as made:
        yield made


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
