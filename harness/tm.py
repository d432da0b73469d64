"""``python -m tm run`` as the tests and the benches run it: a process in a session of its own
(so that a signal reaches the supervisor only, as Kubernetes sends it), its output read line by
line by a thread that timestamps each line and copies it to a log file, and what its API says
about its workers (``/api/health/service``).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import orjson

from harness import HarnessError, free_port, unique, wait_for
from harness.kafka import group_assigned
from harness.stack import Stack

READY_POLL_S = 0.010  # how often the log is read while waiting for every partition
API_TIMEOUT_S = 2.0  # one request to tm's own API on this machine
KILL_WAIT_S = 10.0  # after SIGKILL: the session is gone by then
# A worker's "partitions assigned partitions=[0, 1]" and "partitions revoked ..." log lines.
PARTITIONS = re.compile(r"partitions (assigned|revoked) partitions=\[([\d, ]*)\]")


class TmProcess:
    """``python -m tm run`` with the environment ``env`` (complete: nothing is inherited),
    under the command line ``wrap`` if given (``unshare ...``, ``taskset ...``)."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *, wrap: Sequence[str] = ()) -> None:
        self.log_path = log_path
        self.port = int(env.get("APP_PORT", "0"))
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._log: IO[str] = log_path.open("w")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [*wrap, sys.executable, "-m", "tm", "run"],
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name="harness-tm-log", daemon=True)
        self._reader.start()
        self.stopped_in_s: float | None = None  # how long stop() took
        self.killed = False  # stop() had to SIGKILL the session

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            now = time.monotonic()
            line = raw.decode(errors="replace").rstrip("\n")
            with self._lock:
                self.lines.append((now, line))
            self._log.write(line + "\n")
            self._log.flush()

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        """Everything tm has written so far."""
        with self._lock:
            return "\n".join(line for _, line in self.lines)

    def tail(self, n: int = 15) -> str:
        with self._lock:
            return "\n".join(line for _, line in self.lines[-n:])

    def problem(self) -> str | None:
        """Why a run cannot go on with this tm, or None."""
        code = self.process.poll()
        if code is not None:
            return f"tm exited with status {code}; last lines:\n{self.tail()}"
        return None

    # -- what the API says ---------------------------------------------------------------------

    def service(self) -> dict[str, Any] | None:
        """The details of ``/api/health/service`` (the supervisor's view of its workers), or
        None while the API does not answer."""
        url = f"http://127.0.0.1:{self.port}/api/health/service"
        try:
            with urllib.request.urlopen(url, timeout=API_TIMEOUT_S) as reply:
                body = orjson.loads(reply.read())
        except OSError as exc:
            if isinstance(exc, urllib.error.HTTPError):  # 503 while not every check is up
                body = orjson.loads(exc.read())
            else:
                return None
        details: dict[str, Any] = body.get("details") or {}
        return details or None

    def workers(self) -> dict[int, int]:
        """slot -> pid of the workers running now (none while the API does not answer)."""
        details = self.service()
        if details is None:
            return {}
        return {w["slot"]: w["pid"] for w in details["workers"] if w["pid"]}

    def worker_pids(self) -> list[int]:
        return sorted(self.workers().values())

    def worker(self, slot: int, *, not_pid: int = 0, joined: bool = False) -> int:
        """The pid of the worker running in ``slot`` if it is not ``not_pid`` (a restart's new
        worker) and, with ``joined``, has joined the group (it has booted); else 0."""
        details = self.service()
        for w in details["workers"] if details else ():
            if w["slot"] == slot and w["pid"] not in (0, not_pid) and (w["joined"] or not joined):
                return int(w["pid"])
        return 0

    def wait_worker(
        self, slot: int, *, not_pid: int = 0, joined: bool = False, timeout_s: float = 30.0
    ) -> int:
        """Wait for :meth:`worker`; return the worker's pid."""
        return wait_for(
            lambda: self.worker(slot, not_pid=not_pid, joined=joined),
            timeout_s=timeout_s,
            what=f"a worker in slot {slot}"
            + (f" other than {not_pid}" if not_pid else "")
            + (" joined" if joined else ""),
        )

    def roles(self) -> dict[int, str]:
        """pid -> ``supervisor``, ``api`` or ``worker-<slot>`` for tm's processes now."""
        details = self.service()
        if details is None:
            return {self.pid: "supervisor"}
        found = {details["supervisorPid"]: "supervisor", details["pid"]: "api"}
        for w in details["workers"]:
            if w["pid"]:
                found[w["pid"]] = f"worker-{w['slot']}"
        return found

    # -- what the log says: when, and which partitions -------------------------------------------

    def rebalance_events(self) -> list[tuple[float, str, list[int]]]:
        """``(seconds since spawn, "assigned" | "revoked", partitions)`` from the workers' log
        lines: the API serves how many partitions a worker owns, the log which and when."""
        with self._lock:
            lines = list(self.lines)
        events = []
        for at, line in lines:
            match = PARTITIONS.search(line)
            if match:
                parts = [int(p) for p in match.group(2).split(",") if p.strip()]
                events.append((at - self.started, match.group(1), parts))
        return events

    def owned(self) -> set[int]:
        """The partitions this tm's workers own now, net of revocations."""
        owners: Counter[int] = Counter()
        for _, kind, parts in self.rebalance_events():
            for p in parts:
                owners[p] += 1 if kind == "assigned" else -1
        return {p for p, n in owners.items() if n > 0}

    def ready_after(self, partitions: int) -> float | None:
        """Seconds from spawn until every partition was owned by some worker."""
        owners: Counter[int] = Counter()
        for at, kind, parts in self.rebalance_events():
            for p in parts:
                owners[p] += 1 if kind == "assigned" else -1
            if all(owners[p] > 0 for p in range(partitions)):
                return at
        return None

    def wait_ready(self, partitions: int, *, timeout_s: float) -> float:
        """Wait until every partition is owned; return :meth:`ready_after`."""
        deadline = time.monotonic() + timeout_s
        while True:
            ready = self.ready_after(partitions)
            if ready is not None:
                return ready
            problem = self.problem()
            if problem:
                raise HarnessError(problem)
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"not all {partitions} partitions assigned after {timeout_s:.0f} s; "
                    f"last lines:\n{self.tail()}"
                )
            time.sleep(READY_POLL_S)

    # -- the end ---------------------------------------------------------------------------------

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout_s: float = 40.0) -> int:
        """SIGTERM the supervisor only and wait; SIGKILL the whole session at the deadline.
        Returns the exit status; :attr:`stopped_in_s` and :attr:`killed` say how it went."""
        began = time.monotonic()
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                return self.process.wait(KILL_WAIT_S)
        finally:
            self.stopped_in_s = time.monotonic() - began
            self.close()

    def close(self) -> None:
        """SIGKILL whatever is left of the session; stop reading."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(KILL_WAIT_S)
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()


class TmRun(TmProcess):
    """tm pointed at a test's :class:`~harness.stack.Stack`, on a free API port, with short
    batch linger; ``extra_env`` overrides any of it."""

    def __init__(
        self, stack: Stack, tmp_path: Path, *, wrap: Sequence[str] = (), **extra_env: str
    ) -> None:
        self.stack = stack
        env = {
            **os.environ,
            **stack.env,
            "TM_BATCH_LINGER_MS": "5",
            "APP_PORT": str(free_port()),
            **extra_env,
        }
        super().__init__(env, tmp_path / f"tm-{unique('run')}.log", wrap=wrap)

    def wait_assigned(self, partitions: int, timeout_s: float = 30.0) -> None:
        """Wait until this tm's workers own ``partitions`` partitions in all, as its API says
        and as the group coordinator says (the group is stable with them assigned)."""

        def assigned() -> bool:
            details = self.service()
            return (
                details is not None
                and details["partitionsOwned"] >= partitions
                and group_assigned(self.stack.kafka_config, self.stack.group, self.stack.topic)
                >= partitions
            )

        wait_for(assigned, timeout_s=timeout_s, what=f"{partitions} partitions assigned")
