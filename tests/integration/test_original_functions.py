"""The original service's functions and views, called as an operator or an old tool would call
them (`SELECT fn(...)`), on a freshly migrated schema."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import asyncpg
import pytest

pytestmark = pytest.mark.integration

RECEIVED_AT = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
CREATE = "SELECT create_web_crawl_task($1, $2, $3, $4, $5, $6, $7)"
UPDATE = "SELECT update_web_crawl_task($1, $2, $3, $4, $5)"


async def _create(
    db: asyncpg.Connection,
    *,
    status: str = "new",
    email: str = "ann@example.com",
    created_at: dt.datetime | None = None,
) -> uuid.UUID:
    """A task made by the original create function, as the original service called it."""
    db_now = await db.fetchval("SELECT now()")
    stamp = created_at or db_now
    task_id: uuid.UUID = await db.fetchval(
        CREATE, email, "cats", "https://example.com", RECEIVED_AT, status, stamp, stamp
    )
    return task_id


async def _row(db: asyncpg.Connection, task_id: uuid.UUID) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM web_crawl_tasks WHERE id = $1", task_id)
    assert row is not None
    return row


def _seconds(delta: dt.timedelta) -> Decimal:
    """A timedelta as PostgreSQL's EXTRACT(EPOCH ...) gives it: exact seconds, microseconds."""
    return Decimal(delta // dt.timedelta(microseconds=1)) / Decimal(1_000_000)


async def test_create_returns_a_uuid_and_stores_every_value(db: asyncpg.Connection) -> None:
    created_at = dt.datetime(2024, 5, 1, 12, 0, 1, 250_000, tzinfo=dt.UTC)
    updated_at = dt.datetime(2024, 5, 1, 12, 0, 2, tzinfo=dt.UTC)

    task_id = await db.fetchval(
        CREATE,
        "ann@example.com",
        "find cat pictures",
        "https://example.com/cats",
        RECEIVED_AT,
        "new",
        created_at,
        updated_at,
    )

    assert isinstance(task_id, uuid.UUID)
    row = await _row(db, task_id)
    assert dict(row) == {
        "id": task_id,
        "user_email": "ann@example.com",
        "user_query": "find cat pictures",
        "original_url": "https://example.com/cats",
        "received_at": RECEIVED_AT,
        "status": "new",
        "result": None,
        "finished_at": None,
        "created_at": created_at,
        "updated_at": updated_at,
    }


async def test_update_of_an_unknown_id_raises_not_found(db: asyncpg.Connection) -> None:
    unknown = uuid.uuid4()

    with pytest.raises(asyncpg.RaiseError, match="not found") as raised:
        await db.execute(UPDATE, unknown, "completed", "page", RECEIVED_AT, RECEIVED_AT)

    assert str(unknown) in str(raised.value)
    assert await db.fetchval("SELECT count(*) FROM web_crawl_tasks") == 0


async def test_update_changes_the_row_and_the_trigger_sets_updated_at(
    db: asyncpg.Connection,
) -> None:
    """The trigger, not the caller's p_updated_at, sets updated_at: to the updating
    transaction's now()."""
    long_ago = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    task_id = await _create(db, created_at=long_ago)
    assert (await _row(db, task_id))["updated_at"] == long_ago
    finished_at = dt.datetime(2024, 5, 1, 12, 5, tzinfo=dt.UTC)

    async with db.transaction():
        await db.execute(UPDATE, task_id, "completed", "<html>cats</html>", finished_at, long_ago)
        update_time = await db.fetchval("SELECT now()")

    row = await _row(db, task_id)
    assert (row["status"], row["result"], row["finished_at"]) == (
        "completed",
        "<html>cats</html>",
        finished_at,
    )
    assert row["updated_at"] == update_time
    assert row["updated_at"] > long_ago


async def test_update_moves_an_error_to_completed(db: asyncpg.Connection) -> None:
    """A retried crawl succeeds after an error."""
    task_id = await _create(db)
    await db.execute(UPDATE, task_id, "error", "timeout", RECEIVED_AT, RECEIVED_AT)

    await db.execute(UPDATE, task_id, "completed", "page", RECEIVED_AT, RECEIVED_AT)

    row = await _row(db, task_id)
    assert (row["status"], row["result"]) == ("completed", "page")


async def test_update_refuses_completed_to_error_and_keeps_the_row(
    db: asyncpg.Connection,
) -> None:
    task_id = await _create(db)
    await db.execute(UPDATE, task_id, "completed", "page", RECEIVED_AT, RECEIVED_AT)
    before = await _row(db, task_id)

    with pytest.raises(asyncpg.RaiseError, match="cannot move to status error"):
        await db.execute(UPDATE, task_id, "error", "late failure", RECEIVED_AT, RECEIVED_AT)

    assert await _row(db, task_id) == before


async def test_find_by_id_returns_the_row_with_its_result(db: asyncpg.Connection) -> None:
    task_id = await _create(db)
    await _create(db, email="bob@example.com")
    await db.execute(UPDATE, task_id, "error", "dns failure", RECEIVED_AT, RECEIVED_AT)

    rows = await db.fetch("SELECT * FROM find_web_crawl_task_by_id($1)", task_id)

    assert len(rows) == 1
    assert dict(rows[0]) == dict(await _row(db, task_id))
    assert (rows[0]["status"], rows[0]["result"]) == ("error", "dns failure")
    assert await db.fetch("SELECT * FROM find_web_crawl_task_by_id($1)", uuid.uuid4()) == []


async def test_find_by_status_returns_that_status_newest_first(db: asyncpg.Connection) -> None:
    base = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)
    oldest = await _create(db, created_at=base)
    newest = await _create(db, created_at=base + dt.timedelta(hours=2))
    middle = await _create(db, created_at=base + dt.timedelta(hours=1))
    await _create(db, status="completed", created_at=base + dt.timedelta(hours=3))
    await _create(db, status="error", created_at=base + dt.timedelta(hours=4))

    rows = await db.fetch("SELECT * FROM find_web_crawl_tasks_by_status('new')")

    assert [row["id"] for row in rows] == [newest, middle, oldest]
    assert {row["status"] for row in rows} == {"new"}
    assert "result" in rows[0]


