"""``tm db prune``: finished tasks older than the retention period leave the table in small
batches, so that the table does not grow for ever and the consumer never waits for the pruning.

The cutoff (``now() - days`` on the server's clock) is fixed once at the start. The table is
walked oldest first with a keyset cursor on ``(created_at, id)`` (the index
``idx_web_crawl_tasks_created_at_id``): each batch reads the next ``batch_size`` rows older than
the cutoff whatever their status, locks the finished ones among them with ``FOR UPDATE SKIP
LOCKED`` and deletes them, in one statement and so one short transaction. A ``new`` task is
never deleted, and an old one still ``new`` is read once per run, not once per batch; a row the
consumer holds at that moment is passed over (the next run takes it), never waited for. The
statement-level DELETE trigger of the hourly counts keeps them exact.

A batch that loses a race (deadlock, serialization failure, a lock wait past the session's
lock timeout) is tried again a few times; any other database error stops the run. Each run,
dry runs aside, leaves one row in ``tm_prune_runs``: the API's ``/api/metrics`` exposes the last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from tm.adapters import postgres
from tm.errors import DatabaseUnavailableError

log = logging.getLogger("tm.retention")

BATCH_SIZE = 5000  # rows read per batch: about 0.1 s beside a 1,000/s load on 2 cores (bench.prune)
PAUSE_S = 0.2  # between batches: the consumer's transactions and autovacuum get the machine
MAX_BATCH_SIZE = 100_000  # beyond, one delete holds its locks and its WAL burst too long
MAX_PAUSE_S = 3600.0
RETRY_ATTEMPTS = 5  # per batch, as the consumer retries a lost race with backoff
RETRY_BACKOFF_S = 0.1  # doubled at each attempt: 0.1, 0.2, 0.4, 0.8 s
RETRY_SQLSTATES = frozenset({"40P01", "40001", "55P03"})  # deadlock, serialization, lock wait
# One prune of a table at a time (a CronJob's and one by hand): an advisory lock on this key
# and the table's oid, so that prunes of two schemas (two tms, or tests) do not exclude each other.
PRUNE_LOCK_KEY = 0x746D_7072  # "tmpr"
_FIRST = (datetime.min.replace(tzinfo=UTC), uuid.UUID(int=0))  # before every (created_at, id)

# One batch. `batch` is the next rows of the walk, whatever their status (so the cursor passes
# old `new` tasks once); `doomed` locks its finished rows, skipping those another transaction
# holds, and checks their status again on the locked version; `gone` deletes them. The cursor's
# next position is the last row read.
_DELETE_SQL = """
WITH batch AS MATERIALIZED (
    SELECT id, created_at, status FROM web_crawl_tasks
    WHERE (created_at, id) > ($1::timestamptz, $2::uuid) AND created_at < $3::timestamptz
    ORDER BY created_at, id
    LIMIT $4
), doomed AS (
    SELECT t.id FROM web_crawl_tasks t
    WHERE t.id IN (SELECT b.id FROM batch b WHERE b.status IN ('completed', 'error'))
      AND t.status IN ('completed', 'error')
    FOR UPDATE OF t SKIP LOCKED
), gone AS (
    DELETE FROM web_crawl_tasks t USING doomed d WHERE t.id = d.id RETURNING t.id
)
SELECT count(*)::int AS read,
       count(*) FILTER (WHERE status IN ('completed', 'error'))::int AS finished,
       (SELECT count(*) FROM gone)::int AS deleted,
       max(created_at) AS last_created_at,
       (array_agg(id ORDER BY created_at DESC, id DESC))[1] AS last_id
FROM batch
"""

# The dry run: the same walk, nothing locked or deleted.
_COUNT_SQL = """
WITH batch AS (
    SELECT id, created_at, status FROM web_crawl_tasks
    WHERE (created_at, id) > ($1::timestamptz, $2::uuid) AND created_at < $3::timestamptz
    ORDER BY created_at, id
    LIMIT $4
)
SELECT count(*)::int AS read,
       count(*) FILTER (WHERE status IN ('completed', 'error'))::int AS finished,
       count(*) FILTER (WHERE status IN ('completed', 'error'))::int AS deleted,
       max(created_at) AS last_created_at,
       (array_agg(id ORDER BY created_at DESC, id DESC))[1] AS last_id
FROM batch
"""

_RECORD_SQL = """
WITH previous AS (
    SELECT COALESCE((SELECT deleted_rows_total FROM tm_prune_runs ORDER BY id DESC LIMIT 1), 0)
        AS total
), old_runs AS (
    DELETE FROM tm_prune_runs WHERE finished_at < $2
), empty_hours AS (
    -- Counters the deletes brought to zero; an update of a task of that hour recreates its own.
    DELETE FROM web_crawl_task_hourly_counts WHERE hour < date_trunc('hour', $2) AND tasks = 0
), empty_minutes AS (
    DELETE FROM web_crawl_task_minute_counts WHERE minute < date_trunc('minute', $2) AND tasks = 0
)
INSERT INTO tm_prune_runs (started_at, finished_at, cutoff, retention_days, deleted_rows,
                           batches, duration_s, is_complete, deleted_rows_total)
