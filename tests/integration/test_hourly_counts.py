"""get_web_crawl_metrics from the hourly counters equals an exact count, whatever was written."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

pytestmark = pytest.mark.integration

EXACT = """
    SELECT count(*) FILTER (WHERE status = 'new')::int,
           count(*) FILTER (WHERE status = 'completed')::int,
           count(*) FILTER (WHERE status = 'error')::int,
           count(*)::int
    FROM web_crawl_tasks WHERE created_at >= now() - interval '1 hour' * $1
"""


async def _create(db: asyncpg.Connection, n: int) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(n)]
    now = datetime.now(UTC)
    await db.fetch(
        "SELECT * FROM tm_create_tasks($1::uuid[], $2::text[], $3::text[], $4::text[],"
        " $5::timestamptz[])",
        ids,
        [f"u{i}@example.com" for i in range(n)],
        ["q"] * n,
        ["https://example.com"] * n,
        [now] * n,
    )
    return ids


MINUTES = """
    SELECT minute, status::text, tasks FROM web_crawl_task_minute_counts
    WHERE tasks <> 0 AND minute >= (SELECT since FROM web_crawl_task_minute_counts_since)
    ORDER BY 1, 2
"""
MINUTES_EXACT = """
    SELECT date_trunc('minute', created_at), status::text, count(*) FROM web_crawl_tasks
    WHERE created_at >= (SELECT since FROM web_crawl_task_minute_counts_since)
    GROUP BY 1, 2 ORDER BY 1, 2
"""


async def _assert_matches(db: asyncpg.Connection) -> None:
    for hours in (1, 2, 3, 5, 24, 72):
        got = tuple(await db.fetchrow("SELECT * FROM get_web_crawl_metrics($1)", hours))
        want = tuple(await db.fetchrow(EXACT, hours))
        assert got == want, f"hours={hours}"
    minutes = [tuple(row) for row in await db.fetch(MINUTES)]
    assert minutes == [tuple(row) for row in await db.fetch(MINUTES_EXACT)]


async def test_counts_follow_inserts_updates_moves_and_deletes(db: asyncpg.Connection) -> None:
    ids = await _create(db, 60)
    await _assert_matches(db)
    # Spread created_at over the last few hours, at odd minutes (window edges inside hours).
    for i, task_id in enumerate(ids):
        await db.execute(
            "UPDATE web_crawl_tasks SET created_at = now() - $2::interval WHERE id = $1",
            task_id,
            timedelta(minutes=7 + 13 * i),
        )
    await _assert_matches(db)
    now = datetime.now(UTC)
    updates = ids[::3]
    await db.fetch(
        "SELECT * FROM tm_apply_status_updates($1::uuid[], $2::task_status[], $3::text[],"
        " $4::timestamptz[])",
        updates,
        ["completed" if i % 2 else "error" for i in range(len(updates))],
        ["r"] * len(updates),
        [now] * len(updates),
    )
    await _assert_matches(db)
    await db.execute("DELETE FROM web_crawl_tasks WHERE id = ANY($1::uuid[])", ids[:5])
    await _assert_matches(db)
    await db.execute("TRUNCATE web_crawl_tasks")
    await _assert_matches(db)
    assert await db.fetchval("SELECT count(*) FROM web_crawl_task_hourly_counts") == 0
    assert await db.fetchval("SELECT count(*) FROM web_crawl_task_minute_counts") == 0


async def test_original_create_and_update_are_counted(db: asyncpg.Connection) -> None:
    task_id = await db.fetchval(
        "SELECT create_web_crawl_task('a@b.co', 'q', 'https://e.com', now(), 'new', now(), now())"
    )
    await db.execute("SELECT update_web_crawl_task($1, 'completed', 'r', now(), now())", task_id)
    got = tuple(await db.fetchrow("SELECT * FROM get_web_crawl_metrics(1)"))
    assert got == (0, 1, 0, 1)


async def test_the_hourly_counters_migration_counts_the_rows_written_before_it(
    conn: asyncpg.Connection,
) -> None:
    """Adopting a filled database: the migration counts the rows already there."""
    from tm.adapters import migrations

    every = migrations.discover()
    upto3 = [m for m in every if m.version <= 3]
    for migration in upto3:
        await conn.execute(migration.sql)
    await conn.execute(
        "INSERT INTO web_crawl_tasks (user_email, user_query, original_url, received_at, status,"
        " created_at) SELECT 'a@b.co', 'q', 'https://e.com', now(),"
        " (ARRAY['new','completed','error'])[1 + g % 3]::task_status,"
        " now() - (g || ' minutes')::interval FROM generate_series(1, 500) g"
    )
    for migration in every[3:]:
        await conn.execute(migration.sql)
    # The minute counters, added later to a table that had rows, count from a minute to come:
    # until then the windows are counted from the hourly counters and the table.
    assert await conn.fetchval("SELECT since > now() FROM web_crawl_task_minute_counts_since")
    await _assert_matches(conn)
    await _assert_matches_since_any_minute(conn)


async def test_counts_since_any_minute_of_an_hour(db: asyncpg.Connection) -> None:
    """The partial first hour of a window is counted from the minute counters and its first
    minute; exact at the hour's edges and in between."""
    ids = await _create(db, 120)
    for i, task_id in enumerate(ids):
        await db.execute(
            "UPDATE web_crawl_tasks SET created_at = now() - $2::interval WHERE id = $1",
            task_id,
            timedelta(minutes=1 + 4 * i),
        )
    finished = ids[::3]
    await db.fetch(
        "SELECT * FROM tm_apply_status_updates($1::uuid[], $2::task_status[], $3::text[],"
        " $4::timestamptz[])",
        finished,
        ["completed" if i % 2 else "error" for i in range(len(finished))],
        ["r"] * len(finished),
        [datetime.now(UTC)] * len(finished),
    )
    await _assert_matches_since_any_minute(db)


async def _assert_matches_since_any_minute(db: asyncpg.Connection) -> None:
    top = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    for hours_back in (1, 3, 6):
        for minute in (0, 1, 17, 29, 30, 31, 44, 59):
            since = top - timedelta(hours=hours_back) + timedelta(minutes=minute, seconds=7)
            got = tuple(await db.fetchrow("SELECT * FROM tm_web_crawl_metrics_since($1)", since))
            want = tuple(
                await db.fetchrow(EXACT.replace("now() - interval '1 hour' * $1", "$1"), since)
            )
            assert got == want, since
