"""One worker process: everything with a socket or a thread is built here, after the fork.

The worker runs on uvloop. Its Kafka consumer is driven from one thread (``poll``, ``close``:
rebalance callbacks run inside those calls), acknowledgements and commits wait in another, and
the event loop decodes, talks to PostgreSQL and decides. While batch N is in the database, the
poll of batch N+1 is already running, so polling and decoding overlap the database call.

A transient failure commits nothing: the worker seeks the partitions of the failed batch (and of
the batch polled meanwhile, which is dropped) back to their first offsets, pauses everything it
owns, backs off, resumes, and the messages come again. It keeps polling so it stays in the group.

The supervisor hears from the worker through a pipe: ``B`` booted, ``H`` heartbeat (every
second, from the event loop: a stuck loop stops them), ``A n`` partitions owned, ``R 1``/``R 0``
retrying after a transient failure or through again, and ``F text`` the one-line reason before
a fatal exit.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import uvloop
from confluent_kafka import KafkaError, Message

from tm.adapters.kafka import KafkaSink, KafkaSource
from tm.adapters.postgres import Database
from tm.config import Settings
from tm.core.batch import Batch, merge_first_offsets
from tm.core.decode import DecodeStats
from tm.core.policy import backoff_s
from tm.errors import CommitDeferredError, FatalError, TmError, TransientError
from tm.observability import metrics, tracing
from tm.pipeline import Pipeline, Summary
from tm.supervisor import Reporter

log = logging.getLogger("tm.worker")

HEARTBEAT_INTERVAL_S = 1.0
REVOKE_BUDGET_S = 20.0  # time given to the in-flight batch on revoke; < session timeout
PAUSED_POLL_S = 0.2  # poll timeout while backing off: keeps the group alive, wakes up soon
POOL_SIZE = 2  # one batch in the database at a time, plus one spare

PR_SET_PDEATHSIG = 1  # prctl option, from <linux/prctl.h>

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_FATAL = 3  # broken invariant or bad deploy: the supervisor does not hurry a restart


class Worker:
    def __init__(self, settings: Settings, *, slot: int, reporter: Reporter) -> None:
        self._settings = settings
        self._slot = slot
        self._reporter = reporter
        self._stopping = asyncio.Event()
        self._owned: set[int] = set()
        self._inflight: asyncio.Task[Summary] | None = None
        self._source: KafkaSource | None = None
        self._inflight_decode_s = 0.0
        # Committable offsets a rebalance refused (ILLEGAL_GENERATION): sent with the next
        # commit, or by the revoke callback; dropped for partitions that went elsewhere.
        self._deferred: dict[int, int] = {}
        self._database: Database | None = None
        self._decode_stats = DecodeStats()
        self._poll_thread = ThreadPoolExecutor(1, thread_name_prefix=f"tm-poll-{slot}")
        self._io_thread = ThreadPoolExecutor(1, thread_name_prefix=f"tm-io-{slot}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self.applied_messages = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGTERM, self._on_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked since the fork
        settings = self._settings
        database = await Database.open(settings.postgres, max_size=POOL_SIZE)
        kafka_log = logging.getLogger("tm.kafka")
        sink = KafkaSink(settings.kafka, logger=kafka_log)
        source = KafkaSource(
            settings.kafka,
            slot=self._slot,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
            logger=kafka_log,
            error_cb=self._on_kafka_error,
        )
        self._source = source
        traces = tracing.setup(settings)  # None when OTEL_ENABLED is false
        pipeline = Pipeline(
            settings=settings,
            database=database,
            sink=sink,
            io_executor=self._io_thread,
            tracing=traces,
        )
        self._decode_stats = pipeline.decode_stats
        self._database = database
        self._reporter.send("B")
        log.info(
            "worker started",
            extra={"fields": {"slot": self._slot, "pid": os.getpid(), "topic": source.topic}},
        )
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            await self._consume(source, pipeline)
        finally:
            heartbeat.cancel()
            await self._close(source, sink, database)
            if traces is not None:
                traces.close()  # the queued spans, within tracing.SHUTDOWN_BUDGET_S
        return EXIT_OK

    def _on_signal(self) -> None:
        # Only the first SIGTERM counts: a signal sent to the whole process group (a terminal,
        # `timeout`, `kill -- -pgid`) arrives twice, once directly and once forwarded by the
        # supervisor. "A second signal exits at once" is the supervisor's job: it SIGKILLs.
        if self._stopping.is_set():
            return
        log.info("stopping: finishing the in-flight batch", extra={"fields": {"slot": self._slot}})
        self._stopping.set()

    async def _heartbeat(self) -> None:
        while True:
            self._reporter.send("H")
            metrics.record_memory("worker")
            if self._database is not None:
                in_use, idle = self._database.pool_usage()
                metrics.db_pool_connections.labels("in_use").set(in_use)
                metrics.db_pool_connections.labels("idle").set(idle)
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _close(self, source: KafkaSource, sink: KafkaSink, database: Database) -> None:
        loop = asyncio.get_running_loop()
        # Leaving the group runs the revoke callback, which needs this loop: run it in the thread.
        await loop.run_in_executor(self._poll_thread, source.close)
        left = await loop.run_in_executor(self._io_thread, sink.close, 10.0)
        if left:
            log.error("producer closed with undelivered messages", extra={"fields": {"n": left}})
        await database.close(5.0)
        self._poll_thread.shutdown(wait=False)
        self._io_thread.shutdown(wait=False)
        log.info(
            "worker stopped",
            extra={"fields": {"slot": self._slot, "applied_messages": self.applied_messages}},
        )

    # -- the loop ----------------------------------------------------------------------------

    async def _consume(self, source: KafkaSource, pipeline: Pipeline) -> None:
        loop = asyncio.get_running_loop()
        consumer = self._settings.consumer
        max_messages = consumer.batch_max_messages
        linger_s = consumer.batch_linger_ms / 1000
        attempt = 0
        resume_at: float | None = None
        inflight_batch: Batch | None = None
        while not self._stopping.is_set():
            if resume_at is not None and loop.time() >= resume_at:
                source.resume(sorted(self._owned))
                resume_at = None
            timeout_s = linger_s if resume_at is None else PAUSED_POLL_S
            polled = await loop.run_in_executor(
                self._poll_thread, source.poll, max_messages, timeout_s
            )
            messages = self._usable(polled)
            decode_started = time.perf_counter()
            batch = pipeline.assemble(messages) if messages else None
            decode_s = time.perf_counter() - decode_started

            if self._inflight is not None:
                failure = await self._finish(self._inflight, source)
                self._inflight = None
                if failure is not None:
                    assert inflight_batch is not None  # noqa: S101
                    pending = [inflight_batch.first_offsets]
                    if batch is not None:
                        pending.append(batch.first_offsets)
                    resume_at = loop.time() + self._back_off(
                        source, merge_first_offsets(*pending), attempt, failure
                    )
                    attempt += 1
                    continue
                if attempt:
                    self._reporter.send("R 0")  # a batch went through again
                attempt = 0
            if batch is not None:
                inflight_batch = batch
                self._inflight = asyncio.create_task(pipeline.process(batch, messages))
                self._inflight_decode_s = decode_s
            elif self._deferred and self._inflight is None:
                # Idle, with offsets a rebalance refused: the poll has served the rebalance.
                await self._commit(source, self._owned_deferred())

        if self._inflight is not None:
            # The last batch is committed by the revoke callback when close() leaves the group:
            # a commit from here could wait on a rebalance that needs us to poll. So the task
            # stays in self._inflight for _ready_to_commit to find.
            failure = await self._finish(self._inflight, source, commit=False)
            if failure is not None:
                log.warning(
                    "last batch not applied; it will be consumed again after restart",
                    extra={"fields": {"error": str(failure)}},
                )

    async def _finish(
        self, task: asyncio.Task[Summary], source: KafkaSource, *, commit: bool = True
    ) -> TransientError | None:
        """Wait for a batch and commit it; return its transient failure, raise a fatal one."""
        try:
            summary = await task
            summary.decode_s = self._inflight_decode_s
            if commit and not summary.committed:
                # Offsets a rebalance kept from being committed go with these (newer wins).
                committable = {**self._owned_deferred(), **self._owned_offsets(summary)}
                summary.commit_s = await self._commit(source, committable)
                summary.committed = True
        except TransientError as exc:
            return exc
        self.applied_messages += summary.size
        self._record(summary)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "batch done",
                extra={
                    "fields": {
                        "size": summary.size,
                        "decode_ms": round(summary.decode_s * 1000, 1),
                        "db_ms": round(summary.db_s * 1000, 1),
                        "publish_ms": round(summary.publish_s * 1000, 1),
                        "commit_ms": round(summary.commit_s * 1000, 1),
                        **summary.outcomes,
                        **{f"dlq_{k}": v for k, v in summary.dead_letters.items()},
                    }
                },
            )
        return None

    def _record(self, summary: Summary) -> None:
        """Metrics of a committed batch: a handful of updates per batch, none per message."""
        metrics.messages_consumed.inc(summary.size)
        metrics.batch_size.observe(summary.size)
        for outcome, count in summary.outcomes.items():
            metrics.messages_applied.labels(outcome).inc(count)
        for reason, count in summary.dead_letters.items():
            metrics.dead_letters.labels(reason).inc(count)
        for stage, seconds in (
            ("decode", summary.decode_s),
            ("db", summary.db_s),
            ("publish", summary.publish_s),
            ("commit", summary.commit_s),
        ):
            metrics.stage_duration.labels(stage).observe(seconds)
        now_ms = time.time() * 1000
        metrics.observe_latencies((now_ms - ts) / 1000 for ts in summary.timestamps_ms)
        invalid = self._decode_stats.invalid_trace_context
        if invalid:
            metrics.invalid_trace_context.inc(invalid)
            self._decode_stats.invalid_trace_context = 0

    async def _commit(self, source: KafkaSource, committable: dict[int, int]) -> float:
        """Commit from the io thread; a refusal by a rebalance keeps the offsets for later
        (the next commit, an idle loop turn, or the revoke callback). Returns the seconds taken."""
        started = time.perf_counter()
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._io_thread, source.commit, committable
            )
            self._deferred = {}
        except CommitDeferredError as exc:
            if not self._deferred:
                log.info("commit deferred by a rebalance", extra={"fields": {"error": str(exc)}})
            self._deferred = committable
        return time.perf_counter() - started

    def _owned_deferred(self) -> dict[int, int]:
        return {p: o for p, o in self._deferred.items() if p in self._owned}

    def _owned_offsets(self, summary: Summary) -> dict[int, int]:
        return {p: o for p, o in summary.committable.items() if p in self._owned}

    def _back_off(
        self, source: KafkaSource, first_offsets: dict[int, int], attempt: int, error: TmError
    ) -> float:
        """Rewind the owned partitions of the failed batches, pause everything; return the
        delay before resuming."""
        consumer = self._settings.consumer
        rewind = {p: o for p, o in first_offsets.items() if p in self._owned}
        source.rewind(rewind)
        source.pause(sorted(self._owned))
        self._reporter.send("R 1")  # retrying: readiness reports the degraded state
        metrics.batch_retries.inc()
        delay = backoff_s(
            attempt,
            initial_s=consumer.retry_backoff_initial_ms / 1000,
            cap_s=consumer.retry_backoff_max_ms / 1000,
            jitter=random.random(),  # noqa: S311 (spreading retries, not security)
        )
        log.warning(
            "batch failed; nothing committed, retrying",
            extra={
                "fields": {
                    "error": str(error),
                    "attempt": attempt + 1,
                    "retry_in_s": round(delay, 3),
                    "rewound": rewind,
                }
            },
        )
        return delay

    def _usable(self, polled: list[Message]) -> list[Message]:
        """The polled messages that are real and of partitions still owned (a revoke can land
        between the fetch and the return of a poll)."""
        owned = self._owned
        if all(m.error() is None and m.partition() in owned for m in polled):
            return polled
        usable = []
        for message in polled:
            error = message.error()
            if error is None:
                if message.partition() in owned:
                    usable.append(message)
            elif error.fatal() or error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise FatalError(f"consumer: {error.name()}: {error.str()}")
            else:
                log.warning("consumer error", extra={"fields": {"error": error.str()}})
        return usable

    # -- rebalance callbacks: they run in the poll thread, inside consume()/close() ----------

    def _call_in_loop(self, coro: Any, timeout_s: float) -> None:
        assert self._loop is not None  # noqa: S101
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            future.result(timeout_s)
        except TimeoutError:
            future.cancel()

    def _on_assign(self, _consumer: Any, partitions: list[Any]) -> None:
        self._call_in_loop(self._assigned([tp.partition for tp in partitions]), 10.0)

    def _on_revoke(self, _consumer: Any, partitions: list[Any]) -> None:
        metrics.rebalances.labels("revoke").inc()
        revoked = [tp.partition for tp in partitions]
        assert self._loop is not None and self._source is not None  # noqa: S101
        future = asyncio.run_coroutine_threadsafe(self._ready_to_commit(), self._loop)
        try:
            committable = future.result(REVOKE_BUDGET_S + 5)
        except TimeoutError:
            future.cancel()
            committable = {}
        if committable:
            try:
                self._source.commit(committable)  # inside the callback: still our partitions
            except TmError as exc:
                log.warning("commit on revoke failed", extra={"fields": {"error": str(exc)}})
        self._call_in_loop(self._forget(revoked), 10.0)

    def _on_lost(self, _consumer: Any, partitions: list[Any]) -> None:
        # Lost, not revoked: another member may own them already; never commit them again.
        metrics.rebalances.labels("lost").inc()
        self._call_in_loop(self._forget([tp.partition for tp in partitions]), 10.0)

    def _on_kafka_error(self, error: KafkaError) -> None:
        if error.fatal():
            log.error("kafka fatal error", extra={"fields": {"error": error.str()}})
        else:
            log.warning("kafka error", extra={"fields": {"error": error.str()}})

    async def _assigned(self, partitions: list[int]) -> None:
        metrics.rebalances.labels("assign").inc()
        self._owned.update(partitions)
        self._reporter.send(f"A {len(self._owned)}")
        log.info("partitions assigned", extra={"fields": {"partitions": sorted(partitions)}})

    async def _ready_to_commit(self) -> dict[int, int]:
        """On revoke: wait for the in-flight batch (up to the budget); if it succeeded and is
        not committed yet, claim its commit and return its owned offsets."""
        deferred = self._owned_deferred()
        self._deferred = {}
        inflight = self._inflight
        if inflight is None:
            return deferred
        if not inflight.done():
            await asyncio.wait({inflight}, timeout=REVOKE_BUDGET_S)
        if not inflight.done() or inflight.cancelled() or inflight.exception() is not None:
            return deferred  # abandoned or failed: the loop rewinds what is still ours
        summary = inflight.result()
        if summary.committed:
            return deferred
        summary.committed = True
        return {**deferred, **self._owned_offsets(summary)}

    async def _forget(self, partitions: list[int]) -> None:
        self._owned.difference_update(partitions)
        for partition in partitions:
            self._deferred.pop(partition, None)  # another member owns them now
        self._reporter.send(f"A {len(self._owned)}")
        log.info("partitions revoked", extra={"fields": {"partitions": sorted(partitions)}})


def _stop_with_parent() -> None:
    """Ask Linux for a SIGTERM when the supervisor dies (even by SIGKILL): no orphan workers."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the heartbeat pipe closing is the fallback
        return
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(settings: Settings, *, slot: int, report_fd: int | None) -> int:
    """Entry point of a forked worker; returns the exit status."""
    from tm.observability import logs

    logs.setup(settings.log, settings.otel, environment=settings.environment)
    reporter = Reporter(report_fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor forwards a SIGTERM
    _stop_with_parent()
    started = time.monotonic()
    try:
        return uvloop.run(Worker(settings, slot=slot, reporter=reporter).run())
    except FatalError as exc:
        reporter.send(f"F {exc}")
        log.error("worker stopped: fatal error", extra={"fields": {"error": str(exc)}})
        return EXIT_FATAL
    except TmError as exc:
        reporter.send(f"F {exc}")
        log.error("worker stopped", extra={"fields": {"error": str(exc)}})
        return EXIT_CRASH
    except Exception as exc:
        reporter.send(f"F {type(exc).__name__}: {exc}")
        log.exception(
            "worker crashed",
            extra={"fields": {"uptime_s": round(time.monotonic() - started, 1)}},
        )
        return EXIT_CRASH
