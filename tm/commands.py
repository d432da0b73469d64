"""The operator commands behind ``tm db migrate``, ``tm db prune``, ``tm check [--config-only]``
and ``tm topics create``.

Each returns the process exit status and prints one line per thing it did or found.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import msgspec

from tm.adapters import kafka, migrations, postgres, retention
from tm.config import Settings
from tm.connections import PostgresSettings
from tm.errors import DatabaseUnavailableError, TmError
from tm.observability import logs

CHECK_TIMEOUT_S = 5.0  # per dependency; long enough for a slow broker, short for a probe


def db_migrate(settings: Settings) -> int:
    async def run() -> list[migrations.Migration]:
        # No statement timeout: a migration on a big table may take long (connect_kwargs).
        conn = await postgres.connect(settings.postgres, migrating=True)
        try:
            async with postgres.translated():
                return await migrations.migrate(conn)
        finally:
            await conn.close()

    applied = asyncio.run(run())
    for migration in applied:
        print(f"applied {migration.version:04d}_{migration.name}")
    if not applied:
        print("schema is up to date; nothing to apply")
    return 0


def db_prune(
    settings: Settings,
    *,
    days: int | None,
    batch_size: int = retention.BATCH_SIZE,
    pause_s: float = retention.PAUSE_S,
    is_dry_run: bool = False,
) -> int:
    """Delete the finished tasks older than ``days`` (default TM_RETENTION_DAYS) in batches
    (:mod:`tm.adapters.retention`); log a progress line every TM_PROGRESS_INTERVAL_S and one
    line at the end. SIGTERM or SIGINT stops it between two batches, and the run is recorded
    as stopped."""
    logs.setup(settings.log, settings.otel, environment=settings.environment)
    log = logging.getLogger("tm.retention")
    days = days if days is not None else settings.retention.days
    if days is None:
        log.info("retention is not set (TM_RETENTION_DAYS or --days): nothing deleted")
        return 0
    options = retention.Options(
        days=days, batch_size=batch_size, pause_s=pause_s, is_dry_run=is_dry_run
    )
    outcome = asyncio.run(_prune(settings, options, log))
    if outcome is None:
        log.warning("another tm db prune is running: nothing done")
        return 0
    if not outcome.is_complete:
        log.warning("prune stopped before the cutoff", extra={"fields": outcome.fields()})
        return 130
    message = "prune dry run: would delete" if is_dry_run else "pruned"
    log.info(message, extra={"fields": outcome.fields()})
    return 0


async def _prune(
    settings: Settings, options: retention.Options, log: logging.Logger
) -> retention.Outcome | None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    interval_s = settings.log.progress_interval_s
    next_line = time.monotonic() + interval_s

    def progress(outcome: retention.Outcome) -> None:
        nonlocal next_line
        now = time.monotonic()
        if interval_s > 0 and now >= next_line:
            next_line = now + interval_s
            fields = outcome.fields()
            fields["rate_per_s"] = round(outcome.deleted / max(outcome.duration_s, 1e-9), 1)
            log.info("prune progress", extra={"fields": fields})

    conn = await postgres.connect(settings.postgres)
    try:
        return await retention.prune(conn, options, stop=stop, on_batch=progress)
    finally:
        await conn.close()


def check_config(settings: Settings) -> int:
    """``tm check --config-only``: the settings parsed (``config.load`` raised nothing, or
    ``tm`` already exited 2 naming the bad variable); one line saying what they point at, no
    secret in it. Contacts nothing, so a manifest's environment can be checked anywhere."""
    k, pg, c = settings.kafka, settings.postgres, settings.consumer
    workers = f"{c.workers} (default)" if c.is_workers_default else str(c.workers)
    print(
        f"settings: ok: environment {settings.environment}, workers {workers},"
        f" kafka {','.join(k.brokers)} group {k.group_id}"
        f" (instance {k.group_instance_id or 'dynamic'}), topic {k.task_status_topic},"
        f" postgres {pg.host}:{pg.port}/{pg.database}, http :{settings.http.port}"
    )
    return 0


