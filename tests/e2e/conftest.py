"""Fixtures of the end-to-end tests: a fresh stack (database + topics) per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.harness import Stack, make_stack
from tm.config import Settings


@pytest.fixture
def stack(settings: Settings, pg_up: None, kafka_up: None) -> Iterator[Stack]:
    yield from make_stack(settings)
