"""What the status page reads besides the original endpoints: the stall rule, rates and p99 from
two readings of the metrics, the group's members matched to workers, dead letters newest first,
one shared read for many requests, and the page's own answers."""

from __future__ import annotations

import asyncio
import math
import time

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from tm import config
from tm.adapters.kafka.tools import Group, Member, Record
from tm.api import prometheus
from tm.api.context import Api
from tm.api.counts import SharedCounts
from tm.api.database import ApiDatabase
from tm.api.dead_letters import dead_letter_json, newest
from tm.api.kafka_watch import STALL_AFTER_S, KafkaWatch, advance
from tm.api.page import CONTENT_SECURITY_POLICY
from tm.api.partitions import member_of, process_uptime_s
from tm.api.rates import Totals, quantile, rates, totals
from tm.api.server import build_app
from tm.api.shared import Shared
from tm.api.state import StateReader

SETTINGS = config.load({"TM_WORKERS": "2", "API_TOKEN": "s3cret-token"})


# -- stalls ----------------------------------------------------------------------------------


def test_a_partition_is_stalled_when_its_lag_grows_past_the_last_commit_for_long_enough() -> None:
    progress = advance(None, committed=10, lag=0, now=0.0)
    progress = advance(progress, committed=10, lag=5, now=100.0)  # messages arrive
    assert not progress.is_stalled(100.0 + STALL_AFTER_S - 1)
    progress = advance(progress, committed=10, lag=9, now=100.0 + STALL_AFTER_S)
    assert progress.is_stalled(100.0 + STALL_AFTER_S)
    moved = advance(progress, committed=12, lag=7, now=200.0)
    assert not moved.is_stalled(200.0) and moved.lag_at_move == 7


def test_an_idle_partition_and_one_whose_lag_falls_back_are_not_stalled() -> None:
    idle = advance(advance(None, committed=3, lag=0, now=0.0), committed=3, lag=0, now=1e6)
    assert not idle.is_stalled(1e6)
    waiting = advance(idle, committed=3, lag=2, now=1e6)
    back = advance(waiting, committed=3, lag=0, now=1e6 + STALL_AFTER_S + 1)
    assert not back.is_stalled(1e6 + STALL_AFTER_S + 1)


# -- rates and p99 -----------------------------------------------------------------------------


def test_quantile_interpolates_inside_its_bucket_as_prometheus_does() -> None:
    buckets = {0.01: 50.0, 0.1: 100.0, math.inf: 100.0}
    assert quantile(0.5, buckets) == 0.01
    assert quantile(0.99, buckets) == 0.01 + (0.1 - 0.01) * (99 - 50) / 50
    assert quantile(0.99, {0.05: 0.0, math.inf: 10.0}) == 0.05  # above every finite bound
    assert quantile(0.99, {0.05: 0.0, math.inf: 0.0}) is None


def families(
    consumed: float, created: float, invalid_json: float, *, fast: float, slow: float
) -> list[Metric]:
    applied = CounterMetricFamily("tm_messages_applied", "", labels=["outcome"])
    applied.add_metric(["created"], created)
    dead = CounterMetricFamily("tm_dead_letters", "", labels=["reason"])
    dead.add_metric(["invalid_json"], invalid_json)
    latency = HistogramMetricFamily("tm_end_to_end_latency_seconds", "")
    latency.add_metric([], [("0.05", fast), ("0.1", fast + slow), ("+Inf", fast + slow)], 0.0)
    return [CounterMetricFamily("tm_messages_consumed", "", value=consumed), applied, dead, latency]


def test_rates_are_the_differences_over_the_span_and_p99_is_of_that_span_only() -> None:
    then = totals(families(100, 90, 10, fast=1000, slow=0), at=0.0)
    now = totals(families(160, 140, 20, fast=1099, slow=1), at=10.0)
    body = rates(then, now)
    assert body["windowS"] == 10.0 and body["consumedPerS"] == 6.0
    assert body["appliedPerS"]["created"] == 5.0 and body["appliedPerS"]["updated"] == 0.0
    assert body["deadLettersPerS"]["invalid_json"] == 1.0
    assert body["deadLettersTotal"]["invalid_json"] == 20
    # 100 new latencies, one of them above 50 ms: the p99 is at the 50 ms bound.
    assert body["endToEndP99Ms"] == 50.0


def test_a_first_reading_gives_totals_but_no_rate() -> None:
    now = totals(families(1, 1, 1, fast=1, slow=0), at=5.0)
    body = rates(None, now)
    assert body["windowS"] is None and body["appliedPerS"] is None
    assert body["deadLettersTotal"]["invalid_json"] == 1
    assert rates(Totals(4.5, 0, {}, {}, {}), now)["windowS"] is None  # too close together


