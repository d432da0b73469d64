"""The facts a bench's report prints about where it ran (the machine, the broker's and the
database's versions and settings) and the statistics it prints (percentiles).
"""

from __future__ import annotations

import glob
import os
import platform
import re
import sys
import time
from pathlib import Path

import asyncpg
import confluent_kafka

from harness.stack import query
from tm.config import Settings

_KAFKA_JAR_RE = re.compile(r"kafka(?:-server|_2\.\d+|-clients)-(\d+\.\d+\.\d+[\w.-]*)\.jar$")


def note(text: str, *, who: str = "bench") -> None:
    """A progress line on stderr: ``[who HH:MM:SS] text`` (the report goes to stdout)."""
    print(f"[{who} {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Checks:
    """What a run checked, each noted as it is made; the run is ok when every check passed and
    nothing stopped it (``error``)."""

    checks: list[tuple[str, bool, str]]
    error: str | None

    def check(self, what: str, ok: bool, detail: str) -> None:
        self.checks.append((what, ok, detail))
        note(f"check {'ok' if ok else 'FAILED'}: {what}: {detail}")

    @property
    def ok(self) -> bool:
        return self.error is None and all(ok for _, ok, _ in self.checks)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    index = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def kafka_broker_version() -> str:
    """The broker's version, read from the jars of a local ``kafka.Kafka`` process (librdkafka
    does not expose the broker version). ``unknown`` when the broker is not on this machine."""
    for cmdline_path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            argv = Path(cmdline_path).read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kafka.Kafka" not in argv:
            continue
        args = [a.decode(errors="replace") for a in argv]
        for flag in ("-cp", "-classpath", "--class-path"):
            if flag in args[:-1]:
                for entry in args[args.index(flag) + 1].split(":"):
                    candidates = glob.glob(entry) if "*" in entry else [entry]
                    for jar in sorted(candidates):
                        match = _KAFKA_JAR_RE.search(jar)
                        if match:
                            return f"Apache Kafka {match.group(1)} (local broker, from its jars)"
        return "unknown (local broker found, no versioned jar on its class path)"
    return "unknown (broker not on this machine)"


def machine(settings: Settings) -> dict[str, str]:
    """What the report says about where it ran."""
    facts = {
        "nproc": f"{os.cpu_count()} (usable by this process: {len(os.sched_getaffinity(0))})",
        "cpu": _cpu_model(),
        "memory": _memory_gib(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "confluent-kafka / librdkafka": (
            f"{confluent_kafka.version()[0]} / {confluent_kafka.libversion()[0]}"
        ),
        "asyncpg": asyncpg.__version__,
        "kafka": kafka_broker_version(),
    }
    rows = query(
        settings,
        "SELECT current_setting('server_version'), current_setting('shared_buffers'),"
        " current_setting('synchronous_commit'), current_setting('fsync'),"
        " current_setting('max_wal_size')",
    )
    version, shared_buffers, sync_commit, fsync, max_wal = rows[0]
    facts["postgresql"] = (
        f"{version} (shared_buffers={shared_buffers}, synchronous_commit={sync_commit},"
        f" fsync={fsync}, max_wal_size={max_wal})"
    )
    return facts
