"""What the end-to-end tests share: a fresh database and topics per test, `tm run` as a real
subprocess, and ways to look at the outcome (rows, topic contents, committed offsets) that poll
until a condition holds or a deadline passes, instead of sleeping.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import asyncpg
import pytest
from confluent_kafka import Consumer, ConsumerGroupState, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from bench.stack import free_port, unique
from tm.adapters import kafka, migrations, postgres
from tm.config import Settings

T = TypeVar("T")
# A worker's "partitions assigned partitions=[0, 1]" and "partitions revoked ..." log lines.
PARTITIONS = re.compile(r"partitions (assigned|revoked) partitions=\[([\d, ]*)\]")
Headers = list[tuple[str, bytes]]  # as the tests write them
# Headers as confluent-kafka's produce() takes them (its stubs' list), and as tm.traffic makes them.
KafkaHeaders = list[tuple[str, str | bytes | None]]


@dataclass
class Stack:
    """A fresh database (migrated) and fresh topics; ``env`` points tm at them."""

    settings: Settings
    database: str
    topic: str
    requests_topic: str
    dlq_topic: str
    group: str
    partitions: int
    env: dict[str, str] = field(default_factory=dict)

    # -- Kafka -------------------------------------------------------------------------------

    def _kafka_config(self) -> dict[str, Any]:
        return kafka.client_config(self.settings.kafka)

    def produce(
        self,
        messages: Sequence[tuple[bytes | None, Headers | KafkaHeaders, bytes | None]],
        *,
        topic: str | None = None,
        partition: int | None = None,
    ) -> None:
        """Produce (key, headers, value) messages and wait for their acknowledgements."""
        producer = Producer({**self._kafka_config(), "enable.idempotence": True, "acks": "all"})
        for key, headers, value in messages:
            kwargs: dict[str, Any] = {"key": key, "value": value, "headers": headers}
            if partition is not None:
                kwargs["partition"] = partition
            producer.produce(topic or self.topic, **kwargs)
        assert producer.flush(30) == 0

    def read_topic(self, topic: str, *, timeout_s: float = 10.0) -> list[Any]:
        """Every message currently in ``topic`` (all partitions, from the beginning)."""
        consumer = Consumer(
            {**self._kafka_config(), "group.id": unique("reader"), "enable.auto.commit": False}
        )
        try:
            meta = consumer.list_topics(topic, timeout=timeout_s)
            partitions = list(meta.topics[topic].partitions)
            ends = {}
            for p in partitions:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=timeout_s
                )
                if high > low:
                    ends[p] = high
            consumer.assign([TopicPartition(topic, p, 0) for p in ends])
            seen: dict[int, int] = dict.fromkeys(ends, -1)
            out: list[Any] = []
            deadline = time.monotonic() + timeout_s
            while any(seen[p] + 1 < ends[p] for p in ends) and time.monotonic() < deadline:
                for message in consumer.consume(500, 0.2):
                    if message.error() is None:
                        out.append(message)
                        partition, offset = message.partition(), message.offset()
                        assert partition is not None and offset is not None  # not an error
                        seen[partition] = offset
            return out
        finally:
            consumer.close()

    def committed(self) -> dict[int, int]:
        """The group's committed offsets per partition (negative: none)."""
        consumer = Consumer({**self._kafka_config(), "group.id": self.group})
        try:
            tps = [TopicPartition(self.topic, p) for p in range(self.partitions)]
            return {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=10)}
        finally:
            consumer.close()

    def end_offsets(self) -> dict[int, int]:
        consumer = Consumer({**self._kafka_config(), "group.id": unique("reader")})
        try:
            return {
                p: consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)[1]
                for p in range(self.partitions)
            }
        finally:
            consumer.close()

    def group_assigned(self) -> int:
        """How many partitions of the topic the group coordinator has assigned to members of
        a stable group (0 while it rebalances)."""
        admin = AdminClient(self._kafka_config())
        description = admin.describe_consumer_groups([self.group])[self.group].result(10)
        if description.state != ConsumerGroupState.STABLE:
            return 0
        return sum(
            1
            for member in description.members
            for tp in member.assignment.topic_partitions
            if tp.topic == self.topic
        )

    def all_committed(self) -> bool:
        """True when the group has committed every message currently in the topic."""
        ends = self.end_offsets()
        committed = self.committed()
        return all(committed.get(p, -1) >= end for p, end in ends.items() if end > 0)

    # -- PostgreSQL --------------------------------------------------------------------------

    def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async def run() -> list[asyncpg.Record]:
            kwargs = postgres.connect_kwargs(self.settings.postgres)
            kwargs["database"] = self.database
            conn = await asyncpg.connect(**kwargs)
            try:
                return list(await conn.fetch(sql, *args))
            finally:
                await conn.close()

        return asyncio.run(run())

    def count(self, where: str = "true") -> int:
        return int(self.query(f"SELECT count(*) FROM web_crawl_tasks WHERE {where}")[0][0])


