"""The metrics and the debug line of an acknowledged batch: a handful of updates per batch,
none per message."""

from __future__ import annotations

import logging
import time

from tm.observability import metrics
from tm.pipeline import BatchRecord

log = logging.getLogger("tm.worker")


def transaction(*, committed: int = 0, aborted_by: str | None = None) -> None:
    """Exactly-once: ``committed`` transactions went through, or one was aborted by the Kafka
    error named ``aborted_by`` (or ``batch_failed``: the batch's own failure)."""
    if committed:
        metrics.transactions.labels("committed", "").inc(committed)
    if aborted_by is not None:
        metrics.transactions.labels("aborted", aborted_by).inc()


def record(batch: BatchRecord) -> list[int]:
    """The batch's metrics (and debug line); returns how many of its messages fell in each
    end-to-end latency bucket (metrics.LATENCY_BUCKETS_S, then above them)."""
    metrics.messages_consumed.inc(batch.size)
    metrics.batch_size.observe(batch.size)
    for outcome, count in batch.outcomes.items():
        metrics.messages_applied.labels(outcome).inc(count)
    for reason, count in batch.dead_letters.items():
        metrics.dead_letters.labels(reason).inc(count)
    for stage, seconds in (
        ("decode", batch.decode_s),
        ("db", batch.db_s),
        ("publish", batch.publish_s),
    ):
        metrics.stage_duration.labels(stage).observe(seconds)
    if batch.transaction_s is not None:
        metrics.stage_duration.labels("transaction").observe(batch.transaction_s)
    now_ms = time.time() * 1000
    latencies = metrics.observe_latencies((now_ms - ts) / 1000 for ts in batch.timestamps_ms)
    if batch.invalid_trace_contexts:
        metrics.invalid_trace_context.inc(batch.invalid_trace_contexts)
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "batch done",
            extra={
                "fields": {
                    "size": batch.size,
                    "decode_ms": round(batch.decode_s * 1000, 1),
                    "db_ms": round(batch.db_s * 1000, 1),
                    "publish_ms": round(batch.publish_s * 1000, 1),
                    **batch.outcomes,
                    **{f"dlq_{k}": v for k, v in batch.dead_letters.items()},
                }
            },
        )
    return latencies
