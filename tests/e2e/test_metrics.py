"""Prometheus metrics of a real `tm run` (DESIGN §6): GET /metrics after a known mix of messages
counts exactly what was sent, per outcome and per dead-letter reason; a killed worker is counted
as a restart and its live series go while its counters stay; and a real Prometheus server
(Debian's `prometheus`, installed by `make test` through stack/tools.sh) scrapes tm and answers
a PromQL query with the number of messages sent, with tm's alert rules loaded.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import wait_for
from harness.kafka import Headers
from harness.servers import RULES, get, get_json, prometheus_server, query
from harness.stack import Stack
from harness.tm import TmRun

pytestmark = pytest.mark.e2e

OUTCOMES = ("created", "duplicate", "updated", "unchanged", "task_not_found", "invalid_transition")
REASONS = (
    "invalid_json",
    "invalid_headers",
    "invalid_body",
    "task_not_found",
    "invalid_transition",
    "result_too_large",
    "row_rejected",
)
Message = tuple[bytes | None, Headers, bytes | None]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- messages ----------------------------------------------------------------------------------


def _headers(status: str | None, task_id: uuid.UUID | None = None) -> Headers:
    out: Headers = [("task_type", b"web-crawl"), ("timestamp", b"2025-08-10T10:18:59.023Z")]
    if status is not None:
        out.append(("status", status.encode()))
    if task_id is not None:
        out.append(("task_id", str(task_id).encode()))
    return out


def new(task_id: uuid.UUID, email: str = "ada@example.com") -> Message:
    body = {"user_email": email, "user_query": "q", "base_url": "https://example.com/shop"}
    return (None, _headers("new", task_id), orjson.dumps(body))


def completed(task_id: uuid.UUID) -> Message:
    return (str(task_id).encode(), _headers("completed", task_id), b'{"crawl_result": "ok"}')


def failed(task_id: uuid.UUID) -> Message:
    return (str(task_id).encode(), _headers("error", task_id), b'{"error": "timeout"}')


# -- /metrics ----------------------------------------------------------------------------------


def scrape(tm: TmRun) -> Samples | None:
    """The samples of GET /metrics, or None while the API does not answer."""
    got = get(tm.port, "/metrics")
    if got is None:
        return None
    status, content_type, body = got
    assert status == 200
    assert content_type.startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for metric, labels in samples if metric == name]


def scrape_when(
    tm: TmRun, condition: Callable[[Samples], bool], what: str, timeout_s: float = 30.0
) -> Samples:
    """Scrape until ``condition(samples)`` holds (metrics are recorded just after a commit)."""

    def check() -> Samples:
        samples = scrape(tm)
        return samples if samples is not None and condition(samples) else {}

    return wait_for(check, timeout_s=timeout_s, what=what)


@contextmanager
def tm_running(stack: Stack, tmp_path: Path, **env: str) -> Iterator[TmRun]:
    tm = TmRun(stack, tmp_path, **env)
    try:
        yield tm
    except BaseException:
        tm.stop()
        raise
    assert tm.stop() == 0, tm.output()


# -- 1. the counters equal what was sent --------------------------------------------------------


def test_metrics_count_a_known_mix_of_messages(stack: Stack, tmp_path: Path) -> None:
    n = 40
    ids = [uuid.uuid4() for _ in range(n)]
    unknown = uuid.uuid4()
    updates = [
        *(completed(task_id) for task_id in ids[:5]),
        *(failed(task_id) for task_id in ids[5:8]),
        (None, _headers("new"), b"{not json"),  # invalid_json
        (None, _headers(None), orjson.dumps({"user_email": "a@b.c"})),  # invalid_headers
        new(uuid.uuid4(), email="not-an-email"),  # invalid_body
        completed(unknown),  # task_not_found
        failed(ids[0]),  # invalid_transition: ids[0] is completed by then
    ]
    sent = n + len(updates)

    with tm_running(stack, tmp_path, TM_WORKERS="2") as tm:
        tm.wait_assigned(stack.partitions)
        stack.produce([new(task_id) for task_id in ids])  # spread over the partitions
        wait_for(stack.all_committed, what="the new tasks committed")
        stack.produce(updates, partition=0)  # in order: the completion before the error
        wait_for(stack.all_committed, what="every message committed")
        samples = scrape_when(
            tm,
            lambda s: (
                value(s, "tm_messages_consumed_total") >= sent
                and value(s, "tm_workers_assigned") == 2
            ),
            what=f"tm_messages_consumed_total = {sent} and both workers assigned",
        )
        pids = tm.worker_pids()

    assert value(samples, "tm_messages_consumed_total") == sent
    applied = {o: value(samples, "tm_messages_applied_total", outcome=o) for o in OUTCOMES}
    assert applied == {
        "created": n,
        "duplicate": 0,
        "updated": 8,
        "unchanged": 0,
        "task_not_found": 1,
        "invalid_transition": 1,
    }
    dead = {r: value(samples, "tm_dead_letters_total", reason=r) for r in REASONS}
    assert dead == {
        "invalid_json": 1,
        "invalid_headers": 1,
        "invalid_body": 1,
        "task_not_found": 1,
        "invalid_transition": 1,
        "result_too_large": 0,
        "row_rejected": 0,
    }
    assert value(samples, "tm_batch_retries_total") == 0
    assert len(stack.read_topic(stack.dlq_topic)) == sum(dead.values())

    # Histograms: one batch-size observation per committed batch, summing to every message;
    # each stage observed once per batch; one latency per message.
    batches = value(samples, "tm_batch_size_messages_count")
    assert batches >= 2
    assert value(samples, "tm_batch_size_messages_sum") == sent
    assert value(samples, "tm_batch_size_messages_bucket", le="+Inf") == batches
    for stage in ("decode", "db", "publish", "commit"):
        assert value(samples, "tm_stage_duration_seconds_count", stage=stage) == batches, stage
        assert value(samples, "tm_stage_duration_seconds_sum", stage=stage) > 0, stage
    assert value(samples, "tm_end_to_end_latency_seconds_count") == sent
    assert value(samples, "tm_end_to_end_latency_seconds_bucket", le="+Inf") == sent

    # Gauges of the live processes: memory of each, the workers' state, the start-up time.
    memory = series(samples, "tm_process_resident_memory_bytes")
    roles = sorted(labels["role"] for labels in memory)
    assert roles == ["api", "supervisor", "worker", "worker"], memory
    assert {int(labels["pid"]) for labels in memory if labels["role"] == "worker"} == set(pids)
    for labels in memory:
        assert 10 * 2**20 < value(samples, "tm_process_resident_memory_bytes", **labels) < 2**30
    assert value(samples, "tm_workers_configured") == 2
    assert value(samples, "tm_workers_running") == 2
    assert value(samples, "tm_workers_assigned") == 2
    assert 0 < value(samples, "tm_startup_seconds") < 30
    assert value(samples, "tm_rebalances_total", kind="assign") >= 2
    pool = value(samples, "tm_db_pool_connections", state="in_use") + value(
        samples, "tm_db_pool_connections", state="idle"
    )
    assert pool >= 2  # each worker's pool holds at least one connection
    assert value(samples, "tm_worker_restarts_total", role="worker") == 0
    assert value(samples, "tm_worker_restarts_total", role="api") == 0


# -- 2. a killed worker -------------------------------------------------------------------------


def test_killed_worker_is_counted_and_its_live_series_go(stack: Stack, tmp_path: Path) -> None:
    n = 30
    memory = "tm_process_resident_memory_bytes"

    def worker_memory_pids(samples: Samples) -> set[int]:
        return {
            int(labels["pid"]) for labels in series(samples, memory) if labels["role"] == "worker"
        }

    with tm_running(stack, tmp_path, TM_WORKERS="2") as tm:
        tm.wait_assigned(stack.partitions)
        stack.produce([new(uuid.uuid4()) for _ in range(n)])
        wait_for(stack.all_committed, what="the messages committed")
        first = tm.workers()
        scrape_when(
            tm,
            lambda s: (
                worker_memory_pids(s) == set(first.values())
                and value(s, "tm_messages_applied_total", outcome="created") == n
            ),
            what="both workers' memory and every message counted",
        )

        victim, survivor = first[0], first[1]
        os.kill(victim, signal.SIGKILL)
        replacement = tm.wait_worker(0, not_pid=victim)
        samples = scrape_when(
            tm,
            lambda s: (
                worker_memory_pids(s) == {survivor, replacement}
                and value(s, "tm_workers_running") == 2
                and value(s, "tm_worker_restarts_total", role="worker") == 1
            ),
            what="the dead worker's series gone, the new worker's present, the restart counted",
        )

    assert value(samples, "tm_worker_restarts_total", role="worker") == 1
    assert value(samples, "tm_worker_restarts_total", role="api") == 0
    assert victim not in worker_memory_pids(samples)
    assert all(int(labels["pid"]) != victim for labels in series(samples, memory))
    # What the dead worker counted stays in the sums.
    assert value(samples, "tm_messages_applied_total", outcome="created") == n
    assert value(samples, "tm_messages_consumed_total") == n
    assert value(samples, "tm_end_to_end_latency_seconds_count") == n


# -- 3. a real Prometheus server scrapes tm ----------------------------------------------------


def test_prometheus_scrapes_tm(stack: Stack, tmp_path: Path) -> None:
    n = 25
    with (
        tm_running(stack, tmp_path, TM_WORKERS="2") as tm,
        prometheus_server(tmp_path, tm.port) as prometheus,
    ):
        wait_for(
            lambda: [r for r in query(prometheus, 'up{job="tm"}') if r["value"][1] == "1"],
            what="prometheus scraping tm",
        )
        tm.wait_assigned(stack.partitions)
        stack.produce([new(uuid.uuid4()) for _ in range(n)])

        def applied() -> bool:
            result = query(prometheus, "sum(tm_messages_applied_total)")
            return bool(result) and float(result[0]["value"][1]) == n

        wait_for(applied, timeout_s=60, what=f"sum(tm_messages_applied_total) = {n}")
        created = query(prometheus, 'tm_messages_applied_total{outcome="created"}')
        assert [float(r["value"][1]) for r in created] == [n]

        rules = get_json(prometheus, "/api/v1/rules")
        loaded = [rule for group in rules["data"]["groups"] for rule in group["rules"]]
        assert len(loaded) == RULES.read_text().count("- alert: ")  # every rule of the file
        assert all(rule["health"] != "err" for rule in loaded), loaded
