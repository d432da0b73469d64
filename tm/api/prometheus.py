"""``GET /metrics``: tm's own metrics, aggregated over every live process, plus the consumer
group's lag per partition.

The lag is not recorded by the workers: in multiprocess mode a gauge's series cannot be removed
when a partition is revoked. The API process computes it instead, from the group's committed
offsets and the partitions' high watermarks, read in the background by
:class:`~tm.api.kafka_watch.KafkaWatch`; a scrape reads the last answer and never waits for the
broker. A stale answer (Kafka unreachable) is not served: the series disappear rather than lie.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tm.api.context import api_of
from tm.api.kafka_watch import KafkaWatch
from tm.api.responses import prometheus_response
from tm.api.state import StateReader
from tm.observability import metrics as tm_metrics

LAG_METRIC = "tm_consumer_lag_messages"
COMMITTED_METRIC = "tm_consumer_committed_offset"


class LagCollector(Collector):
    """``tm_consumer_lag_messages{partition}``: high watermark minus committed offset, and
    ``tm_consumer_committed_offset{partition}``: the committed offset itself."""

    def __init__(self, watch: KafkaWatch) -> None:
        self._watch = watch

    def collect(self) -> Iterator[Metric]:
        lag = self._watch.lag
        if not lag.is_fresh(time.monotonic()):
            return
        family = GaugeMetricFamily(
            LAG_METRIC,
            "Messages of the task-status topic not yet committed by the consumer group, per "
            "partition (high watermark minus committed offset)",
            labels=["partition"],
        )
        for partition, value in sorted(lag.by_partition.items()):
            family.add_metric([str(partition)], value)
        yield family
        committed = GaugeMetricFamily(
            COMMITTED_METRIC,
            "The consumer group's committed offset per partition of the task-status topic (its"
            " low watermark while the group has committed nothing there)",
            labels=["partition"],
        )
        for partition, value in sorted(lag.committed.items()):
            committed.add_metric([str(partition)], value)
        yield committed


class SupervisorCollector(Collector):
    """The supervisor's metrics (workers, restarts, start-up time), from its latest state line."""

    def __init__(self, state: StateReader) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        current = self._state.current
        if not current.started_at:
            return
        workers = current.workers
        yield from tm_metrics.supervisor_families(
            configured=len(workers),
            running=sum(1 for w in workers if w.pid),
            assigned=sum(1 for w in workers if w.pid and w.joined),
            startup_s=current.startup_s,
            restarts_total=current.restarts_total,
        )


def build_registry(watch: KafkaWatch, state: StateReader) -> CollectorRegistry:
    """The files of every live tm process (when in multiprocess mode, as under ``tm run``), the
    lag collector and the supervisor's metrics."""
    registry = tm_metrics.aggregated_registry()
    registry.register(LagCollector(watch))
    registry.register(SupervisorCollector(state))
    return registry


async def metrics(request: web.Request) -> web.Response:
    registry = api_of(request).registry
    # Reading every process's files is disk and CPU work: keep it off the event loop.
    body = await asyncio.to_thread(generate_latest, registry)
    return prometheus_response(body)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)
