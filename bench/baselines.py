"""The two yardsticks tm is measured against (DESIGN §8).

- :func:`direct_database_ceiling`: the same ``new`` rows through the same set-based call
  (``tm.adapters.postgres.Database.apply`` -> ``tm_create_tasks``), no Kafka: W processes with
  one connection each (as tm has W workers), batches of tm's size, all released together.
- :func:`original_design`: what the old service did per message: one consumer, ``consume(1)``,
  one ``SELECT create_web_crawl_task(...)`` and one synchronous offset commit per message.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg
import orjson
import uvloop
from confluent_kafka import Consumer

from tm.adapters import postgres
from tm.adapters.postgres import Database
from tm.config import Settings
from tm.core.decode import DecodeStats, decode
from tm.core.messages import NewTask
from tm.traffic import new_task_message

CHILD_TIMEOUT_S = 600.0  # a ceiling child that has not reported by then is stuck


@dataclass(frozen=True, slots=True)
class Ceiling:
    rows: int
    seconds: float
    outcomes: dict[str, int]

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def new_tasks(numbers: range, *, topic: str, partitions: int) -> list[NewTask]:
    """The NewTask rows tm would decode from gateway messages ``numbers`` (the id of a message
    without task_id is a UUIDv5 of its Kafka coordinates: give each a distinct one)."""
    stats = DecodeStats()
    now_ms = int(time.time() * 1000)
    rows = []
    for n in numbers:
        headers, value = new_task_message(n)
        item = decode(
            headers,  # type: ignore[arg-type]  # (str, bytes) pairs, as consumed
            value,
            topic=topic,
            partition=n % partitions,
            offset=n // partitions,
            timestamp_ms=now_ms,
            max_result_chars=1_048_576,
            stats=stats,
        )
        assert type(item) is NewTask, item
        rows.append(item)
    return rows


def _ceiling_child(
    settings: Settings,
    numbers: range,
    batch: int,
    topic: str,
    partitions: int,
    barrier: Any,
    results: Any,
) -> None:
    """One of the W parallel writers: build its rows and connect, wait for the others, then
    apply its batches back to back and report (start, end, outcomes)."""
    try:
        rows = new_tasks(numbers, topic=topic, partitions=partitions)
        loop = uvloop.new_event_loop()
        database = loop.run_until_complete(Database.open(settings.postgres, max_size=1))
        try:
            barrier.wait(CHILD_TIMEOUT_S)
            started = time.monotonic()
            outcomes: Counter[str] = Counter()
            for i in range(0, len(rows), batch):
                created, _ = loop.run_until_complete(database.apply(rows[i : i + batch], []))
                outcomes.update(created)
            ended = time.monotonic()
        finally:
            loop.run_until_complete(database.close(5.0))
            loop.close()
        results.put(("ok", started, ended, dict(outcomes)))
    except BaseException:
        barrier.abort()
        results.put(("error", traceback.format_exc()))


def direct_database_ceiling(
    settings: Settings, *, rows: int, workers: int, batch: int, topic: str, partitions: int
) -> Ceiling:
    """``rows`` new tasks into the (fresh) table of ``settings``' database by ``workers``
    processes in parallel; the time is from the common start to the last writer's end."""
    # spawn, not fork: this process already runs librdkafka threads.
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(workers + 1)
    results = context.Queue()
    share = -(-rows // workers)
    children = []
    for w in range(workers):
        numbers = range(w * share, min(rows, (w + 1) * share))
        child = context.Process(
            target=_ceiling_child,
            args=(settings, numbers, batch, topic, partitions, barrier, results),
            name=f"bench-ceiling-{w}",
        )
        child.start()
        children.append(child)
    try:
        barrier.wait(CHILD_TIMEOUT_S)
        reports = [results.get(timeout=CHILD_TIMEOUT_S) for _ in children]
    except Exception as exc:  # queue.Empty, BrokenBarrierError: say what the children said
        errors = []
        while not results.empty():
            report = results.get_nowait()
            if report[0] == "error":
                errors.append(report[1])
        raise RuntimeError(f"direct-database ceiling failed: {errors or exc}") from exc
    finally:
        for child in children:
            child.join(30)
            if child.is_alive():
                child.kill()
    failed = [r[1] for r in reports if r[0] == "error"]
    if failed:
        raise RuntimeError(f"direct-database ceiling failed:\n{failed[0]}")
    outcomes: Counter[str] = Counter()
    for _, _, _, counts in reports:
        outcomes.update(counts)
    seconds = max(r[2] for r in reports) - min(r[1] for r in reports)
    return Ceiling(rows=rows, seconds=seconds, outcomes=dict(outcomes))


@dataclass(frozen=True, slots=True)
class Original:
    messages: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


_ORIGINAL_SQL = "SELECT create_web_crawl_task($1, $2, $3, $4, $5, $6, $7)"


def original_design(
    settings: Settings,
    kafka_config: dict[str, Any],
    *,
    topic: str,
    group: str,
    messages: int,
    timeout_s: float,
) -> Original:
    """Consume ``messages`` gateway ``new`` events the old way. Timed from the first message
    received to the commit of the last one (start-up and group join excluded)."""
    consumer = Consumer(
        {
            **kafka_config,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "log_level": 3,
        }
    )
    loop = uvloop.new_event_loop()
    conn: asyncpg.Connection = loop.run_until_complete(
        asyncpg.connect(**postgres.connect_kwargs(settings.postgres))
    )
    run = loop.run_until_complete
    try:
        consumer.subscribe([topic])
        done = 0
        started: float | None = None
        deadline = time.monotonic() + timeout_s
        while done < messages:
            if time.monotonic() > deadline:
                raise RuntimeError(f"original design: {done} of {messages} after {timeout_s} s")
            polled = consumer.consume(1, 1.0)
            if not polled:
                continue
            message = polled[0]
            if message.error() is not None:
                continue
            if started is None:
                started = time.monotonic()
            # A consumed message's headers are a list of (name, bytes | None); the stubs type
            # headers() as produce() takes them (a dict or list, values str | bytes | None).
            raw = cast("Sequence[tuple[str, bytes | None]]", message.headers() or ())
            headers = {k: v.decode() for k, v in raw if v is not None}
            value = message.value()
            assert value is not None  # every message of the run has a body
            body = orjson.loads(value)
            now = datetime.now(UTC)
            run(
                conn.fetchval(
                    _ORIGINAL_SQL,
                    body["user_email"],
                    body["user_query"],
                    body["base_url"],
                    datetime.fromisoformat(headers["timestamp"]),
                    headers["status"],
                    now,
                    now,
                )
            )
            consumer.commit(message=message, asynchronous=False)
            done += 1
        assert started is not None
        return Original(messages=messages, seconds=time.monotonic() - started)
    finally:
        consumer.close()
        run(conn.close())
        loop.close()


def truncate_tasks(settings: Settings) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(**postgres.connect_kwargs(settings.postgres))
        try:
            await conn.execute("TRUNCATE web_crawl_tasks")
        finally:
            await conn.close()

    asyncio.run(run())
