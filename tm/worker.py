"""One worker process: everything with a socket or a thread is built here, after the fork.

The worker runs on uvloop. Its Kafka consumer is driven from one thread (``poll``, ``close``:
rebalance and commit callbacks run inside those calls), the producer's acknowledgements are
awaited in another, and the event loop decodes, talks to PostgreSQL and decides. A batch goes
through three stages, each overlapping the others' work on other batches:

1. poll and decode (batch N+1 is polled while batch N is in the database);
2. stage: one database call, then its crawl requests and dead letters are enqueued; one batch
   at a time, in poll order, so an update never overtakes the `new` of its task;
3. acknowledgement: one flush covers every batch staged so far; then the batches are done, in
   poll order, and their offsets are committed asynchronously by the next poll (the result
   comes back in a callback; a commit a rebalance refused is sent again with the next). The
   revoke callback, and so shutdown, commits synchronously.

The state of all this (owned partitions, batches in flight, committable offsets, backoff) is one
pure object, tm.core.offsets.Offsets. A transient failure commits nothing of what is in flight:
the worker seeks the owned partitions of every batch in flight (and of the batch polled
meanwhile, which is dropped) back to their first offsets, pauses everything it owns, backs off,
resumes, and the messages come again. It keeps polling so it stays in the group.
librdkafka keeps a partition's pause flag across a revoke and a later assignment, so the
rebalance callbacks set it themselves: an assigned partition is paused while the worker backs
off and resumed otherwise, and a revoked one is resumed before it goes. Ownership is recorded
inside the callbacks, in the poll thread, before the poll returns: a busy event loop cannot leave
a revoked partition marked owned or an assigned one unknown.

An unreachable or read-only database, or a broker that does not answer, is not a reason to
exit: the worker connects with backoff (it reports ``R 1`` and has not booted, so readiness
says not ready); only a configuration error (bad credentials, a missing database, topics too
small for tm) ends a worker before it boots.

The supervisor hears from the worker through a pipe: ``B`` booted, ``H`` heartbeat (every
second, from the event loop, and only while the poll and io threads make progress: a stuck
loop or a hung client call stops them), ``A n`` partitions owned, ``R 1``/``R 0``
retrying after a transient failure or through again, and ``F text`` the one-line reason before
a fatal exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import uvloop
from confluent_kafka import KafkaError, Message

from tm.adapters import kafka
from tm.adapters.kafka import KafkaSink, KafkaSource
from tm.adapters.postgres import Database
from tm.config import Settings
from tm.core.batch import Batch
from tm.core.decode import DecodeStats
from tm.core.offsets import Offsets
from tm.core.policy import backoff_s
from tm.errors import FatalError, TmError, TransientError
from tm.observability import metrics, tracing
from tm.pipeline import Pipeline, Summary
from tm.supervisor import Reporter

if TYPE_CHECKING:
    from tm.adapters.redis import TaskEvents

log = logging.getLogger("tm.worker")
T = TypeVar("T")

HEARTBEAT_INTERVAL_S = 1.0
REVOKE_BUDGET_S = 20.0  # time given to the in-flight batch on revoke; < session timeout
PAUSED_POLL_S = 0.2  # poll timeout while backing off: keeps the group alive, wakes up soon
# Poll timeouts otherwise; a poll returns as soon as a message is there. Busy (batches in
# flight, or a commit just sent): short, as the next commit waits for the poll to return.
BUSY_POLL_S = 0.005
IDLE_POLL_S = 0.05  # nothing in flight: what a stop or a backoff's end may wait for
POOL_SIZE = 2  # one batch in the database at a time, plus one spare

# Longest a call may run in a worker thread before the worker counts it as hung and stops its
# heartbeats (the supervisor then kills and restarts it). A poll returns within its timeout
# unless a rebalance callback runs inside it, which may wait REVOKE_BUDGET_S for the in-flight
# batch and then commit; io calls (flush, commit) are bounded by the Kafka request timeout.
POLL_STUCK_AFTER_S = REVOKE_BUDGET_S + 40.0
IO_STUCK_MARGIN_S = 30.0  # added to the producer's flush bound for the io thread
EVENTS_CLOSE_BUDGET_S = 2.0  # on shutdown, for the task events still queued for Redis
COMMITS_TIMED = 64  # commits awaiting their answer, kept for the commit-stage metric

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_FATAL = 3  # broken invariant or bad deploy: the supervisor does not hurry a restart


class Worker:
    def __init__(self, settings: Settings, *, slot: int, reporter: Reporter) -> None:
        self._settings = settings
        self._slot = slot
        self._reporter = reporter
        self._stopping = asyncio.Event()
        # The consume loop's state (tm.core.offsets). The rebalance and commit callbacks
        # change it from the poll thread, inside the poll and before it returns, so that a
        # busy event loop cannot leave a revoked partition marked owned: every access holds
        # the lock (a few per batch).
        self._state = Offsets()
        self._lock = threading.Lock()
        self._source: KafkaSource | None = None
        self._staging: asyncio.Task[Summary] | None = None  # the batch in the database stage
        self._unacked: list[Summary] = []  # staged, waiting for their acknowledgements
        self._to_ack = asyncio.Event()
        self._flushing = asyncio.Lock()  # held while a flush waits for acknowledgements
        self._acked = asyncio.Event()  # set when a flush ends
        self._ack_failure: TransientError | None = None  # for the loop to back off
        self._commits_sent: dict[tuple[tuple[int, int], ...], float] = {}  # for the metric
        self._database: Database | None = None
        self._decode_stats = DecodeStats()
        self._poll_thread = ThreadPoolExecutor(1, thread_name_prefix=f"tm-poll-{slot}")
        self._io_thread = ThreadPoolExecutor(1, thread_name_prefix=f"tm-io-{slot}")
        self._loop: asyncio.AbstractEventLoop | None = None
        # When the call now running in each thread began (None: idle), for the heartbeat.
        self._busy_since: dict[str, float | None] = {"poll": None, "io": None}
        self._stuck_after_s = {
            "poll": POLL_STUCK_AFTER_S,
            "io": settings.kafka.request_timeout_ms / 1000 + 5 + IO_STUCK_MARGIN_S,
        }
        self.applied_messages = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGTERM, self._on_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked since the fork
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            connected = await self._connect()
            if connected is None:  # stopped while a dependency was unreachable
                return EXIT_OK
            await self._serve(*connected)
        finally:
            heartbeat.cancel()
        return EXIT_OK

    async def _connect(self) -> tuple[Database, int] | None:
        """Open the pool and read the largest record the producer may send (the topics'
        limits), retrying with backoff while the database is unreachable or read-only (a
        failover) or the broker does not answer; None if a stop came first. A configuration
        error raises."""
        settings = self._settings
        consumer = settings.consumer
        attempt = 0
        while True:
            try:
                produce_limit = await asyncio.to_thread(kafka.produce_limit, settings.kafka)
                database = await Database.open(settings.postgres, max_size=POOL_SIZE)
            except TransientError as exc:
                delay = backoff_s(
                    attempt,
                    initial_s=consumer.retry_backoff_initial_ms / 1000,
                    cap_s=consumer.retry_backoff_max_ms / 1000,
                    jitter=random.random(),  # noqa: S311 (spreading retries, not security)
                )
                if attempt == 0:
                    self._reporter.send("R 1")
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
                self._reporter.send("R 0")
            self._database = database
            return database, produce_limit

    async def _serve(self, database: Database, produce_limit: int) -> None:
        settings = self._settings
        kafka_log = logging.getLogger("tm.kafka")
        sink = KafkaSink(settings.kafka, max_message_bytes=produce_limit, logger=kafka_log)
        source = KafkaSource(
            settings.kafka,
            slot=self._slot,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
            logger=kafka_log,
            error_cb=self._on_kafka_error,
            on_commit=self._on_commit,
        )
        self._source = source
        traces = tracing.setup(settings)  # None when OTEL_ENABLED is false
        events = _task_events(settings)  # None when REDIS_URL is unset
        pipeline = Pipeline(
            settings=settings,
            database=database,
            sink=sink,
            io_executor=self._io_thread,
            tracing=traces,
            dead_letter_max_bytes=sink.max_message_bytes,  # fits the DLQ topic (read at boot)
            task_events=events,
        )
        self._decode_stats = pipeline.decode_stats
        self._reporter.send("B")
        log.info(
            "worker started",
            extra={"fields": {"slot": self._slot, "pid": os.getpid(), "topic": source.topic}},
        )
        try:
            await self._consume(source, pipeline)
        finally:
            await self._close(source, sink, database)
            if events is not None:
                await events.close(EVENTS_CLOSE_BUDGET_S)
            if traces is not None:
                traces.close()  # the queued spans, within tracing.SHUTDOWN_BUDGET_S

    def _on_signal(self) -> None:
        # Only the first SIGTERM counts: a signal sent to the whole process group (a terminal,
        # `timeout`, `kill -- -pgid`) arrives twice, once directly and once forwarded by the
        # supervisor. "A second signal exits at once" is the supervisor's job: it SIGKILLs.
        if self._stopping.is_set():
            return
        log.info("stopping: finishing the in-flight batch", extra={"fields": {"slot": self._slot}})
        self._stopping.set()

    async def _heartbeat(self) -> None:
        reported = False
        while True:
            stuck = stuck_thread(time.monotonic(), self._busy_since, self._stuck_after_s)
            if stuck is None:
                self._reporter.send("H")
                reported = False
            elif not reported:  # no heartbeat: the supervisor kills and restarts this worker
                log.error("worker thread hung; heartbeats stop", extra={"fields": stuck})
                self._reporter.send(f"F {stuck['thread']} thread hung for {stuck['busy_s']} s")
                reported = True
            metrics.record_memory("worker")
            if self._database is not None:
                in_use, idle = self._database.pool_usage()
                metrics.db_pool_connections.labels("in_use").set(in_use)
                metrics.db_pool_connections.labels("idle").set(idle)
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _close(self, source: KafkaSource, sink: KafkaSink, database: Database) -> None:
        # Leaving the group runs the revoke callback, which needs this loop: run it in the thread.
        await self._in_thread("poll", source.close)
        left = await self._in_thread("io", sink.close, 10.0)
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
        """Poll, decode, stage (database + produce) one batch at a time, in order; the
        acknowledgements and commits follow in :meth:`_acknowledge`, off this path."""
        loop = asyncio.get_running_loop()
        consumer = self._settings.consumer
        max_messages = consumer.batch_max_messages
        linger_s = consumer.batch_linger_ms / 1000
        state = self._state
        acker = asyncio.create_task(self._acknowledge(source, pipeline))
        try:
            while not self._stopping.is_set():
                if state.resume_due(loop.time()):
                    source.resume(sorted(state.owned))
                    log.info(
                        "resuming after backoff",
                        extra={"fields": {"partitions": sorted(state.owned)}},
                    )
                # The commit goes with the poll, from the poll thread: the client's calls wait
                # for each other (a commit from another thread would wait for the poll). So
                # while batches are in flight a poll is short, and their commits soon follow
                # their acknowledgements; idle, it waits longer for the next message.
                commit = self._due_commit()
                if state.paused:
                    timeout_s = PAUSED_POLL_S
                elif state.in_flight or commit:
                    timeout_s = BUSY_POLL_S
                else:
                    timeout_s = IDLE_POLL_S
                polled = await self._in_thread(
                    "poll", source.poll, max_messages, timeout_s, commit, linger_s
                )
                messages = self._usable(polled)
                decode_started = time.perf_counter()
                batch = pipeline.assemble(messages) if messages else None
                decode_s = time.perf_counter() - decode_started

                # One batch in the database at a time, in poll order.
                failure = await self._staged()
                if failure is None and acker.done():
                    acker.result()  # a fatal error in the acknowledgements: raise it
                failure = failure or self._ack_failure
                if failure is not None:
                    await self._back_off(source, failure, batch)
                    continue
                if batch is not None:
                    with self._lock:
                        seq = state.admit(batch.first_offsets, batch.committable)
                    self._staging = asyncio.create_task(
                        self._stage(pipeline, batch, messages, seq, decode_s)
                    )

            # Stopping: the last batches reach their end here; their offsets are committed by
            # the revoke callback when close() leaves the group (a commit from here could wait
            # on a rebalance that needs us to poll).
            failure = await self._staged() or await self._drained()
            if failure is not None:
                log.warning(
                    "last batches not applied; they will be consumed again after restart",
                    extra={"fields": {"error": str(failure)}},
                )
        finally:
            acker.cancel()

    async def _stage(
        self, pipeline: Pipeline, batch: Batch, messages: list[Message], seq: int, decode_s: float
    ) -> Summary:
        summary = await pipeline.stage(batch, messages, self._previous_acknowledged)
        summary.seq = seq
        summary.decode_s = decode_s
        self._unacked.append(summary)
        self._to_ack.set()
        return summary

    async def _previous_acknowledged(self) -> None:
        """Before a batch produces: every batch before it is acknowledged. librdkafka's flush
        waits for an empty queue, so a flush under way while the next batch produces would
        wait for that batch too, and under steady load for ever more; this way a flush waits
        for one batch's messages, while the next batch's database call runs. Raises the
        failure of an earlier batch (this one is then retried with it)."""
        failure = await self._drained()
        if failure is not None:
            raise failure

    async def _staged(self) -> TransientError | None:
        """Wait for the batch in the database stage; its transient failure, or None. A fatal
        failure raises."""
        staging, self._staging = self._staging, None
        if staging is None:
            return None
        try:
            await staging
        except TransientError as exc:
            return exc
        return None

    async def _acknowledge(self, source: KafkaSource, pipeline: Pipeline) -> None:
        """Forever: wait for staged batches, wait for the acknowledgement of what they
        produced (one flush), mark them done in poll order (their offsets go with the next
        poll's commit). A transient failure is left in ``_ack_failure`` for the loop to back
        off."""
        state = self._state
        while True:
            await self._to_ack.wait()
            self._to_ack.clear()
            if not self._unacked or self._ack_failure is not None:
                continue
            recovered = False
            async with self._flushing:
                summaries, self._unacked = self._unacked, []
                self._busy_since["io"] = time.monotonic()  # the flush runs in the io thread
                try:
                    await pipeline.acknowledge(summaries)
                except TransientError as exc:
                    self._ack_failure = exc
                    summaries = []
                else:
                    with self._lock:
                        for summary in summaries:
                            state.acked(summary.seq)
                        recovered = state.went_through()
                finally:
                    self._busy_since["io"] = None
            self._acked.set()  # after the lock: a batch waiting to publish may go now
            if recovered:
                self._reporter.send("R 0")  # a batch went through again
            for summary in summaries:
                self.applied_messages += summary.size
                self._record(summary)

    async def _drained(self) -> TransientError | None:
        """Wait until every staged batch is acknowledged (or failed); the failure, or None."""
        while (self._unacked or self._flushing.locked()) and self._ack_failure is None:
            self._acked.clear()
            await self._acked.wait()
        return self._ack_failure

    def _due_commit(self) -> dict[int, int] | None:
        """The offsets that became committable since the last commit (sent with the next
        poll; the result comes to :meth:`_on_commit`), or None."""
        with self._lock:
            due = self._state.take_commit()
        if not due:
            return None
        sent = self._commits_sent
        if len(sent) >= COMMITS_TIMED:  # answers that never came (a rebalance): drop the oldest
            del sent[next(iter(sent))]
        sent[_commit_key(due)] = time.perf_counter()
        return due

    def _record(self, summary: Summary) -> None:
        """Metrics of an acknowledged batch: a handful of updates per batch, none per message."""
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
        ):
            metrics.stage_duration.labels(stage).observe(seconds)
        now_ms = time.time() * 1000
        metrics.observe_latencies((now_ms - ts) / 1000 for ts in summary.timestamps_ms)
        invalid = self._decode_stats.invalid_trace_context
        if invalid:
            metrics.invalid_trace_context.inc(invalid)
            self._decode_stats.invalid_trace_context = 0
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "batch done",
                extra={
                    "fields": {
                        "size": summary.size,
                        "decode_ms": round(summary.decode_s * 1000, 1),
                        "db_ms": round(summary.db_s * 1000, 1),
                        "publish_ms": round(summary.publish_s * 1000, 1),
                        **summary.outcomes,
                        **{f"dlq_{k}": v for k, v in summary.dead_letters.items()},
                    }
                },
            )

    async def _back_off(self, source: KafkaSource, failure: TmError, polled: Batch | None) -> None:
        """Abandon every batch in flight: rewind the owned partitions to their first offsets
        (and those of the batch just polled), pause everything, and set the time to resume."""
        consumer = self._settings.consumer
        async with self._flushing:  # a flush under way ends first (its batches may commit)
            for summary in self._unacked:
                if summary.trace is not None:
                    summary.trace.fail(failure)
            self._unacked = []
            self._ack_failure = None
            delay = backoff_s(
                self._state.attempt,
                initial_s=consumer.retry_backoff_initial_ms / 1000,
                cap_s=consumer.retry_backoff_max_ms / 1000,
                jitter=random.random(),  # noqa: S311 (spreading retries, not security)
            )
            with self._lock:
                attempt = self._state.attempt
                rewind = self._state.failed(
                    asyncio.get_running_loop().time(),
                    delay,
                    polled.first_offsets if polled is not None else None,
                )
                source.rewind(rewind)
                # Paused from now on: an assignment during the backoff is paused too.
                source.pause(sorted(self._state.owned))
        self._reporter.send("R 1")  # retrying: readiness reports the degraded state
        metrics.batch_retries.inc()
        log.warning(
            "batch failed; nothing committed, retrying",
            extra={
                "fields": {
                    "error": str(failure),
                    "attempt": attempt + 1,
                    "retry_in_s": round(delay, 3),
                    "rewound": rewind,
                }
            },
        )

    def _usable(self, polled: list[Message]) -> list[Message]:
        """The polled messages that are real and of partitions still owned (a revoke can land
        between the fetch and the return of a poll)."""
        owned = self._state.owned
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

    # -- callbacks: they run in the poll thread, inside consume()/close() --------------------

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        assert self._source is not None  # noqa: S101
        assigned = {tp.partition for tp in partitions}
        with self._lock:
            # Assign here rather than after the callback, so the pause flag can be set at
            # once: paused while backing off (the loop resumes every owned partition after).
            self._source.assign_in_callback(consumer, partitions, paused=self._state.paused)
            self._state.assigned(assigned)
            owned = len(self._state.owned)
        metrics.rebalances.labels("assign").inc()
        self._reporter.send(f"A {owned}")
        log.info("partitions assigned", extra={"fields": {"partitions": sorted(assigned)}})

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        metrics.rebalances.labels("revoke").inc()
        assert self._loop is not None and self._source is not None  # noqa: S101
        future = asyncio.run_coroutine_threadsafe(self._ready_to_commit(), self._loop)
        try:
            committable = future.result(REVOKE_BUDGET_S + 5)
        except TimeoutError:
            future.cancel()
            committable = {}
            log.warning(
                "revoke: the batches in flight did not finish in time; their partitions go"
                " uncommitted and their messages will be consumed again",
                extra={"fields": {"budget_s": REVOKE_BUDGET_S}},
            )
        if committable:
            try:
                self._source.commit(committable)  # inside the callback: still our partitions
            except TmError as exc:
                log.warning("commit on revoke failed", extra={"fields": {"error": str(exc)}})
        # Not paused when it comes back (librdkafka would keep the flag across assignments).
        self._source.resume_in_callback(consumer, partitions)
        self._forget({tp.partition for tp in partitions}, "revoked")

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        # Lost, not revoked: another member may own them already; never commit them again.
        metrics.rebalances.labels("lost").inc()
        assert self._source is not None  # noqa: S101
        self._source.resume_in_callback(consumer, partitions)
        self._forget({tp.partition for tp in partitions}, "lost")

    def _forget(self, partitions: set[int], how: str) -> None:
        with self._lock:
            self._state.forget(partitions)
            owned = len(self._state.owned)
        self._reporter.send(f"A {owned}")
        log.info(f"partitions {how}", extra={"fields": {"partitions": sorted(partitions)}})

    def _on_commit(self, offsets: dict[int, int], error: str | None, rebalancing: bool) -> None:
        sent_at = self._commits_sent.pop(_commit_key(offsets), None)
        if error is None:
            if sent_at is not None:
                metrics.stage_duration.labels("commit").observe(time.perf_counter() - sent_at)
            return
        with self._lock:
            self._state.commit_refused(offsets)  # sent again with the next commit
        if rebalancing:
            log.info("commit deferred by a rebalance", extra={"fields": {"error": error}})
        else:
            log.warning("commit failed; retried with the next", extra={"fields": {"error": error}})

    def _on_kafka_error(self, error: KafkaError) -> None:
        if error.fatal():
            log.error("kafka fatal error", extra={"fields": {"error": error.str()}})
        else:
            log.warning("kafka error", extra={"fields": {"error": error.str()}})

    async def _in_thread(self, thread: str, call: Callable[..., T], *args: Any) -> T:
        """Run a blocking client call in the poll or io thread, timing it for the heartbeat."""
        executor = self._poll_thread if thread == "poll" else self._io_thread
        self._busy_since[thread] = time.monotonic()
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, call, *args)
        finally:
            self._busy_since[thread] = None

    async def _ready_to_commit(self) -> dict[int, int]:
        """On revoke: wait (up to the budget) for the batches in flight to reach their end;
        return every owned committable offset, for a synchronous commit before they go."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled(), REVOKE_BUDGET_S)
        with self._lock:
            return self._state.take_all()

    async def _settled(self) -> None:
        """The batch in the database stage and every staged batch have reached their end, or
        one failed (the loop then rewinds what is still ours)."""
        staging = self._staging
        if staging is not None:
            await asyncio.wait({staging})
            if staging.cancelled() or staging.exception() is not None:
                return
        await self._drained()


def _commit_key(offsets: dict[int, int]) -> tuple[tuple[int, int], ...]:
    return tuple(sorted(offsets.items()))


def _task_events(settings: Settings) -> TaskEvents | None:
    """The Redis task-event feed, started; imported only when REDIS_URL is set."""
    if settings.redis.url is None:
        return None
    from tm.adapters.redis import TaskEvents

    events = TaskEvents(settings.redis)
    events.start()
    return events


def stuck_thread(
    now: float, busy_since: dict[str, float | None], stuck_after_s: dict[str, float]
) -> dict[str, Any] | None:
    """The first thread whose current call has run longer than its bound, or None."""
    for thread, since in busy_since.items():
        if since is not None and now - since > stuck_after_s[thread]:
            return {"thread": thread, "busy_s": round(now - since, 1)}
    return None


def main(settings: Settings, *, slot: int, report_fd: int | None) -> int:
    """Entry point of a forked worker; returns the exit status."""
    from tm.observability import logs

    logs.setup(settings.log, settings.otel, environment=settings.environment)
    reporter = Reporter(report_fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor forwards a SIGTERM
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
