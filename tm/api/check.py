"""The cached result of a background dependency check, and how old it may get.

Probes never reach a dependency themselves: a background loop checks PostgreSQL and Kafka every
few seconds and stores a :class:`Check`; a probe reads it with its age. A check that has not been
refreshed for :data:`STALE_AFTER_S` counts as down, so a hung check loop cannot keep a pod ready.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

# A check older than this is down: three missed rounds of the slowest loop (interval + timeout).
STALE_AFTER_S = 15.0


@dataclass(frozen=True, slots=True)
class Check:
    """One answer of a dependency: up or down, how long it took, what it said."""

    is_up: bool
    response_time_ms: float
    checked_at: float  # time.monotonic() when the answer came
    checked_at_wall: float  # time.time() of the same moment, for display
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def pending(cls) -> Check:
        """Before the first answer."""
        return cls(
            is_up=False,
            response_time_ms=0.0,
            checked_at=time.monotonic(),
            checked_at_wall=time.time(),
            error="not checked yet",
        )

    @classmethod
    def now(
        cls,
        *,
        is_up: bool,
        started: float,
        error: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> Check:
        """An answer that arrived just now, for a check begun at ``started`` (monotonic)."""
        done = time.monotonic()
        return cls(
            is_up=is_up,
            response_time_ms=round((done - started) * 1000, 3),
            checked_at=done,
            checked_at_wall=time.time(),
            error=error,
            details=details or {},
        )

    def age_s(self, now: float) -> float:
        return max(0.0, now - self.checked_at)

    def is_up_at(self, now: float) -> bool:
        """Up, and fresh enough to be believed."""
        return self.is_up and self.age_s(now) <= STALE_AFTER_S

    def error_at(self, now: float) -> str | None:
        if self.is_up and not self.is_up_at(now):
            return f"no answer from the check for {self.age_s(now):.0f} s"
        return self.error
