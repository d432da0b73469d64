"""The database calls behind the HTTP API on a table of 1,000,000 tasks (DESIGN §8: < 100 ms p99):

    .venv/bin/python -m bench.api [--rows N] [--calls C] [--page P]

On a fresh migrated database it inserts N tasks with ``generate_series`` (statuses mixed: 25 %
new, 60 % completed, 15 % error; ``created_at`` spread uniformly over the last 72 h), runs
``VACUUM ANALYZE`` (as autovacuum would after such a load), then times C calls of each of the API's
database calls through the API's own :class:`~tm.api.database.ApiDatabase` (its pool, its SQL, its
timeouts), one call at a time:

  - ``get_web_crawl_metrics(24)`` (``/api/metrics``);
  - a task by id, random ids (``/api/tasks/{id}``);
  - a page of P tasks, no status: the first page, and pages after a random task's cursor
    (``/api/tasks?limit=P&after=...``);
  - the same with a random status.

It prints p50/p99/max per call as markdown on stdout, and the plan of each query (``EXPLAIN
(ANALYZE, BUFFERS)``; for the metrics function, the plan of the count it runs per status, since a
plpgsql-free SQL function's inner statements do not show in the caller's plan). The database is
dropped at the end, even on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg

from harness import stop_on_sigterm
from harness.report import machine, note, percentile
from harness.stack import Fresh
from tm import config
from tm.adapters import postgres
from tm.api import database as api_database
from tm.api.database import ApiDatabase
from tm.config import Settings

DEFAULT_ROWS = 1_000_000
DEFAULT_CALLS = 300
DEFAULT_PAGE = 100
WARMUP_CALLS = 10  # per call kind, not timed: connections, plans, caches
TARGET_P99_MS = 100.0
STATUSES = ("new", "completed", "error")
FILL_CHUNK_ROWS = 1_000_000  # rows an INSERT, each its own transaction, with a progress line

_FILL_SQL = """
INSERT INTO web_crawl_tasks (id, user_email, user_query, original_url, received_at, status,
                             result, finished_at, created_at, updated_at)
SELECT gen_random_uuid(),
       'user' || g.i || '@example.com',
       'query ' || (g.i % 97),
       'https://example.com/page/' || g.i,
       g.created_at,
       g.status,
       CASE g.status WHEN 'completed' THEN 'result of task ' || g.i
                     WHEN 'error' THEN 'timeout while crawling' END,
       CASE WHEN g.status <> 'new' THEN g.created_at + interval '30 seconds' END,
       g.created_at,
       g.created_at
