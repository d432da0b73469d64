"""Decisions about failures, pure and clock-free: how long to back off, when dead-lettering has
gone too far, and how to split a batch to isolate a row the database refuses.
"""

from __future__ import annotations

import math

from tm.errors import FatalError

# The bad-deploy stop (arroyo's DlqLimit, counted in whole batches). Data never stops a worker:
# a batch in which PostgreSQL applied any row shows that the schema and this tm agree, however
# many of its other rows it refused (crawled pages are full of bytes it cannot store). Only when
# it applies nothing at all, batch after batch, do they probably disagree (a constraint or a
# trigger this tm's rows cannot satisfy): then the worker stops rather than drain the topic into
# the dead-letter topic.
# Batches in a row with every row refused: a batch is one poll, and a burst from one broken
# producer can fill one or two polls on its own; five polls in a row without one good row among
# them is no longer a burst.
REFUSED_BATCHES_TO_STOP = 5
# Rows refused in all over those batches: on a quiet topic five lone bad messages are five
# one-row batches, and bad data still.
REFUSED_ROWS_TO_STOP = 100


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
    """Counts the batches in a row in which PostgreSQL refused every row; raises FatalError
    once there are ``batches`` of them with ``rows`` refused rows in all. A batch with any
    row applied ends the run."""

    def __init__(
        self, *, batches: int = REFUSED_BATCHES_TO_STOP, rows: int = REFUSED_ROWS_TO_STOP
    ) -> None:
        self._batches = batches
        self._rows = rows
        self._run_batches = 0
        self._run_rows = 0

    def record(self, *, rejected: int, applied: int) -> None:
        """One batch went through the database: ``rejected`` rows refused, ``applied`` not."""
        if applied or not rejected:
            self._run_batches = self._run_rows = 0
            return
        self._run_batches += 1
        self._run_rows += rejected
        if self._run_batches >= self._batches and self._run_rows >= self._rows:
            raise FatalError(
                f"every row of {self._run_batches} batches in a row ({self._run_rows} rows) was "
                "refused by PostgreSQL; the schema and this tm probably disagree"
            )