SELECT $1, now(), $2, $3, $4, $5, $6, $7, $4 + previous.total FROM previous
"""


@dataclass(frozen=True, slots=True)
class Options:
    days: int
    batch_size: int = BATCH_SIZE
    pause_s: float = PAUSE_S
    is_dry_run: bool = False


@dataclass(slots=True)
class Outcome:
    """What a run did (a dry run: what it would have deleted), so far or in all."""

    days: int
    cutoff: datetime
    is_dry_run: bool
    deleted: int = 0  # rows (a dry run: finished rows older than the cutoff)
    batches: int = 0  # batches that read at least one row
    read: int = 0  # rows older than the cutoff read, of any status
    skipped_locked: int = 0  # finished rows another transaction held: the next run takes them
    retries: int = 0  # batches tried again after a lost race
    duration_s: float = 0.0
    is_complete: bool = False  # the walk reached the cutoff (False: stopped by a signal)

    def fields(self) -> dict[str, Any]:
        """The fields of a log line."""
        return {
            "deleted": self.deleted,
            "batches": self.batches,
            "read": self.read,
            "skipped_locked": self.skipped_locked,
            "retries": self.retries,
            "duration_s": round(self.duration_s, 3),
            "cutoff": self.cutoff.isoformat(),
            "days": self.days,
            **({"dry_run": True} if self.is_dry_run else {}),
        }


async def prune(
    conn: asyncpg.Connection,
    options: Options,
    *,
    stop: asyncio.Event | None = None,
    on_batch: Callable[[Outcome], None] | None = None,
) -> Outcome | None:
    """Walk the rows older than ``now() - options.days`` and delete the finished ones, batch by
    batch; until the cutoff is reached or ``stop`` is set (checked between batches). Record the
    run in ``tm_prune_runs`` unless it is a dry run. None when another prune holds the lock
    (nothing done); tm's errors for a database failure."""
    stop = stop or asyncio.Event()
    async with postgres.translated():
        table = await conn.fetchval("SELECT 'web_crawl_tasks'::regclass::oid::int")
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", PRUNE_LOCK_KEY, table):
            return None
        try:
            return await _prune(conn, options, stop, on_batch)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1, $2)", PRUNE_LOCK_KEY, table)


async def _prune(
    conn: asyncpg.Connection,
    options: Options,
    stop: asyncio.Event,
    on_batch: Callable[[Outcome], None] | None,
) -> Outcome:
    started = time.monotonic()
    started_at, cutoff = await conn.fetchrow(
        "SELECT now(), now() - make_interval(days => $1)", options.days
    )
    outcome = Outcome(days=options.days, cutoff=cutoff, is_dry_run=options.is_dry_run)
    sql = _COUNT_SQL if options.is_dry_run else _DELETE_SQL
    cursor = _FIRST
    while not stop.is_set():
        row = await _batch(conn, sql, cursor, cutoff, options.batch_size, outcome)
        if row["read"] == 0:
            outcome.is_complete = True
            break
        outcome.batches += 1
        outcome.read += row["read"]
        outcome.deleted += row["deleted"]
        outcome.skipped_locked += row["finished"] - row["deleted"]
        outcome.duration_s = time.monotonic() - started
        cursor = (row["last_created_at"], row["last_id"])
        if on_batch is not None:
            on_batch(outcome)
        if row["read"] < options.batch_size:
            outcome.is_complete = True  # the last rows before the cutoff: no need to ask again
            break
        if options.pause_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), options.pause_s)
    outcome.duration_s = time.monotonic() - started
    if not options.is_dry_run:
        await conn.execute(
            _RECORD_SQL,
            started_at,
            cutoff,
            options.days,
            outcome.deleted,
            outcome.batches,
            outcome.duration_s,
            outcome.is_complete,
        )
    return outcome


async def _batch(
    conn: asyncpg.Connection,
    sql: str,
    cursor: tuple[datetime, uuid.UUID],
    cutoff: datetime,
    size: int,
    outcome: Outcome,
) -> asyncpg.Record:
    """One batch, its own transaction (one statement); a lost race is tried again."""
    for attempt in range(RETRY_ATTEMPTS):
        try:
            async with postgres.translated():
                row: asyncpg.Record = await conn.fetchrow(sql, *cursor, cutoff, size)
                return row
        except DatabaseUnavailableError as exc:
            if exc.sqlstate not in RETRY_SQLSTATES or attempt == RETRY_ATTEMPTS - 1:
                raise
            outcome.retries += 1
            log.warning(
                "prune batch lost a race; trying again",
                extra={"fields": {"sqlstate": exc.sqlstate, "attempt": attempt + 1}},
            )
            await asyncio.sleep(RETRY_BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")
