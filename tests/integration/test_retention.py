"""tm.adapters.retention on a real PostgreSQL: which rows a prune deletes (finished and older
than the cutoff, never a `new` one), the hourly counts after it, its batches, the dry run, rows
another transaction holds, one prune at a time, and the run it records."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import asyncpg
import pytest

from tm.adapters import retention
from tm.adapters.retention import Options

pytestmark = pytest.mark.integration

RECOUNT_DIFFERS = """
SELECT count(*) FROM (
    SELECT date_trunc('hour', created_at) AS hour, status, count(*) AS tasks
    FROM web_crawl_tasks GROUP BY 1, 2
) exact FULL JOIN (
    SELECT hour, status, tasks FROM web_crawl_task_hourly_counts WHERE tasks <> 0
) kept USING (hour, status)
WHERE exact.tasks IS DISTINCT FROM kept.tasks
"""
MINUTES_RECOUNT_DIFFERS = """
SELECT count(*) FROM (
    SELECT date_trunc('minute', created_at) AS minute, status, count(*) AS tasks
    FROM web_crawl_tasks GROUP BY 1, 2
) exact FULL JOIN (
    SELECT minute, status, tasks FROM web_crawl_task_minute_counts WHERE tasks <> 0
) kept USING (minute, status)
WHERE exact.tasks IS DISTINCT FROM kept.tasks
"""


async def insert(db: asyncpg.Connection, status: str, age: timedelta, count: int) -> list[str]:
    """``count`` tasks of ``status`` created ``age`` ago (spread over a few minutes, so that
    they fall in more than one hour); their ids."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    await db.execute(
        "INSERT INTO web_crawl_tasks (id, user_email, user_query, original_url, received_at,"
        " status, result, finished_at, created_at)"
        " SELECT r.id::uuid, 'u@example.com', 'q', 'https://example.com/', t, $2::task_status,"
        " CASE WHEN $2 = 'new' THEN NULL ELSE 'r' END, CASE WHEN $2 = 'new' THEN NULL ELSE t END,"
        " t FROM unnest($1::text[]) WITH ORDINALITY AS r(id, n),"
        " LATERAL (SELECT now() - $3::interval - r.n * interval '7 minutes' AS t) x",
        ids,
        status,
        age,
    )
    return ids


async def statuses(db: asyncpg.Connection) -> dict[str, int]:
    rows = await db.fetch("SELECT status::text, count(*) FROM web_crawl_tasks GROUP BY 1")
    return {row[0]: row[1] for row in rows}


async def test_only_finished_tasks_older_than_the_cutoff_are_deleted(
    db: asyncpg.Connection,
) -> None:
    old_new = await insert(db, "new", timedelta(days=400), 4)
    await insert(db, "completed", timedelta(days=31), 5)
    await insert(db, "error", timedelta(days=45), 3)
    young_completed = await insert(db, "completed", timedelta(days=29), 2)
    young_error = await insert(db, "error", timedelta(hours=1), 2)
    young_new = await insert(db, "new", timedelta(minutes=1), 2)

    outcome = await retention.prune(db, Options(days=30, pause_s=0))

    assert outcome is not None and outcome.is_complete
    assert outcome.deleted == 8
    assert outcome.read == 12  # the old `new` tasks are read, and kept
    kept = {str(r[0]) for r in await db.fetch("SELECT id FROM web_crawl_tasks")}
    assert kept == {*old_new, *young_completed, *young_error, *young_new}


async def test_new_tasks_of_any_age_are_never_deleted(db: asyncpg.Connection) -> None:
    for days in (1, 31, 365, 3650):
        await insert(db, "new", timedelta(days=days), 3)
    outcome = await retention.prune(db, Options(days=1, batch_size=2, pause_s=0))
    assert outcome is not None and outcome.deleted == 0
    assert await statuses(db) == {"new": 12}


async def test_the_hourly_counts_equal_a_recount_after_a_prune(db: asyncpg.Connection) -> None:
    for status, days in (("completed", 40), ("error", 35), ("new", 50), ("completed", 2)):
        await insert(db, status, timedelta(days=days), 20)
    await retention.prune(db, Options(days=30, batch_size=7, pause_s=0))
    assert await db.fetchval(RECOUNT_DIFFERS) == 0
    assert await db.fetchval(MINUTES_RECOUNT_DIFFERS) == 0
    assert await statuses(db) == {"new": 20, "completed": 20}
    # The counters brought to zero before the cutoff are removed, not kept for ever.
    for counters in ("web_crawl_task_hourly_counts", "web_crawl_task_minute_counts"):
        zeros = await db.fetchval(f"SELECT count(*) FROM {counters} WHERE tasks = 0")
        assert zeros == 0, counters
    window = await db.fetchrow("SELECT * FROM get_web_crawl_metrics(24 * 365)")
    assert tuple(window) == (20, 20, 0, 40)


