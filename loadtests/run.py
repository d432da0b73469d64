"""Running locust on the load test's users and reading what it wrote: used by ``python -m
loadtests`` (``make load``) and by the smoke test in ``make test``. Nothing here imports
locust or gevent (locust monkey-patches the process that imports it); locust runs as a child.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loadtests.options import STAGE_TYPE, STAGES

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = REPO / "loadtests" / "locustfile.py"
CSV_PREFIX = "load"  # locust writes load_stats.csv, load_stats_history.csv, load_failures.csv
HTML_REPORT = "report.html"
PROBE_TIMEOUT_S = 2.0
LOCUST_STOP_S = 60.0  # locust drains its tasks in flight (LOAD_DRAIN_S) before it exits


@dataclass(frozen=True, slots=True)
class StatRow:
    """One line of locust's ``*_stats.csv``: a stage or an endpoint."""

    type: str
    name: str
    count: int
    failures: int
    rate: float  # requests (tasks, for a stage) a second over the run
    p50: float
    p95: float
    p99: float
    max: float

    @property
    def is_stage(self) -> bool:
        return self.type == STAGE_TYPE


def locust_command(
    *, host: str, users: int, seconds: float | None, out: Path, ui: bool = False
) -> list[str]:
    """The locust command line: headless for ``seconds`` with CSV and HTML report in ``out``,
    or (``ui``) the web UI on 127.0.0.1 with ``users`` as the form's default."""
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--host",
        host,
        "-u",
        str(users),
        "-r",
        str(users),  # everyone at once: the rate is the point, not the ramp
        "--csv",
        str(out / CSV_PREFIX),
        "--csv-full-history",
    ]
    if ui:
        return [*command, "--web-host", "127.0.0.1"]
    if seconds is None:
        raise ValueError("headless locust needs a run time")
    return [
        *command,
        "--headless",
        "--run-time",
        f"{math.ceil(seconds)}s",
        "--html",
        str(out / HTML_REPORT),
        "--only-summary",
        "--exit-code-on-error",
        "0",  # failures are judged from the CSV, with the rest
    ]


def locust_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the repository on the import path (locust adds only the locustfile's
    folder)."""
    path = env.get("PYTHONPATH", "")
    return {**env, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


def run_locust(command: list[str], env: dict[str, str], *, timeout_s: float | None) -> int:
    """Run locust in the foreground; return its exit status (SIGTERM, then kill, at the
    deadline)."""
    with subprocess.Popen(command, env=locust_env(env), cwd=REPO) as process:  # noqa: S603
        try:
            return process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return _terminate(process)
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C (the web UI's way out) or SIGTERM
            _terminate(process)
            raise


def _terminate(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM (locust then writes its reports), SIGKILL after LOCUST_STOP_S."""
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(LOCUST_STOP_S)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def _number(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        return math.nan


def read_stats(path: Path) -> list[StatRow]:
    """The stages and endpoints of locust's stats CSV (not its Aggregated line), stages
    first."""
    rows = []
    with path.open(newline="") as handle:
        for line in csv.DictReader(handle):
            if line["Name"] == "Aggregated":
                continue
            rows.append(
                StatRow(
                    type=line["Type"],
                    name=line["Name"],
                    count=int(line["Request Count"]),
                    failures=int(line["Failure Count"]),
                    rate=_number(line["Requests/s"]),
                    p50=_number(line["50%"]),
                    p95=_number(line["95%"]),
                    p99=_number(line["99%"]),
                    max=_number(line["Max Response Time"]),
                )
            )
    return sorted(rows, key=lambda r: (not r.is_stage, r.name))


def problems(rows: list[StatRow]) -> list[str]:
    """What makes a run bad: a stage without successes, any failure."""
    found = []
    by_name = {r.name: r for r in rows if r.is_stage}
    for stage in STAGES:
        row = by_name.get(stage)
        if row is None or row.count - row.failures <= 0:
            found.append(f"stage {stage!r} saw no success")
    found += [f"{r.type} {r.name}: {r.failures} of {r.count} failed" for r in rows if r.failures]
    return found


def render(rows: list[StatRow]) -> str:
    """A markdown table: per stage and endpoint, the rate, p50/p95/p99, max and failures."""

    def ms(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:,.0f}"

    out = [
        "| stage or endpoint | count | rate /s | p50 ms | p95 ms | p99 ms | max ms | failures |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = f"**{r.name}**" if r.is_stage else f"{r.type} {r.name}"
        out.append(
            f"| {name} | {r.count:,} | {r.rate:,.1f} | {ms(r.p50)} | {ms(r.p95)} | {ms(r.p99)}"
            f" | {ms(r.max)} | {r.failures:,} |"
        )
    return "\n".join(out)


# -- tm's API, from outside -------------------------------------------------------------------


def http_status(url: str, token: str | None = None) -> int:
    """The status of GET ``url`` (0 when nothing answers)."""
    request = urllib.request.Request(url)  # noqa: S310 (http://127.0.0.1 only)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as reply:  # noqa: S310
            return int(reply.status)
    except urllib.error.HTTPError as error:
        error.close()
        return int(error.code)
    except OSError:
        return 0


def wait_ready(base: str, *, timeout_s: float, problem: Callable[[], str | None]) -> None:
    """Wait for ``/api/health/ready`` to say 200; raise with ``problem()`` or at the
    deadline."""
    deadline = time.monotonic() + timeout_s
    while http_status(f"{base}/api/health/ready") != 200:
        why = problem()
        if why:
            raise RuntimeError(why)
        if time.monotonic() > deadline:
            raise RuntimeError(f"tm at {base} not ready after {timeout_s:.0f} s")
        time.sleep(0.25)
