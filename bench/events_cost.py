"""What the Redis task-event feed costs tm: CPU per message with REDIS_URL set and unset.

    python -m bench.events_cost [--messages 100000] [--rounds 2] [--redis-url redis://127.0.0.1:6379/0]

Each round runs tm twice on a fresh database and topics (unset, then set), with the same
``new`` messages produced beforehand, and reads the CPU time (user + system, from
/proc/<pid>/stat) of tm's processes (supervisor, workers, API) once every message is committed.
Start-up is in both figures alike, so the difference per message is the feed's cost. Needs the
local stack with Redis (``STACK_REDIS=1 make stack-up``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from bench.e2e import free_port, note, produce_bulk
from bench.probes import TmProcess
from bench.stack import Stack, kafka_config, unique
from tm import config
from tm.traffic import new_task_message

PARTITIONS = 6
WORKERS = 2
TIMEOUT_S = 300.0
_TICK_S = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(root: int) -> float:
    """User + system CPU seconds of ``root`` and every live descendant."""
    total, pending = 0.0, [root]
    while pending:
        pid = pending.pop()
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICK_S  # utime, stime
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as children:
                    pending += [int(c) for c in children.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def committed_all(kconfig: dict[str, object], group: str, topic: str, total: int) -> bool:
    consumer = Consumer({**kconfig, "group.id": group})
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return sum(max(tp.offset, 0) for tp in consumer.committed(tps, timeout=10)) >= total
    finally:
        consumer.close()


def one_run(stack: Stack, messages: int, redis_url: str | None, log_dir: Path) -> float:
    """CPU seconds of tm for ``messages`` pre-produced `new` events."""
    settings = stack.database("bench_events")
    base = unique("bench-events").replace("_", "-")
    topic, requests, dlq, group = f"{base}-ts", f"{base}-req", f"{base}.dlq", f"{base}-group"
    stack.create_topics([topic, requests, dlq], partitions=PARTITIONS)
    kconfig = kafka_config(settings)
    produce_bulk(kconfig, topic, [(None, *new_task_message(n)) for n in range(messages)])
    env = {
        **os.environ,
        "POSTGRES_DB": settings.postgres.database,
        "TASK_STATUS_TOPIC": topic,
        "WEB_CRAWL_REQUEST_TOPIC": requests,
        "DLQ_TOPIC": dlq,
        "KAFKA_GROUP_ID": group,
        "TM_WORKERS": str(WORKERS),
        "APP_PORT": str(free_port()),
        "TM_REDIS_STREAM": unique("bench:events"),
    }
    env.pop("REDIS_URL", None)
    if redis_url:
        env["REDIS_URL"] = redis_url
    tm = TmProcess(env, log_dir / f"{base}.log")
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not committed_all(kconfig, group, topic, messages):
            if tm.problem() or time.monotonic() > deadline:
                raise SystemExit(f"tm did not commit every message:\n{tm.tail()}")
            time.sleep(0.2)
        return tree_cpu_s(tm.pid)
    finally:
        tm.process.terminate()
        tm.process.wait(60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.events_cost", description=__doc__)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    settings = config.load()
    stack = Stack(settings)
    log_dir = Path(tempfile.mkdtemp(prefix="tm-bench-events-"))
    unset: list[float] = []
    with_feed: list[float] = []
    try:
        for round_ in range(args.rounds):
            for url, into in ((None, unset), (args.redis_url, with_feed)):
                cpu = one_run(stack, args.messages, url, log_dir)
                into.append(cpu / args.messages * 1e6)
                mode = "set" if url else "unset"
                note(f"round {round_ + 1}: REDIS_URL {mode}: {into[-1]:.1f} µs/msg")
                stack.cleanup()
    finally:
        stack.cleanup()
    a, b = statistics.median(unset), statistics.median(with_feed)
    print(
        f"tm CPU per message ({args.messages} new events, {WORKERS} workers, median of"
        f" {args.rounds}): REDIS_URL unset {a:.1f} µs, set {b:.1f} µs, difference {b - a:+.1f} µs"
        f" (load average {os.getloadavg()[0]:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
