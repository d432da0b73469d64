"""What the benchmark watches from the outside, each in a thread of its own: the consumer
group's committed offsets (:class:`CommitWatcher`), the resident memory of tm's process tree
(:class:`RssSampler`), and ``tm run`` itself with its log lines (:class:`TmProcess`).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from confluent_kafka import Consumer, ConsumerGroupState, TopicPartition
from confluent_kafka.admin import AdminClient

COMMIT_POLL_S = 0.010  # how often the committed offsets are read: the latency resolution
COMMITTED_TIMEOUT_S = 5.0  # one OffsetFetch; the broker answers in about a millisecond
RSS_SAMPLE_S = 0.1  # memory sampling period
GROUP_POLL_S = 0.05  # how often the group is described while waiting for it to settle
_PARTITIONS_RE = re.compile(r"partitions=\[([0-9, ]*)\]")


class BenchError(Exception):
    """The benchmark cannot go on (tm died, a deadline passed, a check failed)."""


@dataclass(frozen=True, slots=True)
class Observation:
    """The committed offsets as one look saw them: ``monotonic``/``wall`` are taken when the
    answer arrived, so they are upper bounds of when the commits happened."""

    monotonic: float
    wall: float
    offsets: tuple[int, ...]  # next offset per partition; 0 when nothing is committed

    @property
    def total(self) -> int:
        return sum(self.offsets)


class CommitWatcher(threading.Thread):
    """Reads the group's committed offsets every :data:`COMMIT_POLL_S` with
    ``Consumer.committed`` (which never joins the group) and keeps every change."""

    def __init__(self, config: dict[str, Any], *, group: str, topic: str, partitions: int) -> None:
        super().__init__(name="bench-commit-watcher", daemon=True)
        self._consumer = Consumer(
            {**config, "group.id": group, "enable.auto.commit": False, "log_level": 3}
        )
        self._tps = [TopicPartition(topic, p) for p in range(partitions)]
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self.changes: list[Observation] = []
        self.looks = 0
        self.look_s_total = 0.0
        self.look_s_max = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                began = time.monotonic()
                answer = self._consumer.committed(self._tps, timeout=COMMITTED_TIMEOUT_S)
                now, wall = time.monotonic(), time.time()
                offsets = tuple(max(tp.offset, 0) for tp in answer)
                took = now - began
                with self._lock:
                    self.looks += 1
                    self.look_s_total += took
                    self.look_s_max = max(self.look_s_max, took)
                    if not self.changes or self.changes[-1].offsets != offsets:
                        self.changes.append(Observation(now, wall, offsets))
                self._stop_event.wait(max(0.0, COMMIT_POLL_S - took))
        except BaseException as exc:  # reported by wait_for, in the main thread
            self.error = exc
        finally:
            self._consumer.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)

    @property
    def mark(self) -> int:
        """Where the next phase's observations start."""
        with self._lock:
            return len(self.changes)

    def latest(self) -> Observation | None:
        with self._lock:
            return self.changes[-1] if self.changes else None

    def mean_look_ms(self) -> float:
        with self._lock:
            return 1000 * self.look_s_total / self.looks if self.looks else 0.0

    def wait_for(
        self, targets: list[int], *, timeout_s: float, alive: Callable[[], str | None]
    ) -> Observation:
        """Block until every partition's committed offset reaches its target; raise
        BenchError at the deadline or as soon as ``alive()`` returns a reason to stop."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.error is not None:
                raise BenchError(f"reading committed offsets failed: {self.error}")
            seen = self.latest()
            if seen is not None and all(o >= t for o, t in zip(seen.offsets, targets, strict=True)):
                return seen
            problem = alive()
            if problem:
                raise BenchError(problem)
            if time.monotonic() > deadline:
                got = seen.total if seen else 0
                raise BenchError(
                    f"only {got} of {sum(targets)} offsets committed after {timeout_s:.0f} s"
                )
            time.sleep(COMMIT_POLL_S)

    def phase(self, start: int, targets: list[int]) -> tuple[Observation, Observation]:
        """The first observation of the phase that started at ``start`` with a new commit, and
        the first at which every target was reached."""
        with self._lock:
            seen = self.changes[start:]
            before = self.changes[start - 1].total if start > 0 else 0
        first = next(o for o in seen if o.total > before)
        last = next(o for o in seen if all(c >= t for c, t in zip(o.offsets, targets, strict=True)))
        return first, last

    def commit_series(self, *, start: int) -> list[tuple[list[float], list[int]]]:
        """Per partition, the wall times at which its committed offset was seen to rise and the
        offsets seen then (from observation ``start`` on). A message at ``offset`` was
        committed at ``walls[bisect_right(offsets, offset)]``."""
        with self._lock:
            seen = self.changes[start:]
        series: list[tuple[list[float], list[int]]] = [([], []) for _ in self._tps]
        for o in seen:
            for partition, value in enumerate(o.offsets):
                walls, offsets = series[partition]
                if offsets and value <= offsets[-1]:
                    continue  # a rewind would go backwards; the first time counts
                walls.append(o.wall)
                offsets.append(value)
        return series


def committed_at(series: tuple[list[float], list[int]], offset: int) -> float | None:
    """Wall time at which ``offset`` was first seen committed in one partition's series."""
    walls, offsets = series
    index = bisect.bisect_right(offsets, offset)
    return walls[index] if index < len(walls) else None


