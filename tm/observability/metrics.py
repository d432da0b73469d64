"""Every metric tm exports, declared once, with what it measures (DESIGN §6).

prometheus-client runs in multiprocess mode: ``tm run`` points ``PROMETHEUS_MULTIPROC_DIR`` at a
fresh directory, the workers and the API process write their own files there, and ``GET
/metrics`` aggregates them (:func:`aggregated_registry`). The supervisor imports none of this:
a value it wrote would be inherited by every child it forks later. It reports to the API
process instead, which serves :func:`supervisor_families` from the supervisor's state and
records the supervisor's memory.
Counters and histograms of a dead worker stay in the sums; the supervisor marks its files dead,
so its live gauges disappear. Per-partition lag is not recorded by workers (multiprocess mode
cannot remove a series when a partition is revoked): the API process computes
``tm_consumer_lag_messages{partition}`` from the group's committed offsets and serves it beside
these (``tm.api.prometheus``).

Names take the ``tm_`` prefix and base units; only counters end in ``_total``. Buckets resolve
the targets of DESIGN §8: 100 ms per database call, 50 ms per message end to end. Labels whose
values are known in advance are created at import, at zero, so that ``rate()`` and ``increase()``
see a series's first increment and an alert can compare against "no progress". The alert rules
over these metrics are in ``k8s/prometheus/tm-alerts.yaml``.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tm.core.messages import Outcome, Reason

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# 0.1 and 0.05 are bounds, so "p99 above the target" is read from the bucket counts, not guessed
# by interpolation inside a wide bucket.
STAGE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000)

STAGES = ("decode", "db", "publish", "commit", "transaction")
REBALANCE_KINDS = ("assign", "revoke", "lost")
RESTARTED_ROLES = ("worker", "api")

messages_consumed = Counter(
    "tm_messages_consumed_total",
    "Messages consumed from the task-status topic, counted when their batch is committed",
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
    "tm_rebalances_total",
    "Partition assignment changes seen by workers, by kind (assign, revoke, lost)",
    ["kind"],
)
batch_size = Histogram(
    "tm_batch_size_messages", "Messages per committed batch", buckets=BATCH_BUCKETS
)
stage_duration = Histogram(
    "tm_stage_duration_seconds",
    "Time per batch spent in a stage: decode, db (the set-based calls), publish (until "
    "acknowledged), commit (at-least-once: the consumer's commit), transaction (exactly-once: "
    "the commit of the transaction holding the batch's outputs and offsets)",
    ["stage"],
    buckets=STAGE_BUCKETS_S,
)
transactions = Counter(
    "tm_transactions_total",
    "Exactly-once: Kafka transactions by outcome (committed, aborted) and, when aborted, by "
    "cause (the Kafka error's name, or batch_failed: the batch failed before its commit)",
    ["outcome", "cause"],
)
end_to_end_latency = Histogram(
    "tm_end_to_end_latency_seconds",
    "Per message, from its Kafka timestamp to the commit of its batch",
    buckets=LATENCY_BUCKETS_S,
)
task_events = Counter(
    "tm_task_events_total",
    "Task transitions for the Redis feed (REDIS_URL), by outcome: sent (in the stream and on "
    "the task's channel) or dropped (Redis slow or down, or the feed's queue full)",
    ["outcome"],
)
db_pool_connections = Gauge(
    "tm_db_pool_connections",
    "Connections of the live workers' asyncpg pools, by state (in_use, idle)",
    ["state"],
    multiprocess_mode="livesum",
)
resident_memory = Gauge(
    "tm_process_resident_memory_bytes",
    "Resident memory of each live tm process, by role (supervisor, worker, api) and pid",
    ["role"],
    multiprocess_mode="liveall",
)

for _outcome in Outcome:
    messages_applied.labels(_outcome.value)
for _reason in Reason:
    dead_letters.labels(_reason.value)
for _kind in REBALANCE_KINDS:
    rebalances.labels(_kind)
for _stage in STAGES:
    stage_duration.labels(_stage)
transactions.labels("committed", "")

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def record_memory(role: str, pid: int | None = None) -> None:
    """Set the resident memory of this process, or of ``pid`` (the multiprocess mode has no
    process collector)."""
    try:
        with open(f"/proc/{pid or 'self'}/statm", "rb") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return
    resident_memory.labels(role).set(resident_pages * _PAGE_BYTES)


def supervisor_families(
    *,
    configured: int,
    running: int,
    assigned: int,
    startup_s: float | None,
    restarts_total: dict[str, int],
) -> list[Metric]:
    """The supervisor's metrics, served by the API process from the supervisor's latest state
    line (the supervisor writes no metric files: its children would inherit them)."""
    families: list[Metric] = [
        GaugeMetricFamily(
            "tm_workers_configured",
            "Worker processes the supervisor keeps running (TM_WORKERS)",
            value=configured,
        ),
        GaugeMetricFamily("tm_workers_running", "Worker processes alive", value=running),
        GaugeMetricFamily(
            "tm_workers_assigned",
            "Live workers that have joined the consumer group (had a first assignment, "
            "possibly empty)",
            value=assigned,
        ),
    ]
    if startup_s is not None:
        families.append(
            GaugeMetricFamily(
                "tm_startup_seconds",
                "Seconds from the start of `tm run` until every worker first joined the "
                "consumer group",
                value=startup_s,
            )
        )
    restarts = CounterMetricFamily(
        "tm_worker_restarts",
        "Child processes restarted by the supervisor after they died or hung, by role "
        "(worker, api)",
        labels=["role"],
    )
    for role in RESTARTED_ROLES:
        restarts.add_metric([role], restarts_total.get(role, 0))
    families.append(restarts)
    return families


def observe_many(histogram: Histogram, values: Iterable[float]) -> list[int]:
    """``histogram.observe(v)`` for every ``v``, with one update per bucket instead of one per
    value (each update in multiprocess mode is a write to a memory-mapped file). The bucket
    counts are exactly those of ``observe``; the sum may differ in the last bits of a float.
    A NaN is dropped. ``histogram`` must be a child: unlabelled, or ``histogram.labels(...)``.
    Returns how many values went in each bucket (the last one: above the last finite bound)."""
    bounds = histogram._upper_bounds  # noqa: SLF001
    counts = [0] * len(bounds)
    # A NaN would break the sort; observe() counts it in no bucket (and poisons the sum).
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return counts
    # prometheus-client has no bulk observe; these attributes are its Histogram's internals
    # (stable since 0.4). Bucket i counts values <= bound i and above bound i-1, as observe()
    # does; the last bound is +Inf.
    buckets = histogram._buckets  # noqa: SLF001
    start = 0
    for index, bound in enumerate(bounds):
        stop = bisect.bisect_right(ordered, bound, lo=start)
        if stop > start:
            buckets[index].inc(stop - start)
            counts[index] = stop - start
        start = stop
        if start == len(ordered):
            break
    histogram._sum.inc(sum(ordered))  # noqa: SLF001
    return counts


def observe_latencies(latencies_s: Iterable[float]) -> list[int]:
    """Observe many end-to-end latencies at once (see :func:`observe_many`); how many went in
    each bucket of LATENCY_BUCKETS_S (and the last, above them)."""
    return observe_many(end_to_end_latency, latencies_s)


def aggregated_registry(directory: str | None = None) -> CollectorRegistry:
    """A registry reading the files of every live tm process in ``directory`` (under ``tm run``:
    ``settings.metrics.directory``, which the supervisor fills in for its children); ``GET
    /metrics`` adds the consumer lag to it. By default, the directory prometheus-client writes
    this process's own files to, when it runs in multiprocess mode (it chose so at import, from
    PROMETHEUS_MULTIPROC_DIR); else this process's metrics only."""
    registry = CollectorRegistry()
    # prometheus-client has no public "multiprocess mode?": its value class is what tells
    # (MutexValue unless PROMETHEUS_MULTIPROC_DIR was set at import; stable since 0.4).
    if directory is not None or values.ValueClass is not values.MutexValue:
        multiprocess.MultiProcessCollector(registry, directory)  # type: ignore[no-untyped-call]
    return registry
