"""Every metric tm exports, declared once, with what it measures (DESIGN §6).

prometheus-client runs in multiprocess mode: ``tm run`` points ``PROMETHEUS_MULTIPROC_DIR`` at a
fresh directory before anything imports this module, each process (supervisor, workers, the API
process) writes its own files there, and ``GET /metrics`` aggregates them (:func:`render`). The
supervisor marks the files of a dead worker as dead (:func:`forget_process`), so its gauges
disappear. Per-partition lag is not recorded by workers (multiprocess mode cannot remove a
series when a partition is revoked): the API process computes it from the group's committed
offsets when scraped (``tm.api``).

Names take the ``tm_`` prefix and base units; only counters end in ``_total``. Buckets resolve
the targets of DESIGN §8: 100 ms per database call, 50 ms per message end to end.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

STAGE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000)

messages_consumed = Counter(
    "tm_messages_consumed_total", "Messages polled from the task-status topic and decoded"
)
messages_applied = Counter(
    "tm_messages_applied_total",
    "Messages applied in PostgreSQL, by outcome (created, duplicate, updated, unchanged, "
    "task_not_found, invalid_transition)",
    ["outcome"],
)
dead_letters = Counter(
    "tm_dead_letters_total", "Messages sent to the dead-letter topic, by reason", ["reason"]
)
batch_retries = Counter(
    "tm_batch_retries_total",
    "Batches that failed for a reason that may pass (database or Kafka unavailable) and were "
    "rewound to be tried again",
)
invalid_trace_context = Counter(
    "tm_invalid_trace_context_total",
    "Messages whose traceparent was invalid: the context was dropped, the message kept",
)
rebalances = Counter(
    "tm_rebalances_total", "Partition assignment changes seen by workers, by kind", ["kind"]
)
worker_restarts = Counter(
    "tm_worker_restarts_total", "Workers restarted by the supervisor after they died or hung"
)
batch_size = Histogram(
    "tm_batch_size_messages", "Messages per applied batch", buckets=BATCH_BUCKETS
)
stage_duration = Histogram(
    "tm_stage_duration_seconds",
    "Time per batch spent in a stage: decode, db (the set-based calls), publish (until "
    "acknowledged), commit",
    ["stage"],
    buckets=STAGE_BUCKETS_S,
)
end_to_end_latency = Histogram(
    "tm_end_to_end_latency_seconds",
    "Per message, from its Kafka timestamp to the commit of its batch",
    buckets=LATENCY_BUCKETS_S,
)
db_pool_connections = Gauge(
    "tm_db_pool_connections",
    "Connections of the workers' asyncpg pools, by state (in_use, idle)",
    ["state"],
    multiprocess_mode="livesum",
)
workers_assigned = Gauge(
    "tm_workers_assigned",
    "Workers that own at least one partition, as the supervisor last heard",
    multiprocess_mode="livemax",
)
workers_running = Gauge("tm_workers_running", "Worker processes alive", multiprocess_mode="livemax")
startup_seconds = Gauge(
    "tm_startup_seconds",
    "Seconds from the start of `tm run` until every worker first owned its partitions",
    multiprocess_mode="max",
)
resident_memory = Gauge(
    "tm_process_resident_memory_bytes",
    "Resident memory of each tm process (supervisor, workers, API); sum for the total",
    ["role"],
    multiprocess_mode="liveall",
)

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def record_memory(role: str) -> None:
    """Set this process's resident memory (the multiprocess mode has no process collector)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return
    resident_memory.labels(role).set(resident_pages * _PAGE_BYTES)


def observe_latencies(latencies_s: Iterable[float]) -> None:
    """Observe many end-to-end latencies at once: one bucket update per bucket, not per value
    (each update in multiprocess mode is a write to a memory-mapped file)."""
    values = sorted(latencies_s)
    if not values:
        return
    # prometheus-client has no bulk observe; these attributes are its Histogram's internals
    # (stable since 0.4). Bucket i counts values <= bound i and above bound i-1.
    bounds = end_to_end_latency._upper_bounds  # noqa: SLF001
    buckets = end_to_end_latency._buckets  # noqa: SLF001
    start = 0
    for index, bound in enumerate(bounds):
        stop = bisect.bisect_right(values, bound, lo=start)
        if stop > start:
            buckets[index].inc(stop - start)
        start = stop
        if start == len(values):
            break
    end_to_end_latency._sum.inc(sum(values))  # noqa: SLF001


def render() -> tuple[bytes, str]:
    """The aggregated metrics of every live tm process, and their content type."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


def forget_process(pid: int) -> None:
    """Drop the live gauges of a process that exited."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
