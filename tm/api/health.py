"""``/api/health*``: the original service's health endpoints, their paths and JSON shapes, with
its defects fixed (reference §8 items 11 and 17).

Three components, as before: ``database`` and ``kafka`` are the cached answers of the background
checks (:mod:`tm.api.database`, :mod:`tm.api.kafka_watch`), with their age; ``service`` is tm
itself, from the supervisor's state: up when the supervisor is not stopping, every worker is
alive, has joined the consumer group and is not backing off after a failure, and the workers own
every partition of the task-status topic (its partition count comes from the Kafka check).

Status codes. The overall status keeps the original's rule (no component down: ``healthy``; all
down: ``unhealthy``; otherwise ``degraded``), but only ``healthy`` is 200: ``/api/health`` and
``/api/health/detailed`` are readiness-type answers, so ``degraded`` is 503 (the original gave
200). ``/api/health/ready`` is 200 only when all three components are up. ``/api/health/live``
only proves that this process's event loop answers: it looks at no dependency.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from aiohttp import web

from tm.api.check import Check
from tm.api.context import Api, api_of
from tm.api.responses import json_response, now_iso, uptime_ms

COMPONENTS = ("database", "kafka", "service")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_MB = 1024 * 1024

try:
    VERSION = metadata.version("tm")
except metadata.PackageNotFoundError:  # running from a bare checkout
    VERSION = "0.0.0"


@dataclass(frozen=True, slots=True)
class Component:
    """One component's answer, as the endpoints show it."""

    is_up: bool
    response_time_ms: float
    age_ms: int
    error: str | None
    details: dict[str, Any]

    @property
    def status(self) -> str:
        return "up" if self.is_up else "down"

    def summary(self) -> dict[str, Any]:
        return {"status": self.status, "responseTime": self.response_time_ms}

    def full(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": self.status,
            "responseTime": self.response_time_ms,
            "ageMs": self.age_ms,
        }
        if self.error is not None:
            body["error"] = self.error
        body["details"] = self.details
        return body


def _from_check(check: Check, now: float, details: dict[str, Any]) -> Component:
    return Component(
        is_up=check.is_up_at(now),
        response_time_ms=check.response_time_ms,
        age_ms=int(check.age_s(now) * 1000),
        error=check.error_at(now),
        details={**check.details, **details},
    )


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * _PAGE_BYTES / _MB, 1)


def _service(api: Api, now: float) -> Component:
    state = api.state.current
    problems: list[str] = []
    if not api.state.is_fresh(now):
        problems.append("no recent state from the supervisor")
    if state.stopping:
        problems.append("stopping")
    for worker in state.workers:
        if not worker.pid:
            problems.append(f"worker {worker.slot} is not running")
        elif not worker.joined:
            problems.append(f"worker {worker.slot} has not joined the group")
        elif worker.retrying:
            problems.append(f"worker {worker.slot} is backing off after a failure")
    if not state.workers:
        problems.append("no worker")
    # A worker joins with an empty first assignment, and a cooperative rebalance moves
    # partitions in two rounds: ready means that every partition of the topic is owned, by
    # this pod's workers or another pod's (in a group of several pods each owns its share).
    topic_partitions = api.kafka.check.details.get("taskStatusPartitions")
    in_group = api.kafka.check.details.get("groupAssignedPartitions")
    owned = sum(w.partitions for w in state.workers if w.pid)
    if isinstance(topic_partitions, int):
        if isinstance(in_group, int) and in_group < topic_partitions:
            problems.append(f"{in_group} of {topic_partitions} partitions assigned in the group")
        elif in_group is None and owned < topic_partitions:
            problems.append(f"{owned} of {topic_partitions} partitions owned")
    pids = [os.getpid(), os.getppid(), *(w.pid for w in state.workers if w.pid)]
    sizes = [size for size in map(_rss_mb, pids) if size is not None]
    details = {
        "uptime": uptime_ms(state.started_at or api.started_at),
        "memoryUsage": {"rss": _rss_mb(os.getpid()), "totalRss": round(sum(sizes), 1)},
        "pythonVersion": platform.python_version(),
        "platform": f"{platform.system().lower()}-{platform.machine()}",
        "pid": os.getpid(),
        "supervisorPid": os.getppid(),
        "stopping": state.stopping,
        "workersExpected": api.settings.consumer.workers,
        "workersJoined": sum(1 for w in state.workers if w.pid and w.joined),
        "partitionsOwned": owned,
        "workers": [
            {
                "slot": w.slot,
                "pid": w.pid,
                "joined": w.joined,
                "partitions": w.partitions,
                "restarts": w.restarts,
                "retrying": w.retrying,
            }
            for w in state.workers
        ],
    }
    age_ms = int((now - api.state.received_at) * 1000) if api.state.received_at else 0
    return Component(
        is_up=not problems,
        response_time_ms=0.0,
        age_ms=age_ms,
        error="; ".join(problems) or None,
        details=details,
    )


