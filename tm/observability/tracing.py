"""OpenTelemetry traces of a worker's batches (DESIGN §6).

:func:`setup` runs in each worker after the fork. With ``OTEL_ENABLED=false`` it builds nothing
and returns None, and the pipeline's only cost is an ``if`` per batch and per published message.
Otherwise it installs a TracerProvider whose spans leave through a BatchSpanProcessor to the
OTLP/HTTP exporter at ``<OTEL_EXPORTER_OTLP_ENDPOINT>/v1/traces``. Ending a span only appends it
to a bounded in-memory queue; a thread exports it. A slow or absent collector therefore costs
spans (the oldest are dropped when the queue is full), never messages or pipeline time.

The spans of one batch (:class:`BatchTrace`):

``tm.batch`` (CONSUMER, a root sampled at ``TRACING_SAMPLING_RATE``)
    from the start of the apply to the acknowledgement of the last message produced, with a
    Link to the upstream context of each message that has a valid ``traceparent`` (the first
    MAX_LINKS of them), and the batch's outcome counts as attributes. It is the current span
    while the batch is processed, so log lines written meanwhile carry its trace id.
``tm.process <status>`` (CONSUMER), one per message whose upstream ``traceparent`` is sampled
    a child of that ``traceparent`` (same trace id), linked to ``tm.batch``; its attributes say
    where the message came from and what became of it. A dead-lettered message's span has
    status ERROR with the ``dlq_reason``. Its span id is the parent named by the outbound crawl
    request's ``traceparent``: ``00-<upstream trace id>-<this span's id>-<flags>``, and the
    upstream ``tracestate`` goes with it unchanged.
``tm.db apply`` (CLIENT) and ``publish <topic>`` (PRODUCER), children of ``tm.process``
    the batch's database call (one for the whole batch, so every message's span has the same
    times) and the message's own produce up to the batch's acknowledgement.

A message whose upstream is not sampled, or that has no ``traceparent``, gets no span (only the
link), and its crawl request carries the upstream headers unchanged, as when tracing is off: tm
then exported nothing the downstream could name, and the gateway's span is the right parent.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, cast

from confluent_kafka import Message
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from tm.core.decode import valid_traceparent

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from tm.config import Settings
    from tm.core.batch import Batch

log = logging.getLogger("tm.tracing")

TRACER_NAME = "tm"
# Links on one batch span: a batch holds up to TM_BATCH_MAX_MESSAGES (2000 by default) messages,
# and each link costs about 100 bytes exported and a few microseconds. Past this number the rest
# are counted in `tm.batch.links_dropped`; every sampled message still has its own span.
MAX_LINKS = 256
# Time given to the exporter to send the spans still queued when a worker stops; it comes out
# of GRACEFUL_SHUTDOWN_TIMEOUT, so it stays short: a missing collector must not hold the exit.
SHUTDOWN_BUDGET_S = 3.0
# The SDK logs a warning for every span it drops from a full queue; one line per interval says
# enough and keeps a collector outage from flooding the logs.
DROP_WARNING_INTERVAL_S = 60.0

_SAMPLED = 0x01
_DB_ATTRIBUTES = {
    "db.system.name": "postgresql",
    "db.operation.name": "tm_create_tasks+tm_apply_status_updates",
}


def span_context(traceparent: str) -> SpanContext:
    """The remote SpanContext of an already validated ``traceparent`` header."""
    _, trace_id, span_id, flags = traceparent.split("-")
    return SpanContext(
        int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(int(flags, 16))
    )


def traceparent_of(span: trace.Span) -> str:
    """The W3C ``traceparent`` that names ``span`` as the parent."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _header(message: Message, name: str) -> str | None:
    headers = cast(list[tuple[str, bytes | None]] | None, message.headers())
    for key, raw in headers or ():
        if key == name and raw is not None:
            try:
                return raw.decode()
            except UnicodeDecodeError:
                return None
    return None


