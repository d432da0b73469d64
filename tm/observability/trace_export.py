"""Tracing's plumbing: the TracerProvider (resource, sampler, limits) and, in a worker after
the fork, the OTLP/HTTP exporter behind a BatchSpanProcessor (tm.observability.tracing has the
spans themselves)."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from opentelemetry import trace

from tm.observability.tracing import MAX_LINKS, Tracing

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from tm.config import Settings

log = logging.getLogger("tm.tracing")

# The SDK logs a warning for every span it drops from a full queue; one line per interval says
# enough and keeps a collector outage from flooding the logs.
DROP_WARNING_INTERVAL_S = 60.0


class _Throttle(logging.Filter):
    """Lets one record per interval through (for the SDK's per-span 'Queue full' warning)."""

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._next = 0.0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                return False
            self._next = now + self._interval_s
        return True


def make_provider(settings: Settings) -> TracerProvider:
    """A TracerProvider with tm's resource, sampler and limits, and no processor yet."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    otel = settings.otel
    resource = Resource.create(
        {
            "service.name": otel.service_name,
            "service.version": otel.service_version,
            # Both spellings: older backends read the first, current semantic conventions
            # the second.
            "deployment.environment": settings.environment,
            "deployment.environment.name": settings.environment,
        }
    )
    return TracerProvider(
        # A root (the batch span) is sampled at the configured rate; a message's span follows
        # its upstream sampled flag.
        sampler=ParentBased(root=TraceIdRatioBased(otel.sampling_rate)),
        resource=resource,
        span_limits=SpanLimits(max_links=MAX_LINKS),
        shutdown_on_exit=False,  # workers leave through os._exit; Tracing.close flushes
    )


def setup(settings: Settings) -> Tracing | None:
    """Start tracing in this process (a worker, after the fork) when OTEL_ENABLED is true."""
    otel = settings.otel
    if not otel.enabled:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = make_provider(settings)
    exporter = OTLPSpanExporter(
        endpoint=f"{otel.exporter_endpoint.rstrip('/')}/v1/traces",
        timeout=otel.timeout_ms / 1000,
    )
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter,
            max_queue_size=otel.max_queue_size,
            max_export_batch_size=min(otel.max_batch_size, otel.max_queue_size),
            schedule_delay_millis=otel.delay_ms,
            export_timeout_millis=otel.timeout_ms,
        )
    )
    trace.set_tracer_provider(provider)
    logging.getLogger("opentelemetry.sdk._shared_internal").addFilter(
        _Throttle(DROP_WARNING_INTERVAL_S)
    )
    log.info(
        "tracing on",
        extra={
            "fields": {
                "endpoint": otel.exporter_endpoint,
                "sampling_rate": otel.sampling_rate,
            }
        },
    )
    return Tracing(
        provider,
        topic=settings.kafka.task_status_topic,
        requests_topic=settings.kafka.web_crawl_request_topic,
        dlq_topic=settings.kafka.dlq_topic,
        exporter=exporter,
    )
