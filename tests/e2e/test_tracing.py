"""Traces of `tm run` at a real OpenTelemetry Collector: the consumer span is a child of the
gateway's traceparent, the batch span links to it, and the crawl request names an exported span.
OTEL_ENABLED=false exports nothing; a missing collector loses spans, not messages."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from harness import free_port, wait_for
from harness.stack import Stack
from harness.tm import TmRun
from tests.e2e.otelcol import Collector, build

pytestmark = pytest.mark.e2e

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
BODY = {"user_email": "ada@example.com", "user_query": "q", "base_url": "https://example.com"}
# Short export delays: the spans reach the collector while the test waits, not at shutdown.
TRACED = {"OTEL_ENABLED": "true", "TRACING_DELAY_MS": "100", "TM_WORKERS": "1"}


@pytest.fixture(scope="session")
def otelcol_binary() -> Path:
    return build()


@pytest.fixture
def otelcol(otelcol_binary: Path, tmp_path: Path) -> Iterator[Collector]:
    collector = Collector(otelcol_binary, tmp_path)
    try:
        yield collector
    finally:
        collector.close()


def new_event(traceparent: str) -> tuple[None, list[tuple[str, bytes]], bytes]:
    headers = [
        ("task_type", b"web-crawl"),
        ("status", b"new"),
        ("timestamp", b"2025-08-10T10:18:59.023Z"),
        ("traceparent", traceparent.encode()),
        ("tracestate", b"gw=1"),
    ]
    return (None, headers, orjson.dumps(BODY))


def test_a_traced_message_reaches_the_collector(
    stack: Stack, otelcol: Collector, tmp_path: Path
) -> None:
    stack.produce([new_event(TRACEPARENT)])
    tm = TmRun(
        stack,
        tmp_path,
        **TRACED,
        OTEL_EXPORTER_OTLP_ENDPOINT=otelcol.endpoint,
        OTEL_SERVICE_NAME="tm-e2e",
    )
    try:
        wait_for(stack.all_committed, what="the message committed")
        requests = wait_for(lambda: stack.read_topic(stack.requests_topic), what="crawl request")
        received = otelcol.receiver
        consumer = wait_for(lambda: received.named("tm.process new"), what="the consumer span")[0]
        batch = next(
            s
            for s in wait_for(lambda: received.named("tm.batch"), what="the batch span")
            if (TRACE_ID, PARENT_ID) in s.links
        )
        wait_for(
            lambda: len([s for s in received.snapshot() if s.trace_id == TRACE_ID]) >= 3,
            what="the database and publish spans",
        )
    finally:
        assert tm.stop() == 0, tm.output()

    # The consumer span continues the gateway's trace, under the gateway's span.
    assert consumer.trace_id == TRACE_ID
    assert consumer.parent_span_id == PARENT_ID
    assert consumer.kind == "CONSUMER"
    assert consumer.attributes["tm.outcome"] == "created"
    assert consumer.resource["service.name"] == "tm-e2e"
    assert (batch.trace_id, batch.span_id) in consumer.links

    # Its children: the database call and the publish.
    children = {s.name: s for s in received.snapshot() if s.parent_span_id == consumer.span_id}
    assert set(children) == {"tm.db apply", f"publish {stack.requests_topic}"}

    # The crawl request names the consumer span: one that tm really exported.
    (request,) = requests
    headers = dict(request.headers())
    version, trace_id, span_id, flags = headers["traceparent"].decode().split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert span_id == consumer.span_id
    assert span_id in {s.span_id for s in received.snapshot()}
    assert headers["tracestate"] == b"gw=1"
    assert consumer.attributes["tm.task.id"] == request.key().decode()


def test_otel_enabled_false_exports_nothing(
    stack: Stack, otelcol: Collector, tmp_path: Path
) -> None:
    stack.produce([new_event(TRACEPARENT)])
    tm = TmRun(
        stack,
        tmp_path,
        **{**TRACED, "OTEL_ENABLED": "false"},
        OTEL_EXPORTER_OTLP_ENDPOINT=otelcol.endpoint,
    )
    try:
        wait_for(stack.all_committed, what="the message committed")
        requests = wait_for(lambda: stack.read_topic(stack.requests_topic), what="crawl request")
    finally:
        assert tm.stop() == 0, tm.output()  # a worker flushes its spans when it stops

    otelcol.barrier("ffffffffffffffffffffffffffffffff")
    assert [s.name for s in otelcol.receiver.snapshot()] == ["test.barrier"]
    # Today's behaviour: the upstream context passes through unchanged.
    (request,) = requests
    assert dict(request.headers())["traceparent"] == TRACEPARENT.encode()


def test_a_missing_collector_loses_spans_not_messages(stack: Stack, tmp_path: Path) -> None:
    stack.produce([new_event(TRACEPARENT)])
    tm = TmRun(
        stack,
        tmp_path,
        **TRACED,
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}",  # nobody listens
    )
    try:
        wait_for(stack.all_committed, what="the message committed")
        requests = wait_for(lambda: stack.read_topic(stack.requests_topic), what="crawl request")
        assert stack.count() == 1
    finally:
        started = time.monotonic()
        assert tm.stop() == 0, tm.output()
        stop_s = time.monotonic() - started
    (request,) = requests
    assert dict(request.headers())["traceparent"].split(b"-")[1] == TRACE_ID.encode()
    # The exporter's retries do not hold the exit beyond the flush budget (3 s) by much.
    assert stop_s < 15, tm.output()
