"""Fresh databases (migrated) and uuid-named topics on the running local stack, created for one
test or one bench and dropped afterwards (even on failure).

:class:`Fresh` records what it creates and :meth:`Fresh.cleanup` removes it; :class:`Stack` is
one tm's world (a database, its three topics and its group) with ways to look at the outcome;
:func:`make_stack` makes one for a fixture.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from harness import kafka as kafka_io
from harness import unique
from tm.adapters import kafka, migrations, postgres
from tm.config import Settings

ADMIN_TIMEOUT_S = 30.0  # topic creation/deletion and DDL; generous for a busy broker
MAINTENANCE_DB = "postgres"  # where CREATE/DROP DATABASE run from


# -- PostgreSQL --------------------------------------------------------------------------------


def with_database(settings: Settings, name: str) -> Settings:
    """The same settings, pointing at another database."""
    pg = msgspec.structs.replace(settings.postgres, database=name)
    return msgspec.structs.replace(settings, postgres=pg)


def kafka_config(settings: Settings) -> dict[str, Any]:
    """The librdkafka configuration of ``settings`` (the secured listeners' too)."""
    return kafka.client_config(settings.kafka)


async def _admin_connect(settings: Settings) -> asyncpg.Connection:
    kwargs = postgres.connect_kwargs(settings.postgres)
    kwargs["database"] = MAINTENANCE_DB
    try:
        return await asyncpg.connect(**kwargs)
    except asyncpg.InvalidCatalogNameError:  # no `postgres` database: use the configured one
        return await asyncpg.connect(**postgres.connect_kwargs(settings.postgres))


def admin_sql(settings: Settings, sql: str) -> None:
    """Run one statement from the maintenance database (CREATE/DROP DATABASE, ALTER SYSTEM)."""

    async def run() -> None:
        conn = await _admin_connect(settings)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def query(settings: Settings, sql: str, *args: Any) -> list[asyncpg.Record]:
    """Run one query on the settings' database (a connection of its own)."""

    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(**postgres.connect_kwargs(settings.postgres))
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


class Fresh:
    """Everything a test or a bench creates; :meth:`cleanup` removes it and never raises."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.databases: list[str] = []
        self.topics: list[str] = []

    def database(self, prefix: str) -> Settings:
        """Create and migrate a fresh database; return settings pointing at it."""
        name = unique(prefix)
        admin_sql(self.settings, f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        target = with_database(self.settings, name)

        async def migrate() -> None:
            conn = await asyncpg.connect(**postgres.connect_kwargs(target.postgres))
            try:
                await migrations.migrate(conn)
            finally:
                await conn.close()

        asyncio.run(migrate())
        return target

    def create_topics(self, names: list[str], *, partitions: int) -> None:
        self.topics.extend(names)
        kafka.create_topics(
            self.settings.kafka, names, partitions=partitions, timeout_s=ADMIN_TIMEOUT_S
        )

    def stack(self, prefix: str, *, partitions: int) -> Stack:
        """A migrated database and a task-status, a requests and a dead-letter topic, one
        name for all of them: a world for one tm."""
        settings = self.database(prefix)
        name = settings.postgres.database
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
        self.create_topics(
            [stack.topic, stack.requests_topic, stack.dlq_topic], partitions=partitions
        )
        return stack

    def cleanup(self) -> list[str]:
        """Drop the databases and delete the topics; return what could not be removed."""
        problems: list[str] = []
        for name in self.databases:
            try:
                admin_sql(self.settings, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as exc:  # keep cleaning up the rest
                problems.append(f"database {name}: {exc}")
        self.databases.clear()
        if self.topics:
            admin = AdminClient(kafka_config(self.settings))
            futures = admin.delete_topics(self.topics, operation_timeout=ADMIN_TIMEOUT_S)
            for name, future in futures.items():
                try:
                    future.result(ADMIN_TIMEOUT_S)
                except KafkaException as exc:
                    error = exc.args[0] if exc.args else None
                    if not (
                        isinstance(error, KafkaError)
                        and error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
                    ):
                        problems.append(f"topic {name}: {exc}")
            self.topics.clear()
        return problems


@contextmanager
def make_stack(
    settings: Settings, *, partitions: int = 6, prefix: str = "tm_e2e"
) -> Iterator[Stack]:
    """A :class:`Stack` for the length of a ``with`` block (a fixture's ``yield``)."""
    fresh = Fresh(settings)
    try:
        yield fresh.stack(prefix, partitions=partitions)
    finally:
        problems = fresh.cleanup()
        assert not problems, problems


@dataclass
class Stack:
    """A fresh database (migrated) and fresh topics; ``env`` points tm at them."""

    settings: Settings  # pointing at ``database``
    database: str
    topic: str
    requests_topic: str
    dlq_topic: str
    group: str
    partitions: int
    env: dict[str, str] = field(default_factory=dict)  # added to (and over) tm's own

    def __post_init__(self) -> None:
        self.env = {
            "POSTGRES_DB": self.database,
            "TASK_STATUS_TOPIC": self.topic,
            "WEB_CRAWL_REQUEST_TOPIC": self.requests_topic,
            "DLQ_TOPIC": self.dlq_topic,
            "KAFKA_GROUP_ID": self.group,
            "TM_TOPIC_PARTITIONS": str(self.partitions),
            **self.env,
        }

    @property
    def kafka_config(self) -> dict[str, Any]:
        return kafka_config(self.settings)

    # -- Kafka -------------------------------------------------------------------------------

    def produce(
        self,
        messages: Sequence[tuple[bytes | None, kafka_io.AnyHeaders, bytes | None]],
        *,
        topic: str | None = None,
        partition: int | None = None,
    ) -> None:
        """Produce (key, headers, value) messages and wait for their acknowledgements."""
        kafka_io.produce(self.kafka_config, topic or self.topic, messages, partition=partition)

    def feed(
        self, *, count: int, rate: float, start: int = 0, completed_lag: int = 0
    ) -> kafka_io.Feeder:
        """A :class:`~harness.kafka.Feeder` into the task-status topic, started."""
        return kafka_io.Feeder(
            self.kafka_config,
            self.topic,
            partitions=self.partitions,
            count=count,
            rate=rate,
            start=start,
            completed_lag=completed_lag,
        )

    def read_topic(
        self, topic: str, *, timeout_s: float = 10.0, uncommitted: bool = False
    ) -> list[Any]:
        """Every message currently in ``topic`` (all partitions, from the beginning), as a
        read_committed reader sees them, or every record written (``uncommitted``)."""
        return kafka_io.read_topic(
            self.kafka_config, topic, timeout_s=timeout_s, uncommitted=uncommitted
        )

    def committed(self) -> dict[int, int]:
        """The group's committed offsets per partition (negative: none)."""
        return kafka_io.committed(self.kafka_config, self.group, self.topic, self.partitions)

    def end_offsets(self) -> dict[int, int]:
        return kafka_io.end_offsets(self.kafka_config, self.topic, self.partitions)

    def group_assigned(self) -> int:
        """How many partitions of the topic the group coordinator has assigned to members of
        a stable group (0 while it rebalances)."""
        return kafka_io.group_assigned(self.kafka_config, self.group, self.topic)

    def all_committed(self) -> bool:
        """True when the group has committed every message currently in the topic."""
        ends = self.end_offsets()
        committed = self.committed()
        return all(committed.get(p, -1) >= end for p, end in ends.items() if end > 0)

    # -- PostgreSQL --------------------------------------------------------------------------

    def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return query(with_database(self.settings, self.database), sql, *args)

    def count(self, where: str = "true") -> int:
        return int(self.query(f"SELECT count(*) FROM web_crawl_tasks WHERE {where}")[0][0])
