"""A `new` event exactly as the gateway sends it becomes one row and one crawl request; the
default worker count follows the CPUs tm may use and the topic's partitions."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from harness import wait_for
from harness.stack import Stack, make_stack
from harness.tm import TmRun
from tm.config import Settings

pytestmark = pytest.mark.e2e

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


BODY = {
    "user_email": "ada@example.com",
    "user_query": "Find product information",
    "base_url": "http://localhost:8080/shop",
}
HEADERS = [
    ("traceparent", TRACEPARENT.encode()),
    ("tracestate", b"vendor=value"),
    ("task_type", b"web-crawl"),
    ("status", b"new"),
    ("timestamp", b"2025-08-10T10:18:59.023Z"),
]


def test_gateway_new_task_becomes_row_and_crawl_request(stack: Stack, tmp_path: Path) -> None:
    body, headers = BODY, HEADERS
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


def test_default_worker_count_follows_the_cpus_tm_may_use(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TM_WORKERS unset, tm pinned to one CPU (as a 1-CPU container on a big node would be):
    one worker, not one per CPU of the machine."""
    monkeypatch.delenv("TM_WORKERS", raising=False)
    stack.produce(
        [
            (None, HEADERS, orjson.dumps({**BODY, "user_email": f"u{n}@example.com"}))
            for n in range(20)
        ]
    )
    tm = TmRun(stack, tmp_path, wrap=["taskset", "-c", "0"])
    try:
        wait_for(stack.all_committed, what="the messages committed")
        assert stack.count() == 20
    finally:
        assert tm.stop() == 0, tm.output()
    output = tm.output()
    assert output.count("worker spawned") == 1, output


@pytest.fixture
def one_partition(settings: Settings, pg_up: None, kafka_up: None) -> Iterator[Stack]:
    with make_stack(settings, partitions=1) as made:
        yield made


def test_default_worker_count_is_never_above_the_partitions(
    one_partition: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TM_WORKERS unset on a 2-CPU machine, a topic of one partition: one worker (a second
    would own nothing and hold its connections for nothing)."""
    stack = one_partition
    monkeypatch.delenv("TM_WORKERS", raising=False)
    tm = TmRun(stack, tmp_path)
    try:
        tm.wait_assigned(1)
        stack.produce([(None, HEADERS, orjson.dumps(BODY))])
        wait_for(stack.all_committed, what="the message committed")
    finally:
        assert tm.stop() == 0, tm.output()
    output = tm.output()
    assert "starting workers=1 " in output, output
    assert output.count("worker spawned") == 1, output


@pytest.mark.parametrize("log_format", ["structured", "simple"])
def test_progress_lines_say_what_each_worker_applied(
    stack: Stack, tmp_path: Path, log_format: str
) -> None:
    """At info level, every TM_PROGRESS_INTERVAL_S, a line per worker that applied something:
    its messages by outcome, its dead letters by reason, the rate, its lag and the p99 of the
    end-to-end latency; nothing while idle."""
    malformed = (None, HEADERS, b"{not json")
    stack.produce([(None, HEADERS, orjson.dumps({**BODY, "user_email": f"u{n}@x.io"}))
                   for n in range(40)] + [malformed])  # fmt: skip
    tm = TmRun(stack, tmp_path, TM_WORKERS="2", TM_PROGRESS_INTERVAL_S="1", LOG_FORMAT=log_format)
    try:
        wait_for(lambda: sum(f["applied"] for f in progress(tm, log_format)) == 41)
        idle = len(progress(tm, log_format))
        time.sleep(3)  # three intervals without a message...
        assert tm.stop() == 0
    finally:
        tm.close()
    lines = progress(tm, log_format)
    assert len(lines) == idle  # ...with no line for an interval without messages
    assert sum(f.get("created", 0) for f in lines) == 40
    assert sum(f.get("dlq_invalid_json", 0) for f in lines) == 1
    assert {fields["slot"] for fields in lines} <= {0, 1}
    for fields in lines:
        assert fields["rate_per_s"] > 0
        assert fields["lag"] >= 0
        assert fields["e2e_p99_ms"] > 0


def progress(tm: TmRun, log_format: str) -> list[dict[str, float]]:
    """The fields of tm's progress lines so far."""
    found = []
    for line in tm.output().splitlines():
        if log_format == "structured":
            if not line.startswith("{") or '"message":"progress"' not in line.replace(" ", ""):
                continue
            found.append(
                {k: v for k, v in orjson.loads(line).items() if isinstance(v, int | float)}
            )
        elif "]:progress " in line:
            pairs = (item.split("=", 1) for item in line.split("]:progress ", 1)[1].split())
            found.append({k: float(v) for k, v in pairs if v.replace(".", "", 1).isdigit()})
    return found