class Tracing:
    """The spans of one worker's batches. Build it with :func:`setup`, or, in tests, around
    any TracerProvider (an InMemorySpanExporter behind a SimpleSpanProcessor)."""

    def __init__(
        self,
        provider: trace.TracerProvider,
        *,
        topic: str,
        exporter: SpanExporter | None = None,
    ) -> None:
        self._provider = provider
        self._exporter = exporter
        self._tracer = provider.get_tracer(TRACER_NAME)
        self._topic = topic

    def start_batch(self, batch: Batch, messages: Sequence[Message]) -> BatchTrace:
        """Start the batch span and a consumer span per sampled message; nothing is exported
        before :meth:`BatchTrace.end` or :meth:`BatchTrace.fail`."""
        now_ns = time.time_ns()
        tracer = self._tracer
        topic = self._topic
        links: list[Link] = []
        n_contexts = 0
        sampled: list[tuple[int, str, SpanContext]] = []  # (message ref, status, upstream)

        def consider(ref: int, status: str, traceparent: str) -> None:
            nonlocal n_contexts
            n_contexts += 1
            # Parse only what is used: past the link cap, an unsampled context costs a count.
            is_sampled = int(traceparent[-2:], 16) & _SAMPLED
            if len(links) >= MAX_LINKS and not is_sampled:
                return
            upstream = span_context(traceparent)
            if len(links) < MAX_LINKS:
                links.append(Link(upstream))
            if is_sampled:
                sampled.append((ref, status, upstream))

        for task, ref in zip(batch.creates, batch.create_refs, strict=True):
            if task.traceparent is not None:
                consider(ref, "new", task.traceparent)
        for update, ref in zip(batch.updates, batch.update_refs, strict=True):
            if update.traceparent is not None:
                consider(ref, update.status.value, update.traceparent)
        for ref, _ in batch.rejected:  # rare: read their headers again, decode dropped them
            raw = _header(messages[ref], "traceparent")
            if raw is not None and valid_traceparent(raw):
                consider(ref, "rejected", raw)

        batch_span = tracer.start_span(
            "tm.batch",
            context=otel_context.Context(),  # a root: never a child of whatever is current
            kind=SpanKind.CONSUMER,
            links=links,
            start_time=now_ns,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "process",
                "messaging.destination.name": topic,
                "messaging.batch.message_count": batch.size,
                "tm.batch.links_dropped": n_contexts - len(links),
            },
        )
        to_batch = [Link(batch_span.get_span_context())]
        consumers: dict[int, trace.Span] = {}
        for ref, status, upstream in sampled:
            message = messages[ref]
            consumers[ref] = tracer.start_span(
                f"tm.process {status}",
                context=trace.set_span_in_context(NonRecordingSpan(upstream)),
                kind=SpanKind.CONSUMER,
                links=to_batch,
                start_time=now_ns,
                attributes={
                    "messaging.system": "kafka",
                    "messaging.operation.type": "process",
                    "messaging.destination.name": topic,
                    "messaging.destination.partition.id": str(message.partition()),
                    "messaging.kafka.offset": message.offset() or 0,
                    "tm.task.status": status,
                },
            )
        return BatchTrace(tracer, batch_span, consumers)

    def close(self, timeout_s: float = SHUTDOWN_BUDGET_S) -> None:
        """Export what is queued, waiting at most ``timeout_s``; then give up on the rest."""
        shutdown = getattr(self._provider, "shutdown", None)
        if shutdown is None:
            return
        # The SDK's shutdown waits up to 30 s for its export thread, whatever we ask for: run
        # it aside and stop waiting at our deadline.
        closing = threading.Thread(target=shutdown, name="tm-otel-shutdown", daemon=True)
        closing.start()
        closing.join(timeout_s)
        if closing.is_alive():
            log.warning(
                "trace exporter did not finish in time; queued spans are lost",
                extra={"fields": {"timeout_s": timeout_s}},
            )
            if self._exporter is not None:
                self._exporter.shutdown()  # interrupts its retries, so the thread ends soon