FROM (
    SELECT i,
           now() - random() * interval '72 hours' AS created_at,  -- one draw per row
           CASE WHEN i % 20 < 5 THEN 'new'
                WHEN i % 20 < 17 THEN 'completed'
                ELSE 'error' END::task_status AS status
    FROM generate_series(1, $1::integer) AS i
) AS g
"""
# The one statement of get_web_crawl_metrics that reads the table: the tasks of the window's
# first minute from its start (the rest comes from the hourly and minute counters).
_COUNT_SQL = (
    "SELECT status, count(*) FROM web_crawl_tasks"
    " WHERE created_at >= now() - interval '1 hour' * $1"
    " AND created_at < date_trunc('minute', now() - interval '1 hour' * $1) + interval '1 minute'"
    " GROUP BY status"
)


def _percentiles(samples_s: list[float]) -> tuple[float, float, float]:
    """p50, p99 and the slowest, in milliseconds."""
    ms = sorted(s * 1000 for s in samples_s)
    return percentile(ms, 50), percentile(ms, 99), ms[-1]


async def _time(calls: int, call: Callable[[int], Awaitable[Any]]) -> list[float]:
    for n in range(WARMUP_CALLS):
        await call(n)
    samples = []
    for n in range(calls):
        started = time.perf_counter()
        await call(n)
        samples.append(time.perf_counter() - started)
    return samples


async def _explain(conn: asyncpg.Connection, sql: str, *args: Any) -> str:
    rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *args)
    return "\n".join(row[0] for row in rows)


async def run(settings: Settings, *, rows: int, calls: int, page: int) -> list[str]:
    out: list[str] = []
    # The fill and the VACUUM of millions of rows take longer than a query's deadline.
    conn = await asyncpg.connect(**postgres.connect_kwargs(settings.postgres, migrating=True))
    try:
        started = time.monotonic()
        for done in range(0, rows, FILL_CHUNK_ROWS):
            await conn.execute(_FILL_SQL, min(FILL_CHUNK_ROWS, rows - done))
            note(f"filled {min(done + FILL_CHUNK_ROWS, rows):,} of {rows:,} rows")
        filled_s = time.monotonic() - started
        started = time.monotonic()
        await conn.execute("VACUUM ANALYZE web_crawl_tasks")
        vacuum_s = time.monotonic() - started
        counts = await conn.fetch(
            "SELECT status::text, count(*) FROM web_crawl_tasks GROUP BY 1 ORDER BY 1"
        )
        spread = await conn.fetchrow(
            "SELECT count(DISTINCT created_at), min(created_at), max(created_at),"
            " count(*) FILTER (WHERE created_at >= now() - interval '24 hours')"
            " FROM web_crawl_tasks"
        )
        size = await conn.fetchval(
            "SELECT pg_size_pretty(pg_total_relation_size('web_crawl_tasks'))"
        )
        out.append(
            f"Table: {rows:,} rows ({', '.join(f'{r[0]} {r[1]:,}' for r in counts)}), {size}"
            f" with indexes; filled in {filled_s:.1f} s, VACUUM ANALYZE {vacuum_s:.1f} s."
            f" created_at: {spread[0]:,} distinct values from {spread[1]:%Y-%m-%d %H:%M} to"
            f" {spread[2]:%Y-%m-%d %H:%M} UTC, {spread[3]:,} in the last 24 h."
        )
        sample = await conn.fetch(
            "SELECT id::text, created_at FROM web_crawl_tasks TABLESAMPLE BERNOULLI (1)"
            " ORDER BY random() LIMIT $1",
            calls + WARMUP_CALLS,
        )
        ids = [str(r[0]) for r in sample]
        cursors: list[tuple[datetime, str]] = [(r[1], str(r[0])) for r in sample]
        rng = random.Random(7)
        statuses = [rng.choice(STATUSES) for _ in sample]

        db = ApiDatabase(settings.postgres)
        await db.start()
        try:
            kinds: list[tuple[str, Callable[[int], Awaitable[Any]]]] = [
                ("get_web_crawl_metrics(24)", lambda n: db.web_crawl_metrics(24)),
                ("task by id", lambda n: db.task(ids[n])),
                (
                    f"first page of {page}, no status",
                    lambda n: db.tasks(status=None, after=None, limit=page + 1),
                ),
                (
                    f"page of {page} after a random task, no status",
                    lambda n: db.tasks(status=None, after=cursors[n], limit=page + 1),
                ),
                (
                    f"first page of {page}, random status",
                    lambda n: db.tasks(status=statuses[n], after=None, limit=page + 1),
                ),
                (
                    f"page of {page} after a random task, random status",
                    lambda n: db.tasks(status=statuses[n], after=cursors[n], limit=page + 1),
                ),
            ]
            out += [
                "",
                f"{calls} timed calls per kind (after {WARMUP_CALLS} untimed), one at a time,"
                " through the API's ApiDatabase (asyncpg pool of 2, its SQL and timeouts):",
                "",
                "| call | p50 ms | p99 ms | max ms | target p99 < 100 ms |",
                "|---|---:|---:|---:|---|",
            ]
            for name, call in kinds:
                p50, p99, worst = _percentiles(await _time(calls, call))
                verdict = "met" if p99 < TARGET_P99_MS else "**missed**"
                out.append(f"| {name} | {p50:.2f} | {p99:.2f} | {worst:.2f} | {verdict} |")
        finally:
            await db.close()

        created_at, after_id = cursors[0]
        plans = [
            (
                "SELECT * FROM get_web_crawl_metrics(24)",
                "SELECT * FROM get_web_crawl_metrics(24)",
                (),
            ),
            ("the count of the window's first minute, as inside it", _COUNT_SQL, (24,)),
            ("task by id", api_database.TASK_SQL, (ids[0],)),
            (
                "first page, no status",
                api_database.list_sql(status=False, after=False),
                (page + 1,),
            ),
            (
                "page after a cursor, no status",
                api_database.list_sql(status=False, after=True),
                (page + 1, created_at, after_id),
            ),
            (
                "page after a cursor, status 'error'",
                api_database.list_sql(status=True, after=True),
                (page + 1, "error", created_at, after_id),
            ),
        ]
        out += ["", "Plans (EXPLAIN (ANALYZE, BUFFERS)):"]
        for title, sql, args in plans:
            plan = await _explain(conn, sql, *args)
            uses_index = "Index" in plan
            out += [
                "",
                f"{title}: {'uses an index' if uses_index else 'NO INDEX'}",
                "```",
                plan,
                "```",
            ]
    finally:
        await conn.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="N (1000000)")
    parser.add_argument("--calls", type=int, default=DEFAULT_CALLS, help="C per call kind (300)")
    parser.add_argument("--page", type=int, default=DEFAULT_PAGE, help="P tasks a page (100)")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.calls < 2 or not 1 <= args.page <= 1000:
        parser.error("--rows >= 1, --calls >= 2, --page in 1..1000")
    stop_on_sigterm()
    settings = config.load()
    stack = Fresh(settings)
    lines = ["# bench.api: the API's database calls", "", f"Command: `{shlex.join(sys.orig_argv)}`"]
    try:
        target = stack.database("tm_bench_api")
        facts = machine(settings)
        lines += ["", *(f"- {key}: {value}" for key, value in facts.items()), ""]
        lines += asyncio.run(run(target, rows=args.rows, calls=args.calls, page=args.page))
    finally:
        for problem in stack.cleanup():
            lines.append(f"cleanup: {problem}")
        print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
