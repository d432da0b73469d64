"""Decisions about failures, pure and clock-free: how long to back off, when dead-lettering has
gone too far, and how to split a batch to isolate a row the database refuses.
"""

from __future__ import annotations

import math

from tm.errors import FatalError

# A run of this many rows refused by PostgreSQL in a row, with nothing applied between, is a bad
# deploy (schema and code disagree), not bad data: crash instead of draining the topic into the
# dead-letter topic.
MAX_CONSECUTIVE_ROW_REJECTIONS = 100


def backoff_s(attempt: int, *, initial_s: float, cap_s: float, jitter: float) -> float:
    """Delay before retry number ``attempt`` (0-based): exponential, capped, with ``jitter`` in
    [0, 1) taking up to half of it off so that many workers do not retry in step."""
    delay = min(cap_s, math.ldexp(initial_s, min(attempt, 32)))
    return delay * (1.0 - 0.5 * jitter)


def halves(start: int, stop: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Split the row range [start, stop) of a failed batch in two, to find the refused row."""
    middle = (start + stop) // 2
    return (start, middle), (middle, stop)


class RowRejectionLimit:
    """Counts consecutive refused rows; raises FatalError past the limit."""

    def __init__(self, limit: int = MAX_CONSECUTIVE_ROW_REJECTIONS) -> None:
        self._limit = limit
        self._consecutive = 0

    def record(self, *, rejected: int, applied: int) -> None:
        self._consecutive = rejected if applied else self._consecutive + rejected
        if self._consecutive > self._limit:
            raise FatalError(
                f"{self._consecutive} rows in a row were refused by PostgreSQL; "
                "the schema and this tm probably disagree"
            )
