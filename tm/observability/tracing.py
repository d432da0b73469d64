"""OpenTelemetry traces of a worker's batches (DESIGN §6).

:func:`tm.observability.trace_export.setup` runs in each worker after the fork. With
``OTEL_ENABLED=false`` it builds nothing and returns None: the pipeline then uses its no-op trace
(tm.pipeline.NO_TRACER), whose cost is a few calls per batch and a dict lookup per message that
has a ``traceparent``. Otherwise it installs a TracerProvider whose spans leave through a
BatchSpanProcessor to the OTLP/HTTP exporter at ``<OTEL_EXPORTER_OTLP_ENDPOINT>/v1/traces``.
Ending a span only appends it to a bounded in-memory queue; a thread exports it. A slow or
absent collector therefore costs spans (the oldest are dropped when the queue is full), never
messages or pipeline time.

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
from typing import TYPE_CHECKING, NamedTuple

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from tm.core.messages import Outcome

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from tm.core.batch import Batch
    from tm.core.decode import RawMessage
    from tm.pipeline import BatchRecord

log = logging.getLogger("tm.tracing")

TRACER_NAME = "tm"
# Links on one batch span: a batch holds up to TM_BATCH_MAX_MESSAGES (2000 by default) messages,
# and each link costs about 100 bytes exported and a few microseconds. Past this number the rest
# are counted in `tm.batch.links_dropped`; every sampled message still has its own span.
MAX_LINKS = 256
# Time given to the exporter to send the spans still queued when a worker stops; it comes out
# of GRACEFUL_SHUTDOWN_TIMEOUT, so it stays short: a missing collector must not hold the exit.
SHUTDOWN_BUDGET_S = 3.0

_SAMPLED = 0x01
_PUBLISHED = frozenset({Outcome.CREATED.value, Outcome.DUPLICATE.value})  # a crawl request
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


class Tracing:
    """The spans of one worker's batches (tm.pipeline.Tracer). Build it with :func:`setup`,
    or, in tests, around any TracerProvider (an InMemorySpanExporter behind a
    SimpleSpanProcessor)."""

    def __init__(
        self,
        provider: trace.TracerProvider,
        *,
        topic: str,
        requests_topic: str = "requests-web-crawl",
        dlq_topic: str = "task-status.dlq",
        exporter: SpanExporter | None = None,
    ) -> None:
        self._provider = provider
        self._exporter = exporter
        self.tracer = provider.get_tracer(TRACER_NAME)
        self.topic = topic
        self.requests_topic = requests_topic
        self.dlq_topic = dlq_topic

    def start_batch(self, batch: Batch, messages: Sequence[RawMessage]) -> BatchTrace:
        """Start the batch span and a consumer span per sampled message; nothing is exported
        before :meth:`BatchTrace.end` or :meth:`BatchTrace.fail`."""
        now_ns = time.time_ns()
        now = time.perf_counter()
        tracer = self.tracer
        topic = self.topic
        links: list[Link] = []
        n_contexts = 0
        sampled: list[tuple[int, _Row, SpanContext]] = []  # (message ref, its row, upstream)

        def consider(ref: int, row: _Row, traceparent: str) -> None:
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
                sampled.append((ref, row, upstream))

        for index, (task, ref) in enumerate(zip(batch.creates, batch.create_refs, strict=True)):
            if task.traceparent is not None:
                consider(ref, _Row("new", task.id, index, True), task.traceparent)
        for index, (update, ref) in enumerate(zip(batch.updates, batch.update_refs, strict=True)):
            if update.traceparent is not None:
                row = _Row(update.status.value, update.id, index, False)
                consider(ref, row, update.traceparent)
        for ref, rejected in batch.rejected:
            if rejected.traceparent is not None:
                consider(ref, _Row("rejected", "", -1, False), rejected.traceparent)

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
        consumers: dict[int, tuple[trace.Span, _Row]] = {}
        for ref, row, upstream in sampled:
            message = messages[ref]
            span = tracer.start_span(
                f"tm.process {row.status}",
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
                    "tm.task.status": row.status,
                },
            )
            consumers[ref] = (span, row)
        return BatchTrace(self, batch_span, consumers, (now_ns, now))

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


class _Row(NamedTuple):
    """What a traced message is in its batch: its status, task id, and position among the
    batch's creates (``create``) or updates (-1: rejected at decode)."""

    status: str
    task_id: str
    position: int
    create: bool


