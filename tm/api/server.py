"""The API process: an aiohttp application on uvloop, wired here.

It reports to the supervisor like a worker does (``B`` once listening, ``H`` every second), and
reads the supervisor's state lines to know whether every worker has joined the group. Its
dependency clients (:mod:`tm.api.database`, :mod:`tm.api.kafka_watch`) are created here, after
the fork, and checked in the background; no request waits for a dependency check.

Routes: :mod:`tm.api.health` (``/api/health*``), :mod:`tm.api.task_metrics` (``/api/metrics*``),
:mod:`tm.api.tasks` (``/api/tasks*``), :mod:`tm.api.prometheus` (``/metrics``), and the status
page (:mod:`tm.api.page`: ``/``, ``/ui``) with what it reads besides those
(:mod:`tm.api.partitions`, :mod:`tm.api.rates`, :mod:`tm.api.dead_letters`); errors are JSON
(:mod:`tm.api.responses`). Nothing is logged per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import TYPE_CHECKING

import uvloop
from aiohttp import web

from tm.api import (
    dead_letters,
    health,
    page,
    partitions,
    prometheus,
    rates,
    task_metrics,
    tasks,
)
from tm.api.context import API_KEY, Api
from tm.api.counts import SharedCounts
from tm.api.database import ApiDatabase
from tm.api.kafka_watch import KafkaWatch
from tm.api.responses import errors_as_json
from tm.api.state import StateReader
from tm.config import Settings
from tm.observability import metrics
from tm.protocol import Reporter

if TYPE_CHECKING:
    from tm.api.redis_watch import RedisWatch

log = logging.getLogger("tm.api")

HEARTBEAT_INTERVAL_S = 1.0


def build_app(api: Api) -> web.Application:
    """The application and its routes; the dependency clients are started by :func:`serve`."""
    app = web.Application(middlewares=[errors_as_json])
    app[API_KEY] = api
    health.add_routes(app)
    task_metrics.add_routes(app)
    tasks.add_routes(app)
    prometheus.add_routes(app)
    partitions.add_routes(app)
    rates.add_routes(app)
    dead_letters.add_routes(app)
    page.add_routes(app)
    return app


async def serve(settings: Settings, *, state_fd: int | None, report_fd: int | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked since the fork
    reporter = Reporter(report_fd)
    state = StateReader()
    if state_fd is not None:
        os.set_blocking(state_fd, False)

        def on_state() -> None:
            try:
                chunk = os.read(state_fd, 65536)
            except BlockingIOError:
                return
            if chunk:
                state.feed(chunk)
            else:
                loop.remove_reader(state_fd)  # the supervisor is gone

        loop.add_reader(state_fd, on_state)
    database = ApiDatabase(settings.postgres)
    kafka = KafkaWatch(settings.kafka)
    redis = _redis_watch(settings)
    api = Api(
        settings=settings,
        state=state,
        database=database,
        kafka=kafka,
        registry=prometheus.build_registry(kafka, state),
        counts=SharedCounts(database),
        started_at=time.time(),
        redis=redis,
    )
    await database.start()
    kafka.start()
    runner = web.AppRunner(build_app(api), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host="0.0.0.0", port=settings.http.port)  # noqa: S104
    try:
        await site.start()
    except OSError as exc:
        reporter.failed(f"cannot listen on APP_PORT {settings.http.port}: {exc.strerror}")
        await runner.cleanup()
        await _close(database, kafka, redis)
        return 1
    reporter.booted()
    log.info("api listening", extra={"fields": {"port": settings.http.port}})
    try:
        while not stop.is_set():
            reporter.heartbeat()
            metrics.record_memory("api")
            metrics.record_memory("supervisor", os.getppid())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEARTBEAT_INTERVAL_S)
    finally:
        await runner.cleanup()
        await _close(database, kafka, redis)
    return 0


async def _close(database: ApiDatabase, kafka: KafkaWatch, redis: RedisWatch | None) -> None:
    await asyncio.to_thread(kafka.close)
    await database.close()
    if redis is not None:
        await redis.close()


def _redis_watch(settings: Settings) -> RedisWatch | None:
    """The background check of Redis, started; imported only when REDIS_URL is set."""
    if settings.redis.url is None:
        return None
    from tm.api.redis_watch import RedisWatch

    watch = RedisWatch(settings.redis)
    watch.start()
    return watch


def main(settings: Settings, *, state_fd: int | None, report_fd: int | None) -> int:
    """Entry point of the forked API process; returns the exit status."""
    from tm.observability import logs

    logs.setup(settings.log, settings.otel, environment=settings.environment)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor forwards a SIGTERM
    try:
        return uvloop.run(serve(settings, state_fd=state_fd, report_fd=report_fd))
    except Exception:
        log.exception("api process crashed")
        return 1
