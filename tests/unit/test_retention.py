"""tm.adapters.retention's batch loop against a fake connection: a batch that loses a race
(deadlock, serialization failure) is tried again, a few times; another database error stops
the run."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from tm.adapters import retention
from tm.adapters.retention import Options
from tm.errors import DatabaseUnavailableError, FatalError

CUTOFF = datetime(2026, 1, 1, tzinfo=UTC)


class FakeConnection:
    """Answers the prune's statements: the lock, the cutoff, then one batch result or error
    per batch statement from ``batches``, and the run's record."""

    def __init__(self, batches: list[dict[str, Any] | BaseException]) -> None:
        self.batches = batches
        self.batch_calls = 0
        self.recorded: tuple[Any, ...] | None = None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return 1 if "regclass" in sql else True

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        if "make_interval" in sql:
            return CUTOFF, CUTOFF
        self.batch_calls += 1
        answer = self.batches.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def execute(self, sql: str, *args: Any) -> None:
        if "INSERT INTO tm_prune_runs" in sql:
            self.recorded = args


def batch(read: int, deleted: int) -> dict[str, Any]:
    return {
        "read": read,
        "finished": deleted,
        "deleted": deleted,
        "last_created_at": CUTOFF,
        "last_id": None,
    }


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retention, "RETRY_BACKOFF_S", 0.0)


def run(conn: FakeConnection, options: Options) -> retention.Outcome | None:
    return asyncio.run(retention.prune(conn, options))


def test_a_deadlock_or_serialization_failure_is_tried_again() -> None:
    conn = FakeConnection(
        [
            asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
            batch(2, 2),
            asyncpg.exceptions.SerializationError("could not serialize"),
            batch(1, 1),
        ]
    )
    outcome = run(conn, Options(days=30, batch_size=2, pause_s=0))
    assert outcome is not None
    assert (outcome.deleted, outcome.batches, outcome.retries) == (3, 2, 2)
    assert conn.recorded is not None and conn.recorded[3:5] == (3, 2)


def test_a_race_lost_every_time_stops_the_run() -> None:
    races: list[dict[str, Any] | BaseException] = [
        asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
        for _ in range(retention.RETRY_ATTEMPTS)
    ]
    conn = FakeConnection(races)
    with pytest.raises(DatabaseUnavailableError) as info:
        run(conn, Options(days=30, pause_s=0))
    assert info.value.sqlstate == "40P01"
    assert conn.batch_calls == retention.RETRY_ATTEMPTS
    assert conn.recorded is None


def test_another_database_error_is_not_retried() -> None:
    conn = FakeConnection([asyncpg.exceptions.UndefinedTableError("no such table")])
    with pytest.raises(FatalError):
        run(conn, Options(days=30, pause_s=0))
    assert conn.batch_calls == 1
