"""CPU per message of tm's processes, per process kind, and the end-to-end rate:

    python -m bench.cpu [--messages 200000] [--workers 2] [--instances 1] [--partitions 6]
                        [--rounds 1] [--json FILE] [--redis-url URL | --feed-cost URL]

On a fresh database and fresh topics: N gateway ``new`` events are produced before tm starts;
tm runs (``--instances`` copies of ``python -m tm run`` in one consumer group, ``--workers``
each) until every message is committed; then tm stops, N ``completed``/``error`` updates of
those tasks are produced, and a fresh tm applies them. In each phase the CPU time (user +
system, ``/proc/<pid>/stat``, every thread) of each tm process is read when every partition is
owned and again when every message is committed: start-up is left out. The messages committed
before the first reading are left out of the count too. The same readings are taken of
PostgreSQL's processes, of the broker (the JVM) and of redis-server, for scale.

The rate is the messages committed between the two readings over the time between them
(committed offsets read every 50 ms). Markdown on stdout; ``--json`` writes the figures.

``--feed-cost URL`` measures what the Redis task-event feed costs: each round is a
pair, a run with REDIS_URL unset and one with it set to URL, both at once (each on its own
database and topics), and the figure is the median over the rounds of each pair's difference.
A run's tm CPU per message varies by a few microseconds from one run to the next on two shared
cores, more than the feed's cost; runs side by side share whatever else loads the machine, so
their difference is steadier than that of runs one after the other. (The PostgreSQL, broker
and redis-server figures are then those of both runs together.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import HarnessError, free_port, unique
from harness.kafka import CommitWatcher, Message, count_records, produce
from harness.procfs import cpu_s, pids_named
from harness.report import note
from harness.stack import Fresh, kafka_config, query
from harness.tm import TmProcess
from tm import config
from tm.traffic import new_task_message, update_message

UPDATE_ERROR_RATIO = 0.2
READY_TIMEOUT_S = 60.0
PHASE_TIMEOUT_S = 600.0
WATCH_S = 0.05


def reading(tms: list[TmProcess]) -> dict[str, float]:
    """CPU seconds so far per kind: tm's kinds (as its API names its processes), PostgreSQL and
    the broker."""
    totals = {"supervisor": 0.0, "worker": 0.0, "api": 0.0}
    for tm in tms:
        for pid, role in tm.roles().items():
            totals[role.split("-")[0]] += cpu_s(pid)
    totals["postgres"] = sum(cpu_s(pid) for pid in pids_named(r"^(\S*/)?postgres\b"))
    totals["broker"] = sum(cpu_s(pid) for pid in pids_named(r"kafka\.Kafka"))
    totals["redis"] = sum(cpu_s(pid) for pid in pids_named(r"^(\S*/)?redis-server\b"))
    return totals


@dataclass
class Phase:
    kind: str  # "new" | "update"
    messages: int  # committed between the readings
    seconds: float
    cpu_s: dict[str, float]

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    def us_per_message(self, kind: str) -> float:
        return self.cpu_s[kind] / self.messages * 1e6

    @property
    def tm_us(self) -> float:
        return sum(self.us_per_message(k) for k in ("supervisor", "worker", "api"))


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.settings = config.load()
        self.stack = Fresh(self.settings)
        self.kconfig = kafka_config(self.settings)
        self.log_dir = Path(tempfile.mkdtemp(prefix="tm-bench-cpu-"))

    def round(self, redis_url: str | None) -> list[Phase]:
        """Both phases on a fresh database and topics; REDIS_URL set to ``redis_url``."""
        a = self.args
        db = self.stack.database("bench_cpu")
        base = unique("bench-cpu").replace("_", "-")
        topic, group = f"{base}-ts", f"{base}-group"
        requests, dlq = f"{base}-req", f"{base}.dlq"
        self.stack.create_topics([topic, requests, dlq], partitions=a.partitions)
        env = {
            **os.environ,
            "POSTGRES_DB": db.postgres.database,
            "TASK_STATUS_TOPIC": topic,
            "WEB_CRAWL_REQUEST_TOPIC": requests,
            "DLQ_TOPIC": dlq,
            "KAFKA_GROUP_ID": group,
            "TM_WORKERS": str(a.workers),
            "TM_DELIVERY": a.delivery,
            "LOG_FORMAT": "simple",
            "LOG_LEVEL": "info",
            "LOG_COLORS": "false",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("REDIS_URL", None)
        if redis_url:  # the task-event feed on
            env["REDIS_URL"] = redis_url
            env["TM_REDIS_STREAM"] = unique("bench:events")
        try:
            return self.phases(env, db, topic, group, requests, dlq)
        finally:
            if redis_url:  # the stream holds 2N events: gone with the round's topics
                _drop_stream(redis_url, env["TM_REDIS_STREAM"])

    def pair(self, redis_url: str) -> tuple[list[Phase], list[Phase]]:
        """Two rounds at once, REDIS_URL unset and set, on their own databases and topics:
        whatever else loads the machine then weighs on both alike."""
        done: dict[str | None, list[Phase]] = {}
        failed: list[BaseException] = []

        def one(url: str | None) -> None:
            try:
                done[url] = self.round(url)
            except BaseException as exc:  # raised again below, in the bench's thread
                failed.append(exc)

        threads = [threading.Thread(target=one, args=(url,)) for url in (None, redis_url)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failed:
            raise failed[0]
        return done[None], done[redis_url]

    def phases(
        self,
        env: dict[str, str],
        db: config.Settings,
        topic: str,
        group: str,
        requests: str,
        dlq: str,
    ) -> list[Phase]:
        """Both phases: N `new` events pre-produced, then N updates of those tasks."""
        a = self.args
        note(f"producing {a.messages} `new` events")
        produce(self.kconfig, topic, [(None, *new_task_message(n)) for n in range(a.messages)])
        news = self.phase("new", env, topic, group, a.messages)
        requests_out = count_records(self.kconfig, requests)
        if requests_out != a.messages:
            raise HarnessError(f"{requests_out} crawl requests for {a.messages} tasks")
        ids = [r[0] for r in query(db, "SELECT id FROM web_crawl_tasks")]
        if len(ids) != a.messages:
            raise HarnessError(f"{len(ids)} rows for {a.messages} `new` events")
        chooser = random.Random(0)
        updates: list[Message] = []
        for task_id in ids:
            headers, value = update_message(task_id, failed=chooser.random() < UPDATE_ERROR_RATIO)
            updates.append((str(task_id).encode(), headers, value))
        note(f"producing {len(updates)} updates")
        produce(self.kconfig, topic, updates)
        del updates
        done = self.phase("update", env, topic, group, 2 * a.messages)
        left = query(db, "SELECT count(*) FROM web_crawl_tasks WHERE status = 'new'")[0][0]
        dead = count_records(self.kconfig, dlq)
        if left or dead:
            raise HarnessError(f"{left} tasks still new, {dead} dead letters")
        query(db, "VACUUM web_crawl_tasks")
        heap, indexes = query(
            db,
            "SELECT pg_relation_size('web_crawl_tasks'), pg_indexes_size('web_crawl_tasks')",
        )[0]
        note(
            f"table after VACUUM: {a.messages:,} finished tasks, {heap / a.messages:.0f} B a row"
            f" in the heap, {indexes / a.messages:.0f} B in its indexes"
        )
        return [news, done]

    def phase(self, kind: str, env: dict[str, str], topic: str, group: str, target: int) -> Phase:
        a = self.args
        watcher = CommitWatcher(
            self.kconfig, group=group, topic=topic, partitions=a.partitions, poll_s=WATCH_S
        )
        watcher.start()
        instances = [
            TmProcess({**env, "APP_PORT": str(free_port())}, self.log_dir / f"{kind}-{i}.log")
            for i in range(a.instances)
        ]
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not set(range(a.partitions)) <= set[int]().union(*(i.owned() for i in instances)):
                for i in instances:
                    if i.problem():
                        raise HarnessError(i.problem() or "")
                if time.monotonic() > deadline:
                    raise HarnessError("tm did not own every partition in time")
                time.sleep(0.01)
            before, at_before, started = reading(instances), watcher.total, time.monotonic()
            deadline = started + PHASE_TIMEOUT_S
            while watcher.total < target:
                for i in instances:
                    if i.problem():
                        raise HarnessError(i.problem() or "")
                if time.monotonic() > deadline:
                    raise HarnessError(f"only {watcher.total} of {target} committed")
                time.sleep(0.01)
            after, ended = reading(instances), watcher.changed_at
            count = target - at_before
            cpu = {k: after[k] - before[k] for k in after}
            note(
                f"{kind}: {count} messages in {ended - started:.2f} s, tm"
                f" {sum(cpu[k] for k in ('supervisor', 'worker', 'api')) / count * 1e6:.1f} µs/msg"
            )
            return Phase(kind, count, ended - started, cpu)
        finally:
            for i in instances:
                i.stop(30)
            watcher.stop()


def _drop_stream(url: str, name: str) -> None:
    import redis  # only where the feed is measured, as in tm

    client = redis.Redis.from_url(url)
    try:
        client.delete(name)
    finally:
        client.close()


def by_kind(rounds: list[list[Phase]]) -> dict[str, list[Phase]]:
    """The phases of every round, by kind ("new", "update"), in round order."""
    kinds: dict[str, list[Phase]] = {}
    for round_ in rounds:
        for phase in round_:
            kinds.setdefault(phase.kind, []).append(phase)
    return kinds


def table(rounds: list[list[Phase]], redis: bool) -> tuple[list[str], dict[str, Any]]:
    """The medians over the rounds, as a Markdown table and as figures."""
    med = statistics.median
    lines = [
        "| messages | rate | tm µs/msg | workers | supervisor | API | PostgreSQL | broker |"
        + (" redis-server |" if redis else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if redis else ""),
    ]
    figures: dict[str, Any] = {}
    for kind, runs in by_kind(rounds).items():
        row = {
            "rate": med(p.rate for p in runs),
            "tm_us": med(p.tm_us for p in runs),
            **{k: med(p.us_per_message(k) for p in runs) for k in runs[0].cpu_s},
            "runs": [asdict(p) for p in runs],
        }
        figures[kind] = row
        lines.append(
            f"| {kind} | {row['rate']:,.0f}/s | **{row['tm_us']:.1f}** | {row['worker']:.1f} |"
            f" {row['supervisor']:.1f} | {row['api']:.1f} | {row['postgres']:.1f} |"
            f" {row['broker']:.1f} |" + (f" {row['redis']:.1f} |" if redis else "")
        )
    return lines, figures


def feed_cost(
    unset: list[list[Phase]], with_feed: list[list[Phase]]
) -> tuple[list[str], dict[str, Any]]:
    """The pairs' differences in tm CPU per message (set minus unset), per kind."""
    lines = [
        "| messages | tm µs/msg, set - unset (median) | each pair's difference"
        " | redis-server µs/msg |",
        "|---|---|---|---|",
    ]
    figures: dict[str, Any] = {}
    plain, fed = by_kind(unset), by_kind(with_feed)
    for kind, runs in fed.items():
        diffs = [b.tm_us - a.tm_us for a, b in zip(plain[kind], runs, strict=True)]
        redis = statistics.median(p.us_per_message("redis") for p in runs)
        figures[kind] = {"difference_us": statistics.median(diffs), "pairs": diffs, "redis": redis}
        lines.append(
            f"| {kind} | **{statistics.median(diffs):+.1f}** |"
            f" {', '.join(f'{d:+.1f}' for d in diffs)} | {redis:.1f} |"
        )
    return lines, figures