def components(api: Api) -> dict[str, Component]:
    """The three components, read now from the cached checks and the supervisor's state."""
    now = time.monotonic()
    return {
        "database": _from_check(api.database.check, now, api.database.pool_details()),
        "kafka": _from_check(api.kafka.check, now, {}),
        "service": _service(api, now),
    }


def overall(parts: dict[str, Component]) -> str:
    down = sum(1 for part in parts.values() if not part.is_up)
    return "healthy" if down == 0 else "unhealthy" if down == len(parts) else "degraded"


def _uptime(api: Api) -> int:
    return uptime_ms(api.state.current.started_at or api.started_at)


def _overall(request: web.Request, *, detailed: bool) -> web.Response:
    api = api_of(request)
    parts = components(api)
    status = overall(parts)
    body = {
        "status": status,
        "timestamp": now_iso(),
        "version": VERSION,
        "uptime": _uptime(api),
        "checks": {
            name: part.full() if detailed else part.summary() for name, part in parts.items()
        },
    }
    if detailed and api.redis is not None:
        # Shown, never counted: the task-event feed is best effort (DESIGN §11).
        redis = _from_check(api.redis.check, time.monotonic(), {"countsForReadiness": False})
        body["checks"]["redis"] = redis.full()  # type: ignore[index]
    return json_response(body, status=200 if status == "healthy" else 503)


async def health(request: web.Request) -> web.Response:
    return _overall(request, detailed=False)


async def detailed(request: web.Request) -> web.Response:
    return _overall(request, detailed=True)


async def component(request: web.Request) -> web.Response:
    """``/api/health/database``, ``/kafka``, ``/service``."""
    name = request.match_info["component"]
    part = components(api_of(request))[name]
    body = {"component": name, "timestamp": now_iso(), **part.full()}
    return json_response(body, status=200 if part.is_up else 503)


async def ready(request: web.Request) -> web.Response:
    parts = components(api_of(request))
    is_ready = all(part.is_up for part in parts.values())
    body: dict[str, Any] = {
        "ready": is_ready,
        "timestamp": now_iso(),
        "checks": {name: part.status for name, part in parts.items()},
    }
    if not is_ready:
        body["reasons"] = [f"{name}: {p.error}" for name, p in parts.items() if not p.is_up]
    return json_response(body, status=200 if is_ready else 503)


async def live(request: web.Request) -> web.Response:
    """This process answers: cheap, and independent of the dependencies."""
    body = {"alive": True, "timestamp": now_iso(), "uptime": _uptime(api_of(request))}
    return json_response(body)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/health", health)
    app.router.add_get("/api/health/detailed", detailed)
    app.router.add_get("/api/health/ready", ready)
    app.router.add_get("/api/health/live", live)
    app.router.add_get(r"/api/health/{component:database|kafka|service}", component)
