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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

from tm.errors import FatalError

T = TypeVar("T")
Thread = Literal["poll", "io"]

REVOKE_BUDGET_S = 20.0  # time given to the in-flight batches on revoke; < session timeout
# A poll returns within its timeout unless a rebalance callback runs inside it, which may wait
# REVOKE_BUDGET_S for the batches in flight and then commit.
POLL_BOUND_S = REVOKE_BUDGET_S + 40.0
IO_BOUND_MARGIN_S = 5.0  # added to the longest an io call may take by its own bounds


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

    async def run(self, thread: Thread, call: Callable[..., T], *args: Any) -> T:
        """Run a blocking client call in the thread; HungCallError if it runs past the
        thread's bound, and from then on at once for any call (the threads are not free)."""
        if self.hung is not None:
            raise HungCallError(self.hung)
        loop = asyncio.get_running_loop()
        bound_s = self.bound_s[thread]
        timeout = asyncio.timeout(bound_s)
        try:
            async with timeout:
                return await loop.run_in_executor(self._executors[thread], call, *args)
        except TimeoutError:
            if not timeout.expired():
                raise  # the call's own TimeoutError
            name = getattr(call, "__qualname__", repr(call))
            self.hung = f"{name} has not returned after {bound_s:.0f} s in the {thread} thread"
            raise HungCallError(self.hung) from None

    def shutdown(self) -> None:
        for executor in self._executors.values():
            executor.shutdown(wait=False)