class GroupWatcher(threading.Thread):
    """Describes the consumer group (the broker's view) until it is stable with ``workers``
    members that each own at least one partition and all ``partitions`` owned: DESIGN §8's
    "all workers assigned". ``settled_at`` is then the monotonic time of that description."""

    def __init__(
        self, config: dict[str, Any], *, group: str, workers: int, partitions: int
    ) -> None:
        super().__init__(name="bench-group-watcher", daemon=True)
        self._admin = AdminClient({**config, "log_level": 3})
        self._group = group
        self._workers = workers
        self._partitions = partitions
        self._stop_event = threading.Event()
        self.settled_at: float | None = None
        self.last_seen = "not described yet"

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                future = self._admin.describe_consumer_groups([self._group], request_timeout=5)
                description = future[self._group].result()
            except Exception as exc:  # a group not yet known, a slow broker: look again
                self.last_seen = f"describe failed: {exc}"
                self._stop_event.wait(GROUP_POLL_S)
                continue
            now = time.monotonic()
            owned = [
                {tp.partition for tp in m.assignment.topic_partitions} for m in description.members
            ]
            everyone = set().union(*owned) if owned else set()
            self.last_seen = (
                f"state {description.state.name}, {len(owned)} members owning"
                f" {[sorted(o) for o in owned]}"
            )
            if (
                description.state == ConsumerGroupState.STABLE
                and len(owned) == self._workers
                and sum(1 for o in owned if o) == min(self._workers, self._partitions)
                and len(everyone) == self._partitions
            ):
                self.settled_at = now
                return
            self._stop_event.wait(GROUP_POLL_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)


# -- memory ----------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        with contextlib.suppress(OSError, ValueError):
            found.extend(
                int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
            )
    return found


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(_children(pid))
    return tree


def status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


@dataclass
class MemoryPeak:
    rss_kib: int = 0
    pss_kib: int = 0
    processes: int = 0
    samples: int = 0


class RssSampler(threading.Thread):
    """Sums VmRSS (and PSS, which counts pages shared after fork once) over tm's process tree
    every :data:`RSS_SAMPLE_S`, keeping the peak of each labelled phase."""

    def __init__(self, root: int) -> None:
        super().__init__(name="bench-rss", daemon=True)
        self._root = root
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._label: str | None = None
        self.peaks: dict[str, MemoryPeak] = {}

    def label(self, name: str | None) -> None:
        with self._lock:
            self._label = name
            if name is not None:
                self.peaks.setdefault(name, MemoryPeak())

    def run(self) -> None:
        while not self._stop_event.wait(RSS_SAMPLE_S):
            with self._lock:
                label = self._label
            if label is None:
                continue
            pids = process_tree(self._root)
            rss = sum(status_kib(pid, "VmRSS:") for pid in pids)
            pss = sum(pss_kib(pid) for pid in pids)
            with self._lock:
                peak = self.peaks[label]
                peak.samples += 1
                if rss > peak.rss_kib:
                    peak.rss_kib, peak.processes = rss, len(pids)
                peak.pss_kib = max(peak.pss_kib, pss)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


# -- tm run ----------------------------------------------------------------------------------


class TmProcess:
    """``python -m tm run`` in a session of its own; its output (stdout and stderr) is read
    line by line by a thread that timestamps each line and copies it to ``log_path``."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._log: IO[str] = log_path.open("w")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tm", "run"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name="bench-tm-log", daemon=True)
        self._reader.start()

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

    def problem(self) -> str | None:
        """Why the benchmark cannot go on with this tm, or None."""
        code = self.process.poll()
        if code is not None:
            return f"tm exited with status {code}; last lines:\n{self.tail()}"
        return None

    def tail(self, n: int = 15) -> str:
        with self._lock:
            return "\n".join(line for _, line in self.lines[-n:])

    def rebalance_events(self) -> list[tuple[float, str, list[int]]]:
        """``(seconds since spawn, "assigned" | "revoked", partitions)`` from tm's log lines."""
        events = []
        with self._lock:
            lines = list(self.lines)
        for at, line in lines:
            kind = (
                "assigned"
                if "partitions assigned" in line
                else "revoked"
                if "partitions revoked" in line
                else None
            )
            if kind is None:
                continue
            match = _PARTITIONS_RE.search(line)
            parts = [int(p) for p in match.group(1).split(",") if p.strip()] if match else []
            events.append((at - self.started, kind, parts))
        return events

    def ready_after(self, partitions: int) -> float | None:
        """Seconds from spawn until every partition was owned by some worker (net of
        revocations), from the ``partitions assigned``/``revoked`` log lines."""
        owners: Counter[int] = Counter()
        for at, kind, parts in self.rebalance_events():
            for p in parts:
                owners[p] += 1 if kind == "assigned" else -1
            if all(owners[p] > 0 for p in range(partitions)):
                return at
        return None

    def wait_ready(
        self, partitions: int, *, timeout_s: float, poll_s: float = COMMIT_POLL_S
    ) -> float:
        deadline = time.monotonic() + timeout_s
        while True:
            ready = self.ready_after(partitions)
            if ready is not None:
                return ready
            problem = self.problem()
            if problem:
                raise BenchError(problem)
            if time.monotonic() > deadline:
                raise BenchError(
                    f"not all {partitions} partitions assigned after {timeout_s:.0f} s; "
                    f"last lines:\n{self.tail()}"
                )
            time.sleep(poll_s)

    def stop(self, timeout_s: float) -> tuple[int, float, bool]:
        """SIGTERM the supervisor only (as Kubernetes does) and wait; SIGKILL the whole session
        at the deadline. Returns (exit status, seconds it took, whether it had to be killed)."""
        began = time.monotonic()
        killed = False
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                code = self.process.wait(10)
        finally:
            self._reader.join(5)
            if self.process.stdout is not None:
                self.process.stdout.close()
            self._log.close()
        return code, time.monotonic() - began, killed
