"""The worker's two client threads, each call bounded.

The Kafka consumer is driven from the poll thread (``poll``, ``close``: rebalance and commit
callbacks run inside those calls); the producer's acknowledgements are awaited in the io thread.
A call that runs longer than its thread's bound is hung: librdkafka has calls that can block
past their own timeout (``send_offsets_to_transaction`` while the group coordinator is
unreachable, for one), and a C call cannot be cancelled. :meth:`ClientThreads.run` then raises
:class:`HungCallError`, and the worker exits without touching its clients again; the supervisor
starts a new one (whose transactional producer, exactly-once, fences the old one and aborts its
open transaction). Nothing is lost: what the hung call was for was not committed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, NoReturn, TypeVar

from tm.errors import FatalError

T = TypeVar("T")
Thread = Literal["poll", "io"]

REVOKE_BUDGET_S = 20.0  # time given to the in-flight batches on revoke; < session timeout
# A poll returns within its timeout unless a rebalance callback runs inside it, which may wait
# REVOKE_BUDGET_S for the batches in flight and then commit.
POLL_BOUND_S = REVOKE_BUDGET_S + 40.0
IO_BOUND_MARGIN_S = 5.0  # added to the longest an io call may take by its own bounds
WATCH_INTERVAL_S = 1.0  # how often a watched thread's call is asked whether it is overdue

# Asked with time.monotonic(): what the client call now running in the thread has overrun (its
# name and timeout), or None. The transactional sink times each librdkafka call it makes.
Overdue = Callable[[float], str | None]


class HungCallError(FatalError):
    """A client call ran past its thread's bound; the thread is still in it."""


class ClientThreads:
    def __init__(self, *, slot: int, io_bound_s: float) -> None:
        """``io_bound_s``: the longest an io call may take by its own bounds (a flush: the Kafka
        request timeout; exactly-once, a transaction's commit and the abort after it)."""
        self._executors: dict[Thread, ThreadPoolExecutor] = {
            "poll": ThreadPoolExecutor(1, thread_name_prefix=f"tm-poll-{slot}"),
            "io": ThreadPoolExecutor(1, thread_name_prefix=f"tm-io-{slot}"),
        }
        self.bound_s: dict[Thread, float] = {
            "poll": POLL_BOUND_S,
            "io": io_bound_s + IO_BOUND_MARGIN_S,
        }
        self.hung: str | None = None  # what ran past its bound, once one did
        self._watches: dict[Thread, Overdue] = {}
        self.watch_interval_s = WATCH_INTERVAL_S

    def watch(self, thread: Thread, overdue: Overdue) -> None:
        """Ask ``overdue`` every :data:`WATCH_INTERVAL_S` while a call runs in ``thread``: a
        call is hung as soon as it says so, before the thread's bound."""
        self._watches[thread] = overdue

    async def run(self, thread: Thread, call: Callable[..., T], *args: Any) -> T:
        """Run a blocking client call in the thread; HungCallError if it runs past the
        thread's bound, and from then on at once for any call (the threads are not free)."""
        if self.hung is not None:
            raise HungCallError(self.hung)
        loop = asyncio.get_running_loop()
        bound_s = self.bound_s[thread]
        future = loop.run_in_executor(self._executors[thread], call, *args)
        overdue = self._watches.get(thread)
        if overdue is None:
            timeout = asyncio.timeout(bound_s)
            try:
                async with timeout:
                    return await future
            except TimeoutError:
                if not timeout.expired():
                    raise  # the call's own TimeoutError
                self._hang(thread, call, f"has not returned after {bound_s:.0f} s")
        deadline = time.monotonic() + bound_s
        while True:
            done, _ = await asyncio.wait({future}, timeout=self.watch_interval_s)
            if done:
                return future.result()
            now = time.monotonic()
            late = overdue(now)
            if late is not None:
                self._hang(thread, call, f"is stuck in {late}")
            if now >= deadline:
                self._hang(thread, call, f"has not returned after {bound_s:.0f} s")

    def _hang(self, thread: Thread, call: Callable[..., Any], how: str) -> NoReturn:
        name = getattr(call, "__qualname__", repr(call))
        self.hung = f"{name} {how} in the {thread} thread"
        raise HungCallError(self.hung) from None

    def shutdown(self) -> None:
        for executor in self._executors.values():
            executor.shutdown(wait=False)
