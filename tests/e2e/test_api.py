"""The HTTP API of a real `tm run`: every endpoint's answer and error statuses, the token,
readiness following the workers and the database, the task counts, the task pages, and the
consumer-group lag on /metrics."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import orjson
import pytest

from harness import wait_for
from harness.proxy import TcpProxy
from harness.stack import Stack
from harness.tm import TmRun
from tm.traffic import new_task_message

pytestmark = pytest.mark.e2e

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
FAST = {
    "TM_RETRY_BACKOFF_INITIAL_MS": "100",
    "TM_RETRY_BACKOFF_MAX_MS": "1000",
    "POSTGRES_QUERY_TIMEOUT": "2000",
    "POSTGRES_CONNECTION_TIMEOUT": "2000",
}


@dataclass
class Reply:
    status: int  # 0: nobody listening
    headers: Message
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def get(port: int, path: str, *, token: str | None = None, method: str = "GET") -> Reply:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return Reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, error.headers, error.read())
    except (ConnectionError, urllib.error.URLError):
        return Reply(0, Message(), b"")


def wait_status(port: int, path: str, status: int, *, timeout_s: float = 30.0) -> Reply:
    return wait_for(
        lambda: (reply := get(port, path)).status == status and reply,
        timeout_s=timeout_s,
        what=f"{path} answering {status}",
    )


def insert(stack: Stack, rows: list[tuple[str, str, str | None, str]]) -> None:
    """(id, status, result, created_at interval before now) rows, e-mail derived from the id."""
    stack.query(
        "INSERT INTO web_crawl_tasks (id, user_email, user_query, original_url, received_at,"
        " status, result, finished_at, created_at)"
        " SELECT r.id::uuid, 'u-' || r.id || '@example.com', 'query', 'https://example.com/',"
        " now() - r.age::interval, r.status::task_status, r.result,"
        " CASE WHEN r.status = 'new' THEN NULL ELSE now() END, now() - r.age::interval"
        " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])"
        " AS r(id, status, result, age)",
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
    )


def rows_of(status: str, age: str, count: int) -> list[tuple[str, str, str | None, str]]:
    result = None if status == "new" else f"{status} text"
    return [(str(uuid.uuid4()), status, result, age) for _ in range(count)]


# -- health, liveness, errors ----------------------------------------------------------------


def test_once_ready_every_health_endpoint_answers_up_with_its_details(
    stack: Stack, tmp_path: Path
) -> None:
    tm = TmRun(stack, tmp_path, TM_WORKERS="2")
    try:
        live = wait_status(tm.port, "/api/health/live", 200)
        ready = wait_status(tm.port, "/api/health/ready", 200)
        health = get(tm.port, "/api/health")
        detailed = get(tm.port, "/api/health/detailed")
        parts = {name: get(tm.port, f"/api/health/{name}") for name in ("database", "kafka")}
        service = get(tm.port, "/api/health/service")
        config = get(tm.port, "/api/metrics/config")
    finally:
        assert tm.stop() == 0, tm.output()

    body = live.json()
    assert body["alive"] is True and ISO_MS.fullmatch(body["timestamp"])
    assert isinstance(body["uptime"], int) and body["uptime"] >= 0
    assert live.headers["Content-Type"] == "application/json; charset=utf-8"

    assert ready.json()["ready"] is True
    assert ready.json()["checks"] == {"database": "up", "kafka": "up", "service": "up"}

    assert health.status == 200
    body = health.json()
    assert set(body) == {"status", "timestamp", "version", "uptime", "checks"}
    assert body["status"] == "healthy"
    assert set(body["checks"]) == {"database", "kafka", "service"}
    for check in body["checks"].values():
        assert set(check) == {"status", "responseTime"} and check["status"] == "up"

    assert detailed.status == 200
    checks = detailed.json()["checks"]
    database = checks["database"]["details"]
    assert database["connectionPoolSize"] == 2 and database["tableAccessible"] is True
    assert database["database"] == stack.database
    kafka = checks["kafka"]["details"]
    assert kafka["topicsCount"] >= 3 and kafka["brokers"] >= 1
    assert kafka["clusterId"] != "unknown" and kafka["taskStatusPartitions"] == stack.partitions
    workers = checks["service"]["details"]
    assert workers["workersExpected"] == workers["workersJoined"] == 2
    assert sum(w["partitions"] for w in workers["workers"]) == stack.partitions
    assert workers["memoryUsage"]["rss"] > 0
    assert workers["memoryUsage"]["totalRss"] > workers["memoryUsage"]["rss"]
    for check in checks.values():
        assert "error" not in check and check["ageMs"] < 15_000

    for name, reply in [*parts.items(), ("service", service)]:
        assert reply.status == 200, reply.body
        body = reply.json()
        assert body["component"] == name and body["status"] == "up"
        assert {"timestamp", "responseTime", "details"} <= set(body)

    assert config.status == 200
    assert config.json() == {
        "availableTimeRanges": [1, 6, 12, 24, 48, 72],
        "defaultTimeRange": 24,
        "refreshInterval": 15,
    }


def test_two_members_of_one_group_are_both_ready(stack: Stack, tmp_path: Path) -> None:
    """Two pods of one StatefulSet: each owns its share of the partitions, and both are ready
    (readiness counts the group's assignment, not one pod's)."""
    first = TmRun(stack, tmp_path, TM_WORKERS="1")
    second: TmRun | None = None
    try:
        second = TmRun(stack, tmp_path, TM_WORKERS="1")
        wait_for(
            lambda: len(first.owned()) == 3 and len(second.owned()) == 3,
            what="3 partitions each",
        )
        for tm in (first, second):
            body = orjson.loads(wait_status(tm.port, "/api/health/ready", 200).body)
            assert body["ready"] is True
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_errors_are_json(stack: Stack, tmp_path: Path) -> None:
    tm = TmRun(stack, tmp_path, TM_WORKERS="1")
    try:
        wait_status(tm.port, "/api/health/live", 200)
        missing = get(tm.port, "/api/nothing/here")
        outside = get(tm.port, "/favicon.ico")
        post = get(tm.port, "/api/health", method="POST")
        unknown_component = get(tm.port, "/api/health/redis")
    finally:
        assert tm.stop() == 0, tm.output()

    for reply, path in [
        (missing, "/api/nothing/here"),
        (outside, "/favicon.ico"),
        (unknown_component, "/api/health/redis"),
    ]:
        assert reply.status == 404
        assert reply.headers["Content-Type"] == "application/json; charset=utf-8"
        body = reply.json()
        assert body["error"] == "Endpoint not found" and body["path"] == path
        assert ISO_MS.fullmatch(body["timestamp"])
    assert post.status == 405
    assert post.json()["error"] == "Method POST not allowed"
    assert "GET" in post.headers["Allow"]
    assert "HTTP request" not in tm.output()  # nothing logged per request


# -- readiness follows the workers and the database ------------------------------------------


def test_readiness_falls_when_the_database_is_cut_and_returns(
    stack: Stack, proxy: TcpProxy, tmp_path: Path
) -> None:
    env = {"POSTGRES_HOST": proxy.host, "POSTGRES_PORT": str(proxy.port), **FAST}
    tm = TmRun(stack, tmp_path, TM_WORKERS="2", **env)
    try:
        wait_status(tm.port, "/api/health/ready", 200)
        proxy.cut()
        down = wait_status(tm.port, "/api/health/ready", 503)
        database = get(tm.port, "/api/health/database")
        health = get(tm.port, "/api/health")
        live = get(tm.port, "/api/health/live")
        metrics = get(tm.port, "/api/metrics")
        tasks = get(tm.port, "/api/tasks")
        proxy.restore()
        up = wait_status(tm.port, "/api/health/ready", 200)
        metrics_after = get(tm.port, "/api/metrics")
    finally:
        assert tm.stop() == 0, tm.output()

    body = down.json()
    assert body["ready"] is False and body["checks"]["database"] == "down"
    assert body["checks"]["kafka"] == "up"
    assert any(reason.startswith("database: ") for reason in body["reasons"])
    assert database.status == 503 and database.json()["status"] == "down"
    assert database.json()["error"]
    assert health.status == 503 and health.json()["status"] == "degraded"
    assert live.status == 200  # liveness does not depend on the database
    assert metrics.status == 500
    assert metrics.json()["error"] == "Failed to retrieve metrics"
    assert tasks.status == 503 and tasks.json()["error"] == "Database unavailable"
    assert up.json()["ready"] is True
    assert metrics_after.status == 200


# -- /api/metrics ----------------------------------------------------------------------------

TOKEN = "s3cret-token"
INVALID_HOURS = "Invalid hours parameter. Must be a positive number."


def test_task_metrics_count_rows_by_creation_window(stack: Stack, tmp_path: Path) -> None:
    insert(
        stack,
        rows_of("new", "50 minutes", 3)
        + rows_of("completed", "50 minutes", 2)
        + rows_of("error", "50 minutes", 1)
        + rows_of("new", "30 hours", 4)
        + rows_of("completed", "30 hours", 1)
        + rows_of("error", "100 hours", 2),
    )
    tm = TmRun(
        stack,
        tmp_path,
        TM_WORKERS="1",
        METRICS_DEFAULT_TIME_RANGE_HOURS="48",
        METRICS_AVAILABLE_TIME_RANGES="1,48",
        METRICS_REFRESH_INTERVAL_SECONDS="30",
    )
    try:
        wait_status(tm.port, "/api/health/live", 200)
        default = get(tm.port, "/api/metrics")
        by_hours = {h: get(tm.port, f"/api/metrics?hours={h}") for h in (1, 24, 72, 168)}
        as_json = get(tm.port, "/api/metrics/json?hours=24")
        json_default = get(tm.port, "/api/metrics/json")
        config = get(tm.port, "/api/metrics/config")
        invalid = {
            raw: get(tm.port, f"/api/metrics?hours={raw}")
            for raw in ("6abc", "0", "-1", "", "1.5", "abc", "%206", "06", "8761", "99999999")
        }
        twice = get(tm.port, "/api/metrics?hours=1&hours=2")
        json_invalid = get(tm.port, "/api/metrics/json?hours=6abc")
    finally:
        assert tm.stop() == 0, tm.output()

    assert default.status == 200
    assert default.headers["Content-Type"] == PROMETHEUS_TYPE
    text = default.body.decode()
    assert text.endswith("\n") and not text.endswith("\n\n")
    stamp = int(text.split("web_crawl_metrics_timestamp{", 1)[1].split("\n", 1)[0].split()[1])
    assert abs(stamp - time.time()) < 60
    assert text == (
        "# HELP web_crawl_new_tasks_total Web crawl tasks created in the last 48h that are now"
        " new\n"
        "# TYPE web_crawl_new_tasks_total gauge\n"
        'web_crawl_new_tasks_total{time_range="48h"} 7\n'
        "# HELP web_crawl_completed_tasks_total Web crawl tasks created in the last 48h that are"
        " now completed\n"
        "# TYPE web_crawl_completed_tasks_total gauge\n"
        'web_crawl_completed_tasks_total{time_range="48h"} 3\n'
        "# HELP web_crawl_error_tasks_total Web crawl tasks created in the last 48h that are now"
        " error\n"
        "# TYPE web_crawl_error_tasks_total gauge\n"
        'web_crawl_error_tasks_total{time_range="48h"} 1\n'
        "# HELP web_crawl_total_tasks_count Web crawl tasks created in the last 48h\n"
        "# TYPE web_crawl_total_tasks_count gauge\n"
        'web_crawl_total_tasks_count{time_range="48h"} 11\n'
        "# HELP web_crawl_metrics_timestamp Unix time in seconds when these counts were read\n"
        "# TYPE web_crawl_metrics_timestamp gauge\n"
        f'web_crawl_metrics_timestamp{{time_range="48h"}} {stamp}\n'
        "# HELP tm_prune_deleted_rows_total Finished tasks deleted by tm db prune, all runs\n"
        "# TYPE tm_prune_deleted_rows_total counter\n"
        "tm_prune_deleted_rows_total 0\n"  # no prune yet: no tm_prune_last_* either
    )

    expected = {1: (3, 2, 1, 6), 24: (3, 2, 1, 6), 72: (7, 3, 1, 11), 168: (7, 3, 3, 13)}
    for hours, reply in by_hours.items():
        assert reply.status == 200
        values = dict(
            line.split(" ") for line in reply.body.decode().splitlines() if line[0] != "#"
        )
        label = f'{{time_range="{hours}h"}}'
        got = tuple(
            int(values[f"{name}{label}"])
            for name in (
                "web_crawl_new_tasks_total",
                "web_crawl_completed_tasks_total",
                "web_crawl_error_tasks_total",
                "web_crawl_total_tasks_count",
            )
        )
        assert got == expected[hours], hours

    body = as_json.json()
    assert as_json.status == 200
    assert {k: body[k] for k in body if k not in ("timestamp", "lastUpdated")} == {
        "newTasksCount": 3,
        "completedTasksCount": 2,
        "errorTasksCount": 1,
        "totalTasksCount": 6,
        "timeRange": "24h",
    }
    assert ISO_MS.fullmatch(body["timestamp"]) and ISO_MS.fullmatch(body["lastUpdated"])
    assert json_default.json()["timeRange"] == "48h"
    assert json_default.json()["totalTasksCount"] == 11
    assert config.json() == {
        "availableTimeRanges": [1, 48],
        "defaultTimeRange": 48,
        "refreshInterval": 30,
    }

    for raw, reply in [*invalid.items(), ("twice", twice), ("json", json_invalid)]:
        assert reply.status == 400, raw
        body = reply.json()
        assert set(body) == {"error", "timestamp"}, raw
        assert body["error"] == INVALID_HOURS, raw


def test_task_metrics_carry_the_last_prune_run(stack: Stack, tmp_path: Path) -> None:
    insert(
        stack,
        rows_of("completed", "40 days", 5)
        + rows_of("error", "40 days", 2)
        + rows_of("new", "40 days", 3)
        + rows_of("completed", "2 days", 4),
    )
    pruned = subprocess.run(
        [sys.executable, "-m", "tm", "db", "prune", "--days", "30", "--batch-size", "3"],
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    tm = TmRun(stack, tmp_path, TM_WORKERS="1")
    try:
        wait_status(tm.port, "/api/health/live", 200)
        reply = get(tm.port, "/api/metrics")
    finally:
        assert tm.stop() == 0, tm.output()

    assert reply.status == 200
    values = dict(line.split(" ") for line in reply.body.decode().splitlines() if line[0] != "#")
    assert int(values["tm_prune_deleted_rows_total"]) == 7
    assert int(values["tm_prune_last_deleted_rows"]) == 7
    assert int(values["tm_prune_last_batches"]) == 4  # 10 old rows, 3 a batch
    assert int(values["tm_prune_last_complete"]) == 1
    assert float(values["tm_prune_last_duration_seconds"]) >= 0
    assert abs(float(values["tm_prune_last_run_timestamp_seconds"]) - time.time()) < 120
    assert stack.count("status = 'new'") == 3 and stack.count() == 7


# -- /api/tasks --------------------------------------------------------------------------------


def test_tasks_api_demands_the_token_finds_by_id_pages_in_order_and_refuses_bad_queries(
    stack: Stack, tmp_path: Path
) -> None:
    token = TOKEN
    rows = (
        rows_of("new", "1 hour", 40)
        + rows_of("completed", "2 hours", 35)
        + rows_of("error", "3 hours", 25)
        + [(str(uuid.uuid4()), "completed", "x" * 1500, "10 minutes")]
    )
    insert(stack, rows)
    # Ties on created_at: the id breaks them.
    stack.query("UPDATE web_crawl_tasks SET created_at = date_trunc('minute', created_at)")
    order = [
        str(r["id"])
        for r in stack.query("SELECT id FROM web_crawl_tasks ORDER BY created_at DESC, id DESC")
    ]
    completed = [
        str(r["id"])
        for r in stack.query(
            "SELECT id FROM web_crawl_tasks WHERE status = 'completed'"
            " ORDER BY created_at DESC, id DESC"
        )
    ]
    long_id = rows[-1][0]
    tm = TmRun(stack, tmp_path, TM_WORKERS="1", API_TOKEN=token)
    try:
        wait_status(tm.port, "/api/health/live", 200)
        some_id = order[0]
        guarded = {
            "none": get(tm.port, "/api/tasks"),
            "wrong": get(tm.port, "/api/tasks", token=TOKEN + "x"),
            "one": get(tm.port, f"/api/tasks/{some_id}"),
            "bad_id_no_token": get(tm.port, "/api/tasks/not-a-uuid"),
        }
        basic = Reply(0, Message(), b"")
        request = urllib.request.Request(f"http://127.0.0.1:{tm.port}/api/tasks")
        request.add_header("Authorization", f"Basic {token}")
        try:
            urllib.request.urlopen(request, timeout=10).close()  # noqa: S310
        except urllib.error.HTTPError as error:
            with error:
                basic = Reply(error.code, error.headers, error.read())

        one = get(tm.port, f"/api/tasks/{long_id.upper()}", token=token)
        unknown = get(tm.port, f"/api/tasks/{uuid.uuid4()}", token=token)
        malformed = [
            get(tm.port, f"/api/tasks/{raw}", token=token)
            for raw in ("not-a-uuid", long_id.replace("-", ""), long_id + "0")
        ]

        def walk(query: str, limit: int) -> list[str]:
            seen: list[str] = []
            after = ""
            while True:
                reply = get(tm.port, f"/api/tasks?limit={limit}{query}{after}", token=token)
                assert reply.status == 200, reply.body
                page = reply.json()
                assert len(page["tasks"]) <= limit
                seen += [task["id"] for task in page["tasks"]]
                if page["next"] is None:
                    return seen
                assert len(page["tasks"]) == limit
                after = f"&after={page['next']}"

        everything = walk("", 7)
        only_completed = walk("&status=completed", 10)
        first_page = get(tm.port, "/api/tasks", token=token).json()
        bad = {
            raw: get(tm.port, f"/api/tasks?{raw}", token=token)
            for raw in (
                "limit=0",
                "limit=1001",
                "limit=abc",
                "limit=10x",
                "limit=1&limit=2",
                "status=done",
                "status=NEW",
                "after=garbage",
                "after=" + "A" * 40,
            )
        }
    finally:
        assert tm.stop() == 0, tm.output()

    for name, reply in guarded.items():
        assert reply.status == 401, name
        assert reply.json()["error"].startswith("Missing or invalid bearer token"), name
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    assert basic.status == 401

    assert one.status == 200
    task = one.json()
    assert set(task) == {
        "id",
        "user_email",
        "user_query",
        "base_url",
        "received_at",
        "status",
        "result",
        "finished_at",
        "created_at",
        "updated_at",
    }
    assert task["id"] == long_id and task["user_email"] == f"u-{long_id}@example.com"
    assert task["base_url"] == "https://example.com/" and task["status"] == "completed"
    assert task["result"] == "x" * 1500
    for key in ("received_at", "finished_at", "created_at", "updated_at"):
        assert task[key].endswith("Z")

    assert unknown.status == 404 and unknown.json()["error"] == "Task not found"
    for reply in malformed:
        assert reply.status == 400 and reply.json()["error"] == "Invalid task id. Must be a UUID."

    assert everything == order
    assert len(set(everything)) == len(rows)
    assert only_completed == completed
    assert len(first_page["tasks"]) == 100 and first_page["next"] is not None
    listed = next(t for t in first_page["tasks"] if t["id"] == long_id)
    assert listed["result"] == "x" * 1000 and listed["result_truncated"] is True
    assert all(t["result_truncated"] is False for t in first_page["tasks"] if t["id"] != long_id)

    for raw, reply in bad.items():
        assert reply.status == 400, raw
        assert (
            reply.json()["error"].startswith("Invalid ") or "at most once" in reply.json()["error"]
        ), raw


# -- /metrics ----------------------------------------------------------------------------------

LAG_LINE = re.compile(r'^tm_consumer_lag_messages\{partition="(\d+)"\} (\S+)$', re.MULTILINE)


def lag_of(port: int) -> dict[int, float]:
    reply = get(port, "/metrics")
    if reply.status != 200:
        return {}
    return {int(p): float(v) for p, v in LAG_LINE.findall(reply.body.decode())}


def test_consumer_lag_per_partition_rises_while_the_database_is_cut_and_drains_to_zero(
    stack: Stack, proxy: TcpProxy, tmp_path: Path
) -> None:
    env = {"POSTGRES_HOST": proxy.host, "POSTGRES_PORT": str(proxy.port), **FAST}
    tm = TmRun(stack, tmp_path, TM_WORKERS="2", **env)
    per_partition = 5
    try:
        wait_status(tm.port, "/api/health/ready", 200)
        idle = wait_for(
            lambda: (lag := lag_of(tm.port)) and len(lag) == stack.partitions and lag,
            what="a lag series per partition",
        )
        proxy.cut()  # the workers cannot apply: nothing is committed, lag builds up
        for partition in range(stack.partitions):
            stack.produce(
                [(None, *new_task_message(n)) for n in range(per_partition)], partition=partition
            )
        lagging = wait_for(
            lambda: (lag := lag_of(tm.port)) and min(lag.values()) == per_partition and lag,
            what="the lag of the produced messages",
        )
        proxy.restore()
        drained = wait_for(
            lambda: (
                (lag := lag_of(tm.port))
                and len(lag) == stack.partitions
                and max(lag.values()) == 0
                and lag
            ),
            what="the lag back to 0",
        )
        assert stack.all_committed()
        scrape = get(tm.port, "/metrics")
    finally:
        assert tm.stop() == 0, tm.output()

    assert idle == dict.fromkeys(range(stack.partitions), 0.0)
    assert lagging == dict.fromkeys(range(stack.partitions), float(per_partition))
    assert drained == dict.fromkeys(range(stack.partitions), 0.0)
    assert scrape.headers["Content-Type"] == PROMETHEUS_TYPE
    text = scrape.body.decode()
    assert text.endswith("\n")
    assert "# TYPE tm_consumer_lag_messages gauge" in text
    # The committed offsets moved to the end of each partition: what the stalled-partition
    # alert watches beside the lag.
    committed = {
        int(p): float(v)
        for p, v in re.findall(
            r'^tm_consumer_committed_offset\{partition="(\d+)"\} (\S+)$', text, re.MULTILINE
        )
    }
    assert committed == dict.fromkeys(range(stack.partitions), float(per_partition))
    consumed = re.search(r"^tm_messages_consumed_total (\S+)$", text, re.MULTILINE)
    assert consumed is not None and float(consumed.group(1)) >= stack.partitions * per_partition
    assert 'tm_messages_applied_total{outcome="created"}' in text
    assert "tm_process_resident_memory_bytes" in text
