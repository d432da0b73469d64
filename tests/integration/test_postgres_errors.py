"""Errors a failover or a schema change makes PostgreSQL raise, produced for real and
translated by the adapter: they are worth a retry, never fatal to a worker. And the deadlines
the server itself is told on tm's sessions."""

from __future__ import annotations

import asyncpg
import pytest

from tm.adapters import postgres
from tm.adapters.postgres import translate_error
from tm.config import Settings
from tm.errors import DatabaseUnavailableError

pytestmark = pytest.mark.integration


async def test_a_stale_cached_plan_is_transient(conn: asyncpg.Connection) -> None:
    """0A000 "cached plan must not change result type": a prepared statement whose table changed
    (a migration while tm runs), met inside a transaction where asyncpg cannot re-prepare."""
    await conn.execute("CREATE TABLE probe (a int)")
    await conn.fetch("SELECT * FROM probe")  # prepared and cached
    await conn.execute("ALTER TABLE probe ADD COLUMN b int")
    with pytest.raises(asyncpg.exceptions.InvalidCachedStatementError) as raised:
        async with conn.transaction():
            await conn.fetch("SELECT * FROM probe")
    translated = translate_error(raised.value)
    assert isinstance(translated, DatabaseUnavailableError), translated
    assert translated.sqlstate == "0A000"


async def test_a_read_only_server_is_transient(conn: asyncpg.Connection) -> None:
    """25006: what a standby answers to a write until it is promoted."""
    await conn.execute("CREATE TABLE probe (a int)")
    await conn.execute("SET default_transaction_read_only = on")
    with pytest.raises(asyncpg.PostgresError) as raised:
        await conn.execute("INSERT INTO probe VALUES (1)")
    translated = translate_error(raised.value)
    assert isinstance(translated, DatabaseUnavailableError), translated
    assert translated.sqlstate == "25006"


async def test_sessions_carry_the_clients_deadlines_and_keepalives(
    settings: Settings, pg_up: None
) -> None:
    conn = await postgres.connect(settings.postgres)
    try:
        shown = {
            name: await conn.fetchval("SELECT setting FROM pg_settings WHERE name = $1", name)
            for name in (
                "statement_timeout",
                "lock_timeout",
                "idle_in_transaction_session_timeout",
                "tcp_keepalives_idle",
            )
        }
    finally:
        await conn.close()
    query_ms = settings.postgres.query_timeout_ms
    assert shown["statement_timeout"] == str(query_ms + postgres.STATEMENT_TIMEOUT_GRACE_MS)
    assert shown["idle_in_transaction_session_timeout"] == str(query_ms)
    assert 0 < int(shown["lock_timeout"]) < query_ms
    assert shown["tcp_keepalives_idle"] == str(postgres.TCP_KEEPALIVES_IDLE_S)
