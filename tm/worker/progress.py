"""A worker's progress line: every TM_PROGRESS_INTERVAL_S, what it did since the last one
(messages applied by outcome, dead letters by reason, the rate, the lag of its partitions, the
p99 of the end-to-end latency), at info level, and only when something happened. Counted per
acknowledged batch, from what the batch's metrics already computed: nothing per message."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from tm.errors import TmError
from tm.observability.metrics import LATENCY_BUCKETS_S
from tm.pipeline import BatchRecord

log = logging.getLogger("tm.worker")


class Progress:
    def __init__(self, interval_s: float, *, now: float, slot: int = 0) -> None:
        self.interval_s = interval_s  # 0: no progress lines
        self._slot = slot  # the worker's, first in its line
        self._reset(now)

    def _reset(self, now: float) -> None:
        self._since = now
        self._messages = 0
        self._outcomes: Counter[str] = Counter()
        self._dead_letters: Counter[str] = Counter()
        self._latency_buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)

    def add(self, batch: BatchRecord, latency_buckets: list[int]) -> None:
        """An acknowledged batch, and how many of its messages fell in each end-to-end latency
        bucket (tm.worker.report.record)."""
        self._messages += batch.size
        self._outcomes.update(batch.outcomes)
        self._dead_letters.update(batch.dead_letters)
        for index, count in enumerate(latency_buckets):
            self._latency_buckets[index] += count

    def take(self, now: float, *, lag: int | None) -> dict[str, Any] | None:
        """The line's fields for the interval that ends ``now`` (None if no message was
        applied in it), and a new interval. ``lag``: messages behind on the partitions the
        worker owns (None: unknown)."""
        elapsed = max(now - self._since, 1e-9)
        fields: dict[str, Any] | None = None
        if self._messages:
            fields = {
                "slot": self._slot,
                "applied": self._messages,
                **dict(sorted(self._outcomes.items())),
                **{f"dlq_{reason}": n for reason, n in sorted(self._dead_letters.items())},
                "rate_per_s": round(self._messages / elapsed, 1),
                "lag": lag,
                "e2e_p99_ms": quantile_ms(self._latency_buckets, 0.99),
            }
        self._reset(now)
        return fields


async def log_progress(progress: Progress, lag: Callable[[], Awaitable[int]]) -> None:
    """Forever, every progress interval: the line of what the worker did, if anything.
    ``lag()``: messages behind on its partitions (a read in the consumer's thread)."""
    if progress.interval_s <= 0:
        return
    while True:
        await asyncio.sleep(progress.interval_s)
        try:
            behind: int | None = await lag()
        except TmError:
            behind = None
        fields = progress.take(time.monotonic(), lag=behind)
        if fields is not None:
            log.info("progress", extra={"fields": fields})


def quantile_ms(buckets: list[int], q: float) -> float | None:
    """The ``q`` quantile, in milliseconds, of values counted in LATENCY_BUCKETS_S's buckets
    (the last: above them), interpolated linearly within its bucket as Prometheus'
    histogram_quantile does; above the last bound, that bound. None when nothing is counted."""
    total = sum(buckets)
    if not total:
        return None
    rank = q * total
    seen = 0
    lower = 0.0
    for index, count in enumerate(buckets):
        if index == len(LATENCY_BUCKETS_S):  # above every bound: say the last one
            return LATENCY_BUCKETS_S[-1] * 1000
        upper = LATENCY_BUCKETS_S[index]
        if count and seen + count >= rank:
            return round((lower + (upper - lower) * (rank - seen) / count) * 1000, 1)
        seen += count
        lower = upper
    return LATENCY_BUCKETS_S[-1] * 1000