def render(
    args: argparse.Namespace, unset: list[list[Phase]], with_feed: list[list[Phase]]
) -> tuple[str, dict[str, Any]]:
    flags = (
        f"--messages {args.messages} --workers {args.workers} --instances {args.instances}"
        f" --partitions {args.partitions} --rounds {args.rounds} --delivery {args.delivery}"
    )
    if args.redis_url:
        flags += f" --redis-url {args.redis_url}"
    if args.feed_cost:
        flags += f" --feed-cost {args.feed_cost}"
    lines = [
        f"`python -m bench.cpu {flags}` (median of {args.rounds}"
        + (" pairs" if args.feed_cost else "")
        + f"; load average {os.getloadavg()[0]:.2f} at the end)",
        "",
    ]
    summary: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    if not args.feed_cost:
        rows, summary["phases"] = table(with_feed or unset, redis=bool(args.redis_url))
        return "\n".join(lines + rows), summary
    for title, rounds, key in (("unset", unset, "unset"), ("set", with_feed, "set")):
        rows, summary[key] = table(rounds, redis=True)
        lines += [f"REDIS_URL {title}:", "", *rows, ""]
    rows, summary["feed_cost"] = feed_cost(unset, with_feed)
    lines += ["The feed's cost (a pair: the two runs of one round):", "", *rows]
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--delivery",
        choices=("at-least-once", "exactly-once"),
        default="at-least-once",
        help="tm's TM_DELIVERY (at-least-once)",
    )
    parser.add_argument("--json", type=Path, default=None)
    feed = parser.add_mutually_exclusive_group()
    feed.add_argument("--redis-url", default=None, help="set REDIS_URL (the task-event feed)")
    feed.add_argument(
        "--feed-cost",
        metavar="REDIS_URL",
        default=None,
        help="each round a pair, REDIS_URL unset and set (order alternating): the feed's cost",
    )
    args = parser.parse_args(argv)
    bench = Bench(args)
    unset: list[list[Phase]] = []
    with_feed: list[list[Phase]] = []
    try:
        for _ in range(args.rounds):
            if args.feed_cost:
                plain, fed = bench.pair(args.feed_cost)
                unset.append(plain)
                with_feed.append(fed)
            else:
                (with_feed if args.redis_url else unset).append(bench.round(args.redis_url))
            bench.stack.cleanup()
    except HarnessError as exc:
        print(f"bench.cpu: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.stack.cleanup()
    text, summary = render(args, unset, with_feed)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
