"""The write path's cost in the schema: status updates that PostgreSQL makes HOT (no index written),
``updated_at`` still kept for every kind of update, and the listing by status, which no index on
the status serves any more, still complete and in order."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from tests.conftest import connect_to_schema
from tm.adapters.api_database import list_sql
from tm.config import Settings

pytestmark = pytest.mark.integration

CREATE = (
    "SELECT * FROM tm_create_tasks($1::uuid[], $2::text[], $3::text[], $4::text[],"
    " $5::timestamptz[])"
)
UPDATE = (
    "SELECT * FROM tm_apply_status_updates($1::uuid[], $2::task_status[], $3::text[],"
    " $4::timestamptz[])"
)


async def _create(db: asyncpg.Connection, n: int) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(n)]
    now = datetime.now(UTC)
    await db.fetch(
        CREATE, ids, [f"u{i}@example.com" for i in range(n)], ["q"] * n, ["u"] * n, [now] * n
    )
    return ids


async def test_status_updates_write_no_index(db: asyncpg.Connection) -> None:
    """Every update of the batch function is HOT: the row's new version on its page, no index
    entry written (before, each wrote one in every index: the status was indexed)."""
    ids = await _create(db, 400)
    some = ids[::10]  # about one row of every few on a page, as crawls finish them
    async with db.transaction():
        outcomes = await db.fetch(
            UPDATE,
            some,
            ["completed"] * len(some),
            ["Found 5 products matching."] * len(some),
            [datetime.now(UTC)] * len(some),
        )
        assert {row["outcome"] for row in outcomes} == {"updated"}
        stats = await db.fetchrow(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables"
            " WHERE relid = 'web_crawl_tasks'::regclass"
        )
    assert stats is not None
    assert (stats["n_tup_upd"], stats["n_tup_hot_upd"]) == (len(some), len(some))


async def test_updated_at_is_set_by_the_batch_update_and_by_any_other_update(
    db: asyncpg.Connection,
) -> None:
    first, second, third = await _create(db, 3)
    await db.execute("UPDATE web_crawl_tasks SET updated_at = '2020-01-01T00:00:00Z'")

    await db.fetch(UPDATE, [first], ["completed"], ["ok"], [datetime.now(UTC)])
    await db.execute("UPDATE web_crawl_tasks SET result = 'by hand' WHERE id = $1", second)
    await db.execute(
        "UPDATE web_crawl_tasks SET result = 'with its own', updated_at = '2021-06-01T00:00:00Z'"
        " WHERE id = $1",
        third,
    )

    rows = {
        row["id"]: row
        for row in await db.fetch("SELECT id, updated_at, now() AS now FROM web_crawl_tasks")
    }
    assert rows[first]["updated_at"] > datetime(2020, 1, 2, tzinfo=UTC)
    assert rows[second]["updated_at"] > datetime(2020, 1, 2, tzinfo=UTC)
    assert rows[third]["updated_at"] == datetime(2021, 6, 1, tzinfo=UTC)


async def _task(db: asyncpg.Connection, status: str, created_at: datetime) -> uuid.UUID:
    task_id: uuid.UUID = await db.fetchval(
        "SELECT create_web_crawl_task('a@example.com', 'q', 'https://example.com', $1,"
        " $2::task_status, $1, $1)",
        created_at,
        status,
    )
    return task_id


async def _walk(db: asyncpg.Connection, status: str, limit: int) -> list[uuid.UUID]:
    """The listing by status the API sends, page after page through its cursor."""
    seen: list[uuid.UUID] = []
    rows = await db.fetch(list_sql(status=True, after=False), limit, status)
    while True:
        assert len(rows) <= limit
        seen += [row["id"] for row in rows]
        if len(rows) < limit:
            return seen
        last = rows[-1]
        rows = await db.fetch(
            list_sql(status=True, after=True), limit, status, last["created_at"], last["id"]
        )


async def test_the_listing_by_status_is_complete_and_in_order_across_hours(
    db: asyncpg.Connection,
) -> None:
    """Tasks over ten hours, two of them without a `new` task, ties on created_at across page
    edges and hour edges: each page size gives every task of the status once, newest first."""
    top = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=10)
    for hour in range(10):
        start = top + timedelta(hours=hour)
        for k in range(12):
            status = ("completed", "error", "new")[k % 3]
            if status == "new" and hour in (3, 4):
                status = "completed"
            moment = start + timedelta(minutes=5 * k)
            await _task(db, status, moment)
            if k % 4 == 0:
                await _task(db, status, moment)  # the same instant: ordered by id
        await _task(db, "new", start)  # on the hour's edge
    await db.execute(
        "SELECT * FROM tm_apply_status_updates(ARRAY(SELECT id FROM web_crawl_tasks"
        " WHERE status = 'new' ORDER BY id LIMIT 7), array_fill('error'::task_status, ARRAY[7]),"
        " array_fill('late'::text, ARRAY[7]), array_fill(now(), ARRAY[7]))"
    )

    for status in ("new", "completed", "error"):
        want = [
            row["id"]
            for row in await db.fetch(
                "SELECT id FROM web_crawl_tasks WHERE status = $1::task_status"
                " ORDER BY created_at DESC, id DESC",
                status,
            )
        ]
        assert want
        for limit in (1, 4, 7, 1000):
            assert await _walk(db, status, limit) == want, (status, limit)


async def test_the_listing_by_status_cuts_results_where_the_api_says(
    db: asyncpg.Connection,
) -> None:
    task_id = await _task(db, "new", datetime.now(UTC))
    await db.fetch(UPDATE, [task_id], ["completed"], ["y" * 5000], [datetime.now(UTC)])
    rows = await db.fetch(list_sql(status=True, after=False), 10, "completed")
    assert [len(row["result"]) for row in rows] == [1001]


async def test_a_session_that_began_on_an_empty_table_never_reads_it_whole(
    db: asyncpg.Connection, settings: Settings, schema: str
) -> None:
    """A worker's session caches the plans of the batch functions after a few calls. Cached while
    the table was empty, a plan that reads the table whole is the cheapest, and it stayed until
    the table was next analyzed: every later batch read every row. Batches must find their rows
    through the primary key whatever the table held when the session began."""
    await db.execute("ALTER TABLE web_crawl_tasks SET (autovacuum_enabled = false)")
    now = datetime.now(UTC)
    for _ in range(8):  # enough calls for the plan cache to settle on one plan
        ids = [uuid.uuid4()]
        await db.fetch(CREATE, ids * 2, ["a@example.com"] * 2, ["q"] * 2, ["u"] * 2, [now] * 2)
        await db.fetch(UPDATE, ids * 2, ["error", "completed"], ["x", "y"], [now, now])
        await db.fetch(UPDATE, ids, ["completed"], ["z"], [now])
    other = await connect_to_schema(settings, schema)
    try:
        await other.execute(
            "INSERT INTO web_crawl_tasks (user_email, user_query, original_url, received_at)"
            " SELECT 'b@example.com', 'q', 'u', now() FROM generate_series(1, 20000)"
        )
        some = [
            row["id"]
            for row in await other.fetch(
                "SELECT id FROM web_crawl_tasks WHERE status = 'new' LIMIT 4"
            )
        ]
    finally:
        await other.close()

    # The session's counts not yet reported (its migration's scans among them) show here too:
    # what counts is the difference across the calls, within one transaction.
    scans = (
        "SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relid = 'web_crawl_tasks'::regclass"
    )
    async with db.transaction():
        before = await db.fetchval(scans)
        fresh = uuid.uuid4()
        created = await db.fetch(
            CREATE, [fresh, some[0]], ["c@example.com"] * 2, ["q"] * 2, ["u"] * 2, [now] * 2
        )
        updated = await db.fetch(UPDATE, some[1:3], ["completed"] * 2, ["r"] * 2, [now] * 2)
        repeated = await db.fetch(
            UPDATE, [some[3]] * 2, ["error", "completed"], ["e", "r"], [now] * 2
        )
        after = await db.fetchval(scans)
    assert [row["outcome"] for row in created] == ["created", "duplicate"]
    assert [row["outcome"] for row in updated + repeated] == ["updated"] * 4
    assert after - before == 0
