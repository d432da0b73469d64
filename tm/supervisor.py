"""The parent process: check the dependencies, fork the workers, keep them alive, stop them.

A short loop in the shape of gunicorn's arbiter. Signal handlers only record the signal (the
wakeup fd interrupts ``select``); the loop dispatches. Each worker reports on a pipe (see
:mod:`tm.worker`): a worker that dies is restarted with backoff, one that stops sending
heartbeats is killed and restarted, and workers that keep failing before they boot halt the
service with the worker's error in one line (a wrong password must not become a restart storm).

Nothing here imports Kafka or PostgreSQL clients: librdkafka's threads must not cross a fork.
The pre-flight check and the workers import them in their own children.

In a container without an init process the supervisor is PID 1: it reaps every child that
reparents to it (``waitpid(-1)``), and its handlers are installed before the pre-flight check,
because PID 1 ignores a signal it has no handler for (the kubelet's SIGTERM included). Signals
are blocked around each ``fork`` so that a SIGTERM in that window waits for whoever it was sent
to (the parent's handler, or the child's once its event loop handles it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import select
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from tm.config import Settings, cap_workers

log = logging.getLogger("tm.supervisor")

LOOP_TICK_S = 0.5
STATE_INTERVAL_S = 0.5  # how often gauges and the API's state line are refreshed
API_START_DELAY_MAX_S = 5.0  # the API starts when the workers booted, or after this at most
MAX_BOOT_FAILURES = 3  # consecutive failures before boot, per slot, before halting
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_AFTER_S = 60.0  # a worker up this long resets its slot's restart backoff
PREFLIGHT_TIMEOUT_S = 60.0
PR_SET_PDEATHSIG = 1  # prctl option, from <linux/prctl.h>
# Blocked around fork(): a signal in the window is delivered after it, not lost or fatal.
_FORK_BLOCKED = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGCHLD})


class Reporter:
    """A child's side of its pipe to the supervisor (the lines :meth:`Supervisor._read`
    parses); never blocks: a line is dropped when the pipe is full."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        if fd is not None:
            os.set_blocking(fd, False)

    def send(self, line: str) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self._fd, (line.replace("\n", " ") + "\n").encode())


@dataclass
class Slot:
    number: int
    role: str = "worker"  # or "api": the HTTP process
    pid: int = 0
    state_fd: int = -1  # api only: where the supervisor writes its state lines
    fd: int = -1
    buffer: bytes = b""
    started_at: float = 0.0
    last_heartbeat: float = 0.0
    booted: bool = False
    joined: bool = False  # has had a first assignment (possibly empty) since it started
    retrying: bool = False  # backing off after a transient failure (database or Kafka down)
    owned_partitions: int = 0
    boot_failures: int = 0
    restarts: int = 0
    restart_at: float | None = None
    last_error: str = ""
    exit_codes: list[int] = field(default_factory=list)


