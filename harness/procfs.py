"""What ``/proc`` says about processes and the machine: a process tree, CPU seconds, memory
(VmRSS, PSS), open descriptors, whether a pid still lives, the machine's busy share, and a
sampler of a tree's memory peaks in a thread.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

RSS_SAMPLE_S = 0.1  # memory sampling period
_TICK_S = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def alive(pid: int) -> bool:
    """The process exists and is not a zombie nobody reaped yet."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads); 0 if it is gone."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _TICK_S if fields else 0.0


def pids_named(pattern: str) -> list[int]:
    """The processes whose command line matches ``pattern`` (as ``pgrep -f``)."""
    regex = re.compile(pattern)
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if regex.search(command):
                found.append(int(entry))
    return found


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores so far, from /proc/stat (0, 0 when unreadable)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return float(sum(fields) - idle), float(sum(fields))


def busy_since(before: tuple[float, float]) -> float:
    """The share of all cores busy since the ``machine_busy()`` reading ``before``."""
    busy, total = (now - then for now, then in zip(machine_busy(), before, strict=True))
    return busy / total if total else 0.0


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
        super().__init__(name="harness-rss", daemon=True)
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
