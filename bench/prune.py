"""A steady load's latency with and without ``tm db prune`` running beside it:

    python -m bench.prune [--rows 5000000] [--rate 1000] [--seconds 60] [--rounds 3]
                          [--days 30] [--batch-size 5000] [--pause 0.2] [--workers 2]
                          [--partitions 6] [--json FILE]

bench.latency's run (a fresh migrated database and topics, one ``python -m tm run``, paced
gateway ``new`` events, the latency of each from its Kafka CreateTime to its crawl request being
readable and to its offset being committed), with the table first filled with ``--rows`` tasks
created between ``--days`` + 1 and ``--days`` + 30 days ago (one ``INSERT ... SELECT
generate_series`` per chunk; 10 % still ``new``, the rest ``completed`` or ``error``; the insert
trigger keeps the hourly counts), a checkpoint and one phase of load not counted. Then,
``--rounds`` times, a phase of the load alone and a phase
of the same load with ``python -m tm db prune --days D`` started just before it and stopped
(SIGTERM, between two batches) just after it. The report gives each phase's p99s, the median of
each mode's, and the ratio the target holds: pruning keeps the load's p99 within 20 % of the
same load without it. Checks: every ``new`` task kept, the hourly counts equal to a recount, and
bench.latency's own (every crawl request read, every event committed, tm exits 0).
Markdown on stdout, progress on stderr; everything created is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench import latency
from harness import stop_on_sigterm
from harness.report import note
from harness.stack import query
from tm.adapters import postgres
from tm.config import Settings

FILL_CHUNK = 500_000  # rows per INSERT: a few seconds each, within the statement timeout
FILL_MARK = "bench-prune-old"  # user_query of the filled rows
NEW_SHARE = 10  # one filled row in this many is still `new`
TARGET_RATIO = 1.2  # the load's p99 with pruning / without
PRUNE_STOP_TIMEOUT_S = 30.0
_FIELDS_RE = re.compile(r"(\w+)=(\S+)")

_FILL_SQL = f"""
INSERT INTO web_crawl_tasks (id, user_email, user_query, original_url, received_at, status,
                             result, finished_at, created_at, updated_at)
SELECT gen_random_uuid(), 'user' || g || '@example.com', '{FILL_MARK}',
       'https://example.com/page/' || g, t,
       CASE WHEN g % {NEW_SHARE} = 0 THEN 'new' WHEN g % 5 = 1 THEN 'error'
            ELSE 'completed' END::task_status,
       CASE WHEN g % {NEW_SHARE} = 0 THEN NULL ELSE repeat('r', 200) END,
       CASE WHEN g % {NEW_SHARE} = 0 THEN NULL ELSE t END, t, t
FROM generate_series($1::bigint, $2::bigint) g,
     LATERAL (SELECT now() - make_interval(days => $3 + 1)
                 - (g::float8 / $4::float8) * interval '29 days' AS t) x
