"""One worker process: everything with a socket or a thread is built here, after the fork.

The worker runs on uvloop. It connects (with backoff while a dependency is unreachable), builds
the consumer, the producer, the pipeline and the optional task-event feed and tracing, runs the
consume loop (tm.worker.consume) until a SIGTERM, then leaves the group (the revoke callback
commits what is done), flushes and closes.

An unreachable or read-only database, or a broker that does not answer, is not a reason to
exit: the worker connects with backoff (it reports ``R 1`` and has not booted, so readiness
says not ready); only a configuration error (bad credentials, a missing database, topics too
small for tm) ends a worker before it boots. It tells the supervisor what it does through
tm.protocol; a client call that hangs in one of its threads ends it (tm.worker.threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import random
import signal
import socket
import time
from typing import TYPE_CHECKING

import uvloop

from tm.adapters import kafka
from tm.adapters.kafka import KafkaSink, KafkaSource, TransactionalSink
from tm.adapters.postgres import Database
from tm.config import Settings
from tm.core.policy import backoff_s
from tm.errors import FatalError, FencedError, TmError, TransientError
from tm.observability import metrics, trace_export
from tm.pipeline import NO_TRACER, Pipeline
from tm.protocol import EXIT_CRASH, EXIT_FATAL, EXIT_FENCED, EXIT_OK, Reporter
from tm.worker.commit import PollCommit, TransactionCommit
from tm.worker.consume import Consumption
from tm.worker.threads import ClientThreads

if TYPE_CHECKING:
    from tm.adapters.redis import TaskEvents

log = logging.getLogger("tm.worker")
kafka_log = logging.getLogger("tm.kafka")

HEARTBEAT_INTERVAL_S = 1.0
POOL_SIZE = 2  # one batch in the database at a time, plus one spare
EVENTS_CLOSE_BUDGET_S = 2.0  # on shutdown, for the task events still queued for Redis


class Worker:
    def __init__(self, settings: Settings, *, slot: int, reporter: Reporter) -> None:
        self._settings = settings
        self._slot = slot
        self._reporter = reporter
        self._stopping = asyncio.Event()
        exactly_once = settings.consumer.is_exactly_once
        kafka_settings = settings.kafka
        sink_type = TransactionalSink if exactly_once else KafkaSink
        self.threads = ClientThreads(slot=slot, io_bound_s=sink_type.longest_call_s(kafka_settings))
        self.consumption = Consumption(
            settings.consumer,
            reporter=reporter,
            threads=self.threads,
            stopping=self._stopping,
            commit=TransactionCommit if exactly_once else PollCommit,
            progress_interval_s=settings.log.progress_interval_s,
            slot=slot,
        )
        self._database: Database | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked since the fork
        heartbeat = asyncio.create_task(self.heartbeat())
        try:
            connected = await self._connect()
            if connected is None:  # stopped while a dependency was unreachable
                return EXIT_OK
            await self._serve(*connected)
        finally:
            heartbeat.cancel()
        return EXIT_OK

    async def _connect(self) -> tuple[Database, KafkaSink] | None:
        """Open the pool, read the largest record the producer may send (the topics' limits)
        and make the producer, retrying with backoff while the database is unreachable or
        read-only (a failover) or the broker does not answer; None if a stop came first. A
        configuration error raises."""
        settings = self._settings
        consumer = settings.consumer
        attempt = 0
        while True:
            try:
                produce_limit = await asyncio.to_thread(kafka.produce_limit, settings.kafka)
                database = await Database.open(settings.postgres, max_size=POOL_SIZE)
                try:
                    sink = await self._sink(produce_limit)
                except BaseException:
                    await database.close(5.0)
                    raise
            except TransientError as exc:
                delay = backoff_s(
                    attempt,
                    initial_s=consumer.retry_backoff_initial_ms / 1000,
                    cap_s=consumer.retry_backoff_max_ms / 1000,
                    jitter=random.random(),  # noqa: S311 (spreading retries, not security)
                )
                if attempt == 0:
                    self._reporter.retrying(True)
                log.warning(
                    "cannot connect; retrying",
                    extra={
                        "fields": {
                            "error": str(exc),
                            "attempt": attempt + 1,
                            "retry_in_s": round(delay, 3),
                        }
                    },
                )
                attempt += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                    return None
                continue
            if attempt:
                self._reporter.retrying(False)
            self._database = database
            return database, sink

    async def _serve(self, database: Database, sink: KafkaSink) -> None:
        settings = self._settings
        consumption = self.consumption
        source = KafkaSource(
            settings.kafka,
            slot=self._slot,
            on_assign=consumption.on_assign,
            on_revoke=consumption.on_revoke,
            on_lost=consumption.on_lost,
            on_commit=consumption.on_commit,
            on_error=_on_kafka_error,
            logger=kafka_log,
            transactional=settings.consumer.is_exactly_once,
        )
        traces = trace_export.setup(settings) or NO_TRACER  # None when OTEL_ENABLED is false
        events = _task_events(settings)  # None when REDIS_URL is unset
        pipeline = Pipeline(
            settings=settings,
            database=database,
            sink=sink,
            run_io=functools.partial(self.threads.run, "io"),
            tracing=traces,
            dead_letter_max_bytes=sink.max_message_bytes,  # fits the DLQ topic (read at boot)
            task_events=events,
        )
        # What start-up built lives as long as the worker: out of the collector's way. A full
        # collection walks every tracked object, and redis-py alone adds 18,000 of them (one
        # full collection of a worker's start-up heap: 13.7 ms, with redis-py 39 ms).
        gc.freeze()
        self._reporter.booted()
        log.info(
            "worker started",
            extra={"fields": {"slot": self._slot, "pid": os.getpid(), "topic": source.topic}},
        )
        try:
            await consumption.run(source, pipeline)
        finally:
            await self._close(source, sink, database)
            if events is not None:
                await events.close(EVENTS_CLOSE_BUDGET_S)
            traces.close()  # the queued spans, within tracing.SHUTDOWN_BUDGET_S

    async def _sink(self, produce_limit: int) -> KafkaSink:
        """The producer: exactly-once, a transactional one, registered (which fences the
        producer of this slot's previous worker and aborts what it left open)."""
        settings = self._settings
        if not settings.consumer.is_exactly_once:
            return KafkaSink(settings.kafka, max_message_bytes=produce_limit, logger=kafka_log)
        sink = TransactionalSink(
            settings.kafka,
            max_message_bytes=produce_limit,
            transactional_id=kafka.transactional_id(
                settings.kafka, slot=self._slot, process=f"{socket.gethostname()}-{os.getppid()}"
            ),
            logger=kafka_log,
        )
        self.threads.watch("io", sink.overdue)
        await self.threads.run("io", sink.start)
        log.info("transactional producer ready", extra={"fields": {"id": sink.transactional_id}})
        return sink

    def _on_signal(self) -> None:
        # Only the first SIGTERM counts: a signal sent to the whole process group (a terminal,
        # `timeout`, `kill -- -pgid`) arrives twice, once directly and once forwarded by the
        # supervisor. "A second signal exits at once" is the supervisor's job: it SIGKILLs.
        if self._stopping.is_set():
            return
        log.info("stopping: finishing the in-flight batch", extra={"fields": {"slot": self._slot}})
        self._stopping.set()

    async def heartbeat(self) -> None:
        """Every second: a heartbeat, and the worker's gauges. A client call that hangs ends
        the worker (tm.worker.threads); an event loop that hangs stops the heartbeats, and the
        supervisor kills the worker."""
        while True:
            self._reporter.heartbeat()
            metrics.record_memory("worker")
            if self._database is not None:
                in_use, idle = self._database.pool_usage()
                metrics.db_pool_connections.labels("in_use").set(in_use)
                metrics.db_pool_connections.labels("idle").set(idle)
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _close(self, source: KafkaSource, sink: KafkaSink, database: Database) -> None:
        if self.threads.hung is not None:  # its thread is not free: the clients stay as they are
            log.error(
                "leaving the Kafka clients as they are",
                extra={"fields": {"hung": self.threads.hung}},
            )
        else:
            # Leaving the group runs the revoke callback, which needs this loop: run it in the
            # thread.
            await self.threads.run("poll", source.close)
            left = await self.threads.run("io", sink.close, 10.0)
            if left:
                log.error(
                    "producer closed with undelivered messages", extra={"fields": {"n": left}}
                )
        await database.close(5.0)
        self.threads.shutdown()
        log.info(
            "worker stopped",
            extra={
                "fields": {
                    "slot": self._slot,
                    "applied_messages": self.consumption.applied_messages,
                }
            },
        )


def _on_kafka_error(text: str, fatal: bool) -> None:
    if fatal:
        log.error("kafka fatal error", extra={"fields": {"error": text}})
    else:
        log.warning("kafka error", extra={"fields": {"error": text}})


def _task_events(settings: Settings) -> TaskEvents | None:
    """The Redis task-event feed, started; imported only when REDIS_URL is set."""
    if settings.redis.url is None:
        return None
    from tm.adapters.redis import TaskEvents

    events = TaskEvents(settings.redis)
    events.start()
    return events


def main(settings: Settings, *, slot: int, report_fd: int | None) -> int:
    """Entry point of a forked worker; returns the exit status."""
    from tm.observability import logs

    logs.setup(settings.log, settings.otel, environment=settings.environment)
    reporter = Reporter(report_fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor forwards a SIGTERM
    started = time.monotonic()
    try:
        return uvloop.run(Worker(settings, slot=slot, reporter=reporter).run())
    except FencedError as exc:
        reporter.failed(str(exc))
        log.error("worker stopped: fenced", extra={"fields": {"error": str(exc)}})
        return EXIT_FENCED
    except FatalError as exc:
        reporter.failed(str(exc))
        log.error("worker stopped: fatal error", extra={"fields": {"error": str(exc)}})
        return EXIT_FATAL
    except TmError as exc:
        reporter.failed(str(exc))
        log.error("worker stopped", extra={"fields": {"error": str(exc)}})
        return EXIT_CRASH
    except Exception as exc:
        reporter.failed(f"{type(exc).__name__}: {exc}")
        log.exception(
            "worker crashed",
            extra={"fields": {"uptime_s": round(time.monotonic() - started, 1)}},
        )
        return EXIT_CRASH
