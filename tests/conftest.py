"""Shared fixtures: the settings, and a fresh PostgreSQL schema or Kafka topic per test.

Integration tests run against the real local stack (`make stack-up`). When a service does not
answer they fail with one line saying so; they never skip.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from harness import answers, unique
from tm import config
from tm.adapters import migrations, postgres
from tm.config import Settings


@pytest.fixture(scope="session")
def settings() -> Settings:
    return config.load()


@pytest.fixture(scope="session")
def pg_up(settings: Settings) -> None:
    pg = settings.postgres
    if not answers(pg.host, pg.port):
        pytest.fail(f"PostgreSQL does not answer at {pg.host}:{pg.port}: run `make stack-up`")


@pytest.fixture(scope="session")
def kafka_up(settings: Settings) -> None:
    host, _, port = settings.kafka.brokers[0].rpartition(":")
    if not answers(host, int(port)):
        pytest.fail(f"Kafka does not answer at {host}:{port}: run `make stack-up`")


@pytest.fixture
async def schema(settings: Settings, pg_up: None) -> AsyncIterator[str]:
    """A fresh, empty schema, dropped afterwards."""
    name = unique("test")
    admin = await asyncpg.connect(**postgres.connect_kwargs(settings.postgres))
    try:
        await admin.execute(f'CREATE SCHEMA "{name}"')
        yield name
        await admin.execute(f'DROP SCHEMA "{name}" CASCADE')
    finally:
        await admin.close()


async def connect_to_schema(
    settings: Settings, schema: str, *, migrating: bool = False
) -> asyncpg.Connection:
    """A session whose search_path is ``schema`` (``migrating``: without tm's query deadlines,
    as `tm db migrate` connects)."""
    kwargs = postgres.connect_kwargs(settings.postgres, migrating=migrating)
    kwargs["server_settings"] = {**kwargs["server_settings"], "search_path": f'"{schema}"'}
    return await asyncpg.connect(**kwargs)


async def until_waiting_for_a_lock(
    observer: asyncpg.Connection, pid: int, call: asyncio.Future[Any]
) -> None:
    """Returns once the session `pid` waits for a lock (at most a minute); `call`, the work that
    should be waiting, must still be running."""
    waits = "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1"
    for _ in range(1200):
        if await observer.fetchval(waits, pid) or call.done():
            break
        await asyncio.sleep(0.05)
    assert not call.done(), "it did not wait for the other transaction"


@pytest.fixture
async def conn(settings: Settings, schema: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection whose search_path is the fresh schema (nothing migrated yet)."""
    connection = await connect_to_schema(settings, schema)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def other_conn(settings: Settings, schema: str) -> AsyncIterator[asyncpg.Connection]:
    """A second session on the same schema: another transaction, as a second pod or worker."""
    connection = await connect_to_schema(settings, schema)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def db(conn: asyncpg.Connection) -> asyncpg.Connection:
    """A connection to a fresh schema with every migration applied."""
    await migrations.migrate(conn)
    return conn


@pytest.fixture
def topic(settings: Settings, kafka_up: None) -> Iterator[str]:
    """A fresh topic name (created by the test or by the code under test)."""
    yield unique("tm-test").replace("_", "-")
