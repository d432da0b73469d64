"""The benchmark's own fresh stack: migrated databases and uuid-named topics, created at the
start and dropped at the end (even on failure), plus the facts about the machine that the report
prints, and the small helpers every bench and the tests' harness share (unique names, a free
port, SIGTERM as an exit). Nothing here comes from ``tests/``: the benchmark runs from a
checkout without them.
"""

from __future__ import annotations

import asyncio
import glob
import os
import platform
import re
import signal
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import confluent_kafka
import msgspec
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from tm.adapters import kafka, migrations, postgres
from tm.config import Settings

ADMIN_TIMEOUT_S = 30.0  # topic creation/deletion and DDL; generous for a busy broker
MAINTENANCE_DB = "postgres"  # where CREATE/DROP DATABASE run from
_KAFKA_JAR_RE = re.compile(r"kafka(?:-server|_2\.\d+|-clients)-(\d+\.\d+\.\d+[\w.-]*)\.jar$")


def unique(prefix: str) -> str:
    """A name nobody else uses (other engineers run tests on the same servers)."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def free_port() -> int:
    """A TCP port nobody listens on right now (for a tm's API, so that runs can overlap)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stop_on_sigterm() -> None:
    """A SIGTERM unwinds like Ctrl-C does, through the finally blocks: the cleanup runs."""
    signal.signal(signal.SIGTERM, _raise_on_sigterm)


def _raise_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def with_database(settings: Settings, name: str) -> Settings:
    """The same settings, pointing at another database."""
    pg = msgspec.structs.replace(settings.postgres, database=name)
    return msgspec.structs.replace(settings, postgres=pg)


def kafka_config(settings: Settings) -> dict[str, Any]:
    return kafka.client_config(settings.kafka)


async def _admin_connect(settings: Settings) -> asyncpg.Connection:
    kwargs = postgres.connect_kwargs(settings.postgres)
    kwargs["database"] = MAINTENANCE_DB
    try:
        return await asyncpg.connect(**kwargs)
    except asyncpg.InvalidCatalogNameError:  # no `postgres` database: use the configured one
        return await asyncpg.connect(**postgres.connect_kwargs(settings.postgres))


def _admin_execute(settings: Settings, sql: str) -> None:
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


class Stack:
    """Everything the benchmark creates; :meth:`cleanup` removes it and never raises."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.databases: list[str] = []
        self.topics: list[str] = []

    def database(self, prefix: str) -> Settings:
        """Create and migrate a fresh database; return settings pointing at it."""
        name = unique(prefix)
        _admin_execute(self.settings, f'CREATE DATABASE "{name}"')
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

    def cleanup(self) -> list[str]:
        """Drop the databases and delete the topics; return what could not be removed."""
        problems: list[str] = []
        for name in self.databases:
            try:
                _admin_execute(self.settings, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
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


# -- the machine -----------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def kafka_broker_version() -> str:
    """The broker's version, read from the jars of a local ``kafka.Kafka`` process (librdkafka
    does not expose the broker version). ``unknown`` when the broker is not on this machine."""
    for cmdline_path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            argv = Path(cmdline_path).read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kafka.Kafka" not in argv:
            continue
        args = [a.decode(errors="replace") for a in argv]
        for flag in ("-cp", "-classpath", "--class-path"):
            if flag in args[:-1]:
                for entry in args[args.index(flag) + 1].split(":"):
                    candidates = glob.glob(entry) if "*" in entry else [entry]
                    for jar in sorted(candidates):
                        match = _KAFKA_JAR_RE.search(jar)
                        if match:
                            return f"Apache Kafka {match.group(1)} (local broker, from its jars)"
        return "unknown (local broker found, no versioned jar on its class path)"
    return "unknown (broker not on this machine)"


def machine(settings: Settings) -> dict[str, str]:
    """What the report says about where it ran."""
    facts = {
        "nproc": f"{os.cpu_count()} (usable by this process: {len(os.sched_getaffinity(0))})",
        "cpu": _cpu_model(),
        "memory": _memory_gib(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "confluent-kafka / librdkafka": (
            f"{confluent_kafka.version()[0]} / {confluent_kafka.libversion()[0]}"
        ),
        "asyncpg": asyncpg.__version__,
        "kafka": kafka_broker_version(),
    }
    rows = query(
        settings,
        "SELECT current_setting('server_version'), current_setting('shared_buffers'),"
        " current_setting('synchronous_commit'), current_setting('fsync'),"
        " current_setting('max_wal_size')",
    )
    version, shared_buffers, sync_commit, fsync, max_wal = rows[0]
    facts["postgresql"] = (
        f"{version} (shared_buffers={shared_buffers}, synchronous_commit={sync_commit},"
        f" fsync={fsync}, max_wal_size={max_wal})"
    )
    return facts
