"""The answers of ``get_web_crawl_metrics(hours)``, shared between requests.

The count is the one API query whose cost grows with the table: it reads every index entry of
the window (about 330,000 for 24 h of a 1,000,000-task table spread over 72 h). So requests for the
same window within :data:`COUNTS_TTL_S` get the same counts, and concurrent requests wait for one
query instead of starting their own: several dashboards and scrapers cost one count per window.
"""

from __future__ import annotations

import asyncio
import time

from tm.api.database import ApiDatabase

COUNTS_TTL_S = 5.0  # < the 15 s scrape interval: each scrape sees fresh counts
COUNTS_CACHED_WINDOWS = 32  # distinct `hours` values kept; beyond, the oldest is dropped

Counts = tuple[int, int, int, int]  # new, completed, error, total


class SharedCounts:
    """``get_web_crawl_metrics(hours)`` answers, shared for :data:`COUNTS_TTL_S` and between
    concurrent requests. Failures are not kept: the next request tries again."""

    def __init__(self, database: ApiDatabase) -> None:
        self._database = database
        self._answers: dict[int, tuple[float, float, Counts]] = {}  # hours -> (at, wall, counts)
        self._pending: dict[int, asyncio.Task[tuple[float, Counts]]] = {}

    async def get(self, hours: int) -> tuple[float, Counts]:
        """(unix time the counts were read, counts)."""
        answer = self._answers.get(hours)
        if answer is not None and time.monotonic() - answer[0] <= COUNTS_TTL_S:
            return answer[1], answer[2]
        task = self._pending.get(hours)
        if task is None:
            task = asyncio.create_task(self._read(hours))
            self._pending[hours] = task
            task.add_done_callback(lambda done: self._done(hours, done))
        # A client that goes away must not cancel the query the others wait for.
        return await asyncio.shield(task)

    def _done(self, hours: int, task: asyncio.Task[tuple[float, Counts]]) -> None:
        self._pending.pop(hours, None)
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have gone away

    async def _read(self, hours: int) -> tuple[float, Counts]:
        counts = await self._database.web_crawl_metrics(hours)
        wall = time.time()
        self._answers.pop(hours, None)
        self._answers[hours] = (time.monotonic(), wall, counts)
        while len(self._answers) > COUNTS_CACHED_WINDOWS:
            del self._answers[next(iter(self._answers))]
        return wall, counts
