"""PostgreSQL for the API process: a small asyncpg pool of its own (:class:`ReadPool`) and the read
queries behind ``/api/metrics*``, ``/api/tasks*`` and the database check of the health probes.

The pool is opened without connecting (``min_size=0``), so the API answers liveness even when the
database is down at start. Every query has a deadline, and its errors leave this module translated
(:func:`tm.adapters.postgres.translated`). Rows are returned as asyncpg gives them, typed as
:class:`Row`: read them by column name.

Each query is served by an index (``tm/sql/0001_schema.sql``): a task by its primary key, the rest
by ``(created_at, id)``; the windowed counts and the listing by status with the hourly counts
beside it (``tm/sql/0004_hourly_counts.sql``, ``tm/sql/0007_hot_updates.sql``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import asyncpg

from tm.adapters.postgres import connect_kwargs, translated
from tm.connections import PostgresSettings
from tm.errors import DatabaseUnavailableError

POOL_SIZE = 2  # the API's queries are short; two leave one free while the other is busy
ACQUIRE_TIMEOUT_S = 2.0  # waiting for a pooled connection (or for a new one to connect)
QUERY_TIMEOUT_S = 5.0  # every API query: 50 x the 100 ms target, well under a client's patience
LIST_RESULT_CHARS = 1000  # a listing carries this much of each result; the task itself all

SERVER_SQL = "SELECT to_regclass('web_crawl_tasks') IS NOT NULL, current_setting('server_version')"
METRICS_SQL = (
    "SELECT new_tasks_count, completed_tasks_count, error_tasks_count, total_tasks_count"
    " FROM get_web_crawl_metrics($1)"
)
# The last `tm db prune` run (tm/sql/0008_prune_runs.sql), by its primary key's index.
PRUNE_SQL = (
    "SELECT extract(epoch FROM finished_at)::float8, deleted_rows, duration_s, batches,"
    " is_complete, deleted_rows_total FROM tm_prune_runs ORDER BY id DESC LIMIT 1"
)
TASK_SQL = (
    "SELECT id, user_email, user_query, original_url, received_at, status, result, finished_at,"
    " created_at, updated_at FROM find_web_crawl_task_by_id($1)"
)
# Newest first; the row comparison (created_at, id) < ($x, $y) is an index range condition on
# (created_at, id).
# left(result, 1001) reads only a prefix of a compressed value; 1001 characters means "cut"
# (LIST_RESULT_CHARS + 1; the SQL is spelled out in full, never assembled). No index holds the
# status (an index on it would make every status update write every index): a listing by status
# is tm_list_tasks_by_status (tm/sql/0007_hot_updates.sql), which reads only the hours that hold
# tasks of that status.
_LIST_SQL = {
    (False, False): "SELECT id, user_email, user_query, original_url, received_at, status,"
    " left(result, 1001) AS result, finished_at, created_at, updated_at FROM web_crawl_tasks"
    " ORDER BY created_at DESC, id DESC LIMIT $1",
    (False, True): "SELECT id, user_email, user_query, original_url, received_at, status,"
    " left(result, 1001) AS result, finished_at, created_at, updated_at FROM web_crawl_tasks"
    " WHERE (created_at, id) < ($2::timestamptz, $3::uuid)"
    " ORDER BY created_at DESC, id DESC LIMIT $1",
    (True, False): "SELECT id, user_email, user_query, original_url, received_at, status,"
    " result, finished_at, created_at, updated_at"
    " FROM tm_list_tasks_by_status($2::task_status, $1, 1001)",
    (True, True): "SELECT id, user_email, user_query, original_url, received_at, status,"
    " result, finished_at, created_at, updated_at"
    " FROM tm_list_tasks_by_status($2::task_status, $1, 1001, $3::timestamptz, $4::uuid)",
}


def list_sql(*, status: bool, after: bool) -> str:
    """The listing query (exposed for the benchmark's EXPLAIN)."""
    return _LIST_SQL[(status, after)]


class Row(Protocol):
    """A row of a query: its columns by name (an asyncpg Record; a dict will do in tests)."""

    def __getitem__(self, column: str, /) -> Any: ...


@dataclass(frozen=True, slots=True)
class PruneRun:
    """The last ``tm db prune`` (a row of ``tm_prune_runs``)."""

    finished_at_s: float  # unix time
    deleted_rows: int
    duration_s: float
    batches: int
    is_complete: bool  # False: stopped by a signal before the cutoff
    deleted_rows_total: int  # over every run so far


@dataclass(frozen=True, slots=True)
class Server:
    """What :meth:`ReadPool.server` found."""

    has_table: bool  # web_crawl_tasks exists (the schema is migrated)
    version: str  # the server's ``server_version``


class ReadPool:
    def __init__(self, settings: PostgresSettings) -> None:
        self._settings = settings
        self._pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        """Create the pool; it connects on the first query."""
        kwargs = connect_kwargs(self._settings)
        kwargs["server_settings"] = {**kwargs["server_settings"], "application_name": "tm-api"}
        self._pool = await asyncpg.create_pool(
            **kwargs,
            min_size=0,
            max_size=POOL_SIZE,
            max_inactive_connection_lifetime=self._settings.idle_timeout_ms / 1000 or 0,
        )

    async def close(self, timeout_s: float) -> None:
        """Close the connections gracefully, or terminate them after ``timeout_s``."""
        if self._pool is None:
            return
        try:
            await asyncio.wait_for(self._pool.close(), timeout_s)
        except TimeoutError:
            self._pool.terminate()

    def sizes(self) -> tuple[int, int]:
        """(open, idle) connections now; no query."""
        pool = self._pool
        if pool is None:
            return 0, 0
        return pool.get_size(), pool.get_idle_size()

    async def server(self, *, timeout_s: float) -> Server:
        row = await self._fetch(SERVER_SQL, one=True, timeout_s=timeout_s)
        if row is None:
            return Server(has_table=False, version="")
        return Server(has_table=bool(row[0]), version=str(row[1]))

    async def web_crawl_metrics(self, hours: int) -> tuple[int, int, int, int]:
        """(new, completed, error, total) tasks created in the last ``hours``: one call."""
        row = await self._fetch(METRICS_SQL, hours, one=True)
        if row is None:
            return 0, 0, 0, 0
        return int(row[0]), int(row[1]), int(row[2]), int(row[3])

    async def last_prune_run(self) -> PruneRun | None:
        """The last ``tm db prune`` run recorded; None before the first."""
        row = await self._fetch(PRUNE_SQL, one=True)
        if row is None:
            return None
        return PruneRun(
            finished_at_s=float(row[0]),
            deleted_rows=int(row[1]),
            duration_s=float(row[2]),
            batches=int(row[3]),
            is_complete=bool(row[4]),
            deleted_rows_total=int(row[5]),
        )

    async def task(self, task_id: str) -> Row | None:
        row: Row | None = await self._fetch(TASK_SQL, task_id, one=True)
        return row

    async def tasks(
        self, *, status: str | None, after: tuple[datetime, str] | None, limit: int
    ) -> list[Row]:
        """Up to ``limit`` tasks, newest first, strictly after the ``after`` position."""
        args: list[Any] = [limit]
        if status is not None:
            args.append(status)
        if after is not None:
            args.extend(after)
        sql = list_sql(status=status is not None, after=after is not None)
        rows = await self._fetch(sql, *args)
        return list(rows)

    async def _fetch(
        self, sql: str, *args: Any, one: bool = False, timeout_s: float = QUERY_TIMEOUT_S
    ) -> Any:
        pool = self._pool
        if pool is None:
            raise DatabaseUnavailableError("the API's pool is not open")
        async with translated(pool), pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
            if one:
                return await conn.fetchrow(sql, *args, timeout=timeout_s)
            return await conn.fetch(sql, *args, timeout=timeout_s)
