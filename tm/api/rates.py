"""``GET /api/rates``: messages per second over the last minute, by outcome, and the end-to-end
p99, for the status page.

They come from tm's own metrics, the files ``GET /metrics`` aggregates: no database query, no
broker request. A rate needs two readings, so each answer keeps the totals it read, and the rate
is the difference from the oldest reading of the last :data:`WINDOW_S` seconds. Readings are
taken only when someone asks (the page polls every few seconds), and shared between requests for
:data:`RATES_TTL_S`: a page opened after a quiet spell shows rates over the few seconds it has
seen, ``windowS`` says over how many, and grows to a minute.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from tm.api.context import API_KEY
from tm.api.responses import json_response, now_iso
from tm.api.shared import Shared
from tm.core.messages import Outcome, Reason

WINDOW_S = 60.0  # rates are over the last minute
MIN_SPAN_S = 1.0  # two readings closer than this give no rate
RATES_TTL_S = 2.0  # < the page's refresh: every refresh sees a new reading
P99 = 0.99

CONSUMED = "tm_messages_consumed_total"
APPLIED = "tm_messages_applied_total"
DEAD_LETTERS = "tm_dead_letters_total"
LATENCY_BUCKET = "tm_end_to_end_latency_seconds_bucket"


@dataclass(frozen=True, slots=True)
class Totals:
    """The counters the page shows, summed over every tm process, at one moment."""

    at: float  # time.monotonic()
    consumed: float
    applied: dict[str, float]  # by outcome
    dead_letters: dict[str, float]  # by reason
    latency: dict[float, float]  # end-to-end latency: cumulative count per bucket's upper bound


def totals(families: Iterable[Metric], *, at: float) -> Totals:
    """The counters of ``families`` (a registry's collection); absent ones are zero."""
    consumed = 0.0
    applied = dict.fromkeys((o.value for o in Outcome), 0.0)
    dead_letters = dict.fromkeys((r.value for r in Reason), 0.0)
    latency: dict[float, float] = {}
    for family in families:
        for sample in family.samples:
            if sample.name == CONSUMED:
                consumed += sample.value
            elif sample.name == APPLIED:
                outcome = sample.labels["outcome"]
                applied[outcome] = applied.get(outcome, 0.0) + sample.value
            elif sample.name == DEAD_LETTERS:
                reason = sample.labels["reason"]
                dead_letters[reason] = dead_letters.get(reason, 0.0) + sample.value
            elif sample.name == LATENCY_BUCKET:
                bound = float(sample.labels["le"])
                latency[bound] = latency.get(bound, 0.0) + sample.value
    return Totals(
        at=at, consumed=consumed, applied=applied, dead_letters=dead_letters, latency=latency
    )


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The ``q`` quantile of a histogram given as cumulative counts per upper bound, as
    Prometheus's ``histogram_quantile`` estimates it: linear inside the bucket that holds it,
    the highest finite bound when it lies above them all. None when the histogram is empty."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _per_s(now: dict[str, float], then: dict[str, float], span_s: float) -> dict[str, float]:
    return {
        key: round(max(0.0, value - then.get(key, 0.0)) / span_s, 3) for key, value in now.items()
    }


def rates(then: Totals | None, now: Totals) -> dict[str, Any]:
    """The answer of ``/api/rates`` from two readings (``then`` None: the first one)."""
    body: dict[str, Any] = {
        "windowS": None,
        "consumedPerS": None,
        "appliedPerS": None,
        "deadLettersPerS": None,
        "endToEndP99Ms": None,
        "deadLettersTotal": {reason: int(value) for reason, value in now.dead_letters.items()},
    }
    if then is None or now.at - then.at < MIN_SPAN_S:
        return body
    span_s = now.at - then.at
    latency = {b: max(0.0, c - then.latency.get(b, 0.0)) for b, c in now.latency.items()}
    p99_s = quantile(P99, latency)
    body.update(
        windowS=round(span_s, 1),
        consumedPerS=round(max(0.0, now.consumed - then.consumed) / span_s, 3),
        appliedPerS=_per_s(now.applied, then.applied, span_s),
        deadLettersPerS=_per_s(now.dead_letters, then.dead_letters, span_s),
        endToEndP99Ms=None if p99_s is None else round(p99_s * 1000, 1),
    )
    return body


class Rates:
    """Readings of the last minute, taken when asked and shared between requests."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._readings: deque[Totals] = deque()
        self.shared = Shared(self._read, ttl_s=RATES_TTL_S)

    async def _read(self) -> dict[str, Any]:
        # Reading every process's files is disk and CPU work: keep it off the event loop.
        families = await asyncio.to_thread(lambda: list(self._registry.collect()))
        now = totals(families, at=time.monotonic())
        while self._readings and now.at - self._readings[0].at > WINDOW_S:
            self._readings.popleft()
        body = rates(self._readings[0] if self._readings else None, now)
        self._readings.append(now)
        return {**body, "timestamp": now_iso()}


RATES_KEY = web.AppKey("rates", Rates)


async def get_rates(request: web.Request) -> web.Response:
    return json_response(await request.app[RATES_KEY].shared.get())


def add_routes(app: web.Application) -> None:
    app[RATES_KEY] = Rates(app[API_KEY].registry)
    app.router.add_get("/api/rates", get_rates)
