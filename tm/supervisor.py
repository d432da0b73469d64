"""The parent process: check the dependencies, fork the workers, keep them alive, stop them.

A short loop in the shape of gunicorn's arbiter. Signal handlers only record the signal (the
wakeup fd interrupts ``select``); the loop dispatches it to ``handle_<signal>``, then runs the
tick of its mode: running, stopping (draining on SIGTERM/SIGINT) or halting. Each child
reports on a pipe in the line protocol of :mod:`tm.protocol`: a child that dies is restarted
with backoff, one that stops sending heartbeats is killed and restarted, and a child that keeps
failing before it boots halts the service with its error in one line (a wrong password must not
become a restart storm). What is done to a child whatever the mode (spawn, hear, reap, restart,
kill) is :class:`tm.children.Children`'s; the supervisor decides when.

Nothing here imports Kafka or PostgreSQL clients: librdkafka's threads must not cross a fork.
The pre-flight check (:mod:`tm.preflight`) and the workers import them in their own children.

In a container without an init process the supervisor is PID 1: it reaps every child that
reparents to it, and its handlers are installed before the pre-flight check, because PID 1
ignores a signal it has no handler for (the kubelet's SIGTERM included). Signals are blocked
around each ``fork`` so that a SIGTERM in that window waits for whoever it was sent to (the
parent's handler, or the child's once its event loop handles it).
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Collection

import msgspec

from tm.children import Children
from tm.config import MetricsSettings, Settings, cap_workers
from tm.observability import metricfiles
from tm.preflight import PreflightInterruptedError, preflight
from tm.processes import OsProcesses, Processes
from tm.slots import Slot

log = logging.getLogger("tm.supervisor")

LOOP_TICK_S = 0.5
STATE_INTERVAL_S = 0.5  # how often gauges and the API's state line are refreshed
API_START_DELAY_MAX_S = 5.0  # the API starts when the workers booted, or after this at most


class Mode(enum.Enum):
    RUNNING = "running"
    STOPPING = "stopping"  # a stop signal came: the workers drain, then the API goes
    HALTING = "halting"  # a slot kept failing before it booted: everything goes, exit 1


class Supervisor:
    """The parent of every worker and of the API process, from :meth:`start` to the exit
    status :meth:`run` returns (what ``tm run`` exits with)."""

    def __init__(
        self, settings: Settings, *, started: float, processes: Processes | None = None
    ) -> None:
        self._processes: Processes = processes or OsProcesses()
        self._settings = settings
        self._children = Children(settings, self._processes)
        self._started = started
        self._started_wall = time.time() - (self._processes.monotonic() - started)
        self._startup_s: float | None = None  # until every worker first joined the group
        self._last_state = 0.0
        self._signals: list[int] = []
        self._handlers: dict[int, Callable[[int], int | None]] = {
            signal.SIGCHLD: self.handle_chld,
            signal.SIGTERM: self.handle_stop,
            signal.SIGINT: self.handle_stop,
        }
        self._mode = Mode.RUNNING
        self._ticks: dict[Mode, Callable[[], int | None]] = {
            Mode.RUNNING: self._tick_running,
            Mode.STOPPING: self._tick_stopping,
            Mode.HALTING: self._tick_halting,
        }
        self._stopping_since = 0.0  # stopping and halting: when it began
        self._api_stopped = False  # stopping: the API was sent its SIGTERM
        self._draining: list[Slot] = []  # stopping: the slots running when it began
        self._halt_error = ""  # halting: why, for the operator
        self._wakeup_r = self._wakeup_w = -1  # the signal wakeup pipe, once installed

    def configure(self, settings: Settings) -> None:
        """Take the settings to run with (before :meth:`run`): one slot per worker."""
        self._settings = settings
        self._children.configure(settings)

    # -- signals -----------------------------------------------------------------------------

    def install_signals(self) -> None:
        self._wakeup_r, self._wakeup_w = os.pipe()
        os.set_blocking(self._wakeup_w, False)
        os.set_blocking(self._wakeup_r, False)
        signal.set_wakeup_fd(self._wakeup_w)
        for signum in self._handlers:
            signal.signal(signum, self.on_signal)

    def on_signal(self, signum: int, _frame: object = None) -> None:
        """The signal handler: record the signal for the loop."""
        self._signals.append(signum)

    def stop_requested(self) -> bool:
        """A SIGTERM or SIGINT is waiting to be handled."""
        return any(s != signal.SIGCHLD for s in self._signals)

    def handle_chld(self, _signum: int) -> int | None:
        self._reap()
        return None

    def handle_stop(self, signum: int) -> int | None:
        """SIGTERM, SIGINT: the first drains; a second one kills everything at once."""
        if self._mode is Mode.RUNNING:
            self._begin_stop(signum)
            return None
        if self._mode is Mode.HALTING:  # already stopping everything, within the grace period
            return None
        log.warning("second signal: killing workers and exiting at once")
        self._children.kill_all(signal.SIGKILL)
        self._children.wait_all()
        return 128 + signum

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        self.start()
        while (code := self.poll(LOOP_TICK_S)) is None:
            pass
        return code

    def start(self) -> None:
        """Spawn the workers; the API process follows (in the running tick)."""
        for worker in self._children.workers:
            self._spawn(worker)
        # The API process starts once the workers have booted: started together, on a small
        # machine, it slows one worker's boot enough that the workers join the group one after
        # the other, and a cooperative rebalance then takes two more rounds.
        self._children.api.restart_at = self._now() + API_START_DELAY_MAX_S

    def poll(self, timeout_s: float) -> int | None:
        """One turn of the loop: wait up to ``timeout_s`` for a line or a signal, read the
        lines, handle the signals, reap, and run the tick of the mode. Returns the exit status
        once the supervisor is done, else None."""
        fds = self._children.report_fds()
        if self._wakeup_r >= 0:
            fds.append(self._wakeup_r)
        try:
            readable, _, _ = select.select(fds, [], [], timeout_s)
        except InterruptedError:
            readable = []
        if self._wakeup_r in readable:  # its bytes are the signal numbers, also in _signals
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wakeup_r, 4096):
                    pass
        return self._step(readable)

    def _step(self, readable: Collection[int]) -> int | None:
        now = self._now()
        for slot in self._children.slots:
            if slot.fd in readable:
                self._children.read(slot, now)
        while self._signals:
            signum = self._signals.pop(0)
            code = self._handlers[signum](signum)
            if code is not None:
                return code
        self._reap()
        return self._ticks[self._mode]()

    def _tick_running(self) -> int | None:
        self._publish_state()
        now = self._now()
        children = self._children
        children.check_heartbeats(now)
        api = children.api
        if not api.pid and not api.exit_codes and all(w.booted for w in children.workers):
            api.restart_at = now  # first start: the workers are up
        for slot in children.due(now):
            self._spawn(slot)
        return None

    def _tick_stopping(self) -> int | None:
        self._publish_state()
        children = self._children
        api = children.api
        if api.pid and not self._api_stopped and all(w.pid == 0 for w in children.workers):
            self._processes.kill(api.pid, signal.SIGTERM)  # the drain is over: the API too
            self._api_stopped = True
        if all(s.pid == 0 for s in children.slots):
            return self._stopped()
        if self._now() - self._stopping_since > self._grace_s():
            log.error("workers did not stop in time; killing them")
            children.kill_all(signal.SIGKILL)
            children.wait_all()
            return 1
        return None

    def _tick_halting(self) -> int | None:
        running = any(s.pid for s in self._children.slots)
        if running and self._now() - self._stopping_since < self._grace_s():
            return None
        self._children.kill_all(signal.SIGKILL)
        self._children.wait_all()
        print(f"tm: {self._halt_error}", file=sys.stderr)
        return 1

    # -- children ----------------------------------------------------------------------------

    def _spawn(self, slot: Slot) -> None:
        wakeup = [fd for fd in (self._wakeup_r, self._wakeup_w) if fd >= 0]
        self._children.spawn(slot, self._now(), keep_closed=wakeup)

    def _reap(self) -> None:
        now = self._now()
        for slot, code in self._children.reap(now):
            if self._mode is not Mode.RUNNING:
                fields = {"slot": slot.number, "code": code}
                log.info(f"{slot.role} exited", extra={"fields": fields})
            elif (halt := self._children.restart(slot, code, now)) is not None:
                self._begin_halt(halt)

    # -- state, stop and halt ----------------------------------------------------------------

    def _publish_state(self) -> None:
        """The one-time "ready" line, and the state line the API process serves (and turns into
        the supervisor's metrics: this process writes no metric files, which its later children
        would inherit)."""
        now = self._now()
        if now - self._last_state < STATE_INTERVAL_S:
            return
        self._last_state = now
        workers = self._children.workers
        if self._startup_s is None and all(w.pid and w.joined for w in workers):
            self._startup_s = now - self._started
            log.info("ready", extra={"fields": {"startup_s": round(self._startup_s, 3)}})
        state_fd = self._children.api.state_fd
        if state_fd < 0:
            return
        state = {
            "started_at": self._started_wall,
            "startup_s": self._startup_s,
            "restarts_total": self._children.restarts_total,
            "stopping": self._mode is not Mode.RUNNING,
            "workers": [w.state() for w in workers],
        }
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(state_fd, (json.dumps(state) + "\n").encode())

    def _begin_stop(self, signum: int) -> None:
        self._last_state = 0.0  # tell the API at once: readiness falls during the drain
        log.info(
            "stopping workers",
            extra={"fields": {"signal": signal.Signals(signum).name, "grace_s": self._grace_s()}},
        )
        self._mode = Mode.STOPPING
        self._stopping_since = self._now()
        self._draining = [s for s in self._children.slots if s.pid]
        self._publish_state()
        # Workers first; the API keeps answering (readiness 503, "stopping") until they are done.
        self._children.signal_workers(signal.SIGTERM)

    def _stopped(self) -> int:
        # Clean: every worker running when the stop began drained and exited 0 (a slot that
        # was dead, waiting for its restart, had nothing in flight).
        clean = all(s.exit_codes and s.exit_codes[-1] == 0 for s in self._draining)
        log.info("stopped", extra={"fields": {"clean": clean}})
        return 0 if clean else 1

    def _begin_halt(self, error: str) -> None:
        self._halt_error = error
        log.error("halting: %s", error)
        self._mode = Mode.HALTING
        self._stopping_since = self._now()
        self._children.kill_all(signal.SIGTERM)

    def _grace_s(self) -> float:
        return self._settings.consumer.graceful_shutdown_timeout_ms / 1000

    def _now(self) -> float:
        return self._processes.monotonic()


def run(settings: Settings) -> int:
    started = time.monotonic()
    supervisor = Supervisor(settings, started=started)
    supervisor.install_signals()  # first: as PID 1, a signal without a handler is ignored
    try:
        problem, partitions = preflight(settings, stop_requested=supervisor.stop_requested)
    except PreflightInterruptedError:
        log.info("stopped before start: a signal came during the pre-flight check")
        return 0
    if problem is not None:
        print(f"tm: cannot start: {problem}", file=sys.stderr)
        return 1
    settings = cap_workers(settings, partitions=partitions)  # a worker more would own nothing
    log.info(
        "starting",
        extra={
            "fields": {
                "workers": settings.consumer.workers,
                "topic": settings.kafka.task_status_topic,
                "group": settings.kafka.group_id,
                "preflight_s": round(time.monotonic() - started, 3),
            }
        },
    )
    with metricfiles.directory(settings.metrics.directory) as directory:
        # The children get the directory in their settings, made or not (tm.observability).
        metrics = MetricsSettings(directory=directory)
        supervisor.configure(msgspec.structs.replace(settings, metrics=metrics))
        return supervisor.run()
