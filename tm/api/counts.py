"""The answers of ``get_web_crawl_metrics(hours)``, shared between requests.

The count is the one API query whose cost grows with the table: it reads every index entry of
the window (about 330,000 for 24 h of a 1,000,000-task table spread over 72 h). So requests for the
same window within :data:`COUNTS_TTL_S` get the same counts, and concurrent requests wait for one
query instead of starting their own: several dashboards and scrapers cost one count per window.
The last ``tm db prune`` run, which the same endpoint exposes, is shared the same way.
"""

from __future__ import annotations

import functools
import time

from tm.api.database import ApiDatabase, PruneRun
from tm.api.shared import Shared

COUNTS_TTL_S = 5.0  # < the 15 s scrape interval: each scrape sees fresh counts
COUNTS_CACHED_WINDOWS = 32  # distinct `hours` values kept; beyond, the least recently used goes

Counts = tuple[int, int, int, int]  # new, completed, error, total


class SharedCounts:
    """``get_web_crawl_metrics(hours)`` answers, one :class:`~tm.api.shared.Shared` per window:
    shared for :data:`COUNTS_TTL_S` and between concurrent requests; failures are not kept."""

    def __init__(self, database: ApiDatabase) -> None:
        self._database = database
        self._windows: dict[int, Shared[tuple[float, Counts]]] = {}  # the last used last
        self._prune = Shared(self._read_prune, ttl_s=COUNTS_TTL_S)

    async def get(self, hours: int) -> tuple[float, Counts]:
        """(unix time the counts were read, counts)."""
        shared = self._windows.pop(hours, None)
        if shared is None:
            shared = Shared(functools.partial(self._read, hours), ttl_s=COUNTS_TTL_S)
        self._windows[hours] = shared
        while len(self._windows) > COUNTS_CACHED_WINDOWS:
            del self._windows[next(iter(self._windows))]
        return await shared.get()

    async def last_prune_run(self) -> PruneRun | None:
        """The last ``tm db prune`` run recorded; None before the first."""
        return await self._prune.get()

    async def _read_prune(self) -> PruneRun | None:
        return await self._database.last_prune_run()

    async def _read(self, hours: int) -> tuple[float, Counts]:
        counts = await self._database.web_crawl_metrics(hours)
        return time.time(), counts