async def test_count_by_status_counts_the_tasks_of_that_status(db: asyncpg.Connection) -> None:
    for status in ["new", "new", "completed", "error", "error", "error"]:
        await _create(db, status=status)

    counts = {
        status: await db.fetchval(f"SELECT count_web_crawl_tasks_by_status('{status}')")
        for status in ["new", "completed", "error"]
    }

    assert counts == {"new": 2, "completed": 1, "error": 3}


@pytest.fixture
async def windowed(db: asyncpg.Connection) -> asyncpg.Connection:
    """Tasks created now (new 2, completed 1, error 1) and three hours ago (new 1, completed 1)."""
    for status in ["new", "new", "completed", "error"]:
        await _create(db, status=status)
    old = [await _create(db, status=status) for status in ["new", "completed"]]
    await db.execute(
        "UPDATE web_crawl_tasks SET created_at = now() - interval '3 hours' WHERE id = ANY($1)",
        old,
    )
    return db


async def test_windowed_count_by_status_counts_only_tasks_created_in_the_window(
    windowed: asyncpg.Connection,
) -> None:
    assert await windowed.fetchval("SELECT get_tasks_count_by_status('new', 1)") == 2
    assert await windowed.fetchval("SELECT get_tasks_count_by_status('completed', 1)") == 1
    assert await windowed.fetchval("SELECT get_tasks_count_by_status('new', 24)") == 3


async def test_windowed_status_and_total_counts_include_only_tasks_created_in_the_window(
    windowed: asyncpg.Connection,
) -> None:
    assert await windowed.fetchval("SELECT get_new_tasks_count(1)") == 2
    assert await windowed.fetchval("SELECT get_completed_tasks_count(1)") == 1
    assert await windowed.fetchval("SELECT get_error_tasks_count(1)") == 1
    assert await windowed.fetchval("SELECT get_total_tasks_count_by_creation_time(1)") == 4
    assert await windowed.fetchval("SELECT get_total_tasks_count_by_creation_time(24)") == 6


async def test_web_crawl_metrics_returns_one_row_of_four_counts(
    windowed: asyncpg.Connection,
) -> None:
    last_hour = await windowed.fetch("SELECT * FROM get_web_crawl_metrics(1)")
    last_day = await windowed.fetch("SELECT * FROM get_web_crawl_metrics(24)")

    assert [dict(row) for row in last_hour] == [
        {
            "new_tasks_count": 2,
            "completed_tasks_count": 1,
            "error_tasks_count": 1,
            "total_tasks_count": 4,
        }
    ]
    assert [tuple(row) for row in last_day] == [(3, 2, 1, 6)]


async def test_completed_view_lists_finished_tasks_with_success_and_duration(
    db: asyncpg.Connection,
) -> None:
    done = await _create(db)
    failed = await _create(db)
    await _create(db)
    await db.execute(
        UPDATE, done, "completed", "page", RECEIVED_AT + dt.timedelta(seconds=90), RECEIVED_AT
    )
    await db.execute(
        UPDATE,
        failed,
        "error",
        "timeout",
        RECEIVED_AT + dt.timedelta(minutes=5, microseconds=500),
        RECEIVED_AT,
    )

    rows = await db.fetch(
        "SELECT id, is_successful, duration_seconds, result FROM completed_web_crawl_tasks"
    )

    assert {row["id"]: tuple(row)[1:] for row in rows} == {
        done: (True, Decimal("90"), "page"),
        failed: (False, Decimal("300.0005"), "timeout"),
    }


async def test_pending_view_lists_new_tasks_with_their_age(db: asyncpg.Connection) -> None:
    pending = await _create(db)
    finished = await _create(db)
    await db.execute(UPDATE, finished, "completed", "page", RECEIVED_AT, RECEIVED_AT)

    async with db.transaction():
        rows = await db.fetch("SELECT id, received_at, age_seconds FROM pending_web_crawl_tasks")
        db_now = await db.fetchval("SELECT now()")

    assert [row["id"] for row in rows] == [pending]
    assert rows[0]["age_seconds"] == _seconds(db_now - RECEIVED_AT)


async def test_statistics_view_on_an_empty_table_is_one_row_of_zeros(
    db: asyncpg.Connection,
) -> None:
    """The original divided by the row count and failed on an empty table."""
    rows = await db.fetch("SELECT * FROM web_crawl_task_statistics")

    assert [dict(row) for row in rows] == [
        {
            "total_tasks": 0,
            "pending_tasks": 0,
            "successful_tasks": 0,
            "failed_tasks": 0,
            "completion_rate": 0,
        }
    ]


async def test_statistics_view_counts_and_completion_rate(db: asyncpg.Connection) -> None:
    for status in ["new", "completed", "error"]:
        await _create(db, status=status)

    row = await db.fetchrow("SELECT * FROM web_crawl_task_statistics")

    assert row is not None
    assert dict(row) == {
        "total_tasks": 3,
        "pending_tasks": 1,
        "successful_tasks": 1,
        "failed_tasks": 1,
        "completion_rate": Decimal("33.33"),
    }
