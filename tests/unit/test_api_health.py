"""Health, readiness and liveness from cached checks and the supervisor's state, served by the
real application (aiohttp's test server) with no database and no broker behind it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tm import config
from tm.api import prometheus
from tm.api.check import STALE_AFTER_S, Check
from tm.api.context import Api
from tm.api.counts import SharedCounts
from tm.api.database import ApiDatabase
from tm.api.kafka_watch import KafkaWatch, Lag
from tm.api.responses import errors_as_json
from tm.api.server import build_app
from tm.api.state import StateReader

SETTINGS = config.load({"TM_WORKERS": "2"})


def state_line(*, stopping: bool = False, joined: bool = True, partitions: int = 3) -> bytes:
    worker = {"pid": 1, "booted": True, "joined": joined, "partitions": partitions, "restarts": 0}
    line = {
        "started_at": time.time() - 5,
        "stopping": stopping,
        "workers": [{"slot": 0, **worker}, {"slot": 1, **worker}],
    }
    return orjson.dumps(line) + b"\n"


def up(**details: Any) -> Check:
    return Check.now(is_up=True, started=time.monotonic(), details=details)


def down(error: str) -> Check:
    return Check.now(is_up=False, started=time.monotonic(), error=error)


@pytest.fixture
def api() -> Api:
    state = StateReader()
    state.feed(state_line())
    database = ApiDatabase(SETTINGS.postgres)
    database.check = up(tableAccessible=True)
    kafka = KafkaWatch(SETTINGS.kafka)
    kafka.check = up(taskStatusPartitions=6)
    return Api(
        settings=SETTINGS,
        state=state,
        database=database,
        kafka=kafka,
        registry=prometheus.build_registry(kafka, state),
        counts=SharedCounts(database),
        started_at=time.time(),
    )


@pytest.fixture
async def client(api: Api) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(TestServer(build_app(api))) as test_client:
        yield test_client


async def answer(client: TestClient[web.Request, web.Application], path: str) -> tuple[int, Any]:
    response = await client.get(path)
    return response.status, await response.json()


async def test_all_up_is_healthy_and_ready(
    client: TestClient[web.Request, web.Application],
) -> None:
    status, body = await answer(client, "/api/health")
    assert (status, body["status"]) == (200, "healthy")
    status, body = await answer(client, "/api/health/ready")
    assert (status, body["ready"]) == (200, True) and "reasons" not in body
    status, body = await answer(client, "/api/health/service")
    assert status == 200 and body["details"]["partitionsOwned"] == 6


async def test_one_dependency_down_is_degraded_and_503(
    api: Api, client: TestClient[web.Request, web.Application]
) -> None:
    api.database.check = down("ConnectionRefusedError")
    status, body = await answer(client, "/api/health")
    assert (status, body["status"]) == (503, "degraded")  # the original answered 200
    status, body = await answer(client, "/api/health/detailed")
    assert status == 503 and body["checks"]["database"]["error"] == "ConnectionRefusedError"
    status, body = await answer(client, "/api/health/ready")
    assert status == 503 and body["reasons"] == ["database: ConnectionRefusedError"]
    status, body = await answer(client, "/api/health/database")
    assert (status, body["status"], body["component"]) == (503, "down", "database")
    status, _ = await answer(client, "/api/health/kafka")
    assert status == 200
    status, body = await answer(client, "/api/health/live")
    assert (status, body["alive"]) == (200, True)


async def test_everything_down_is_unhealthy_but_alive(
    api: Api, client: TestClient[web.Request, web.Application]
) -> None:
    api.database.check = down("timed out")
    api.kafka.check = down("_TRANSPORT")
    api.state.feed(state_line(stopping=True))
    status, body = await answer(client, "/api/health")
    assert (status, body["status"]) == (503, "unhealthy")
    status, _ = await answer(client, "/api/health/live")
    assert status == 200


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (state_line(stopping=True), "stopping"),
        (state_line(joined=False, partitions=0), "worker 0 has not joined the group"),
        (state_line(partitions=1), "2 of 6 partitions owned"),
        (state_line(partitions=1), "4 of 6 partitions assigned in the group"),
    ],
)
async def test_ready_is_503_naming_why_when_stopping_unjoined_or_short_of_partitions(
    api: Api, client: TestClient[web.Request, web.Application], line: bytes, reason: str
) -> None:
    if "group" in reason:  # the group coordinator's view, when the API could read it
        api.kafka.check = up(taskStatusPartitions=6, groupAssignedPartitions=4)
    api.state.feed(line)
    status, body = await answer(client, "/api/health/ready")
    assert status == 503 and body["checks"]["service"] == "down"
    assert reason in body["reasons"][0]


async def test_stale_answers_are_not_believed(
    api: Api, client: TestClient[web.Request, web.Application]
) -> None:
    old = time.monotonic() - STALE_AFTER_S - 1
    api.kafka.check = Check(
        is_up=True, response_time_ms=1.0, checked_at=old, checked_at_wall=0.0, details={}
    )
    status, body = await answer(client, "/api/health/kafka")
    assert status == 503 and body["error"].startswith("no answer from the check")
    api.state.received_at = old
    status, body = await answer(client, "/api/health/service")
    assert status == 503 and "no recent state from the supervisor" in body["error"]


async def test_lag_is_served_only_when_fresh(
    api: Api, client: TestClient[web.Request, web.Application]
) -> None:
    api.kafka.lag = Lag(by_partition={0: 3, 1: 0}, checked_at=time.monotonic())
    response = await client.get("/metrics")
    text = await response.text()
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert 'tm_consumer_lag_messages{partition="0"} 3.0\n' in text
    assert 'tm_consumer_lag_messages{partition="1"} 0.0\n' in text
    api.kafka.lag = Lag(by_partition={0: 3}, checked_at=time.monotonic() - STALE_AFTER_S - 1)
    response = await client.get("/metrics")
    assert "tm_consumer_lag_messages{" not in await response.text()


async def test_unknown_paths_methods_and_crashes_are_json(
    api: Api, client: TestClient[web.Request, web.Application]
) -> None:
    status, body = await answer(client, "/nope")
    assert (status, body["error"], body["path"]) == (404, "Endpoint not found", "/nope")
    response = await client.delete("/api/health")
    body = await response.json()
    assert response.status == 405 and response.headers["Allow"] == "GET, HEAD"
    assert body["allowed"] == ["GET", "HEAD"]


async def test_an_unexpected_error_is_a_bare_500(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("secret internals")

    app = web.Application(middlewares=[errors_as_json])
    app.router.add_get("/broken", broken)
    async with TestClient(TestServer(app)) as test_client:
        response = await test_client.get("/broken")
        body = await response.json()
    assert response.status == 500
    assert set(body) == {"error", "timestamp"} and body["error"] == "Internal server error"
    assert "secret" not in orjson.dumps(body).decode()
    assert "unexpected error in the API" in caplog.text


async def test_a_pod_owning_its_share_of_the_partitions_is_ready(
    api: Api, client: TestClient[web.Request, web.Application]
) -> None:
    """Several pods in one group: this one's workers own 2 of 6, the group owns all 6."""
    api.kafka.check = up(taskStatusPartitions=6, groupAssignedPartitions=6)
    api.state.feed(state_line(partitions=1))
    status, body = await answer(client, "/api/health/ready")
    assert (status, body["ready"]) == (200, True), body
