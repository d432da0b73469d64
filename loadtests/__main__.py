"""``python -m loadtests [--seconds S] [--rate R] [--ui] [--out DIR]`` (``make load``,
``make load-ui``): locust's users against the tm of ``make run``.

When nothing answers on ``APP_PORT``, it migrates, creates the topics and starts ``tm run``
itself (with ``API_TOKEN``, or a fresh token when unset), and stops it at the end. Headless,
it runs for ``--seconds``, writes locust's CSV and HTML report to a folder it prints, and prints
per stage and endpoint the rate, p50/p95/p99 and failures (also in ``summary.md`` there); the
exit status is 1 when a stage had no success or anything failed.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import report
from harness.tm import TmProcess
from loadtests.options import LoadOptions, refuse_non_local
from loadtests.run import (
    CSV_PREFIX,
    HTML_REPORT,
    http_status,
    locust_command,
    problems,
    read_stats,
    render,
    run_locust,
    wait_ready,
)
from tm import config

READY_TIMEOUT_S = 90.0
DEFAULT_SECONDS = 60.0
DEFAULT_RATE = 100.0  # `new` tasks a second: 10 gateway users at LOAD_USER_RATE=10


def note(text: str) -> None:
    report.note(text, who="load")


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def _start_tm(env: dict[str, str], out: Path, base: str) -> TmProcess:
    for step in (["db", "migrate"], ["topics", "create"]):
        subprocess.run([sys.executable, "-m", "tm", *step], env=env, check=True)  # noqa: S603
    tm = TmProcess(env, out / "tm.log")
    note(f"tm started (pid {tm.pid}, log {tm.log_path}); waiting for /api/health/ready")
    try:
        wait_ready(base, timeout_s=READY_TIMEOUT_S, problem=tm.problem)
    except BaseException:
        tm.stop(30)
        raise
    return tm


def _raise_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: tm is stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=_env_number("LOAD_SECONDS", DEFAULT_SECONDS)
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=_env_number("LOAD_RATE", DEFAULT_RATE),
        help="gateway `new` tasks a second (LOAD_RATE, 100)",
    )
    parser.add_argument("--ui", action="store_true", help="locust's web UI on 127.0.0.1:8089")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: a new one)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rate <= 0:
        parser.error("--seconds and --rate must be positive")

    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    settings = config.load()
    options = LoadOptions.from_env()
    base = f"http://127.0.0.1:{settings.http.port}"
    refused = refuse_non_local(host=base, brokers=settings.kafka.brokers)
    if refused:
        note(f"refusing: {refused}")
        return 2
    gateway_users = max(1, math.ceil(args.rate / options.user_rate))
    users = gateway_users + options.http_users
    out: Path = args.out or Path(tempfile.mkdtemp(prefix="tm-load-"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)

    tm: TmProcess | None = None
    if http_status(f"{base}/api/health/live") == 0:
        env["API_TOKEN"] = env.get("API_TOKEN") or secrets.token_urlsafe(18)
        note(f"nothing answers on {base}: starting tm (migrate, topics create, tm run)")
        tm = _start_tm(env, out, base)
    else:
        if http_status(f"{base}/api/tasks?limit=1", env.get("API_TOKEN")) == 401:
            note(f"the tm on {base} wants another API_TOKEN: set the one it runs with")
            return 2
        note(f"using the tm that answers on {base}")

    note(
        f"{gateway_users} gateway users x {options.user_rate:g} tasks/s"
        f" (= {gateway_users * options.user_rate:g} tasks/s), {options.http_users} API users"
        f" x {options.http_rate:g} requests/s; {options.error_share:.0%} answered `error`"
    )
    command = locust_command(
        host=base, users=users, seconds=None if args.ui else args.seconds, out=out, ui=args.ui
    )
    try:
        if args.ui:
            note("locust's web UI: http://127.0.0.1:8089 (Ctrl-C stops it)")
            try:
                run_locust(command, env, timeout_s=None)
            except KeyboardInterrupt:
                note("stopped")
        else:
            note(f"locust, headless, {args.seconds:.0f} s; reports in {out}")
            limit = args.seconds + options.drain_s + 120  # start-up, drain, report
            run_locust(command, env, timeout_s=limit)
    finally:
        if tm is not None:
            code = tm.stop(settings.consumer.graceful_shutdown_timeout_ms / 1000)
            took, killed = tm.stopped_in_s or 0.0, tm.killed
            note(
                f"tm stopped: exit status {code} after {took:.1f} s"
                + (" (killed at the deadline)" if killed else "")
            )
    if args.ui:
        return 0

    stats = out / f"{CSV_PREFIX}_stats.csv"
    if not stats.exists():
        note(f"locust wrote no {stats.name}")
        return 1
    rows = read_stats(stats)
    found = problems(rows)
    summary = "\n".join(
        [
            f"tm load test: {args.seconds:.0f} s, {gateway_users * options.user_rate:g} tasks/s"
            f" offered ({gateway_users} gateway users), {options.http_users} API users,"
            f" load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
            "",
            render(rows),
            "",
            *(f"- PROBLEM: {p}" for p in found),
            f"reports: {out / HTML_REPORT}, {out / CSV_PREFIX}_*.csv",
        ]
    )
    (out / "summary.md").write_text(summary + "\n")
    print(summary, flush=True)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
