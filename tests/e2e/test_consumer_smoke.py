"""A `new` event exactly as the gateway sends it becomes one row and one crawl request."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from tests.e2e.harness import Stack, TmRun, wait_for

pytestmark = pytest.mark.e2e

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_gateway_new_task_becomes_row_and_crawl_request(stack: Stack, tmp_path: Path) -> None:
    body = {
        "user_email": "ada@example.com",
        "user_query": "Find product information",
        "base_url": "http://localhost:8080/shop",
    }
    headers = [
        ("traceparent", TRACEPARENT.encode()),
        ("tracestate", b"vendor=value"),
        ("task_type", b"web-crawl"),
        ("status", b"new"),
        ("timestamp", b"2025-08-10T10:18:59.023Z"),
    ]
    stack.produce([(None, headers, orjson.dumps(body))])
    tm = TmRun(stack, tmp_path, TM_WORKERS="1")
    try:
        wait_for(stack.all_committed, what="the message committed")
        rows = stack.query("SELECT * FROM web_crawl_tasks")
        requests = wait_for(lambda: stack.read_topic(stack.requests_topic), what="crawl request")
    finally:
        assert tm.stop() == 0, tm.output()

    assert len(rows) == 1
    row = rows[0]
    assert isinstance(row["id"], uuid.UUID)
    assert (row["user_email"], row["user_query"], row["original_url"]) == (
        body["user_email"],
        body["user_query"],
        body["base_url"],
    )
    assert row["received_at"] == datetime(2025, 8, 10, 10, 18, 59, 23000, tzinfo=UTC)
    assert row["status"] == "new"
    assert row["result"] is None and row["finished_at"] is None

    assert len(requests) == 1
    request = requests[0]
    assert request.key() == str(row["id"]).encode()
    assert orjson.loads(request.value()) == body
    sent = dict(request.headers())
    assert sent["task_id"] == str(row["id"]).encode()
    assert sent["timestamp"] == b"2025-08-10T10:18:59.023Z"
    assert sent["traceparent"].split(b"-")[1] == TRACEPARENT.split("-")[1].encode()
    assert sent["tracestate"] == b"vendor=value"
    assert stack.read_topic(stack.dlq_topic, timeout_s=2) == []
