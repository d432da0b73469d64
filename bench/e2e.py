"""The end-to-end benchmark of DESIGN §8, in one run against the real local stack:

    .venv/bin/python -m bench.e2e [--messages N] [--workers W] [--partitions P] [--batch B]

On a fresh database and fresh topics it measures, in this order:

  (f) the direct-database ceiling: N rows through ``Database.apply`` (``tm_create_tasks``) by
      W processes, batches of B, no Kafka;
  (g) the original design: M messages, one proc call and one synchronous commit each;
  (a) N pre-produced gateway ``new`` events through ``python -m tm run``, first commit to last;
  (d) start to ready: spawn to every partition assigned (tm's log lines), during (a);
  (b) N ``completed``/``error`` updates of those tasks, produced while tm runs;
  (c) latency, Kafka timestamp to observed commit, at half of (a)'s rate for ~15 s, and (c')
      at a steady 1,000 events/s (--steady-rate);
  (e) peak RSS of the supervisor and its workers during (a) and (b);

then prints the figures, the ratios of DESIGN §8 against their targets, and the checks, as
markdown on stdout (progress goes to stderr). Commits are seen by reading the group's committed
offsets every 10 ms from this process. Everything created is removed at the end, even on failure.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import baselines
from harness import HarnessError, free_port, stop_on_sigterm, unique
from harness.kafka import (
    COMMIT_POLL_S,
    CommitWatcher,
    Gateway,
    GroupWatcher,
    Message,
    committed_at,
    end_offsets,
    produce,
)
from harness.procfs import RssSampler
from harness.report import Checks, machine, note, percentile
from harness.stack import Fresh, kafka_config, query
from harness.tm import TmProcess
from tm import config
from tm.config import Settings
from tm.traffic import new_task_message, update_message

DEFAULT_MESSAGES = 200_000
DEFAULT_PARTITIONS = 6
DEFAULT_ORIGINAL_MESSAGES = 5_000
DEFAULT_LATENCY_S = 15.0
DEFAULT_STEADY_RATE = 1000.0  # events/s of the second latency phase (c')
UPDATE_ERROR_RATIO = 0.2  # share of `error` among the updates, as `tm send updates` does
READY_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 120.0  # after (a): wait this long for every worker to own partitions
PRODUCE_FLUSH_TIMEOUT_S = 120.0
MIN_PHASE_TIMEOUT_S = 120.0
PHASE_TIMEOUT_PER_MESSAGE_S = 0.002  # 500 msg/s: far below anything tm should do

MIB = 1024 * 1024
TARGET_CEILING_RATIO = 0.85
TARGET_ORIGINAL_RATIO = 20.0
TARGET_P99_MS = 50.0
TARGET_READY_S = 5.0
TARGET_RSS_MIB = 512.0


# -- the report ------------------------------------------------------------------------------


def rate_text(rate: float, unit: str = "msg/s") -> str:
    return f"{rate:,.0f} {unit}"


@dataclass
class Report(Checks):
    command: str
    parameters: str
    facts: dict[str, str] = field(default_factory=dict)
    figures: list[tuple[str, str, str]] = field(default_factory=list)
    ratios: list[tuple[str, str, str, bool | None]] = field(default_factory=list)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def figure(self, what: str, value: str, how: str) -> None:
        self.figures.append((what, value, how))
        note(f"{what}: {value} ({how})")

    def render(self) -> str:
        out = ["# tm end-to-end benchmark (DESIGN §8)", ""]
        out += [f"command: `{self.command}`", "", f"parameters: {self.parameters}", ""]
        if self.facts:
            out += ["| machine | |", "|---|---|"]
            out += [f"| {k} | {v} |" for k, v in self.facts.items()]
            out.append("")
        if self.figures:
            out += ["## Figures", "", "| measurement | value | how |", "|---|---:|---|"]
            out += [f"| {w} | {v} | {h} |" for w, v, h in self.figures]
            out.append("")
        if self.ratios:
            out += [
                "## DESIGN §8",
                "",
                "| target | measured | required | met |",
                "|---|---:|---|---|",
            ]
            for what, measured, required, met in self.ratios:
                verdict = "n/a" if met is None else "yes" if met else "**no**"
                out.append(f"| {what} | {measured} | {required} | {verdict} |")
            out.append("")
        if self.checks:
            out += ["## Checks", ""]
            out += [f"- {'ok' if ok else '**FAILED**'}: {w}: {d}" for w, ok, d in self.checks]
            out.append("")
        if self.notes:
            out += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        if self.error:
            out += ["## The run did not finish", "", "```", self.error.rstrip(), "```", ""]
        return "\n".join(out)


# -- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    messages: int
    workers: int
    partitions: int
    batch: int
    batch_is_default: bool
    original_messages: int
    latency_s: float
    steady_rate: float


class Run:
    """One benchmark run: the fresh stack, tm, the probes, and the phases in order."""

    def __init__(self, settings: Settings, options: Options, report: Report) -> None:
        self.settings = settings
        self.o = options
        self.report = report
        self.stack = Fresh(settings)
        self.kconfig = kafka_config(settings)
        base = unique("bench").replace("_", "-")
        self.topic = f"{base}-task-status"
        self.requests_topic = f"{base}-requests"
        self.dlq_topic = f"{base}.dlq"
        self.original_topic = f"{base}-original"
        self.group = f"{base}-group"
        self.tm: TmProcess | None = None
        self.watcher: CommitWatcher | None = None
        self.sampler: RssSampler | None = None
        self.group_watcher: GroupWatcher | None = None
        self.log_dir = Path(tempfile.mkdtemp(prefix="tm-bench-"))
        # What the phases measured, for the DESIGN §8 table (None: not measured).
        self.rate_a: float | None = None
        self.ceiling_rate: float | None = None
        self.original_rate: float | None = None
        self.p99: float | None = None
        self.ready_s: float | None = None
        self.settled_s: float | None = None
        self.settle_checked = False
        self.rss_peak_kib = 0

    def phase_timeout_s(self, messages: int) -> float:
        return max(MIN_PHASE_TIMEOUT_S, messages * PHASE_TIMEOUT_PER_MESSAGE_S)

    def execute(self) -> None:
        o = self.o
        note(f"creating databases and topics ({o.partitions} partitions)")
        self.tm_db = self.stack.database("bench_tm")
        self.ceiling_db = self.stack.database("bench_ceiling")
        self.stack.create_topics(
            [self.topic, self.requests_topic, self.dlq_topic, self.original_topic],
            partitions=o.partitions,
        )
        self.report.facts.update(machine(self.tm_db))
        self.ceiling()
        self.original()
        self.news()
        self.updates()
        self.latency()
        self.stop_tm()

    # (f)
    def ceiling(self) -> None:
        o = self.o
        note(f"(f) direct-database ceiling: {o.messages} rows, {o.workers} writers")
        result = baselines.direct_database_ceiling(
            self.ceiling_db,
            rows=o.messages,
            workers=o.workers,
            batch=o.batch,
            topic=self.topic,
            partitions=o.partitions,
        )
        self.ceiling_rate = result.rate
        self.report.figure(
            "(f) direct-database ceiling",
            rate_text(result.rate, "rows/s"),
            f"{result.rows} rows in {result.seconds:.2f} s: `Database.apply` -> `tm_create_tasks`"
            f", {o.workers} processes x 1 connection, batches of {o.batch}, fresh table",
        )
        created = result.outcomes.get("created", 0)
        self.report.check(
            "(f) every row created", created == o.messages, f"outcomes {result.outcomes}"
        )

    # (g)
    def original(self) -> None:
        o = self.o
        baselines.truncate_tasks(self.ceiling_db)
        note(f"(g) original design: producing {o.original_messages} messages")
        produce(
            self.kconfig,
            self.original_topic,
            [(None, *new_task_message(n)) for n in range(o.original_messages)],
        )
        note("(g) original design: one proc call + one synchronous commit per message")
        result = baselines.original_design(
            self.ceiling_db,
            self.kconfig,
            topic=self.original_topic,
            group=f"{self.group}-original",
            messages=o.original_messages,
            timeout_s=self.phase_timeout_s(o.original_messages * 10),
        )
        self.original_rate = result.rate
        self.report.figure(
            "(g) original design",
            rate_text(result.rate),
            f"{result.messages} messages in {result.seconds:.2f} s: one consumer, `consume(1)`,"
            " one `SELECT create_web_crawl_task(...)` and one synchronous commit each",
        )
        rows = query(self.ceiling_db, "SELECT count(*) FROM web_crawl_tasks")[0][0]
        self.report.check("(g) one row per message", rows == o.original_messages, f"{rows} rows")

    # (a), (d), (e)
    def news(self) -> None:
        o = self.o
        note(f"(a) building and producing {o.messages} gateway `new` events")
        messages: list[Message] = [(None, *new_task_message(n)) for n in range(o.messages)]
        produced_s = produce(self.kconfig, self.topic, messages)
        del messages
        targets = list(end_offsets(self.kconfig, self.topic, o.partitions).values())
        self.report.check(
            "(a) topic holds N events before tm starts",
            sum(targets) == o.messages,
            f"{sum(targets)} (produced in {produced_s:.2f} s, {o.messages / produced_s:,.0f}/s)",
        )
        self.watcher = CommitWatcher(
            self.kconfig, group=self.group, topic=self.topic, partitions=o.partitions
        )
        self.watcher.start()
        mark = self.watcher.mark
        env = {
            **os.environ,
            "POSTGRES_DB": self.tm_db.postgres.database,
            "TASK_STATUS_TOPIC": self.topic,
            "WEB_CRAWL_REQUEST_TOPIC": self.requests_topic,
            "DLQ_TOPIC": self.dlq_topic,
            "KAFKA_GROUP_ID": self.group,
            "TM_TOPIC_PARTITIONS": str(o.partitions),
            "TM_WORKERS": str(o.workers),
            "TM_BATCH_MAX_MESSAGES": str(o.batch),
            "APP_PORT": str(free_port()),
            "LOG_FORMAT": "simple",  # the rebalance lines are parsed
            "LOG_LEVEL": "info",
            "LOG_COLORS": "false",
            "PYTHONUNBUFFERED": "1",
        }
        note("(a) starting `python -m tm run`")
        self.tm = TmProcess(env, self.log_dir / "tm.log")
        self.sampler = RssSampler(self.tm.pid)
        self.sampler.label("a")
        self.sampler.start()
        self.group_watcher = GroupWatcher(
            self.kconfig, group=self.group, workers=o.workers, partitions=o.partitions
        )
        self.group_watcher.start()
        ready_s = self.tm.wait_ready(o.partitions, timeout_s=READY_TIMEOUT_S)
        note(f"(d) all {o.partitions} partitions assigned {ready_s:.2f} s after spawn")
        self.watcher.wait_for(
            targets, timeout_s=self.phase_timeout_s(o.messages), alive=self.tm.problem
        )
        first, last = self.watcher.phase(mark, targets)
        self.rate_a, how = self._rate(first, last, o.messages, 0, since=self.tm.started)
        self.report.figure(
            "(a) end-to-end, `new` tasks",
            rate_text(self.rate_a),
            f"{o.messages} pre-produced; {how}",
        )
        spawn_to_done = last.monotonic - self.tm.started
        self.report.figure(
            "(a') spawn to last commit", f"{spawn_to_done:.2f} s", "includes start-up"
        )

        self.ready_s = ready_s
        self.report.figure(
            "(d) start to ready",
            f"{ready_s:.2f} s",
            f"spawn of `tm run` (services up, topics exist) to all {o.partitions} partitions"
            " assigned, from its `partitions assigned`/`revoked` log lines",
        )
        rows = query(self.tm_db, "SELECT count(*) FROM web_crawl_tasks")[0][0]
        self.report.check("(a) the table holds N rows", rows == o.messages, f"{rows} rows")
        requests = sum(end_offsets(self.kconfig, self.requests_topic, o.partitions).values())
        self.report.check(
            "(a) one crawl request per task", requests == o.messages, f"{requests} requests"
        )
        self._check_dlq("(a)")
        self._memory("a", "(e) peak RSS during (a)")

    # (b)
    def updates(self) -> None:
        o = self.o
        assert self.watcher is not None and self.tm is not None and self.sampler is not None
        self._settle()
        self.sampler.label("b")
        ids = [r[0] for r in query(self.tm_db, "SELECT id FROM web_crawl_tasks")]
        chooser = random.Random(0)  # the same mix every run
        messages: list[Message] = []
        for task_id in ids:
            headers, value = update_message(task_id, failed=chooser.random() < UPDATE_ERROR_RATIO)
            messages.append((str(task_id).encode(), headers, value))
        before = self.watcher.latest()
        base_total = before.total if before else 0
        mark = self.watcher.mark
        note(f"(b) producing {len(messages)} completed/error updates while tm runs")
        produced_s = produce(self.kconfig, self.topic, messages)
        del messages
        targets = list(end_offsets(self.kconfig, self.topic, o.partitions).values())
        self.watcher.wait_for(
            targets, timeout_s=self.phase_timeout_s(len(ids)), alive=self.tm.problem
        )
        first, last = self.watcher.phase(mark, targets)
        rate, how = self._rate(first, last, len(ids), base_total, since=None)
        self.report.figure(
            "(b) end-to-end, updates",
            rate_text(rate),
            f"{len(ids)} updates ({UPDATE_ERROR_RATIO:.0%} `error`), produced in"
            f" {produced_s:.2f} s while tm ran; {how}",
        )
        counts = dict(
            query(self.tm_db, "SELECT status::text, count(*) FROM web_crawl_tasks GROUP BY 1")
        )
        self.report.check(
            "(b) every task completed or error",
            counts.get("new", 0) == 0
            and counts.get("completed", 0) + counts.get("error", 0) == o.messages,
            f"{counts}",
        )
        self._check_dlq("(b)")
        self._memory("b", "(e) peak RSS during (b)")
        self.sampler.label("c")

    # (c)
    def latency(self) -> None:
        assert self.rate_a is not None
        self._latency(self.rate_a / 2, "(c)", "half of (a)", record=True)
        if self.o.steady_rate:
            self._latency(self.o.steady_rate, "(c')", "a steady rate", record=False)

    def _latency(self, rate: float, label: str, what: str, *, record: bool) -> None:
        o = self.o
        assert self.watcher is not None and self.tm is not None
        mark = self.watcher.mark
        first = query(self.tm_db, "SELECT count(*) FROM web_crawl_tasks")[0][0]
        note(f"{label} producing `new` events at {rate:,.0f}/s for {o.latency_s:.0f} s")
        gateway = Gateway(
            self.kconfig, topic=self.topic, warm_up_topic=self.original_topic
        )  # (g)'s topic, done with by now
        gateway.warm_up()
        paced = gateway.paced(rate=rate, seconds=o.latency_s, first=first)
        targets = list(end_offsets(self.kconfig, self.topic, o.partitions).values())
        self.watcher.wait_for(targets, timeout_s=MIN_PHASE_TIMEOUT_S, alive=self.tm.problem)
        series = self.watcher.commit_series(start=mark)
        latencies: list[float] = []
        unseen = 0
        for _, partition, offset, created_ms in paced.delivered:
            seen = committed_at(series[partition], offset)
            if seen is None:
                unseen += 1
            else:
                latencies.append(seen * 1000 - created_ms)
        latencies.sort()
        resolution = (
            f"observation resolution: committed offsets read every {COMMIT_POLL_S * 1000:.0f} ms"
            f" (each read took {self.watcher.mean_look_ms():.1f} ms on average,"
            f" {self.watcher.look_s_max * 1000:.0f} ms at most), so each latency is overstated"
            f" by up to ~{COMMIT_POLL_S * 1000 + self.watcher.mean_look_ms():.0f} ms"
        )
        if not latencies:
            raise HarnessError("no latency measured")
        if record:
            self.p99 = percentile(latencies, 99)
        self.report.figure(
            f"{label} latency p50 / p95 / p99 / max",
            " / ".join(f"{percentile(latencies, q):.1f}" for q in (50, 95, 99))
            + f" / {latencies[-1]:.1f} ms",
            f"{paced.count} `new` events at {paced.count / paced.seconds:,.0f}/s ({what})"
            f" for {paced.seconds:.1f} s; Kafka CreateTime -> commit seen; {resolution}",
        )
        self.report.check(
            f"{label} every paced event seen committed", unseen == 0, f"{unseen} not seen"
        )
        rows = query(self.tm_db, "SELECT count(*) FROM web_crawl_tasks")[0][0]
        self.report.check(
            f"{label} one more row per paced event",
            rows == first + paced.count,
            f"{rows} rows",
        )
        self._check_dlq(label)

    def stop_tm(self) -> None:
        if self.tm is None:
            return
        tm, self.tm = self.tm, None
        timeout_s = self.settings.consumer.graceful_shutdown_timeout_ms / 1000 + 10
        code = tm.stop(timeout_s)
        took, killed = tm.stopped_in_s or 0.0, tm.killed
        self.report.check(
            "tm stopped by SIGTERM with exit status 0",
            code == 0 and not killed,
            f"exit status {code} after {took:.2f} s"
            + (" (SIGKILLed at the deadline)" if killed else ""),
        )
        lines = [line for _, line in tm.lines]
        errors = [line for line in lines if "level:ERROR" in line or "level:WARN" in line]
        self.report.check(
            "tm logged no warning or error",
            not errors,
            f"{len(errors)} lines" + (f", first: `{errors[0][:200]}`" if errors else ""),
        )

    # -- helpers -----------------------------------------------------------------------------

    def _settle(self) -> None:
        """Report (d'), the broker's "every worker owns partitions", and wait for it (so that
        (b) and (c) measure the steady state, not a start-up rebalance)."""
        assert self.group_watcher is not None and self.tm is not None
        o = self.o
        if self.group_watcher.settled_at is None:
            note(
                f"waiting up to {SETTLE_TIMEOUT_S:.0f} s for all {o.workers} workers to own"
                " partitions before (b)"
            )
        self.group_watcher.join(SETTLE_TIMEOUT_S)
        settled = self.group_watcher.settled_at
        self.settle_checked = True
        events = self.tm.rebalance_events()
        timeline = ", ".join(f"{at:.2f} s {kind} {parts}" for at, kind, parts in events)
        self.report.notes.append(f"tm's rebalance log lines (seconds after spawn): {timeline}")
        if settled is None:
            self.settled_s = None
            self.report.figure(
                "(d') start to all workers assigned",
                f"> {time.monotonic() - self.tm.started:.0f} s",
                f"the group never settled; last description: {self.group_watcher.last_seen}",
            )
            return
        self.settled_s = settled - self.tm.started
        self.report.figure(
            "(d') start to all workers assigned",
            f"{self.settled_s:.2f} s",
            f"spawn to the group described by the broker as stable with {o.workers} members"
            f" each owning partitions (polled every 50 ms)",
        )

    def _rate(
        self, first: Any, last: Any, messages: int, base_total: int, *, since: float | None
    ) -> tuple[float, str]:
        after_first = messages - (first.total - base_total)
        seconds = last.monotonic - first.monotonic
        if seconds > 0 and after_first > 0:
            return after_first / seconds, (
                f"first -> last commit {seconds:.2f} s ({after_first} messages committed after"
                f" the first commit seen)"
            )
        start = since if since is not None else first.monotonic
        seconds = max(last.monotonic - start, 1e-9)
        return messages / seconds, f"all committed at once; {seconds:.2f} s from the start"

    def _check_dlq(self, phase: str) -> None:
        dead = sum(end_offsets(self.kconfig, self.dlq_topic, self.o.partitions).values())
        self.report.check(f"{phase} nothing dead-lettered", dead == 0, f"{dead} dead letters")

    def _memory(self, label: str, what: str) -> None:
        assert self.sampler is not None
        peak = self.sampler.peaks.get(label)
        if peak is None or not peak.samples:
            return
        self.rss_peak_kib = max(self.rss_peak_kib, peak.rss_kib)
        self.report.figure(
            what,
            f"{peak.rss_kib / 1024:.0f} MiB",
            f"sum of VmRSS over {peak.processes} processes (supervisor + workers), {peak.samples}"
            f" samples every 100 ms; PSS (shared pages counted once) peaked at"
            f" {peak.pss_kib / 1024:.0f} MiB",
        )

    def ratios(self) -> None:
        """The DESIGN §8 table, from whatever the run got to measure."""
        add = self.report.ratios.append
        rate_a = self.rate_a
        if rate_a is not None and self.ceiling_rate:
            x = rate_a / self.ceiling_rate
            add(("(a)/(f) end-to-end / direct-database ceiling", f"{x:.2f}",
                 f">= {TARGET_CEILING_RATIO}", x >= TARGET_CEILING_RATIO))  # fmt: skip
        if rate_a is not None and self.original_rate:
            x = rate_a / self.original_rate
            add(("(a)/(g) end-to-end / original design", f"{x:.1f} x",
                 f">= {TARGET_ORIGINAL_RATIO:.0f} x", x >= TARGET_ORIGINAL_RATIO))  # fmt: skip
        if self.p99 is not None:
            add(("(c) latency p99 at half the maximum rate", f"{self.p99:.1f} ms",
                 f"< {TARGET_P99_MS:.0f} ms", self.p99 < TARGET_P99_MS))  # fmt: skip
        if self.ready_s is not None:
            add(("(d) start to ready (all partitions assigned, log lines)",
                 f"{self.ready_s:.2f} s", f"< {TARGET_READY_S:.0f} s",
                 self.ready_s < TARGET_READY_S))  # fmt: skip
        if self.settle_checked:
            settled = self.settled_s
            add(("(d') start to all workers assigned (broker's view)",
                 "never" if settled is None else f"{settled:.2f} s", f"< {TARGET_READY_S:.0f} s",
                 settled is not None and settled < TARGET_READY_S))  # fmt: skip
        if self.rss_peak_kib:
            mib = self.rss_peak_kib / 1024
            add(("(e) peak RSS, supervisor + workers, during (a) and (b)", f"{mib:.0f} MiB",
                 f"< {TARGET_RSS_MIB:.0f} MiB", mib < TARGET_RSS_MIB))  # fmt: skip

    def close(self) -> None:
        """Stop everything started and remove everything created; never raises."""
        if self.tm is not None:
            try:
                self.stop_tm()
            except Exception as exc:
                self.report.notes.append(f"stopping tm failed: {exc}")
        for probe in (self.sampler, self.watcher, self.group_watcher):
            if probe is not None:
                probe.stop()
        for problem in self.stack.cleanup():
            self.report.notes.append(f"cleanup: {problem}")


def _parse(argv: list[str] | None, settings: Settings) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=DEFAULT_MESSAGES, help="N (200000)")
    parser.add_argument("--workers", type=int, default=None, help="W (default: CPU count)")
    parser.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS, help="P (6)")
    parser.add_argument("--batch", type=int, default=None, help="B (default: tm's batch size)")
    parser.add_argument(
        "--original-messages", type=int, default=DEFAULT_ORIGINAL_MESSAGES, help="M (5000)"
    )
    parser.add_argument(
        "--latency-seconds", type=float, default=DEFAULT_LATENCY_S, help="(c) duration (15)"
    )
    parser.add_argument(
        "--steady-rate",
        type=float,
        default=DEFAULT_STEADY_RATE,
        help="(c') a second latency phase at this rate, events/s (1000; 0: skip)",
    )
    args = parser.parse_args(argv)
    for name in ("messages", "partitions", "original_messages"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return Options(
        messages=args.messages,
        workers=args.workers or os.cpu_count() or 1,
        partitions=args.partitions,
        batch=args.batch or settings.consumer.batch_max_messages,
        batch_is_default=args.batch is None,
        original_messages=args.original_messages,
        latency_s=args.latency_seconds,
        steady_rate=args.steady_rate,
    )


def main(argv: list[str] | None = None) -> int:
    settings = config.load()
    options = _parse(argv, settings)
    stop_on_sigterm()
    report = Report(
        command=shlex.join(sys.orig_argv),
        parameters=(
            f"N={options.messages} messages, W={options.workers} workers,"
            f" P={options.partitions} partitions, B={options.batch}"
            f"{' (tm default)' if options.batch_is_default else ''} batch size,"
            f" M={options.original_messages} original-design messages,"
            f" latency phase {options.latency_s:.0f} s"
        ),
    )
    run = Run(settings, options, report)
    started = time.monotonic()
    try:
        run.execute()
    except BaseException as exc:
        report.error = str(exc) if isinstance(exc, HarnessError) else traceback.format_exc()
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            report.error = f"interrupted ({type(exc).__name__})"
    finally:
        run.close()
        run.ratios()
        report.notes.append(f"tm's log: {run.log_dir / 'tm.log'}")
        report.notes.append(f"the whole run took {time.monotonic() - started:.0f} s")
        print(report.render(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
