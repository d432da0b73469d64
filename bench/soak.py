"""The soak: tm for a long while under production-shaped traffic, sampled from outside for
leaks.

    .venv/bin/python -m bench.soak [--minutes M] [--rate R] [--sample-s S] [--out DIR]

On a fresh database and fresh topics (as ``bench.e2e``), a gateway sends `new` tasks and a
crawler answers each crawl request once (20 % `error`), so the task-status topic carries as
many updates as tasks. The rate R is inbound messages a second (tasks + updates); without
``--rate`` it is half the maximum, measured first on the same stack: tm under the same traffic
with the gateway kept ``FLOOD_BACKLOG`` tasks ahead of the crawler for ``FLOOD_S`` seconds,
the committed offsets read before and after. Then a fresh ``tm run`` at R for M minutes,
sampled every S seconds:

- per tm process (supervisor, each worker slot, the API process): RSS, PSS
  (``/proc/<pid>/smaps_rollup``), open file descriptors, threads;
- PostgreSQL connections of tm (``pg_stat_activity``, application_name ``tm`` and ``tm-api``);
- the size and file count of the Prometheus multiprocess directory;
- the consumer group's lag (end offsets minus committed offsets) and, as tm reports it, the sum
  of ``tm_consumer_lag_messages`` on ``/metrics`` (scraped like Prometheus would);
- the committed throughput.

The report (markdown on stdout and ``soak.md``, the plot ``soak.png``, the samples
``samples.csv``, tm's log) gives each series a slope after the warm-up and the growth it means
over the run: under 5 % is "no leak" (DESIGN §8). Exit status 1 when a series grew 5 % or more
or a check failed. Everything created is removed at the end, even on failure.

It lives in ``bench/`` because it is a measurement of tm on a stack of its own, built from the
harness the tests share (``harness.stack``, ``harness.tm``, ``harness.procfs``);
``loadtests/`` drives an already running tm through locust, which a 10-minute sampler of /proc
and PostgreSQL does not need.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import re
import shlex
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from bench import leaks
from bench.leaks import Series
from harness import HarnessError, free_port, report, stop_on_sigterm, unique
from harness.kafka import OffsetReader, end_offsets
from harness.procfs import open_fds, process_tree, pss_kib, status_kib
from harness.report import machine
from harness.servers import prometheus_server
from harness.stack import Fresh, Stack, kafka_config, query
from harness.tm import TmProcess
from tm import config
from tm.traffic import new_task_message, update_message

DEFAULT_MINUTES = 10.0
DEFAULT_SAMPLE_S = 10.0
WARMUP_SHARE = 0.2  # the first fifth of the run is warm-up (at least MIN_WARMUP_S)
MIN_WARMUP_S = 30.0
ERROR_SHARE = 0.2  # crawl requests answered with `error`, as `tm send updates` does
FLOOD_S = 25.0  # the maximum-rate measurement
FLOOD_SETTLE_S = 5.0  # of which the first seconds are not counted (start-up, first batches)
FLOOD_BACKLOG = 40_000  # tasks the flooding gateway keeps ahead of the crawler
DRAIN_TIMEOUT_S = 180.0  # after the traffic stops: until every message is committed
READY_TIMEOUT_S = 60.0
PARTITIONS = 6
TICK_S = 0.001  # the traffic loop's pause when it has nothing to do
CHUNK = 2000  # most gateway events produced per loop turn
KAFKA_TIMEOUT_S = 10.0
SCRAPE_TIMEOUT_S = 5.0
MIB = 1024.0
PRODUCER = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "compression.type": "lz4",
    "queue.buffering.max.messages": 500_000,
    "delivery.report.only.error": True,
    "log_level": 3,
}
_SPAWNED = re.compile(r"(worker|api) spawned\b(.*)")
_SLOT = re.compile(r"\bslot=(\d+)")
_PID = re.compile(r"\bpid=(\d+)")
_LAG = re.compile(r'^tm_consumer_lag_messages\{partition="\d+"\} (\S+)$', re.MULTILINE)


def note(text: str) -> None:
    report.note(text, who="soak")


# -- traffic -----------------------------------------------------------------------------------


class Traffic(threading.Thread):
    """A gateway sending `new` tasks (``tm.traffic.new_task_message``) and a crawler answering
    each crawl request once (``update_message``), in one thread. ``rate``: inbound messages a
    second, half tasks and half updates; None floods: the gateway stays ``backlog`` tasks
    ahead of the crawl requests read."""

    def __init__(self, target: Stack, *, rate: float | None, backlog: int = FLOOD_BACKLOG):
        super().__init__(name="soak-traffic", daemon=True)
        self.target = target
        self.rate = rate
        self.backlog = backlog
        self.first_n = time.time_ns() // 1000  # unique per run: tasks are told apart by n
        self.tasks = 0
        self.updates = 0
        self.requests = 0
        self.repeated = 0
        self.failed = 0
        self.error: BaseException | None = None
        self._answered = bytearray()
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the soak, in the main thread
            self.error = exc

    def _run(self) -> None:
        kconfig = kafka_config(self.target.settings)
        producer = Producer({**kconfig, **PRODUCER, "on_delivery": self._delivered})
        consumer = Consumer({**kconfig, "group.id": unique("soak-crawler"), "log_level": 3})
        topic, requests_topic = self.target.topic, self.target.requests_topic
        tps = []
        for p in range(self.target.partitions):
            _, high = consumer.get_watermark_offsets(
                TopicPartition(requests_topic, p), timeout=KAFKA_TIMEOUT_S
            )
            tps.append(TopicPartition(requests_topic, p, high))
        consumer.assign(tps)
        started = time.monotonic()
        try:
            while not self._stop_event.is_set():
                if self.rate is None:
                    due = self.requests + self.backlog
                else:
                    due = int((time.monotonic() - started) * self.rate / 2) + 1
                sent = 0
                while self.tasks < due and sent < CHUNK:
                    headers, value = new_task_message(self.first_n + self.tasks)
                    try:
                        producer.produce(topic, value=value, headers=headers)
                    except BufferError:
                        producer.poll(0.01)
                        break
                    self.tasks += 1
                    sent += 1
                got = consumer.consume(1000, 0)
                for message in got:
                    if message.error() is None:
                        self._answer(producer, message)
                producer.poll(0)
                if not got and self.tasks >= due:
                    time.sleep(TICK_S)
        finally:
            producer.flush(KAFKA_TIMEOUT_S * 3)
            consumer.close()

    def _delivered(self, error: Any, _message: Any) -> None:
        if error is not None:
            self.failed += 1

    def _answer(self, producer: Producer, message: Any) -> None:
        try:
            n = int(orjson.loads(message.value())["base_url"].rsplit("/", 1)[1])
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return
        index = n - self.first_n
        if not 0 <= index < self.tasks:
            return
        self.requests += 1
        if index >= len(self._answered):
            self._answered.extend(bytes(max(index + 1 - len(self._answered), 1 << 16)))
        if self._answered[index]:
            self.repeated += 1
            return
        self._answered[index] = 1
        key = message.key()
        failed = (n * 2654435761) % 1000 < ERROR_SHARE * 1000  # spread, and the same every run
        headers, value = update_message(uuid.UUID(key.decode()), failed=failed)
        while True:
            try:
                producer.produce(self.target.topic, key=key, value=value, headers=headers)
                break
            except BufferError:
                producer.poll(0.01)
        self.updates += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join(KAFKA_TIMEOUT_S * 4)


# -- looking at tm -----------------------------------------------------------------------------


def _directory(path: Path) -> tuple[float, int]:
    sizes = [f.stat().st_size for f in path.iterdir() if f.is_file()]
    return sum(sizes) / 1024, len(sizes)


def _scrape_lag(port: int) -> float | None:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT_S
        ) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    values = _LAG.findall(text)
    return sum(float(v) for v in values) if values else None


@dataclass
class Samples:
    """Every series of one soak, by name, in the order they first appeared."""

    series: dict[str, Series] = field(default_factory=dict)
    restarts: list[str] = field(default_factory=list)

    def add(self, name: str, kind: str, unit: str, t: float, value: float, **kw: Any) -> None:
        if name not in self.series:
            self.series[name] = Series(name, kind, unit, **kw)
        self.series[name].add(t, value)


class Sampler(threading.Thread):
    """Samples tm from outside every ``every_s`` seconds (and once at once)."""

    def __init__(
        self,
        tm: TmProcess,
        target: Stack,
        *,
        every_s: float,
        metrics_dir: Path,
        port: int,
        rate: float,
    ) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.tm = tm
        self.target = target
        self.every_s = every_s
        self.metrics_dir = metrics_dir
        self.port = port
        self.rate = rate
        self.samples = Samples()
        self.error: BaseException | None = None
        self._offsets = _offsets(target)
        self._stop_event = threading.Event()
        self._began = time.monotonic()
        self._last: tuple[float, int] | None = None
        self._pids: dict[str, int] = {}

    def run(self) -> None:
        try:
            while True:
                self.sample()
                if self._stop_event.wait(self.every_s):
                    return
        except BaseException as exc:
            self.error = exc
        finally:
            self._offsets.close()

    def sample(self) -> None:
        t = time.monotonic() - self._began
        add = self.samples.add
        tree = set(process_tree(self.tm.pid))
        rss_total = pss_total = 0.0
        for pid, role in sorted(self.tm.roles().items(), key=lambda kv: kv[1]):
            if pid not in tree:
                continue
            if self._pids.get(role, pid) != pid:
                self.samples.restarts.append(f"{t:.0f} s: {role} is now pid {pid}")
            self._pids[role] = pid
            rss, pss = status_kib(pid, "VmRSS:") / MIB, pss_kib(pid) / MIB
            rss_total += rss
            pss_total += pss
            add(f"RSS {role}", "rss_mib", "MiB", t, rss)
            add(f"PSS {role}", "pss_mib", "MiB", t, pss)
            add(f"fds {role}", "fds", "fds", t, open_fds(pid))
            add(f"threads {role}", "threads", "threads", t, status_kib(pid, "Threads:"))
        add("RSS total", "rss_mib", "MiB", t, rss_total)
        add("PSS total", "pss_mib", "MiB", t, pss_total)
        rows = query(
            self.target.settings,
            "SELECT application_name, count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND application_name IN ('tm', 'tm-api') GROUP BY 1",
        )
        counts = dict(rows)
        for name in ("tm", "tm-api"):
            add(
                f"PostgreSQL connections {name}",
                "pg_connections",
                "connections",
                t,
                counts.get(name, 0),
            )
        kib, files = _directory(self.metrics_dir)
        add("metric files size", "metric_kib", "KiB", t, kib)
        add("metric files", "metric_files", "files", t, files)
        committed = self._offsets.committed_total()
        lag = self._offsets.ends_total() - committed
        add("consumer lag", "lag", "messages", t, lag, floor=max(self.rate, 1.0))
        scraped = _scrape_lag(self.port)
        if scraped is not None:
            add(
                "consumer lag (/metrics)",
                "lag",
                "messages",
                t,
                scraped,
                floor=max(self.rate, 1.0),
                judged=False,
            )
        if self._last is not None:
            then, before = self._last
            add(
                "committed throughput",
                "throughput",
                "msg/s",
                t,
                (committed - before) / max(t - then, 1e-9),
                judged=False,
            )
        self._last = (t, committed)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(60)


# -- the run -----------------------------------------------------------------------------------


def _tm_env(target: Stack, *, port: int, metrics_dir: Path | None = None) -> dict[str, str]:
    env = {**os.environ, **target.env, "APP_PORT": str(port)}
    if metrics_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    return env


def _start_tm(target: Stack, log_path: Path, env: dict[str, str]) -> TmProcess:
    tm = TmProcess(env, log_path)
    try:
        tm.wait_ready(target.partitions, timeout_s=READY_TIMEOUT_S)
    except BaseException:
        tm.stop(30)
        raise
    return tm


def _drain(target: Stack, traffic: Traffic, tm: TmProcess) -> float:
    """Stop the gateway, keep the crawler answering until every crawl request is answered and
    every message committed; return how long it took."""
    began = time.monotonic()
    traffic.rate = 0.0  # no more tasks; the crawler goes on
    traffic.backlog = 0
    offsets = _offsets(target)
    try:
        while True:
            if traffic.error is not None:
                raise HarnessError(f"the traffic failed: {traffic.error}")
            problem = tm.problem()
            if problem:
                raise HarnessError(problem)
            answered = traffic.updates >= traffic.tasks
            if answered and offsets.committed_total() >= offsets.ends_total():
                return time.monotonic() - began
            if time.monotonic() - began > DRAIN_TIMEOUT_S:
                raise HarnessError(
                    f"not drained after {DRAIN_TIMEOUT_S:.0f} s: {traffic.updates} of"
                    f" {traffic.tasks} tasks answered,"
                    f" lag {offsets.ends_total() - offsets.committed_total()}"
                )
            time.sleep(0.5)
    finally:
        traffic.stop()
        offsets.close()


def measure_max(target: Stack, log_dir: Path) -> tuple[float, str]:
    """tm's committed rate under the soak's traffic with the gateway flooding; returns
    (messages a second, how it was measured)."""
    tm = _start_tm(target, log_dir / "tm-max.log", _tm_env(target, port=free_port()))
    traffic = Traffic(target, rate=None)
    offsets = _offsets(target)
    try:
        traffic.start()
        time.sleep(FLOOD_SETTLE_S)
        t0, c0 = time.monotonic(), offsets.committed_total()
        time.sleep(FLOOD_S - FLOOD_SETTLE_S)
        t1, c1 = time.monotonic(), offsets.committed_total()
        if traffic.error is not None:
            raise HarnessError(f"the traffic failed: {traffic.error}")
        rate = (c1 - c0) / (t1 - t0)
        drained = _drain(target, traffic, tm)
    finally:
        traffic.stop()
        offsets.close()
        code = tm.stop(40)
    how = (
        f"committed offsets over {t1 - t0:.0f} s of a {FLOOD_S:.0f} s flood (gateway kept"
        f" {FLOOD_BACKLOG:,} tasks ahead of the crawler, every crawl request answered), on the"
        f" soak's own stack before the soak; drained in {drained:.0f} s; that tm exited {code}"
    )
    return rate, how


@dataclass
class SoakResult:
    seconds: float
    rate: float
    warmup_s: float
    sample_s: float
    samples: Samples
    tasks: int = 0
    updates: int = 0
    repeated: int = 0
    produce_failures: int = 0
    drained_s: float | None = None
    tm_exit: int | None = None
    tm_killed: bool = False
    worker_deaths: int = 0
    dead_letters: int | None = None
    log_path: Path | None = None
    error: str | None = None
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def series(self) -> list[Series]:
        return list(self.samples.series.values())


def run_soak(
    target: Stack,
    *,
    seconds: float,
    rate: float,
    sample_s: float,
    warmup_s: float,
    log_dir: Path,
    dashboard_png: Path | None = None,
) -> SoakResult:
    """A fresh ``tm run`` on ``target`` for ``seconds`` at ``rate`` inbound messages a second,
    sampled every ``sample_s``; then the traffic stops, tm drains it, and gets a SIGTERM.
    ``dashboard_png``: a Prometheus scrapes tm meanwhile, and the dashboard's main panels are
    drawn from it there (stack.dashboard)."""
    metrics_dir = Path(tempfile.mkdtemp(prefix="tm-soak-metrics-"))
    port = free_port()
    tm = _start_tm(
        target, log_dir / "tm-soak.log", _tm_env(target, port=port, metrics_dir=metrics_dir)
    )
    with contextlib.ExitStack() as scraped:
        prometheus = (
            scraped.enter_context(prometheus_server(log_dir, port, ("/metrics", "/api/metrics")))
            if dashboard_png is not None
            else None
        )
        result = _soak(target, tm, seconds, rate, sample_s, warmup_s, metrics_dir, port)
        if prometheus is not None and dashboard_png is not None:
            from stack import dashboard

            dashboard.draw(f"http://127.0.0.1:{prometheus}", dashboard_png, seconds / 60 + 1)
    return result


def _soak(
    target: Stack,
    tm: TmProcess,
    seconds: float,
    rate: float,
    sample_s: float,
    warmup_s: float,
    metrics_dir: Path,
    port: int,
) -> SoakResult:
    sampler = Sampler(tm, target, every_s=sample_s, metrics_dir=metrics_dir, port=port, rate=rate)
    traffic = Traffic(target, rate=rate)
    result = SoakResult(seconds, rate, warmup_s, sample_s, sampler.samples, log_path=tm.log_path)
    try:
        traffic.start()
        sampler.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for failed in (traffic.error, sampler.error):
                if failed is not None:
                    raise HarnessError(f"{failed!r}")
            problem = tm.problem()
            if problem:
                raise HarnessError(problem)
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        sampler.stop()
        if sampler.error is not None:
            raise HarnessError(f"sampling failed: {sampler.error!r}")
        result.drained_s = _drain(target, traffic, tm)
    except BaseException as exc:
        result.error = str(exc) if isinstance(exc, HarnessError) else traceback.format_exc()
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            result.error = f"interrupted ({type(exc).__name__})"
    finally:
        traffic.stop()
        sampler.stop()
        result.tasks, result.updates = traffic.tasks, traffic.updates
        result.repeated, result.produce_failures = traffic.repeated, traffic.failed
        timeout_s = target.settings.consumer.graceful_shutdown_timeout_ms / 1000 + 10
        result.tm_exit = tm.stop(timeout_s)
        result.tm_killed = tm.killed
        result.worker_deaths = sum(1 for _, line in tm.lines if "worker died" in line)
        for path in metrics_dir.iterdir():
            path.unlink()
        metrics_dir.rmdir()
    result.dead_letters = _count(target, target.dlq_topic)
    _checks(result)
    return result


def _offsets(target: Stack) -> OffsetReader:
    return OffsetReader(
        target.kafka_config, group=target.group, topic=target.topic, partitions=target.partitions
    )


def _count(target: Stack, topic: str) -> int:
    return sum(end_offsets(target.kafka_config, topic, target.partitions).values())


def _checks(r: SoakResult) -> None:
    add = r.checks.append
    add(
        (
            "the soak ran to its end and drained",
            r.error is None and r.drained_s is not None,
            r.error or f"drained in {r.drained_s:.1f} s",
        )
    )
    add(
        (
            "tm stopped by SIGTERM with exit status 0",
            r.tm_exit == 0 and not r.tm_killed,
            f"exit status {r.tm_exit}" + (" (killed)" if r.tm_killed else ""),
        )
    )
    add(("no worker died", r.worker_deaths == 0, f"{r.worker_deaths} `worker died` lines"))
    add(
        (
            "no child process restarted",
            not r.samples.restarts,
            "; ".join(r.samples.restarts) or "same pids throughout",
        )
    )
    add(
        (
            "every task answered once",
            r.updates == r.tasks,
            f"{r.tasks} tasks, {r.updates} updates, {r.repeated} crawl requests repeated",
        )
    )
    add(("nothing dead-lettered", r.dead_letters == 0, f"{r.dead_letters} dead letters"))
    add(("every message produced", r.produce_failures == 0, f"{r.produce_failures} failed"))


# -- the report --------------------------------------------------------------------------------


def verdicts(result: SoakResult) -> list[tuple[Series, leaks.Trend | None]]:
    return [(s, leaks.trend(s, result.warmup_s)) for s in result.series]


def leaking(result: SoakResult) -> list[str]:
    return [
        f"{s.name} grew {t.growth:.1%}"
        for s, t in verdicts(result)
        if s.judged and t is not None and not t.ok
    ]


def render(result: SoakResult, *, command: str, facts: dict[str, str], how_rate: str) -> str:
    r = result
    out = ["# tm soak", "", f"command: `{command}`", ""]
    out += [
        f"{r.seconds / 60:.1f} minutes at {r.rate:,.0f} inbound messages/s ({how_rate});"
        f" sampled every {r.sample_s:.0f} s; warm-up {r.warmup_s:.0f} s (not judged);"
        f" {r.tasks:,} tasks and {r.updates:,} updates sent",
        "",
    ]
    if facts:
        out += ["| machine | |", "|---|---|", *(f"| {k} | {v} |" for k, v in facts.items()), ""]
    out += [
        "## Series after the warm-up",
        "",
        "Slope of a Theil-Sen line (the median of the slopes between every two samples) through"
        " the samples after the warm-up; growth is the line's rise over the run relative to its"
        " start. No leak: growth under"
        f" {leaks.LEAK_GROWTH:.0%}.",
        "",
        "| series | samples | start | end | slope /min | growth | verdict |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for s, t in verdicts(r):
        if t is None:
            out.append(f"| {s.name} | {len(s.values)} | | | | | too few samples |")
            continue
        verdict = "shown only" if not s.judged else "no leak" if t.ok else "**grows**"
        out.append(
            f"| {s.name} ({s.unit}) | {t.samples} | {t.start:,.1f} | {t.end:,.1f}"
            f" | {t.slope_per_min:+,.2f} | {t.growth:+.1%} | {verdict} |"
        )
    out += ["", "## Checks", ""]
    out += [f"- {'ok' if ok else '**FAILED**'}: {w}: {d}" for w, ok, d in r.checks]
    grows = leaking(r)
    out += ["", f"Leaks: {', '.join(grows) if grows else 'none (every series under 5 %)'}", ""]
    if r.log_path:
        out.append(f"tm's log: {r.log_path}")
    return "\n".join(out)


def write_samples(result: SoakResult, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["series", "unit", "seconds", "value"])
        for s in result.series:
            for t, v in zip(s.times, s.values, strict=True):
                writer.writerow([s.name, s.unit, f"{t:.1f}", f"{v:.3f}"])


PANELS = [
    ("rss_mib", "RSS (MiB)"),
    ("pss_mib", "PSS (MiB)"),
    ("fds", "open file descriptors"),
    ("threads", "threads"),
    ("pg_connections", "PostgreSQL connections"),
    ("metric_kib", "metric files (KiB)"),
    ("lag", "consumer lag (messages)"),
    ("throughput", "committed (msg/s)"),
]


def plot(result: SoakResult, path: Path) -> None:
    """One panel per kind of series, every series of that kind a line; warm-up shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 2, figsize=(14, 14), sharex=True)
    for ax, (kind, title) in zip(axes.flat, PANELS, strict=True):
        for s in result.series:
            if s.kind == kind:
                ax.plot([t / 60 for t in s.times], s.values, label=s.name, linewidth=1.2)
        if kind == "metric_kib":
            files = next((s for s in result.series if s.kind == "metric_files"), None)
            if files is not None:
                twin = ax.twinx()
                twin.plot([t / 60 for t in files.times], files.values, "k:", label="files")
                twin.set_ylabel("files")
        ax.axvspan(0, result.warmup_s / 60, color="0.9", zorder=0)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in axes[-1]:
        ax.set_xlabel("minutes (grey: warm-up)")
    fig.suptitle(f"tm soak: {result.seconds / 60:.1f} min at {result.rate:,.0f} msg/s")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- the command -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES)
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="inbound messages/s (default: half the measured maximum)",
    )
    parser.add_argument("--sample-s", type=float, default=DEFAULT_SAMPLE_S)
    parser.add_argument(
        "--warmup-s",
        type=float,
        default=None,
        help=f"default: {WARMUP_SHARE * 100:.0f} %% of the run, at least {MIN_WARMUP_S:.0f} s",
    )
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: new)")
    parser.add_argument(
        "--dashboard",
        action="store_true",
        help="a Prometheus scrapes tm; the Grafana dashboard's main panels go to dashboard.png",
    )
    args = parser.parse_args(argv)
    seconds = args.minutes * 60
    if seconds <= 0 or args.sample_s <= 0 or (args.rate is not None and args.rate <= 0):
        parser.error("--minutes, --rate and --sample-s must be positive")
    warmup_s = (
        args.warmup_s if args.warmup_s is not None else max(MIN_WARMUP_S, WARMUP_SHARE * seconds)
    )
    out: Path = args.out or Path(tempfile.mkdtemp(prefix="tm-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    stop_on_sigterm()

    settings = config.load()
    stack = Fresh(settings)
    try:
        target = stack.stack("soak", partitions=PARTITIONS)
        facts = machine(target.settings)
        if args.rate is None:
            note(f"measuring the maximum rate ({FLOOD_S:.0f} s flood)")
            top, how = measure_max(target, out)
            rate = top / 2
            how_rate = f"half of {top:,.0f} msg/s: {how}"
        else:
            rate, how_rate = args.rate, "given with --rate"
        note(f"soak: {args.minutes:g} min at {rate:,.0f} msg/s, samples every {args.sample_s:g} s")
        result = run_soak(
            target,
            seconds=seconds,
            rate=rate,
            sample_s=args.sample_s,
            warmup_s=warmup_s,
            log_dir=out,
            dashboard_png=out / "dashboard.png" if args.dashboard else None,
        )
    finally:
        for problem in stack.cleanup():
            note(f"cleanup: {problem}")
    write_samples(result, out / "samples.csv")
    plot(result, out / "soak.png")
    text = render(result, command=shlex.join(sys.orig_argv), facts=facts, how_rate=how_rate)
    text += f"\n\nplot: {out / 'soak.png'}; samples: {out / 'samples.csv'}\n"
    (out / "soak.md").write_text(text)
    print(text, flush=True)
    failed = leaking(result) or [w for w, ok, _ in result.checks if not ok]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