class Supervisor:
    def __init__(self, settings: Settings, *, started: float) -> None:
        self._settings = settings
        self._pid = os.getpid()  # what a child's parent must be: not 1 when we are PID 1
        self._workers: list[Slot] = []
        self._api = Slot(-1, role="api")
        self._slots: list[Slot] = []
        self.configure(settings)
        self._started = started
        self._started_wall = time.time() - (time.monotonic() - started)
        self._startup_s: float | None = None  # until every worker first joined the group
        self._restarts_total = {"worker": 0, "api": 0}
        self._last_state = 0.0
        self._signals: list[int] = []
        self._stopping_since: float | None = None
        self._halt_error: str | None = None
        self._draining: list[Slot] = []
        self._wakeup_r, self._wakeup_w = os.pipe()

    def configure(self, settings: Settings) -> None:
        """Take the settings to run with (before :meth:`run`): one slot per worker."""
        self._settings = settings
        self._workers = [Slot(n) for n in range(settings.consumer.workers)]
        self._slots = [*self._workers, self._api]

    # -- signals -----------------------------------------------------------------------------

    def install_signals(self) -> None:
        os.set_blocking(self._wakeup_w, False)
        os.set_blocking(self._wakeup_r, False)
        signal.set_wakeup_fd(self._wakeup_w)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def stop_requested(self) -> bool:
        """A SIGTERM or SIGINT is waiting to be handled."""
        return any(s != signal.SIGCHLD for s in self._signals)

    # -- workers -----------------------------------------------------------------------------

    def _spawn(self, slot: Slot) -> None:
        read_fd, write_fd = os.pipe()
        state_r = state_w = -1
        if slot.role == "api":
            state_r, state_w = os.pipe()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _FORK_BLOCKED)
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                os.close(read_fd)
                signal.set_wakeup_fd(-1)
                for signum in (signal.SIGTERM, signal.SIGCHLD):
                    signal.signal(signum, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor forwards SIGTERM
                # A SIGTERM before the child's own handler exists must wait, not kill it: the
                # child unblocks it once its event loop handles it (tm.worker, tm.api.server).
                signal.pthread_sigmask(
                    signal.SIG_SETMASK,
                    (mask | {signal.SIGTERM})
                    - {
                        signal.SIGINT,
                        signal.SIGCHLD,
                    },
                )
                _stop_with_parent(self._pid)
                for other in self._slots:
                    for fd in (other.fd, other.state_fd):
                        if fd >= 0:
                            os.close(fd)
                os.close(self._wakeup_r)
                os.close(self._wakeup_w)
                if slot.role == "api":
                    os.close(state_w)
                    from tm.api.server import main as api_main

                    code = api_main(self._settings, state_fd=state_r, report_fd=write_fd)
                else:
                    from tm import worker

                    code = worker.main(self._settings, slot=slot.number, report_fd=write_fd)
            finally:
                from tm.observability import logs

                logs.shutdown()  # os._exit skips atexit: export the child's queued log records
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        if slot.role == "api":
            os.close(state_r)
            os.set_blocking(state_w, False)
            slot.state_fd = state_w
        now = time.monotonic()
        slot.pid, slot.fd, slot.buffer = pid, read_fd, b""
        slot.started_at = slot.last_heartbeat = now
        slot.booted, slot.joined, slot.retrying = False, False, False
        slot.owned_partitions, slot.restart_at = 0, None
        if slot.role == "api":
            log.info("api spawned", extra={"fields": {"pid": pid}})
        else:
            log.info("worker spawned", extra={"fields": {"slot": slot.number, "pid": pid}})

    def _read(self, slot: Slot) -> None:
        try:
            chunk = os.read(slot.fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            return
        slot.buffer += chunk
        *lines, slot.buffer = slot.buffer.split(b"\n")
        now = time.monotonic()
        for raw in lines:
            line = raw.decode(errors="replace")
            slot.last_heartbeat = now
            if line == "B":
                slot.booted = True
                slot.boot_failures = 0
            elif line.startswith("A "):
                slot.joined = True
                slot.owned_partitions = int(line[2:] or 0)
            elif line.startswith("R "):
                slot.retrying = line == "R 1"
            elif line.startswith("F "):
                slot.last_error = line[2:]

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self._slots if s.pid == pid), None)
            if slot is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            self._read(slot)
            os.close(slot.fd)
            if slot.state_fd >= 0:
                os.close(slot.state_fd)
            slot.pid, slot.fd, slot.state_fd = 0, -1, -1
            slot.exit_codes.append(code)
            _forget_metrics(pid)
            if self._stopping_since is not None:
                log.info(
                    f"{slot.role} exited", extra={"fields": {"slot": slot.number, "code": code}}
                )
                continue
            self._schedule_restart(slot, code)

    def _schedule_restart(self, slot: Slot, code: int) -> None:
        now = time.monotonic()
        if not slot.booted:
            slot.boot_failures += 1
            if slot.boot_failures >= MAX_BOOT_FAILURES:
                who = "the API process" if slot.role == "api" else f"worker {slot.number}"
                self._halt_error = (
                    f"{who} failed {slot.boot_failures} times before it booted: "
                    f"{slot.last_error or f'exit status {code}'}"
                )
                return
        if now - slot.started_at >= STABLE_AFTER_S:
            slot.restarts = 0
        delay = RESTART_BACKOFF_S[min(slot.restarts, len(RESTART_BACKOFF_S) - 1)]
        slot.restarts += 1
        slot.restart_at = now + delay
        self._restarts_total[slot.role] += 1
        log.error(
            f"{slot.role} died; restarting",
            extra={
                "fields": {
                    "slot": slot.number,
                    "code": code,
                    "error": slot.last_error or "-",
                    "restart_in_s": delay,
                }
            },
        )
        slot.last_error = ""

    def _check_heartbeats(self) -> None:
        timeout_s = self._settings.consumer.heartbeat_timeout_ms / 1000
        now = time.monotonic()
        for slot in self._slots:
            if slot.pid and now - slot.last_heartbeat > timeout_s:
                log.error(
                    "worker stopped sending heartbeats; killing it",
                    extra={"fields": {"slot": slot.number, "pid": slot.pid}},
                )
                slot.last_error = f"no heartbeat for {timeout_s:.0f} s"
                _kill(slot.pid, signal.SIGKILL)
                slot.last_heartbeat = now  # killed once; the reaper restarts it

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        for worker in self._workers:
            self._spawn(worker)
        # The API process starts once the workers have booted: started together, on a small
        # machine, it slows one worker's boot enough that the workers join the group one after
        # the other, and a cooperative rebalance then takes two more rounds.
        self._api.restart_at = time.monotonic() + API_START_DELAY_MAX_S
        while True:
            fds = [self._wakeup_r] + [s.fd for s in self._slots if s.fd >= 0]
            try:
                readable, _, _ = select.select(fds, [], [], LOOP_TICK_S)
            except InterruptedError:
                readable = []
            if self._wakeup_r in readable:
                _drain(self._wakeup_r)
            for slot in self._slots:
                if slot.fd in readable:
                    self._read(slot)
            while self._signals:
                signum = self._signals.pop(0)
                if signum == signal.SIGCHLD:
                    self._reap()
                elif self._stopping_since is None:
                    self._begin_stop(signum)
                else:
                    log.warning("second signal: killing workers and exiting at once")
                    self._kill_all(signal.SIGKILL)
                    self._wait_all()
                    return 128 + signum
            self._reap()
            self._publish_state()
            if self._halt_error is not None:
                return self._halt()
            if self._stopping_since is not None:
                if self._api.pid and all(w.pid == 0 for w in self._workers):
                    _kill(self._api.pid, signal.SIGTERM)  # the drain is over: the API goes too
                if all(s.pid == 0 for s in self._slots):
                    return self._stopped()
                if time.monotonic() - self._stopping_since > self._grace_s():
                    log.error("workers did not stop in time; killing them")
                    self._kill_all(signal.SIGKILL)
                    self._wait_all()
                    return 1
                continue
            self._check_heartbeats()
            now = time.monotonic()
            api = self._api
            if not api.pid and not api.exit_codes and all(w.booted for w in self._workers):
                api.restart_at = now  # first start: the workers are up
            for slot in self._slots:
                if slot.pid == 0 and slot.restart_at is not None and now >= slot.restart_at:
                    self._spawn(slot)

    def _publish_state(self) -> None:
        """The one-time "ready" line, and the state line the API process serves (and turns into
        the supervisor's metrics: this process writes no metric files, which its later children
        would inherit)."""
        now = time.monotonic()
        if now - self._last_state < STATE_INTERVAL_S:
            return
        self._last_state = now
        if self._startup_s is None and all(w.pid and w.joined for w in self._workers):
            self._startup_s = now - self._started
            log.info("ready", extra={"fields": {"startup_s": round(self._startup_s, 3)}})
        if self._api.state_fd < 0:
            return
        state = {
            "started_at": self._started_wall,
            "startup_s": self._startup_s,
            "restarts_total": self._restarts_total,
            "stopping": self._stopping_since is not None,
            "workers": [
                {
                    "slot": w.number,
                    "pid": w.pid,
                    "booted": w.booted,
                    "joined": w.joined,
                    "partitions": w.owned_partitions,
                    "restarts": w.restarts,
                    "retrying": w.retrying,
                }
                for w in self._workers
            ],
        }
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self._api.state_fd, (json.dumps(state) + "\n").encode())

    def _grace_s(self) -> float:
        return self._settings.consumer.graceful_shutdown_timeout_ms / 1000

    def _begin_stop(self, signum: int) -> None:
        self._last_state = 0.0  # tell the API at once: readiness falls during the drain
        log.info(
            "stopping workers",
            extra={"fields": {"signal": signal.Signals(signum).name, "grace_s": self._grace_s()}},
        )
        self._stopping_since = time.monotonic()
        self._draining = [s for s in self._slots if s.pid]
        self._publish_state()
        # Workers first; the API keeps answering (readiness 503, "stopping") until they are done.
        for worker in self._workers:
            if worker.pid:
                _kill(worker.pid, signal.SIGTERM)

    def _stopped(self) -> int:
        # Clean: every worker running when the stop began drained and exited 0 (a slot that
        # was dead, waiting for its restart, had nothing in flight).
        clean = all(s.exit_codes and s.exit_codes[-1] == 0 for s in self._draining)
        log.info("stopped", extra={"fields": {"clean": clean}})
        return 0 if clean else 1

    def _halt(self) -> int:
        log.error("halting: %s", self._halt_error)
        self._stopping_since = time.monotonic()
        self._kill_all(signal.SIGTERM)
        deadline = time.monotonic() + self._grace_s()
        while any(s.pid for s in self._slots) and time.monotonic() < deadline:
            time.sleep(0.1)
            self._reap()
        self._kill_all(signal.SIGKILL)
        self._wait_all()
        print(f"tm: {self._halt_error}", file=sys.stderr)
        return 1

    def _kill_all(self, signum: int) -> None:
        for slot in self._slots:
            if slot.pid:
                _kill(slot.pid, signum)

    def _wait_all(self) -> None:
        for slot in self._slots:
            if slot.pid:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(slot.pid, 0)
                slot.pid = 0


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise


