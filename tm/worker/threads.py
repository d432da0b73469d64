"""The worker's two client threads, timed for the heartbeat.

The Kafka consumer is driven from the poll thread (``poll``, ``close``: rebalance and commit
callbacks run inside those calls); the producer's acknowledgements are awaited in the io thread.
A call that runs longer than its thread's bound counts as hung: the worker stops its heartbeats
and the supervisor kills and restarts it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

T = TypeVar("T")
Thread = Literal["poll", "io"]

REVOKE_BUDGET_S = 20.0  # time given to the in-flight batches on revoke; < session timeout
# A poll returns within its timeout unless a rebalance callback runs inside it, which may wait
# REVOKE_BUDGET_S for the batches in flight and then commit; io calls (flush, commit) are
# bounded by the Kafka request timeout, a transaction's commit or abort by the transaction
# timeout (exactly-once).
POLL_STUCK_AFTER_S = REVOKE_BUDGET_S + 40.0
IO_STUCK_MARGIN_S = 30.0  # added to the producer's flush bound for the io thread


class ClientThreads:
    def __init__(self, *, slot: int, io_bound_ms: int) -> None:
        """``io_bound_ms``: the longest an io call may take (the Kafka request timeout, or the
        transaction timeout in exactly-once mode)."""
        self._executors: dict[Thread, ThreadPoolExecutor] = {
            "poll": ThreadPoolExecutor(1, thread_name_prefix=f"tm-poll-{slot}"),
            "io": ThreadPoolExecutor(1, thread_name_prefix=f"tm-io-{slot}"),
        }
        # When the call now running in each thread began (None: idle).
        self.busy_since: dict[str, float | None] = {"poll": None, "io": None}
        self.stuck_after_s = {
            "poll": POLL_STUCK_AFTER_S,
            "io": io_bound_ms / 1000 + 5 + IO_STUCK_MARGIN_S,
        }

    async def run(self, thread: Thread, call: Callable[..., T], *args: Any) -> T:
        """Run a blocking client call in the thread, timing it."""
        self.busy_since[thread] = time.monotonic()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executors[thread], call, *args)
        finally:
            self.busy_since[thread] = None

    def stuck(self, now: float) -> dict[str, Any] | None:
        return stuck_thread(now, self.busy_since, self.stuck_after_s)

    def shutdown(self) -> None:
        for executor in self._executors.values():
            executor.shutdown(wait=False)


def stuck_thread(
    now: float, busy_since: dict[str, float | None], stuck_after_s: dict[str, float]
) -> dict[str, Any] | None:
    """The first thread whose current call has run longer than its bound, or None."""
    for thread, since in busy_since.items():
        if since is not None and now - since > stuck_after_s[thread]:
            return {"thread": thread, "busy_s": round(now - since, 1)}
    return None
