"""What a soak's samples say: a (Theil-Sen) slope per series after the warm-up, the growth it
means over the run, the verdict (DESIGN §8: "no growth over a soak, < 5 % after warm-up"), and
the unmistakable leaks the short soak in ``make test`` fails on. Pure: numbers in, numbers out.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

LEAK_GROWTH = 0.05  # growth after warm-up, over the run, that counts as a leak

# What the short soak fails on: a series that never went down after the warm-up and rose by
# more than this. Generous on purpose: a pool opening connections up to its size, a worker
# growing its thread pool, a new label set in the metric files are all far below it.
UNBOUNDED = {"fds": 40.0, "pg_connections": 8.0, "metric_files": 8.0, "metric_kib": 1024.0}


@dataclass
class Series:
    """One quantity over time: ``kind`` groups series for plots and verdicts (``rss_mib``,
    ``pss_mib``, ``fds``, ``threads``, ``pg_connections``, ``metric_kib``, ``metric_files``,
    ``lag``, ``throughput``); ``floor`` is the smallest base a relative growth is taken of."""

    name: str
    kind: str
    unit: str
    floor: float = 1.0
    judged: bool = True  # throughput is shown, not judged
    times: list[float] = field(default_factory=list)  # seconds since the soak started
    values: list[float] = field(default_factory=list)

    def add(self, t: float, value: float) -> None:
        self.times.append(t)
        self.values.append(value)

    def after(self, warmup_s: float) -> tuple[list[float], list[float]]:
        pairs = [(t, v) for t, v in zip(self.times, self.values, strict=True) if t >= warmup_s]
        return [t for t, _ in pairs], [v for _, v in pairs]


@dataclass(frozen=True)
class Trend:
    """A straight line through the samples after the warm-up (:func:`fit`)."""

    samples: int
    slope_per_s: float
    start: float  # the line at the first sample after the warm-up
    end: float  # the line at the last sample
    growth: float  # (end - start) / max(start, floor): a fraction
    ok: bool

    @property
    def slope_per_min(self) -> float:
        return self.slope_per_s * 60


def fit(times: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
    """A straight line ``value = a + b * t`` by Theil-Sen: ``b`` is the median of the slopes
    between every two samples, ``a`` the median of ``value - b * t``. Unlike least squares it
    is not tilted by a few samples off the line (a pool that opens one more connection for
    half a minute near the end, a lag spike): a leak moves most pairs, a blip moves few."""
    n = len(times)
    if n == 0:
        return math.nan, math.nan
    slopes = [
        (values[j] - values[i]) / (times[j] - times[i])
        for i in range(n)
        for j in range(i + 1, n)
        if times[j] != times[i]
    ]
    b = statistics.median(slopes) if slopes else 0.0
    a = statistics.median(v - b * t for t, v in zip(times, values, strict=True))
    return a, b


def trend(series: Series, warmup_s: float) -> Trend | None:
    """The trend after ``warmup_s``; None with fewer than three samples there."""
    times, values = series.after(warmup_s)
    if len(times) < 3:
        return None
    a, b = fit(times, values)
    start, end = a + b * times[0], a + b * times[-1]
    growth = (end - start) / max(abs(start), series.floor)
    return Trend(len(times), b, start, end, growth, growth < LEAK_GROWTH)


def unbounded(series: Sequence[Series], warmup_s: float) -> list[str]:
    """The series of the kinds in UNBOUNDED that rose at every step after the warm-up (never
    down) by more than their threshold: a leak nobody could call noise."""
    found = []
    for s in series:
        threshold = UNBOUNDED.get(s.kind)
        if threshold is None:
            continue
        _, values = s.after(warmup_s)
        if len(values) < 3:
            continue
        never_down = all(b >= a for a, b in itertools.pairwise(values))
        rise = values[-1] - values[0]
        if never_down and rise > threshold:
            found.append(
                f"{s.name}: {values[0]:g} -> {values[-1]:g} {s.unit} over {len(values)} samples,"
                f" never down (threshold {threshold:g})"
            )
    return found