class BatchTrace:
    """The spans of one batch (tm.pipeline.Trace). They are all ended, and exported, by
    :meth:`end` or :meth:`fail`, which read what the pipeline did from its BatchRecord; their
    times are the record's, moved onto the wall clock of the batch's start."""

    __slots__ = ("_anchor", "_consumers", "_tracing", "context", "span", "traceparents")

    def __init__(
        self,
        tracing: Tracing,
        span: trace.Span,
        consumers: dict[int, tuple[trace.Span, _Row]],
        anchor: tuple[int, float],
    ) -> None:
        self._tracing = tracing
        self.span = span
        self.context = trace.set_span_in_context(span)
        self._consumers = consumers
        self._anchor = anchor  # (time.time_ns(), time.perf_counter()) at the start
        # The crawl request of a traced `new` names its consumer span as the parent.
        self.traceparents = {
            ref: traceparent_of(span) for ref, (span, row) in consumers.items() if row.create
        }

    @property
    def traced_messages(self) -> int:
        return len(self._consumers)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Make the batch span current (for log lines)."""
        token = otel_context.attach(self.context)
        try:
            yield
        finally:
            otel_context.detach(token)

    def end(self, record: BatchRecord) -> None:
        """Everything produced is acknowledged: end the batch's spans, now."""
        now_ns = time.time_ns()
        self._children(record, now_ns, None)
        for span, _ in self._consumers.values():
            span.end(now_ns)
        attributes: dict[str, int] = {f"tm.outcome.{k}": v for k, v in record.outcomes.items()}
        attributes.update({f"tm.dlq_reason.{k}": v for k, v in record.dead_letters.items()})
        self.span.set_attributes(attributes)
        self.span.end(now_ns)

    def fail(self, error: BaseException, record: BatchRecord) -> None:
        """The batch stopped with ``error`` (it will be retried, or the worker stops)."""
        now_ns = time.time_ns()
        self._children(record, now_ns, error)
        status = Status(StatusCode.ERROR, f"{type(error).__name__}: {error}")
        for span in (*(span for span, _ in self._consumers.values()), self.span):
            span.record_exception(error)
            span.set_status(status)
            span.end(now_ns)

    def _ns(self, perf: float) -> int:
        start_ns, start = self._anchor
        return start_ns + round((perf - start) * 1e9)

    def _children(self, record: BatchRecord, now_ns: int, error: BaseException | None) -> None:
        """The consumer spans' outcomes, and their database and publish spans."""
        tracing = self._tracing
        failed = Status(StatusCode.ERROR, type(error).__name__) if error is not None else None
        publishing: list[tuple[trace.Span, str, str]] = []  # consumer span, topic, key
        for span, row in self._consumers.values():
            outcomes = record.created if row.create else record.updated
            outcome = outcomes[row.position] if 0 <= row.position < len(outcomes) else None
            if outcome is not None:
                span.set_attributes({"tm.task.id": row.task_id, "tm.outcome": outcome})
                if row.create and outcome in _PUBLISHED:
                    publishing.append((span, tracing.requests_topic, row.task_id))
        for ref, reason in record.dead_lettered:
            found = self._consumers.get(ref)
            if found is not None:
                span = found[0]
                span.set_attributes({"tm.outcome": "dead_letter", "tm.dlq_reason": reason})
                span.set_status(Status(StatusCode.ERROR, reason))
                publishing.append((span, tracing.dlq_topic, ""))
        if record.db_started:
            db_failed = not record.applied_at
            db_end_ns = now_ns if db_failed else self._ns(record.applied_at)
            rows = len(record.created) + len(record.updated)
            for span, _ in self._consumers.values():
                db = tracing.tracer.start_span(
                    "tm.db apply",
                    context=trace.set_span_in_context(span),
                    kind=SpanKind.CLIENT,
                    start_time=self._ns(record.db_started),
                    attributes={**_DB_ATTRIBUTES, "db.operation.batch.size": rows},
                )
                if db_failed and failed is not None:
                    db.set_status(failed)
                db.end(db_end_ns)
        if not record.publishing_at:
            return
        publish_ns = self._ns(record.publishing_at)
        for span, topic, key in publishing:
            publish = tracing.tracer.start_span(
                f"publish {topic}",
                context=trace.set_span_in_context(span),
                kind=SpanKind.PRODUCER,
                start_time=publish_ns,
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