def _forget_metrics(pid: int) -> None:
    """Drop the live gauges of a child that exited (its counters stay in the sums)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def _stop_with_parent(parent_pid: int) -> None:
    """In a child: ask Linux for a SIGTERM when the supervisor dies (even by SIGKILL), so that
    no worker or API process outlives it holding partitions or APP_PORT."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the heartbeat pipe closing is the fallback
        return
    if os.getppid() != parent_pid:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)  # pending (blocked) until the child handles it


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass


class PreflightInterruptedError(Exception):
    """A stop signal arrived before the workers were started."""


def preflight(settings: Settings, *, stop_requested: Callable[[], bool]) -> tuple[str | None, int]:
    """Check PostgreSQL, the schema and Kafka in a child process (so that no client thread
    lives in this one before it forks). Returns the problem in one line (None: none) and the
    task-status topic's partition count; raises PreflightInterruptedError when
    ``stop_requested()`` turns true meanwhile (the check is then killed)."""
    read_fd, write_fd = os.pipe()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _FORK_BLOCKED)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for signum in _FORK_BLOCKED:
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(read_fd)
            from tm.commands import preflight as check

            os.write(write_fd, msgspec.json.encode(check(settings)))
            code = 0
        finally:
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.close(write_fd)
    deadline = time.monotonic() + PREFLIGHT_TIMEOUT_S
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or stop_requested():
            _kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_fd)
            if remaining > 0:
                raise PreflightInterruptedError
            return f"pre-flight check did not finish in {PREFLIGHT_TIMEOUT_S:.0f} s", 0
        try:  # a signal interrupts the wait (the handler's wakeup fd is not watched here)
            readable, _, _ = select.select([read_fd], [], [], min(remaining, LOOP_TICK_S))
        except InterruptedError:
            continue
        if readable:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return "pre-flight check crashed", 0
    found = json.loads(b"".join(chunks))  # tm.commands.Preflight (its module loads clients)
    return found["problem"], found["partitions"]


def _metrics_directory() -> str | None:
    """Point prometheus-client's multiprocess mode at an empty directory; return it if we made
    it (to remove it on exit). An operator's PROMETHEUS_MULTIPROC_DIR is emptied and used."""
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        os.makedirs(configured, exist_ok=True)
        for name in os.listdir(configured):
            if name.endswith(".db"):
                os.remove(os.path.join(configured, name))
        return None
    made = tempfile.mkdtemp(prefix="tm-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
    return made


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
    supervisor.configure(settings)
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
    made = _metrics_directory()
    try:
        return supervisor.run()
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
