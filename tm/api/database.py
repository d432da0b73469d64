"""PostgreSQL as the API process sees it: the background check of the health probes, and the
queries of the handlers, run through the API's own pool (:mod:`tm.adapters.api_database`).

A loop asks the server every :data:`PING_INTERVAL_S` whether it answers and the schema is
migrated, and keeps the answer (:class:`~tm.api.check.Check`); health probes read it and never
query. The queries raise tm's errors (DatabaseUnavailableError when the database is down or slow).
The SQL and its constants are the adapter's, named here too for the benchmark and the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime
from typing import Any

from tm.adapters.api_database import (
    LIST_RESULT_CHARS,
    POOL_SIZE,
    TASK_SQL,
    PruneRun,
    ReadPool,
    Row,
    list_sql,
)
from tm.api.check import Check
from tm.connections import PostgresSettings
from tm.errors import DatabaseUnavailableError

__all__ = ["LIST_RESULT_CHARS", "TASK_SQL", "ApiDatabase", "PruneRun", "Row", "list_sql"]

log = logging.getLogger("tm.api")

PING_INTERVAL_S = 2.0
PING_TIMEOUT_S = 2.0  # a check that takes longer is a failed check
_NO_TABLE = "table web_crawl_tasks is missing: run `tm db migrate`"


class ApiDatabase:
    def __init__(self, settings: PostgresSettings) -> None:
        self._settings = settings
        self._pool = ReadPool(settings)
        self._pinger: asyncio.Task[None] | None = None
        self.check = Check.pending()

    async def start(self) -> None:
        """Create the pool (no connection yet) and start the background check."""
        await self._pool.start()
        self._pinger = asyncio.create_task(self._ping_loop(), name="tm-api-db-check")

    async def close(self, timeout_s: float = 5.0) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pinger
        await self._pool.close(timeout_s)

    # -- the background check ----------------------------------------------------------------

    async def _ping_loop(self) -> None:
        while True:
            previous = self.check
            self.check = await self._ping()
            if previous.is_up and not self.check.is_up:
                log.warning("database check failed", extra={"fields": {"error": self.check.error}})
            elif not previous.is_up and self.check.is_up and previous.error != "not checked yet":
                log.info("database check passes again")
            await asyncio.sleep(PING_INTERVAL_S)

    async def _ping(self) -> Check:
        started = time.monotonic()
        try:
            async with asyncio.timeout(PING_TIMEOUT_S):
                server = await self._pool.server(timeout_s=PING_TIMEOUT_S)
        except TimeoutError:
            return Check.now(is_up=False, started=started, error="timed out")
        except DatabaseUnavailableError as exc:
            return Check.now(is_up=False, started=started, error=str(exc))
        except Exception as exc:  # a check must not die: report what broke
            return Check.now(is_up=False, started=started, error=type(exc).__name__)
        return Check.now(
            is_up=server.has_table,
            started=started,
            error=None if server.has_table else _NO_TABLE,
            details={"tableAccessible": server.has_table, "serverVersion": server.version},
        )

    def pool_details(self) -> dict[str, Any]:
        """The pool as it is now (no query)."""
        size, idle = self._pool.sizes()
        return {
            "connectionPoolSize": POOL_SIZE,
            "openConnections": size,
            "idleConnections": idle,
            "activeConnections": size - idle,
            "host": self._settings.host,
            "port": self._settings.port,
            "database": self._settings.database,
        }

    # -- queries -----------------------------------------------------------------------------

    async def web_crawl_metrics(self, hours: int) -> tuple[int, int, int, int]:
        """(new, completed, error, total) tasks created in the last ``hours``: one call."""
        return await self._pool.web_crawl_metrics(hours)

    async def last_prune_run(self) -> PruneRun | None:
        """The last ``tm db prune`` run recorded (None before the first): one row."""
        return await self._pool.last_prune_run()

    async def task(self, task_id: str) -> Row | None:
        return await self._pool.task(task_id)

    async def tasks(
        self, *, status: str | None, after: tuple[datetime, str] | None, limit: int
    ) -> list[Row]:
        """Up to ``limit`` tasks, newest first, strictly after the ``after`` position."""
        return await self._pool.tasks(status=status, after=after, limit=limit)