def wait_for(
    condition: Callable[[], T | Literal[False] | None],
    *,
    timeout_s: float = 30.0,
    interval_s: float = 0.2,
    what: str = "",
) -> T:
    """Poll ``condition`` until it returns a truthy value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what or condition}")
        time.sleep(interval_s)


def admin_sql(settings: Settings, sql: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(**postgres.connect_kwargs(settings.postgres))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def _migrate(settings: Settings, database: str) -> None:
    async def run() -> None:
        kwargs = postgres.connect_kwargs(settings.postgres)
        kwargs["database"] = database
        conn = await asyncpg.connect(**kwargs)
        try:
            await migrations.migrate(conn)
        finally:
            await conn.close()

    asyncio.run(run())


def make_stack(settings: Settings, *, partitions: int = 6) -> Iterator[Stack]:
    """Create the database and topics; drop them afterwards. Use from a fixture."""
    name = unique("tm_e2e")
    topic = name.replace("_", "-")
    stack = Stack(
        settings=settings,
        database=name,
        topic=topic,
        requests_topic=f"{topic}-requests",
        dlq_topic=f"{topic}.dlq",
        group=f"{topic}-group",
        partitions=partitions,
    )
    stack.env = {
        "POSTGRES_DB": name,
        "TASK_STATUS_TOPIC": stack.topic,
        "WEB_CRAWL_REQUEST_TOPIC": stack.requests_topic,
        "DLQ_TOPIC": stack.dlq_topic,
        "KAFKA_GROUP_ID": stack.group,
        "TM_TOPIC_PARTITIONS": str(partitions),
    }
    admin_sql(settings, f'CREATE DATABASE "{name}"')
    try:
        _migrate(settings, name)
        kafka.create_topics(
            settings.kafka,
            [stack.topic, stack.requests_topic, stack.dlq_topic],
            partitions=partitions,
        )
        yield stack
    finally:
        admin_sql(settings, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin = AdminClient(kafka.client_config(settings.kafka))
        for future in admin.delete_topics(
            [stack.topic, stack.requests_topic, stack.dlq_topic], operation_timeout=30
        ).values():
            future.result(30)


class TmRun:
    """`python -m tm run` as a subprocess, in its own session (so a test can signal it the
    way Kubernetes does: the supervisor only). Output goes to a file the test can read."""

    def __init__(
        self, stack: Stack, tmp_path: Path, *, wrap: Sequence[str] = (), **extra_env: str
    ) -> None:
        """``wrap``: a command line to run tm under (``unshare ...``, ``taskset ...``)."""
        self._stack = stack
        self.log_path = tmp_path / f"tm-{unique('run')}.log"
        self.port = free_port()
        env = {
            **os.environ,
            **stack.env,
            "TM_BATCH_LINGER_MS": "5",
            "APP_PORT": str(self.port),
            **extra_env,
        }
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [*wrap, sys.executable, "-m", "tm", "run"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def owned(self) -> set[int]:
        """The partitions this run's workers own now, from their assigned/revoked lines."""
        mine: set[int] = set()
        for what, listed in PARTITIONS.findall(self.output()):
            partitions = {int(p) for p in listed.split(",") if p.strip()}
            if what == "assigned":
                mine |= partitions
            else:
                mine -= partitions
        return mine

    def wait_assigned(self, partitions: int, timeout_s: float = 30.0) -> None:
        """Wait until the workers own ``partitions`` partitions in all, as their own lines say
        and as the group coordinator says (the group is stable with them assigned)."""

        def assigned() -> bool:
            return len(self.owned()) >= partitions and self._stack.group_assigned() >= partitions

        wait_for(assigned, timeout_s=timeout_s, what=f"{partitions} partitions assigned")

    def worker_pids(self) -> list[int]:
        pids = []
        for line in self.output().splitlines():
            if "worker spawned" in line:
                pids.append(int(line.split("pid=")[1].split()[0]))
        return pids

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout_s: float = 40.0) -> int:
        """SIGTERM the supervisor and wait for it; return its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        finally:
            self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self._log.close()
