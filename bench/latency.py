"""Steady-rate latency of ``new`` tasks (DESIGN §8), against the real local stack:

    python -m bench.latency [--rates 200,1000,3000,6000] [--seconds 15] [--workers 2]
                            [--partitions 6] [--json FILE] [--log-level info|debug]

On a fresh migrated database and fresh uuid-named topics, one ``python -m tm run`` is started
and left running; once the broker sees every worker owning partitions, each rate in turn gets a
phase of paced gateway ``new`` events, each with a ``task_id`` header of its own (tm then uses it
as the task id, the crawl request's key and its ``task_id`` header). Two latencies per event,
both from its Kafka CreateTime (set at ``produce()``, in milliseconds):

- to readable: a crawler's view, a consumer assigned (not subscribed: no group join) to every
  partition of the requests topic at its end offsets before the phase, polling with
  ``poll(0.1)``, which returns as soon as a message is there; the wall time at return counts;
- to committed: the group's committed offsets read every 10 ms (:class:`CommitWatcher`), so
  this one is overstated by up to ~10 ms plus one read.

The first second of every rate is left out (warm-up). Markdown on stdout, progress on stderr,
``--json`` writes the same figures. Everything created is removed at the end, even on failure;
the exit status is 1 when a check fails (an event whose crawl request or commit was never seen,
a missing row, a dead letter, tm not exiting 0), not when a target is missed. It measures the tm
importable from the current directory, so the file also runs in a worktree of an older tm.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

import tm
from bench.e2e import READY_TIMEOUT_S
from harness import HarnessError, free_port, stop_on_sigterm, unique
from harness.kafka import (
    COMMIT_POLL_S,
    CommitWatcher,
    Gateway,
    GroupWatcher,
    count_records,
    end_offsets,
)
from harness.kafka import committed_at as committed_wall
from harness.procfs import busy_since, machine_busy
from harness.report import Checks, machine, note, percentile
from harness.stack import Fresh, kafka_config, query
from harness.tm import TmProcess
from tm import config
from tm.config import Settings

DEFAULT_RATES = "200,1000,3000,6000"  # events/s; the last is about half of tm's maximum here
DEFAULT_SECONDS = 15.0
DEFAULT_WORKERS = 2
DEFAULT_PARTITIONS = 6
WARM_UP_S = 1.0  # the events of a rate's first second are left out of its figures
READER_POLL_S = 0.1  # Consumer.poll timeout: returns as soon as a message is there
READER_START_S = 1.0  # the reader polls this long before a phase: connections, first fetch
SETTLE_TIMEOUT_S = 60.0  # for every worker to own partitions before the first rate
SEEN_TIMEOUT_S = 60.0  # after the last produce, for the last crawl request and commit
WAIT_POLL_S = 0.05
QUIET_SAMPLE_S = 2.0  # the machine's load is sampled this long before anything starts
QUIET_BUSY = 0.25  # busier than this before the start: the report says the machine was not quiet
TARGET_READABLE_P99_MS = 50.0
TARGET_COMMITTED_P99_MS = 100.0
QUANTILES = (50, 95, 99)
_FIELD_RE = re.compile(r"\b(size|\w+_ms)=([0-9.]+)")
STAGES = ("decode_ms", "db_ms", "publish_ms", "commit_ms")  # in the order they happen


# -- the two sides of tm ---------------------------------------------------------------------


class RequestReader(threading.Thread):
    """A crawler: reads the requests topic from its current end offsets and keeps the wall time
    at which each task id (the crawl request's key) was first read."""

    def __init__(self, kconfig: dict[str, Any], *, topic: str, partitions: int) -> None:
        super().__init__(name="bench-request-reader", daemon=True)
        ends = end_offsets(kconfig, topic, partitions)
        self._consumer = Consumer(
            {
                **kconfig,
                "group.id": unique("bench-reader"),
                "enable.auto.commit": False,
                "log_level": 3,
            }
        )
        self._consumer.assign([TopicPartition(topic, p, end) for p, end in ends.items()])
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self.seen: dict[str, float] = {}
        self.duplicates = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                message = self._consumer.poll(READER_POLL_S)
                now = time.time()
                if message is None:
                    continue
                if message.error() is not None:
                    raise HarnessError(f"reading crawl requests: {message.error()}")
                key: str | bytes | None = message.key()
                if key is None:  # not tm's shape: fall back on the header
                    key = dict(message.headers() or []).get("task_id")
                task_id = key.decode() if isinstance(key, bytes) else str(key)
                with self._lock:
                    if task_id in self.seen:
                        self.duplicates += 1
                    else:
                        self.seen[task_id] = now
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            self._consumer.close()

    def check(self) -> None:
        if self.error is not None:
            raise HarnessError(f"crawl request reader failed: {self.error}")

    def count(self) -> int:
        with self._lock:
            return len(self.seen)

    def wait_for(self, count: int, *, timeout_s: float, alive: Callable[[], str | None]) -> None:
        """Until ``count`` distinct task ids were read, or the deadline (no error: the ids never
        read are counted by the caller)."""
        deadline = time.monotonic() + timeout_s
        while self.count() < count and time.monotonic() < deadline:
            self.check()
            problem = alive()
            if problem:
                raise HarnessError(problem)
            time.sleep(WAIT_POLL_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)


def tm_source() -> str:
    """Which tm this measures: its directory, and the commit of its checkout (a worktree of an
    older tm says so here) with whether tm/ differs from it."""
    where = Path(tm.__file__).parent
    git = shutil.which("git")
    if git is None:
        return str(where)
    head = subprocess.run(  # noqa: S603 (a fixed command)
        [git, "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    if head.returncode != 0:
        return str(where)
    changed = subprocess.run(  # noqa: S603
        [git, "-C", str(where), "status", "--porcelain", "--", "."],
        capture_output=True,
        text=True,
    )
    dirty = ", with uncommitted changes" if changed.stdout.strip() else ""
    return f"{where} (commit {head.stdout.strip()}{dirty})"


# -- figures ---------------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, float]:
    """p50/p95/p99/max (nearest rank) of a non-empty list."""
    ordered = sorted(values)
    return {**{f"p{q}": percentile(ordered, q) for q in QUANTILES}, "max": ordered[-1]}


@dataclass
class RateResult:
    rate_asked: float
    rate_achieved: float
    seconds: float
    sent: int
    counted: int  # after the warm-up second
    readable_ms: dict[str, float]
    committed_ms: dict[str, float]
    never_seen: int  # events whose crawl request was never read
    never_committed: int
    duplicates: int  # crawl requests read twice
    slowest_readable_at_s: float  # seconds into the phase
    readable_by_second: list[dict[str, float]]
    committed_by_second: list[dict[str, float]]
    stages: dict[str, Any] = field(default_factory=dict)  # from `batch done` lines (debug)
    rebalances: int = 0  # tm's assigned/revoked log lines during the phase
    bench_cpu: float = 0.0  # this process's CPU over the phase, in cores
    machine_busy: float = 0.0  # share of all cores busy over the phase


def batch_stages(
    lines: list[tuple[float, str]], began: float, ended: float, origin: float
) -> dict[str, Any]:
    """Spread of each ``*_ms`` stage of tm's ``batch done`` debug lines (whichever this tm logs)
    between two monotonic times, and the slowest batch (``at_s``: seconds after ``origin``)."""
    batches: list[dict[str, float]] = []
    for at, line in lines:
        if began <= at <= ended and "batch done" in line:
            fields = {k: float(v) for k, v in _FIELD_RE.findall(line)}
            fields["at_s"] = at - origin
            batches.append(fields)
    if not batches:
        return {}
    stages = [s for s in STAGES if any(s in b for b in batches)]
    slowest = max(batches, key=lambda b: sum(b.get(s, 0.0) for s in stages))
    return {
        "batches": len(batches),
        "mean_size": statistics.fmean(b.get("size", 0.0) for b in batches),
        "stages": {s: spread([b.get(s, 0.0) for b in batches]) for s in stages},
        "slowest": slowest,
    }


def by_second(points: list[tuple[float, float]]) -> list[dict[str, float]]:
    """(seconds into the phase, latency) points as one spread per whole second: where the
    spikes fall in time."""
    buckets: dict[int, list[float]] = {}
    for at_s, latency in points:
        buckets.setdefault(int(at_s), []).append(latency)
    return [{"second": k, **spread(v)} for k, v in sorted(buckets.items())]


# -- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    rates: list[float]
    seconds: float
    workers: int
    partitions: int
    json_path: Path | None
    log_level: str
    delivery: str


class Run(Checks):
    """The fresh stack, one tm, the probes, and one phase per rate."""

    def __init__(self, options: Options) -> None:
        self.o = options
        self.settings = config.load()
        self.stack = Fresh(self.settings)
        self.kconfig = kafka_config(self.settings)
        base = unique("bench-latency").replace("_", "-")
        self.topic = f"{base}-ts"
        self.requests_topic = f"{base}-req"
        self.dlq_topic = f"{base}.dlq"
        self.warm_up_topic = f"{base}-warm-up"
        self.group = f"{base}-group"
        self.log_dir = Path(tempfile.mkdtemp(prefix="tm-bench-latency-"))
        self.db: Settings | None = None
        self.tm: TmProcess | None = None
        self.watcher: CommitWatcher | None = None
        self.gateway: Gateway | None = None
        self.facts: dict[str, str] = {}
        self.results: list[RateResult] = []
        self.checks: list[tuple[str, bool, str]] = []
        self.notes: list[str] = []
        self.produced = 0
        self.error: str | None = None
        self.tm_source = tm_source()
        self.busy_before: float | None = None

    def execute(self) -> None:
        self.start()
        for rate in self.o.rates:
            self.results.append(self.phase(rate))
        self.final_checks()

    def start(self) -> None:
        """A fresh database and topics, and one tm ready with a settled group: what each
        phase needs (bench.prune fills the table in between)."""
        o = self.o
        before = machine_busy()
        time.sleep(QUIET_SAMPLE_S)
        self.busy_before = busy_since(before)
        self.notes.append(
            f"the machine was {self.busy_before:.0%} busy in the {QUIET_SAMPLE_S:.0f} s before the"
            " run started"
            + ("" if self.busy_before <= QUIET_BUSY else ": **not quiet**, other work competed")
        )
        note(f"creating a database and topics ({o.partitions} partitions)")
        self.db = db = self.stack.database("bench_latency")
        self.stack.create_topics(
            [self.topic, self.requests_topic, self.dlq_topic, self.warm_up_topic],
            partitions=o.partitions,
        )
        self.facts = machine(db)
        self.watcher = CommitWatcher(
            self.kconfig, group=self.group, topic=self.topic, partitions=o.partitions
        )
        self.watcher.start()
        env = {
            **os.environ,
            "POSTGRES_DB": db.postgres.database,
            "TASK_STATUS_TOPIC": self.topic,
            "WEB_CRAWL_REQUEST_TOPIC": self.requests_topic,
            "DLQ_TOPIC": self.dlq_topic,
            "KAFKA_GROUP_ID": self.group,
            "TM_WORKERS": str(o.workers),
            "TM_DELIVERY": o.delivery,
            "APP_PORT": str(free_port()),
            "LOG_FORMAT": "simple",  # the rebalance and batch lines are parsed
            "LOG_LEVEL": o.log_level,
            "LOG_COLORS": "false",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("REDIS_URL", None)
        note(f"starting `python -m tm run` ({o.workers} workers); log: {self.log_dir / 'tm.log'}")
        self.tm = TmProcess(env, self.log_dir / "tm.log")
        ready_s = self.tm.wait_ready(o.partitions, timeout_s=READY_TIMEOUT_S)
        self._settle()
        note(f"all {o.partitions} partitions owned {ready_s:.2f} s after spawn; group stable")
        self.gateway = Gateway(self.kconfig, topic=self.topic, warm_up_topic=self.warm_up_topic)

    def _settle(self) -> None:
        """Wait for the broker to describe the group as stable with every worker owning
        partitions, so that no start-up rebalance falls into the first rate."""
        assert self.tm is not None
        watcher = GroupWatcher(
            self.kconfig, group=self.group, workers=self.o.workers, partitions=self.o.partitions
        )
        watcher.start()
        try:
            watcher.join(SETTLE_TIMEOUT_S)
        finally:
            watcher.stop()
        if watcher.settled_at is None:
            raise HarnessError(
                f"the group did not settle in {SETTLE_TIMEOUT_S:.0f} s: {watcher.last_seen}"
            )
        self.notes.append(
            f"tm was ready (every worker owning partitions, the broker's view)"
            f" {watcher.settled_at - self.tm.started:.2f} s after spawn"
        )

    def phase(self, rate: float) -> RateResult:
        o = self.o
        assert self.tm is not None and self.watcher is not None and self.gateway is not None
        reader = RequestReader(self.kconfig, topic=self.requests_topic, partitions=o.partitions)
        reader.start()
        try:
            time.sleep(READER_START_S)
            reader.check()
            self.gateway.warm_up()
            mark = self.watcher.mark
            note(f"{rate:,.0f} events/s for {o.seconds:.0f} s")
            cpu_before, busy_before = time.process_time(), machine_busy()
            sent = self.gateway.paced(rate=rate, seconds=o.seconds, first=self.produced)
            bench_cpu = (time.process_time() - cpu_before) / sent.seconds
            busy = busy_since(busy_before)
            self.produced += sent.count
            reader.wait_for(sent.count, timeout_s=SEEN_TIMEOUT_S, alive=self.tm.problem)
            targets = list(end_offsets(self.kconfig, self.topic, o.partitions).values())
            self.watcher.wait_for(targets, timeout_s=SEEN_TIMEOUT_S, alive=self.tm.problem)
            ended = time.monotonic()
        finally:
            reader.stop()
        reader.check()
        series = self.watcher.commit_series(start=mark)
        counted_from_ms = (sent.started_wall + WARM_UP_S) * 1000
        readable: list[tuple[float, float]] = []  # (seconds into the phase, latency ms)
        committed: list[tuple[float, float]] = []
        never_seen = never_committed = 0
        for task_id, partition, offset, created_ms in sent.delivered:
            read_at = reader.seen.get(task_id)
            committed_at = committed_wall(series[partition], offset)
            never_seen += read_at is None
            never_committed += committed_at is None
            if created_ms < counted_from_ms:
                continue
            at_s = created_ms / 1000 - sent.started_wall
            if read_at is not None:
                readable.append((at_s, read_at * 1000 - created_ms))
            if committed_at is not None:
                committed.append((at_s, committed_at * 1000 - created_ms))
        if not readable or not committed:
            raise HarnessError(f"{rate:,.0f}/s: no latency measured after the warm-up")
        began = sent.started
        spawn = self.tm.started
        rebalances = sum(
            1 for at, _, _ in self.tm.rebalance_events() if began <= spawn + at <= ended
        )
        result = RateResult(
            rate_asked=rate,
            rate_achieved=sent.count / sent.seconds,
            seconds=sent.seconds,
            sent=sent.count,
            counted=len(readable),
            readable_ms=spread([ms for _, ms in readable]),
            committed_ms=spread([ms for _, ms in committed]),
            never_seen=never_seen,
            never_committed=never_committed,
            duplicates=reader.duplicates,
            slowest_readable_at_s=max(readable, key=lambda p: p[1])[0],
            readable_by_second=by_second(readable),
            committed_by_second=by_second(committed),
            stages=batch_stages(list(self.tm.lines), began + WARM_UP_S, ended, began),
            rebalances=rebalances,
            bench_cpu=bench_cpu,
            machine_busy=busy,
        )
        note(
            f"{rate:,.0f}/s: readable p99 {result.readable_ms['p99']:.1f} ms,"
            f" committed p99 {result.committed_ms['p99']:.1f} ms"
        )
        self.check(
            f"{rate:,.0f}/s: every crawl request read", never_seen == 0, f"{never_seen} never seen"
        )
        self.check(
            f"{rate:,.0f}/s: every event seen committed",
            never_committed == 0,
            f"{never_committed} never seen committed",
        )
        return result

    def final_checks(self) -> None:
        assert self.db is not None
        rows = query(self.db, "SELECT count(*) FROM web_crawl_tasks")[0][0]
        self.check("one row per event", rows == self.produced, f"{rows} rows, {self.produced} sent")
        requests = count_records(self.kconfig, self.requests_topic)
        self.check("one crawl request per event", requests == self.produced, f"{requests} requests")
        dead = count_records(self.kconfig, self.dlq_topic)
        self.check("nothing dead-lettered", dead == 0, f"{dead} dead letters")
        self.stop_tm()

    def stop_tm(self) -> None:
        if self.tm is None:
            return
        process, self.tm = self.tm, None
        timeout_s = self.settings.consumer.graceful_shutdown_timeout_ms / 1000 + 10
        code = process.stop(timeout_s)
        took, killed = process.stopped_in_s or 0.0, process.killed
        self.check(
            "tm stopped by SIGTERM with exit status 0",
            code == 0 and not killed,
            f"exit status {code} after {took:.2f} s" + (" (SIGKILLed)" if killed else ""),
        )
        warnings = [
            line for _, line in process.lines if "level:ERROR" in line or "level:WARN" in line
        ]
        self.check(
            "tm logged no warning or error",
            not warnings,
            f"{len(warnings)} lines" + (f", first: `{warnings[0][:200]}`" if warnings else ""),
        )

    def close(self) -> None:
        """Stop everything started and remove everything created; never raises."""
        if self.tm is not None:
            try:
                self.stop_tm()
            except Exception as exc:
                self.notes.append(f"stopping tm failed: {exc}")
        if self.watcher is not None:
            self.watcher.stop()
        for problem in self.stack.cleanup():
            self.notes.append(f"cleanup: {problem}")

    # -- the report --------------------------------------------------------------------------

    def resolution(self) -> str:
        assert self.watcher is not None
        look_ms = self.watcher.mean_look_ms()
        return (
            f"committed offsets read every {COMMIT_POLL_S * 1000:.0f} ms (a read took"
            f" {look_ms:.1f} ms on average, {self.watcher.look_s_max * 1000:.0f} ms at most), so"
            f" a latency to committed is overstated by up to ~{COMMIT_POLL_S * 1000 + look_ms:.0f}"
            " ms"
        )

    def summary(self, command: str) -> dict[str, Any]:
        o = self.o
        return {
            "command": command,
            "tm": self.tm_source,
            "options": {**asdict(o), "json_path": str(o.json_path) if o.json_path else None},
            "warm_up_s": WARM_UP_S,
            "machine_busy_before": self.busy_before,
            "machine": self.facts,
            "rates": [asdict(r) for r in self.results],
            "targets_ms": {
                "readable_p99": TARGET_READABLE_P99_MS,
                "committed_p99": TARGET_COMMITTED_P99_MS,
            },
            "checks": [{"what": w, "ok": ok, "detail": d} for w, ok, d in self.checks],
            "notes": self.notes,
            "resolution": self.resolution() if self.watcher is not None else None,
            "error": self.error,
            "ok": self.ok,
        }

    def render(self, command: str) -> str:
        o = self.o
        out = ["# tm steady-rate latency (DESIGN §8)", "", f"command: `{command}`", ""]
        out += [
            f"tm from `{self.tm_source}`; {o.workers} workers, {o.partitions}"
            f" partitions, {o.seconds:.0f} s per rate, the first {WARM_UP_S:.0f} s of each left"
            f" out; load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
            "",
        ]
        if self.facts:
            out += ["| machine | |", "|---|---|"]
            out += [f"| {k} | {v} |" for k, v in self.facts.items()]
            out.append("")
        if self.results:
            out += [
                "## Latency, ms from the event's Kafka CreateTime",
                "",
                "| rate asked | achieved | events | readable p50 | p95 | p99 | max"
                " | committed p50 | p95 | p99 | max | never seen | machine busy | bench CPU |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for r in self.results:
                cells = [f"{r.rate_asked:,.0f}/s", f"{r.rate_achieved:,.0f}/s", f"{r.counted:,}"]
                for figures in (r.readable_ms, r.committed_ms):
                    cells += [f"{figures[k]:.1f}" for k in ("p50", "p95", "p99", "max")]
                cells += [str(r.never_seen), f"{r.machine_busy:.0%}", f"{r.bench_cpu:.0%}"]
                out.append("| " + " | ".join(cells) + " |")
            out += [
                "",
                "## DESIGN §8",
                "",
                "| rate | readable p99 < 50 ms | committed p99 < 100 ms |",
            ]
            out.append("|---:|---|---|")
            for r in self.results:
                verdicts = [
                    f"{figures['p99']:.1f} ms: {'yes' if figures['p99'] < target else '**no**'}"
                    for figures, target in (
                        (r.readable_ms, TARGET_READABLE_P99_MS),
                        (r.committed_ms, TARGET_COMMITTED_P99_MS),
                    )
                ]
                out.append(f"| {r.rate_asked:,.0f}/s | {verdicts[0]} | {verdicts[1]} |")
            out.append("")
        staged = [r for r in self.results if r.stages]
        if staged:
            stages = [k for k in STAGES if any(k in r.stages["stages"] for r in staged)]
            names = [k.removesuffix("_ms") for k in stages]
            out += [
                "## tm's batches (its `batch done` debug lines, after the warm-up), ms",
                "",
                "| rate | batches | mean size | "
                + " | ".join(f"{n} p99 / max" for n in names)
                + " | slowest batch | slowest crawl request |",
                "|---:|---:|---:|" + "---:|" * len(stages) + "---|---|",
            ]
            for r in staged:
                s = r.stages
                slow = s["slowest"]
                cells = [f"{r.rate_asked:,.0f}/s", str(s["batches"]), f"{s['mean_size']:.1f}"]
                for k in stages:
                    figures = s["stages"].get(k)
                    cells.append(f"{figures['p99']:.1f} / {figures['max']:.1f}" if figures else "")
                cells.append(
                    f"{slow.get('size', 0):.0f} messages at {slow['at_s']:.1f} s: "
                    + ", ".join(
                        f"{n} {slow.get(k, 0):.1f}" for k, n in zip(stages, names, strict=True)
                    )
                )
                cells.append(
                    f"{r.readable_ms['max']:.1f} ms, produced at {r.slowest_readable_at_s:.1f} s"
                )
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        if self.checks:
            out += ["## Checks", ""]
            out += [f"- {'ok' if ok else '**FAILED**'}: {w}: {d}" for w, ok, d in self.checks]
            out.append("")
        notes = list(self.notes)
        if self.watcher is not None:
            notes.append(self.resolution())
        notes.append(
            "machine busy: the share of all cores busy while the events were produced"
            " (/proc/stat); bench CPU: this process (producer, reader, commit watcher), in cores"
        )
        notes.append(
            "to readable: the reader's `time.time()` when `poll` returned the crawl request;"
            " CreateTime is in whole milliseconds, so both latencies may be overstated by < 1 ms"
        )
        for r in self.results:
            if r.duplicates or r.rebalances:
                notes.append(
                    f"{r.rate_asked:,.0f}/s: {r.duplicates} crawl requests read twice,"
                    f" {r.rebalances} rebalance log lines during the phase"
                )
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
        if self.error:
            out += ["## The run did not finish", "", "```", self.error.rstrip(), "```", ""]
        return "\n".join(out)


def _parse(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.latency", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument(
        "--rates", default=DEFAULT_RATES, help=f"events/s, comma-separated ({DEFAULT_RATES})"
    )
    parser.add_argument(
        "--seconds", type=float, default=DEFAULT_SECONDS, help="per rate (15; the first 1 s out)"
    )
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="TM_WORKERS (2)")
    parser.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS, help="(6)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--log-level", choices=("info", "debug"), default="info", help="tm's LOG_LEVEL (info)"
    )
    parser.add_argument(
        "--delivery",
        choices=("at-least-once", "exactly-once"),
        default="at-least-once",
        help="tm's TM_DELIVERY (at-least-once)",
    )
    args = parser.parse_args(argv)
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rates: not a comma-separated list of numbers: {args.rates!r}")
    if not rates or any(r <= 0 for r in rates):
        parser.error("--rates: at least one rate, every one positive")
    if args.seconds <= WARM_UP_S + 1:
        parser.error(f"--seconds must be more than {WARM_UP_S + 1:.0f} (the warm-up is left out)")
    if args.workers < 1 or args.partitions < 1:
        parser.error("--workers and --partitions must be positive")
    return Options(
        rates,
        args.seconds,
        args.workers,
        args.partitions,
        args.json,
        args.log_level,
        args.delivery,
    )


def main(argv: list[str] | None = None) -> int:
    options = _parse(argv)
    stop_on_sigterm()
    return drive(Run(options), options.json_path)


def drive(run: Run, json_path: Path | None) -> int:
    """Execute ``run``, always close it, print its report and write its figures to ``json_path``;
    the exit status (0: every check passed). bench.prune's run goes the same way."""
    command = shlex.join(sys.orig_argv)
    try:
        run.execute()
    except BaseException as exc:
        run.error = str(exc) if isinstance(exc, HarnessError) else traceback.format_exc()
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            run.error = f"interrupted ({type(exc).__name__})"
    finally:
        run.close()
        run.notes.append(f"tm's log: {run.log_dir / 'tm.log'}")
        print(run.render(command), flush=True)
        if json_path is not None:
            json_path.write_text(json.dumps(run.summary(command), indent=1) + "\n")
    return 0 if run.ok else 1


if __name__ == "__main__":
    sys.exit(main())