"""

_COUNTS_DIFFER_SQL = """
SELECT count(*) FROM (
    SELECT date_trunc('hour', created_at) AS hour, status, count(*) AS tasks
    FROM web_crawl_tasks GROUP BY 1, 2
) exact FULL JOIN (
    SELECT hour, status, tasks FROM web_crawl_task_hourly_counts WHERE tasks <> 0
) kept USING (hour, status)
WHERE exact.tasks IS DISTINCT FROM kept.tasks
"""


@dataclass(frozen=True)
class Options:
    rows: int
    rate: float
    seconds: float
    rounds: int
    days: int
    batch_size: int
    pause_s: float
    workers: int
    partitions: int
    json_path: Path | None


@dataclass
class Phase:
    mode: str  # "load" or "load + prune"
    result: latency.RateResult
    prune: dict[str, str]  # the fields of the prune's last line; empty without a prune
    prune_exit: int | None = None


class PruneBench(latency.Run):
    def __init__(self, options: Options) -> None:
        super().__init__(
            latency.Options(
                rates=[options.rate],
                seconds=options.seconds,
                workers=options.workers,
                partitions=options.partitions,
                json_path=None,
                log_level="info",
                delivery="at-least-once",
            )
        )
        self.p = options
        self.phases: list[Phase] = []
        self.fill_s = 0.0

    def execute(self) -> None:
        self.start()
        self.fill()
        for _ in range(self.p.rounds):
            for with_prune in (False, True):
                self.phases.append(self.measure(with_prune=with_prune))
        self.final_checks()

    def fill(self) -> None:
        assert self.db is not None
        p = self.p
        note(f"filling {p.rows:,} finished and stuck tasks {p.days + 1}..{p.days + 30} days old")
        started = time.monotonic()

        async def run(settings: Settings) -> None:
            # Without the statement timeout: VACUUM of a few million rows takes longer.
            kwargs = postgres.connect_kwargs(settings.postgres, migrating=True)
            conn = await asyncpg.connect(**kwargs)
            try:
                for first in range(1, p.rows + 1, FILL_CHUNK):
                    last = min(first + FILL_CHUNK - 1, p.rows)
                    await conn.execute(_FILL_SQL, first, last, p.days, p.rows)
                await conn.execute("VACUUM ANALYZE web_crawl_tasks")
                # The fill's pages are flushed now, not by a checkpoint in the first phase.
                await conn.execute("CHECKPOINT")
            finally:
                await conn.close()

        asyncio.run(run(self.db))
        self.fill_s = time.monotonic() - started
        note(f"filled in {self.fill_s:.0f} s; a phase of load to settle, not counted")
        self.phase(self.p.rate)

    def measure(self, *, with_prune: bool) -> Phase:
        prune: subprocess.Popen[str] | None = None
        if with_prune:
            assert self.db is not None
            env = {
                **os.environ,
                "POSTGRES_DB": self.db.postgres.database,
                "LOG_FORMAT": "simple",
                "LOG_COLORS": "false",
                "TM_PROGRESS_INTERVAL_S": "10",
            }
            command = [
                sys.executable,
                "-m",
                "tm",
                "db",
                "prune",
                "--days",
                str(self.p.days),
                "--batch-size",
                str(self.p.batch_size),
                "--pause",
                str(self.p.pause_s),
            ]
            note(f"starting `{shlex.join(command[1:])}`")
            prune = subprocess.Popen(  # noqa: S603 (our own command)
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        try:
            result = self.phase(self.p.rate)
        finally:
            output, code = "", None
            if prune is not None:
                if prune.poll() is None:
                    prune.send_signal(signal.SIGTERM)
                output, _ = prune.communicate(timeout=PRUNE_STOP_TIMEOUT_S)
                code = prune.returncode
        fields: dict[str, str] = {}
        if prune is not None:
            last = [line for line in output.splitlines() if "prune" in line]
            if last:
                fields = dict(_FIELDS_RE.findall(last[-1]))
            finished = code == 0
            fields["ran_to_the_cutoff"] = str(finished)
            self.check(
                "the prune ran the whole phase or reached the cutoff, without an error",
                code in (0, 130),
                f"exit status {code}; {last[-1] if last else output[-500:]}",
            )
            note(f"prune: {fields}")
        return Phase(
            mode="load + prune" if with_prune else "load",
            result=result,
            prune=fields,
            prune_exit=code,
        )

    def final_checks(self) -> None:
        assert self.db is not None
        produced = query(
            self.db, "SELECT count(*) FROM web_crawl_tasks WHERE user_query <> $1", FILL_MARK
        )[0][0]
        self.check(
            "one row per event", produced == self.produced, f"{produced} rows, {self.produced} sent"
        )
        stuck = query(
            self.db,
            "SELECT count(*) FROM web_crawl_tasks WHERE user_query = $1 AND status = 'new'",
            FILL_MARK,
        )[0][0]
        expected = self.p.rows // NEW_SHARE
        self.check("every old `new` task kept", stuck == expected, f"{stuck} of {expected}")
        differ = query(self.db, _COUNTS_DIFFER_SQL)[0][0]
        self.check(
            "the hourly counts equal a recount", differ == 0, f"{differ} (hour, status) differ"
        )
        self.stop_tm()

    # -- the report --------------------------------------------------------------------------

    def p99s(self, mode: str, which: str) -> list[float]:
        return [getattr(ph.result, which)["p99"] for ph in self.phases if ph.mode == mode]

    def ratios(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for which in ("readable_ms", "committed_ms"):
            alone, pruned = self.p99s("load", which), self.p99s("load + prune", which)
            if alone and pruned:
                out[which] = statistics.median(pruned) / statistics.median(alone)
        return out

    def render(self, command: str) -> str:
        p = self.p
        out = ["# Steady load with and without `tm db prune`", "", f"command: `{command}`", ""]
        out += [
            f"tm from `{self.tm_source}`; {p.workers} workers, {p.partitions} partitions;"
            f" {p.rows:,} old tasks filled in {self.fill_s:.0f} s; {p.rate:,.0f} events/s for"
            f" {p.seconds:.0f} s a phase, the first {latency.WARM_UP_S:.0f} s left out;"
            f" prune `--days {p.days} --batch-size {p.batch_size} --pause {p.pause_s:g}`",
            "",
        ]
        if self.facts:
            out += ["| machine | |", "|---|---|"]
            out += [f"| {k} | {v} |" for k, v in self.facts.items()]
            out.append("")
        if self.phases:
            out += [
                "## Phases (latency in ms from the event's Kafka CreateTime)",
                "",
                "| # | mode | achieved | readable p50 | p99 | max | committed p50 | p99 | max"
                " | machine busy | pruned rows | prune rate |",
                "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for n, ph in enumerate(self.phases, 1):
                r = ph.result
                deleted = ph.prune.get("deleted", "")
                duration = float(ph.prune.get("duration_s", "0") or 0)
                rate = f"{int(deleted) / duration:,.0f}/s" if deleted and duration else ""
                cells = [str(n), ph.mode, f"{r.rate_achieved:,.0f}/s"]
                for figures in (r.readable_ms, r.committed_ms):
                    cells += [f"{figures[k]:.1f}" for k in ("p50", "p99", "max")]
                cells += [f"{r.machine_busy:.0%}", f"{int(deleted):,}" if deleted else "", rate]
                out.append("| " + " | ".join(cells) + " |")
            out += ["", "## The target: p99 with pruning within 20 % of the load alone", ""]
            out += ["| latency | load alone (median p99) | with prune | ratio | ≤ 1.2 |"]
            out.append("|---|---:|---:|---:|---|")
            for which, ratio in self.ratios().items():
                alone = statistics.median(self.p99s("load", which))
                pruned = statistics.median(self.p99s("load + prune", which))
                verdict = "yes" if ratio <= TARGET_RATIO else "**no**"
                name = which.removesuffix("_ms")
                out.append(
                    f"| to {name} | {alone:.1f} ms | {pruned:.1f} ms | {ratio:.2f} | {verdict} |"
                )
            out.append("")
        if self.checks:
            out += ["## Checks", ""]
            out += [f"- {'ok' if ok else '**FAILED**'}: {w}: {d}" for w, ok, d in self.checks]
            out.append("")
        out += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        if self.error:
            out += ["## The run did not finish", "", "```", self.error.rstrip(), "```", ""]
        return "\n".join(out)

    def summary(self, command: str) -> dict[str, Any]:
        return {
            "command": command,
            "tm": self.tm_source,
            "options": {**asdict(self.p), "json_path": None},
            "machine": self.facts,
            "phases": [
                {"mode": ph.mode, "result": asdict(ph.result), "prune": ph.prune}
                for ph in self.phases
            ],
            "ratios": self.ratios(),
            "checks": [{"what": w, "ok": ok, "detail": d} for w, ok, d in self.checks],
            "notes": self.notes,
            "error": self.error,
            "ok": self.ok,
        }


def _parse(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.prune", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--rows", type=int, default=5_000_000, help="old tasks filled (5000000)")
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s of the load (1000)")
    parser.add_argument("--seconds", type=float, default=60.0, help="per phase (60)")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of phases (3)")
    parser.add_argument("--days", type=int, default=30, help="the prune's --days (30)")
    parser.add_argument("--batch-size", type=int, default=5000, help="the prune's (5000)")
    parser.add_argument("--pause", type=float, default=0.2, help="the prune's, seconds (0.2)")
    parser.add_argument("--workers", type=int, default=latency.DEFAULT_WORKERS, help="(2)")
    parser.add_argument("--partitions", type=int, default=latency.DEFAULT_PARTITIONS, help="(6)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.rate <= 0 or args.rounds < 1 or args.days < 1:
        parser.error("--rows, --rate, --rounds and --days must be positive")
    if args.seconds <= latency.WARM_UP_S + 1:
        parser.error(f"--seconds must be more than {latency.WARM_UP_S + 1:.0f}")
    return Options(
        rows=args.rows,
        rate=args.rate,
        seconds=args.seconds,
        rounds=args.rounds,
        days=args.days,
        batch_size=args.batch_size,
        pause_s=args.pause,
        workers=args.workers,
        partitions=args.partitions,
        json_path=args.json,
    )


def main(argv: list[str] | None = None) -> int:
    options = _parse(argv)
    stop_on_sigterm()
    return latency.drive(PruneBench(options), options.json_path)


if __name__ == "__main__":
    sys.exit(main())