def check(settings: Settings) -> int:
    """One line per dependency: reached or not, and why. Non-zero when any is not reached."""
    ok = True
    for name, probe in (("postgres", _check_postgres), ("kafka", _check_kafka)):
        started = time.perf_counter()
        try:
            detail = probe(settings)
        except TmError as exc:
            ok = False
            print(f"{name}: NOT reached: {exc}")
        else:
            elapsed_ms = (time.perf_counter() - started) * 1000
            print(f"{name}: reached in {elapsed_ms:.0f} ms: {detail}")
    return 0 if ok else 1


def _schema_state(pg: PostgresSettings) -> tuple[str, migrations.Status]:
    """The server's version and the migration status; raises TmError (a timeout included)."""

    async def run() -> tuple[str, migrations.Status]:
        conn = await postgres.connect(pg)
        try:
            async with postgres.translated():
                return await conn.fetchval("SHOW server_version"), await migrations.status(conn)
        finally:
            await conn.close()

    timeout_s = CHECK_TIMEOUT_S * 2
    try:
        return asyncio.run(asyncio.wait_for(run(), timeout_s))
    except TimeoutError as exc:
        raise DatabaseUnavailableError(f"no answer in {timeout_s:.0f} s") from exc


def _pending(state: migrations.Status) -> str:
    return ", ".join(f"{m.version:04d}_{m.name}" for m in state.pending)


def _topics(settings: Settings) -> tuple[str, str, str]:
    k = settings.kafka
    return (k.task_status_topic, k.web_crawl_request_topic, k.dlq_topic)


def _check_postgres(settings: Settings) -> str:
    pg = settings.postgres
    version, state = _schema_state(pg)
    schema = f"{len(state.pending)} pending ({_pending(state)})" if state.pending else "migrated"
    return f"{pg.host}:{pg.port}/{pg.database} PostgreSQL {version}, schema {schema}"


def _check_kafka(settings: Settings) -> str:
    info = kafka.describe(settings.kafka, timeout_s=CHECK_TIMEOUT_S)
    k = settings.kafka
    topics = ", ".join(
        f"{t} ({info.topics[t]} partitions)" if t in info.topics else f"{t} missing"
        for t in _topics(settings)
    )
    return f"{','.join(k.brokers)} ({info.brokers} broker(s)); topics: {topics}"


def topics_create(settings: Settings, partitions: int | None) -> int:
    count = partitions or settings.kafka.topic_partitions
    names = list(_topics(settings))
    for name, what in kafka.create_topics(settings.kafka, names, partitions=count).items():
        print(f"{what} {name}" + (f" ({count} partitions)" if what == "created" else ""))
    return 0


class Preflight(msgspec.Struct, frozen=True, kw_only=True):
    """What the pre-flight check found (msgspec-encodable, to cross the check's pipe)."""

    problem: str | None  # what stops tm from starting, in one line; None when all is well
    partitions: int  # of TASK_STATUS_TOPIC; 0 when the check stopped before reading it


def preflight(settings: Settings) -> Preflight:
    """Check what tm needs to start: PostgreSQL answers, the schema is migrated, Kafka answers
    and the topics exist; and how many partitions the task-status topic has (the supervisor
    runs no more default workers than that: see ``config.cap_workers``)."""
    pg = settings.postgres
    try:
        _, state = _schema_state(pg)
    except TmError as exc:
        return Preflight(
            problem=f"PostgreSQL at {pg.host}:{pg.port}/{pg.database}: {exc}", partitions=0
        )
    if state.pending:
        problem = f"the schema is not migrated ({_pending(state)} pending): run `tm db migrate`"
        return Preflight(problem=problem, partitions=0)
    k = settings.kafka
    try:
        info = kafka.describe(k, timeout_s=CHECK_TIMEOUT_S)
    except TmError as exc:
        return Preflight(problem=f"Kafka at {','.join(k.brokers)}: {exc}", partitions=0)
    partitions = info.topics.get(k.task_status_topic, 0)
    missing = [t for t in _topics(settings) if t not in info.topics]
    if missing:
        problem = f"topic(s) {', '.join(missing)} do not exist: run `tm topics create`"
        return Preflight(problem=problem, partitions=partitions)
    return Preflight(problem=None, partitions=partitions)