async def test_batches_are_bounded_by_the_batch_size(db: asyncpg.Connection) -> None:
    await insert(db, "completed", timedelta(days=60), 10)
    seen: list[int] = []
    outcome = await retention.prune(
        db, Options(days=30, batch_size=3, pause_s=0), on_batch=lambda o: seen.append(o.deleted)
    )
    assert outcome is not None
    assert (outcome.batches, outcome.deleted) == (4, 10)
    assert seen == [3, 6, 9, 10]


async def test_a_dry_run_counts_and_deletes_nothing(db: asyncpg.Connection) -> None:
    await insert(db, "completed", timedelta(days=60), 6)
    await insert(db, "new", timedelta(days=60), 2)
    outcome = await retention.prune(db, Options(days=30, batch_size=4, pause_s=0, is_dry_run=True))
    assert outcome is not None
    assert (outcome.deleted, outcome.batches, outcome.is_dry_run) == (6, 2, True)
    assert await statuses(db) == {"completed": 6, "new": 2}
    assert await db.fetchval("SELECT count(*) FROM tm_prune_runs") == 0


async def test_a_row_another_transaction_holds_is_passed_over_not_waited_for(
    db: asyncpg.Connection, other_conn: asyncpg.Connection
) -> None:
    ids = await insert(db, "error", timedelta(days=60), 5)
    async with other_conn.transaction():
        # The consumer in the middle of an update (error -> completed) of one of them.
        await other_conn.execute(
            "SELECT 1 FROM web_crawl_tasks WHERE id = $1 FOR UPDATE", uuid.UUID(ids[2])
        )
        outcome = await asyncio.wait_for(retention.prune(db, Options(days=30, pause_s=0)), 10)
    assert outcome is not None
    assert (outcome.deleted, outcome.skipped_locked) == (4, 1)
    assert [str(r[0]) for r in await db.fetch("SELECT id FROM web_crawl_tasks")] == [ids[2]]
    again = await retention.prune(db, Options(days=30, pause_s=0))  # the next run takes it
    assert again is not None and again.deleted == 1


async def test_one_prune_at_a_time(db: asyncpg.Connection, other_conn: asyncpg.Connection) -> None:
    await insert(db, "completed", timedelta(days=60), 3)
    table = await db.fetchval("SELECT 'web_crawl_tasks'::regclass::oid::int")
    await other_conn.execute("SELECT pg_advisory_lock($1, $2)", retention.PRUNE_LOCK_KEY, table)
    assert await retention.prune(db, Options(days=30, pause_s=0)) is None
    assert await statuses(db) == {"completed": 3}


async def test_a_stop_ends_the_run_between_batches_and_records_it_as_stopped(
    db: asyncpg.Connection,
) -> None:
    await insert(db, "completed", timedelta(days=60), 9)
    stop = asyncio.Event()
    outcome = await retention.prune(
        db, Options(days=30, batch_size=2, pause_s=0), stop=stop, on_batch=lambda _: stop.set()
    )
    assert outcome is not None
    assert (outcome.deleted, outcome.batches, outcome.is_complete) == (2, 1, False)
    run = await db.fetchrow("SELECT deleted_rows, batches, is_complete FROM tm_prune_runs")
    assert tuple(run) == (2, 1, False)


async def test_each_run_is_recorded_with_a_running_total(db: asyncpg.Connection) -> None:
    await insert(db, "completed", timedelta(days=60), 3)
    await retention.prune(db, Options(days=30, pause_s=0))
    await insert(db, "error", timedelta(days=60), 2)
    await retention.prune(db, Options(days=30, pause_s=0))
    await retention.prune(db, Options(days=30, pause_s=0))
    runs = await db.fetch(
        "SELECT retention_days, deleted_rows, deleted_rows_total, is_complete,"
        " finished_at - cutoff AS kept FROM tm_prune_runs ORDER BY id"
    )
    assert [tuple(r)[:4] for r in runs] == [(30, 3, 3, True), (30, 2, 5, True), (30, 0, 5, True)]
    assert all(timedelta(days=30) <= r["kept"] < timedelta(days=30, minutes=1) for r in runs)
