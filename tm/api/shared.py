"""One answer shared between requests: what the status page reads, however many browsers keep it
open.

An answer is kept for its time to live, and requests that come while it is being read wait for
that one read instead of starting their own; a client that goes away does not cancel the read
the others wait for. Failures are not kept: the next request tries again. The task counts
(:mod:`tm.api.counts`) keep one per window.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Shared(Generic[T]):
    """The answer of ``read()``, shared for ``ttl_s`` seconds and between concurrent callers."""

    def __init__(self, read: Callable[[], Awaitable[T]], *, ttl_s: float) -> None:
        self._read = read
        self._ttl_s = ttl_s
        self._answer: tuple[float, T] | None = None  # (time.monotonic() it was read, answer)
        self._pending: asyncio.Task[T] | None = None

    async def get(self) -> T:
        if self._answer is not None and time.monotonic() - self._answer[0] <= self._ttl_s:
            return self._answer[1]
        if self._pending is None:
            self._pending = asyncio.create_task(self._keep())
            self._pending.add_done_callback(self._done)
        return await asyncio.shield(self._pending)

    async def _keep(self) -> T:
        answer = await self._read()
        self._answer = (time.monotonic(), answer)
        return answer

    def _done(self, task: asyncio.Task[T]) -> None:
        self._pending = None
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have gone away