class BatchTrace:
    """The spans of one batch while the pipeline works on it. Times are taken here with
    ``time.time_ns()``; the methods do nothing for a message that has no span."""

    __slots__ = (
        "_consumers",
        "_db_end_ns",
        "_db_rows",
        "_db_start_ns",
        "_publishing",
        "_tracer",
        "context",
        "span",
    )

    def __init__(
        self, tracer: trace.Tracer, span: trace.Span, consumers: dict[int, trace.Span]
    ) -> None:
        self._tracer = tracer
        self.span = span
        self.context = trace.set_span_in_context(span)
        self._consumers = consumers
        self._db_start_ns = self._db_end_ns = 0
        self._db_rows = 0
        self._publishing: list[tuple[int, str, str, int]] = []  # ref, topic, key, start_ns

    @property
    def traced_messages(self) -> int:
        return len(self._consumers)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Make the batch span current (for log lines); on an exception, :meth:`fail`."""
        token = otel_context.attach(self.context)
        try:
            yield
        except BaseException as exc:
            self.fail(exc)
            raise
        finally:
            otel_context.detach(token)

    def db_started(self, rows: int) -> None:
        self._db_start_ns = time.time_ns()
        self._db_rows = rows

    def db_ended(self) -> None:
        self._db_end_ns = time.time_ns()

    def outcome(self, ref: int, task_id: str, outcome: str) -> None:
        span = self._consumers.get(ref)
        if span is not None:
            span.set_attributes({"tm.task.id": task_id, "tm.outcome": outcome})

    def dead_lettered(self, ref: int, reason: str, topic: str) -> None:
        span = self._consumers.get(ref)
        if span is None:
            return
        span.set_attributes({"tm.outcome": "dead_letter", "tm.dlq_reason": reason})
        span.set_status(Status(StatusCode.ERROR, reason))
        self._publishing.append((ref, topic, "", time.time_ns()))

    def crawl_request(self, ref: int, topic: str, task_id: str, upstream: str) -> str:
        """The ``traceparent`` of the crawl request of message ``ref``: its consumer span when
        it has one, else ``upstream`` unchanged."""
        span = self._consumers.get(ref)
        if span is None:
            return upstream
        self._publishing.append((ref, topic, task_id, time.time_ns()))
        return traceparent_of(span)

    def end(self, outcomes: dict[str, int], dead_letters: dict[str, int]) -> None:
        """Everything produced is acknowledged: end the batch's spans, now."""
        now_ns = time.time_ns()
        self._children(now_ns, None, db_failed=False)
        for span in self._consumers.values():
            span.end(now_ns)
        attributes: dict[str, int] = {f"tm.outcome.{k}": v for k, v in outcomes.items()}
        attributes.update({f"tm.dlq_reason.{k}": v for k, v in dead_letters.items()})
        self.span.set_attributes(attributes)
        self.span.end(now_ns)

    def fail(self, error: BaseException) -> None:
        """The batch stopped with ``error`` (it will be retried, or the worker stops)."""
        now_ns = time.time_ns()
        db_failed = bool(self._db_start_ns and not self._db_end_ns)
        if db_failed:
            self._db_end_ns = now_ns
        self._children(now_ns, error, db_failed=db_failed)
        status = Status(StatusCode.ERROR, f"{type(error).__name__}: {error}")
        for span in (*self._consumers.values(), self.span):
            span.record_exception(error)
            span.set_status(status)
            span.end(now_ns)

    def _children(self, now_ns: int, error: BaseException | None, *, db_failed: bool) -> None:
        """The database and publish spans, with the times recorded while they ran."""
        tracer = self._tracer
        failed = Status(StatusCode.ERROR, type(error).__name__) if error is not None else None
        if self._db_start_ns:
            for span in self._consumers.values():
                db = tracer.start_span(
                    "tm.db apply",
                    context=trace.set_span_in_context(span),
                    kind=SpanKind.CLIENT,
                    start_time=self._db_start_ns,
                    attributes={**_DB_ATTRIBUTES, "db.operation.batch.size": self._db_rows},
                )
                if db_failed and failed is not None:
                    db.set_status(failed)
                db.end(self._db_end_ns)
        for ref, topic, key, start_ns in self._publishing:
            publish = tracer.start_span(
                f"publish {topic}",
                context=trace.set_span_in_context(self._consumers[ref]),
                kind=SpanKind.PRODUCER,
                start_time=start_ns,
                attributes={
                    "messaging.system": "kafka",
                    "messaging.operation.type": "send",
                    "messaging.destination.name": topic,
                    **({"messaging.kafka.message.key": key} if key else {}),
                },
            )
            if failed is not None:
                publish.set_status(failed)
            publish.end(now_ns)


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
    return Tracing(provider, topic=settings.kafka.task_status_topic, exporter=exporter)