# -- workers and the group's members -------------------------------------------------------------


def test_a_processes_uptime_comes_from_its_start_time_in_clock_ticks() -> None:
    ticks = 100  # SC_CLK_TCK on Linux
    stat = "42 (tm: worker (1)) S " + " ".join(["0"] * 18) + f" {30 * ticks} 0 0"
    assert process_uptime_s(stat, 100.0) == 70.0
    assert process_uptime_s("42 (tm) S", 100.0) is None


def test_a_worker_is_the_member_with_its_client_id_and_not_an_ambiguous_one() -> None:
    k = SETTINGS.kafka
    mine = Member(client_id=f"{k.client_id}-1", instance_id=None, host="/10.0.0.1", partitions=(2,))
    other = Member(
        client_id=f"{k.client_id}-0", instance_id=None, host="/10.0.0.2", partitions=(0,)
    )
    group = Group(is_stable=True, members=(mine, other))
    assert member_of(1, group, k) == mine
    assert member_of(3, group, k) is None
    twice = Group(is_stable=True, members=(mine, mine))
    assert member_of(1, twice, k) is None
    assert group.assigned == 2 and Group(is_stable=False, members=(mine,)).assigned == 0


# -- dead letters --------------------------------------------------------------------------------


def record(partition: int, offset: int, timestamp_ms: int, value: bytes = b"{not json") -> Record:
    headers: list[tuple[str, str | bytes | None]] = [
        ("status", b"new"),
        ("dlq_reason", b"invalid_json"),
        ("dlq_error", b"body: not JSON"),
        ("dlq_topic", b"task-status"),
        ("dlq_partition", str(partition).encode()),
        ("dlq_offset", b"7"),
    ]
    return Record(partition, offset, None, value, headers, timestamp_ms)


def test_dead_letters_are_newest_first_bounded_and_cut() -> None:
    records = [record(0, 5, 1000), record(1, 2, 3000), record(0, 6, 2000)]
    assert [(r.partition, r.offset) for r in newest(records, 2)] == [(1, 2), (0, 6)]
    body = dead_letter_json(record(1, 2, 3000, value=b"x" * 1000))
    assert body["reason"] == "invalid_json" and body["error"] == "body: not JSON"
    assert body["source"] == {"topic": "task-status", "partition": 1, "offset": 7}
    assert body["timestamp"] == "1970-01-01T00:00:03.000Z"
    assert len(body["value"]) == 300 and body["valueTruncated"] is True


# -- one read shared -----------------------------------------------------------------------------


async def test_concurrent_and_recent_requests_share_one_read() -> None:
    reads = 0

    async def read() -> int:
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.01)
        return reads

    shared = Shared(read, ttl_s=60.0)
    assert await asyncio.gather(*(shared.get() for _ in range(10))) == [1] * 10
    assert await shared.get() == 1 and reads == 1


async def test_a_failed_read_is_not_kept() -> None:
    calls = 0

    async def read() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("down")
        return calls

    shared = Shared(read, ttl_s=60.0)
    with pytest.raises(ConnectionError):
        await shared.get()
    assert await shared.get() == 2


# -- the page and the new endpoints, served ---------------------------------------------------


async def test_the_page_is_served_under_a_same_origin_policy_and_dead_letters_need_the_token() -> (
    None
):
    state = StateReader()
    line = {
        "started_at": time.time(),
        "workers": [
            {"slot": 0, "pid": 1, "booted": True, "joined": True, "partitions": 0, "restarts": 2}
        ],
    }
    state.feed(orjson.dumps(line) + b"\n")
    database = ApiDatabase(SETTINGS.postgres)
    kafka = KafkaWatch(SETTINGS.kafka)
    api = Api(
        settings=SETTINGS,
        state=state,
        database=database,
        kafka=kafka,
        registry=prometheus.build_registry(kafka, state),
        counts=SharedCounts(database),
        started_at=time.time(),
    )
    async with TestClient(TestServer(build_app(api))) as client:
        for path in ("/", "/ui"):
            response = await client.get(path)
            html = await response.text()
            assert response.status == 200 and response.content_type == "text/html"
            assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
            assert 'data-token-required="true"' in html and "s3cret" not in html
            assert "http://" not in html and "https://" not in html
        script = await client.get("/ui/status.js")
        assert script.status == 200 and "sessionStorage" in await script.text()
        denied = await client.get("/api/dead-letters")
        assert denied.status == 401
        group = await client.get("/api/partitions")
        body = await group.json()
        assert body["workers"][0]["restarts"] == 2 and body["workers"][0]["partitions"] is None
        assert body["partitions"] == [] and body["fresh"] is False
        rate = await (await client.get("/api/rates")).json()
        assert rate["windowS"] is None
