"""The spans of a batch, with the SDK's InMemorySpanExporter behind the real pipeline and fakes:
their parents and links, the outbound traceparent, and what tracing off or unsampled costs."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Any

import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.fakes import FakeDatabase, FakeMessage, FakeSink, run_stages
from tm import config
from tm.core.messages import NewTask, StatusUpdate
from tm.errors import DatabaseUnavailableError, KafkaUnavailableError
from tm.observability import trace_export, tracing
from tm.pipeline import NO_TRACER, BatchRecord, Pipeline

TS = b"2025-08-10T10:18:59.023Z"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
SAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-01"
UNSAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-00"
REQUESTS = "requests-web-crawl"
DLQ = "task-status.dlq"


def trace_headers(traceparent: str | None, tracestate: str | None) -> list[tuple[str, bytes]]:
    headers = []
    if traceparent is not None:
        headers.append(("traceparent", traceparent.encode()))
    if tracestate is not None:
        headers.append(("tracestate", tracestate.encode()))
    return headers


def new(
    n: int, traceparent: str | None = None, tracestate: str | None = None, *, partition: int = 0
) -> FakeMessage:
    headers = [("task_type", b"web-crawl"), ("status", b"new"), ("timestamp", TS)]
    body = {"user_email": f"user{n}@example.com", "user_query": "q", "base_url": "https://x.io"}
    return FakeMessage(
        headers + trace_headers(traceparent, tracestate), orjson.dumps(body), partition, n
    )


def completed(n: int, task_id: uuid.UUID | str, traceparent: str | None = None) -> FakeMessage:
    headers = [
        ("task_type", b"web-crawl"),
        ("status", b"completed"),
        ("task_id", str(task_id).encode()),
        ("timestamp", TS),
    ]
    body = orjson.dumps({"crawl_result": "done"})
    return FakeMessage(headers + trace_headers(traceparent, None), body, 0, n)


def span_id_hex(span: ReadableSpan) -> str:
    return f"{span.context.span_id:016x}"


def trace_id_hex(span: ReadableSpan) -> str:
    return f"{span.context.trace_id:032x}"


class Traced:
    """A pipeline wired to fakes, traced (or not) into an InMemorySpanExporter."""

    def __init__(self, *, enabled: bool = True, rate: float = 1.0) -> None:
        self.settings = config.load({"OTEL_ENABLED": "true", "TRACING_SAMPLING_RATE": str(rate)})
        self.exporter = InMemorySpanExporter()
        self.provider = trace_export.make_provider(self.settings)
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracing = (
            tracing.Tracing(
                self.provider,
                topic=self.settings.kafka.task_status_topic,
                requests_topic=REQUESTS,
                dlq_topic=DLQ,
            )
            if enabled
            else NO_TRACER
        )
        self.database = FakeDatabase()
        self.sink = FakeSink()
        self.pipeline = Pipeline(
            settings=self.settings,
            database=self.database,
            sink=self.sink,
            run_io=asyncio.to_thread,
            tracing=self.tracing,
        )

    async def run(self, messages: list[FakeMessage]) -> BatchRecord:
        return await run_stages(self.pipeline, messages)

    def spans(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.spans(name)
        assert len(found) == 1, [s.name for s in self.exporter.get_finished_spans()]
        return found[0]

    def requests(self) -> list[dict[str, Any]]:
        return [m for m in self.sink.acknowledged if m["topic"] == REQUESTS]


async def test_a_sampled_message_gets_a_consumer_span_under_its_upstream_span() -> None:
    t = Traced()
    await t.run([new(0, SAMPLED, "vendor=value")])

    consumer = t.one("tm.process new")
    assert consumer.kind is SpanKind.CONSUMER
    assert trace_id_hex(consumer) == TRACE_ID
    assert consumer.parent is not None and consumer.parent.is_remote
    assert f"{consumer.parent.span_id:016x}" == PARENT_ID
    attributes = dict(consumer.attributes or {})
    request = t.requests()[0]
    assert attributes == {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.destination.name": "task-status",
        "messaging.destination.partition.id": "0",
        "messaging.kafka.offset": 0,
        "tm.task.status": "new",
        "tm.task.id": request["key"],
        "tm.outcome": "created",
    }
    assert consumer.status.status_code is StatusCode.UNSET

    # The crawl request names the consumer span, which was exported, and keeps the tracestate.
    assert request["headers"]["traceparent"] == f"00-{TRACE_ID}-{span_id_hex(consumer)}-01"
    assert request["headers"]["tracestate"] == "vendor=value"


async def test_the_database_call_and_the_publish_are_children_with_their_real_times() -> None:
    t = Traced()
    await t.run([new(0, SAMPLED), new(1, SAMPLED)])

    batch = t.one("tm.batch")
    consumers = t.spans("tm.process new")
    dbs = t.spans("tm.db apply")
    publishes = t.spans(f"publish {REQUESTS}")
    assert len(consumers) == len(dbs) == len(publishes) == 2
    for consumer in consumers:
        db = next(s for s in dbs if s.parent and s.parent.span_id == consumer.context.span_id)
        publish = next(
            s for s in publishes if s.parent and s.parent.span_id == consumer.context.span_id
        )
        assert db.kind is SpanKind.CLIENT and publish.kind is SpanKind.PRODUCER
        assert dict(db.attributes or {})["db.operation.batch.size"] == 2
        assert dict(publish.attributes or {})["messaging.destination.name"] == REQUESTS
        assert trace_id_hex(db) == trace_id_hex(publish) == TRACE_ID
        # Nested in time: consumer [ db ] [ publish ... acknowledged ].
        assert consumer.start_time is not None and consumer.end_time is not None
        assert db.start_time is not None and db.end_time is not None
        assert publish.start_time is not None and publish.end_time is not None
        assert consumer.start_time <= db.start_time < db.end_time <= publish.start_time
        assert publish.start_time <= publish.end_time <= consumer.end_time
    # Both messages shared one database call.
    assert {(s.start_time, s.end_time) for s in dbs} == {(dbs[0].start_time, dbs[0].end_time)}
    assert batch.start_time == consumers[0].start_time
    assert batch.end_time == consumers[0].end_time


async def test_the_batch_span_links_every_upstream_context_and_counts_outcomes() -> None:
    t = Traced()
    other_trace = "11111111111111111111111111111111"
    await t.run(
        [
            new(0, SAMPLED),
            new(1, f"00-{other_trace}-2222222222222222-00"),
            new(2),
        ]
    )
    batch = t.one("tm.batch")
    assert batch.kind is SpanKind.CONSUMER
    assert batch.parent is None
    assert trace_id_hex(batch) not in (TRACE_ID, other_trace)  # a trace of its own
    linked = {
        (f"{link.context.trace_id:032x}", f"{link.context.span_id:016x}") for link in batch.links
    }
    assert linked == {(TRACE_ID, PARENT_ID), (other_trace, "2222222222222222")}
    assert dict(batch.attributes or {}) == {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.destination.name": "task-status",
        "messaging.batch.message_count": 3,
        "tm.batch.links_dropped": 0,
        "tm.outcome.created": 3,
    }
    # The consumer span links back to its batch.
    consumer = t.one("tm.process new")
    assert [link.context.span_id for link in consumer.links] == [batch.context.span_id]


async def test_links_stop_at_the_cap_and_the_rest_are_counted() -> None:
    t = Traced()
    extra = 10
    await t.run([new(n, UNSAMPLED) for n in range(tracing.MAX_LINKS + extra)])
    batch = t.one("tm.batch")
    assert len(batch.links) == tracing.MAX_LINKS
    assert dict(batch.attributes or {})["tm.batch.links_dropped"] == extra


async def test_an_unsampled_upstream_gets_no_span_and_its_traceparent_passes_through() -> None:
    t = Traced()
    await t.run([new(0, UNSAMPLED, "vendor=value"), new(1)])
    assert [s.name for s in t.exporter.get_finished_spans()] == ["tm.batch"]
    by_key = {m["headers"]["task_id"]: m["headers"] for m in t.requests()}
    assert len(by_key) == 2
    headers = sorted(by_key.values(), key=lambda h: "traceparent" in h)
    assert "traceparent" not in headers[0] and "tracestate" not in headers[0]
    assert headers[1]["traceparent"] == UNSAMPLED
    assert headers[1]["tracestate"] == "vendor=value"


async def test_tracing_off_creates_no_span_and_sends_the_same_crawl_requests() -> None:
    messages = [new(0, SAMPLED, "vendor=value"), new(1, UNSAMPLED), new(2)]
    off = Traced(enabled=False)
    await off.run(messages)
    assert off.exporter.get_finished_spans() == ()
    assert trace_export.setup(config.load({})) is None  # OTEL_ENABLED defaults to false
    assert trace_export.setup(config.load({"OTEL_ENABLED": "false"})) is None

    # What tm sent before tracing existed: the upstream headers, unchanged.
    sent = {m["key"]: m for m in off.requests()}
    contexts = [
        (m["headers"].get("traceparent"), m["headers"].get("tracestate")) for m in off.requests()
    ]
    assert sorted(contexts, key=str) == sorted(
        [(SAMPLED, "vendor=value"), (UNSAMPLED, None), (None, None)], key=str
    )

    # Traced, the unsampled and context-less messages get byte-identical crawl requests.
    on = Traced()
    await on.run(messages)
    on_requests = {m["key"]: m for m in on.requests()}
    for key, request in sent.items():
        if request["headers"].get("traceparent") == SAMPLED:
            assert on_requests[key]["headers"]["traceparent"] != SAMPLED  # our span instead
            assert on_requests[key]["value"] == request["value"]
        else:
            assert on_requests[key] == request


async def test_a_dead_lettered_message_has_an_error_span_with_its_dlq_publish() -> None:
    t = Traced()
    await t.run([completed(0, uuid.uuid4(), SAMPLED)])
    consumer = t.one("tm.process completed")
    assert consumer.status.status_code is StatusCode.ERROR
    assert consumer.status.description == "task_not_found"
    attributes = dict(consumer.attributes or {})
    assert attributes["tm.outcome"] == "dead_letter"
    assert attributes["tm.dlq_reason"] == "task_not_found"
    publish = t.one(f"publish {DLQ}")
    assert publish.parent is not None and publish.parent.span_id == consumer.context.span_id
    # The dead letter keeps the original headers, upstream traceparent included.
    dead = [m for m in t.sink.acknowledged if m["topic"] == DLQ]
    assert dead[0]["headers"]["traceparent"] == SAMPLED.encode()


async def test_a_rejected_message_with_a_sampled_context_is_traced_too() -> None:
    t = Traced()
    bad = FakeMessage(
        [
            ("task_type", b"web-crawl"),
            ("status", b"new"),
            ("timestamp", TS),
            *trace_headers(SAMPLED, None),
        ],
        b"{not json",
    )
    await t.run([bad])
    consumer = t.one("tm.process rejected")
    assert consumer.parent is not None
    assert f"{consumer.parent.span_id:016x}" == PARENT_ID
    assert dict(consumer.attributes or {})["tm.dlq_reason"] == "invalid_json"
    assert len(t.one("tm.batch").links) == 1
    assert t.spans("tm.db apply")  # the (empty) database step still ran for the batch


async def test_a_failed_database_call_ends_every_span_with_the_error() -> None:
    t = Traced()
    t.database.fail_with = DatabaseUnavailableError("connection refused")
    with pytest.raises(DatabaseUnavailableError):
        await t.run([new(0, SAMPLED)])
    for name in ("tm.batch", "tm.process new", "tm.db apply"):
        span = t.one(name)
        assert span.status.status_code is StatusCode.ERROR, name
    batch = t.one("tm.batch")
    assert [e.name for e in batch.events] == ["exception"]
    assert batch.status.description == "DatabaseUnavailableError: connection refused"
    assert t.spans(f"publish {REQUESTS}") == []
    assert trace.get_current_span() is trace.INVALID_SPAN  # the context was restored


async def test_an_unacknowledged_publish_fails_the_publish_span() -> None:
    t = Traced()
    t.sink.fail_flush = True
    with pytest.raises(KafkaUnavailableError):
        await t.run([new(0, SAMPLED)])
    publish = t.one(f"publish {REQUESTS}")
    assert publish.status.status_code is StatusCode.ERROR
    assert t.one("tm.db apply").status.status_code is StatusCode.UNSET


async def test_the_batch_span_is_current_while_the_batch_is_processed() -> None:
    seen: list[trace.Span] = []

    class Watching(FakeDatabase):
        async def apply(
            self, creates: list[NewTask], updates: list[StatusUpdate]
        ) -> tuple[list[str], list[str]]:
            seen.append(trace.get_current_span())
            return await super().apply(creates, updates)

    t = Traced()
    t.database = Watching()
    t.pipeline._database = t.database
    await t.run([new(0)])
    assert seen[0].get_span_context() == t.one("tm.batch").context
    assert trace.get_current_span() is trace.INVALID_SPAN


async def test_a_sampled_upstream_is_followed_whatever_the_root_rate() -> None:
    t = Traced(rate=0.0)
    await t.run([new(0, SAMPLED), new(1, UNSAMPLED)])
    # The batch span (a root) is not sampled at rate 0; the message's span follows upstream.
    assert t.spans("tm.batch") == []
    assert len(t.spans("tm.process new")) == 1
    assert len(t.spans("tm.db apply")) == 1


def test_the_resource_names_the_service() -> None:
    settings = config.load(
        {
            "OTEL_ENABLED": "true",
            "OTEL_SERVICE_NAME": "tm-test",
            "OTEL_SERVICE_VERSION": "9.9.9",
            "NODE_ENV": "production",
        }
    )
    provider = trace_export.make_provider(settings)
    attributes = dict(provider.resource.attributes)
    assert attributes["service.name"] == "tm-test"
    assert attributes["service.version"] == "9.9.9"
    assert attributes["deployment.environment"] == "production"
    assert "ParentBased" in provider.sampler.get_description()


def test_close_gives_up_on_a_stuck_exporter_at_its_deadline() -> None:
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Stuck(SpanExporter):
        """An export that hangs until shutdown, like retries against a missing collector."""

        def __init__(self) -> None:
            self.released = threading.Event()
            self.exporting = threading.Event()

        def export(self, spans: Any) -> SpanExportResult:
            self.exporting.set()
            self.released.wait(30)
            return SpanExportResult.FAILURE

        def shutdown(self) -> None:
            self.released.set()

    settings = config.load({"OTEL_ENABLED": "true"})
    exporter = Stuck()
    provider = trace_export.make_provider(settings)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1))
    traces = tracing.Tracing(provider, topic="t", exporter=exporter)
    provider.get_tracer("test").start_span("x").end()
    assert exporter.exporting.wait(10)

    started = time.monotonic()
    traces.close(timeout_s=0.2)
    assert time.monotonic() - started < 2
    assert exporter.released.is_set()  # its retries were interrupted


def test_the_sdk_drop_warning_is_throttled() -> None:
    throttle = trace_export._Throttle(60.0)
    record = logging.LogRecord("x", logging.WARNING, "", 0, "Queue full", None, None)
    assert throttle.filter(record)
    assert not throttle.filter(record)
    error = logging.LogRecord("x", logging.ERROR, "", 0, "boom", None, None)
    assert throttle.filter(error)
