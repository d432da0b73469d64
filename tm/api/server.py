"""The API process: an aiohttp application on uvloop.

It reports to the supervisor like a worker does (``B`` once listening, ``H`` every second), and
reads the supervisor's state lines to know whether every worker has joined the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

import uvloop
from aiohttp import web

from tm.api.state import StateReader
from tm.config import Settings
from tm.observability import metrics

log = logging.getLogger("tm.api")

HEARTBEAT_INTERVAL_S = 1.0
STATE_KEY = web.AppKey("state", StateReader)
SETTINGS_KEY = web.AppKey("settings", Settings)


async def prometheus(request: web.Request) -> web.Response:
    """tm's own metrics, aggregated over every live process."""
    body, content_type = metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def live(request: web.Request) -> web.Response:
    """Liveness: this process answers. Cheap, and independent of the dependencies."""
    state = request.app[STATE_KEY].current
    return web.json_response(
        {"alive": True, "timestamp": _now_iso(), "uptime": _uptime_ms(state.started_at)}
    )


def _now_iso() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _uptime_ms(started_at: float) -> int:
    import time

    return int((time.time() - started_at) * 1000) if started_at else 0


def build_app(settings: Settings, state: StateReader) -> web.Application:
    app = web.Application()
    app[STATE_KEY] = state
    app[SETTINGS_KEY] = settings
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/api/health/live", live)
    return app


class _Reporter:
    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        if fd is not None:
            os.set_blocking(fd, False)

    def send(self, line: str) -> None:
        if self._fd is not None:
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                os.write(self._fd, (line + "\n").encode())


async def serve(settings: Settings, *, state_fd: int | None, report_fd: int | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    reporter = _Reporter(report_fd)
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
    runner = web.AppRunner(build_app(settings, state), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host="0.0.0.0", port=settings.http.port)  # noqa: S104
    try:
        await site.start()
    except OSError as exc:
        reporter.send(f"F cannot listen on APP_PORT {settings.http.port}: {exc.strerror}")
        await runner.cleanup()
        return 1
    reporter.send("B")
    log.info("api listening", extra={"fields": {"port": settings.http.port}})
    try:
        while not stop.is_set():
            reporter.send("H")
            metrics.record_memory("api")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEARTBEAT_INTERVAL_S)
    finally:
        await runner.cleanup()
    return 0


def main(settings: Settings, *, state_fd: int | None, report_fd: int | None) -> int:
    """Entry point of the forked API process; returns the exit status."""
    from tm.observability import logs

    logs.setup(settings.log)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor forwards a SIGTERM
    try:
        return uvloop.run(serve(settings, state_fd=state_fd, report_fd=report_fd))
    except Exception:
        log.exception("api process crashed")
        return 1
