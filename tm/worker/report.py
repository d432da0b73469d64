"""The metrics and the debug line of an acknowledged batch: a handful of updates per batch,
none per message."""

from __future__ import annotations

import logging
import time

from tm.core.decode import DecodeStats
from tm.observability import metrics
from tm.pipeline import Summary

log = logging.getLogger("tm.worker")


def record(summary: Summary, decode_stats: DecodeStats) -> None:
    metrics.messages_consumed.inc(summary.size)
    metrics.batch_size.observe(summary.size)
    for outcome, count in summary.outcomes.items():
        metrics.messages_applied.labels(outcome).inc(count)
    for reason, count in summary.dead_letters.items():
        metrics.dead_letters.labels(reason).inc(count)
    for stage, seconds in (
        ("decode", summary.decode_s),
        ("db", summary.db_s),
        ("publish", summary.publish_s),
    ):
        metrics.stage_duration.labels(stage).observe(seconds)
    now_ms = time.time() * 1000
    metrics.observe_latencies((now_ms - ts) / 1000 for ts in summary.timestamps_ms)
    invalid = decode_stats.invalid_trace_context
    if invalid:
        metrics.invalid_trace_context.inc(invalid)
        decode_stats.invalid_trace_context = 0
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "batch done",
            extra={
                "fields": {
                    "size": summary.size,
                    "decode_ms": round(summary.decode_s * 1000, 1),
                    "db_ms": round(summary.db_s * 1000, 1),
                    "publish_ms": round(summary.publish_s * 1000, 1),
                    **summary.outcomes,
                    **{f"dlq_{k}": v for k, v in summary.dead_letters.items()},
                }
            },
        )
