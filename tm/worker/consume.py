"""The consume loop of one worker: it orders the pipeline's stages (tm.pipeline.stages), which
overlap on neighbouring batches:

1. poll and decode (batch N+1 is polled while batch N is in the database);
2. apply: one database call per batch, one batch at a time, in poll order;
3. publish and acknowledge: every applied batch waiting (in poll order, so an update never
   overtakes the `new` of its task) has its crawl requests and dead letters enqueued, then one
   flush (exactly-once: one transaction) covers them all, while the next batches are applied;
   then the batches are done, in poll order, and the commit step (tm.worker.commit) takes their
   offsets: by default they go asynchronously with the next poll, and synchronously from the
   revoke callback (and so at shutdown). Nothing is enqueued while a flush waits, so a flush
   waits for its own batches only; and a transaction that takes longer than a batch takes to
   arrive does not make the next ones queue behind it one by one: they share the next one.

The state of all this (owned partitions, batches in flight, committable offsets, backoff) is one
pure object, tm.core.offsets.Offsets. A transient failure commits nothing of what is in flight:
the loop seeks the owned partitions of every batch in flight (and of the batch polled meanwhile,
which is dropped) back to their first offsets, pauses everything it owns, backs off, resumes,
and the messages come again. It keeps polling so it stays in the group.

librdkafka keeps a partition's pause flag across a revoke and a later assignment, so the assign
callback sets it: an assigned partition is paused while the loop backs off and resumed
otherwise (the source resumes a partition that goes). Ownership is recorded inside the
callbacks, in the poll thread, before the poll returns: a busy event loop cannot leave a revoked
partition marked owned or an assigned one unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from tm.adapters.kafka import Assignment
from tm.config import ConsumerSettings
from tm.core.batch import Batch
from tm.core.decode import RawMessage
from tm.core.offsets import Offsets
from tm.core.policy import backoff_s
from tm.errors import PartitionsGoneError, TmError, TransientError
from tm.observability import metrics
from tm.pipeline import Applied, BatchRecord, Decoded, Published, TransactionOffsets
from tm.protocol import Reporter
from tm.worker import report
from tm.worker.commit import Commit, PollCommit
from tm.worker.progress import Progress, log_progress
from tm.worker.threads import REVOKE_BUDGET_S, ClientThreads

log = logging.getLogger("tm.worker")

PAUSED_POLL_S = 0.2  # poll timeout while backing off: keeps the group alive, wakes up soon
# Poll timeouts otherwise; a poll returns as soon as a message is there. Busy (batches in
# flight, or a commit just sent): short, as the next commit waits for the poll to return.
BUSY_POLL_S = 0.005
IDLE_POLL_S = 0.05  # nothing in flight: what a stop or a backoff's end may wait for
# Applied batches waiting for a flush to end before they are published: the database may run
# this far ahead of the broker, no further (a slow flush stops the loop here).
MAX_WAITING_BATCHES = 8


class Source(Protocol):
    """The consumer (tm.adapters.kafka.KafkaSource); every call blocks (the poll thread) but
    ``group_metadata``, a local read."""

    def poll(
        self, max_messages: int, timeout_s: float, commit: dict[int, int] | None, linger_s: float
    ) -> Sequence[RawMessage]: ...
    def commit(self, committable: dict[int, int]) -> None: ...
    def group_metadata(self) -> object: ...
    def lag(self) -> int: ...
    def rewind(self, first_offsets: dict[int, int]) -> None: ...
    def pause(self, partitions: list[int]) -> None: ...
    def resume(self, partitions: list[int]) -> None: ...


class Stages(Protocol):
    """The pipeline (tm.pipeline.Pipeline)."""

    def decode(self, messages: Sequence[RawMessage]) -> Decoded: ...
    async def apply(self, decoded: Decoded, seq: int) -> Applied: ...
    async def acknowledge(
        self, published: Sequence[Published], offsets: TransactionOffsets | None
    ) -> list[BatchRecord]: ...
    async def abandon(self) -> bool: ...


class Consumption:
    def __init__(
        self,
        settings: ConsumerSettings,
        *,
        reporter: Reporter,
        threads: ClientThreads,
        stopping: asyncio.Event,
        commit: Callable[[Offsets, threading.Lock], Commit] = PollCommit,
        progress_interval_s: float = 0.0,
        slot: int = 0,
    ) -> None:
        self._settings = settings
        self._reporter = reporter
        self._threads = threads
        self._stopping = stopping
        # The rebalance and commit callbacks change the state from the poll thread, inside the
        # poll and before it returns: every access holds the lock (a few per batch).
        self.state = Offsets()
        self._lock = threading.Lock()
        self._commit = commit(self.state, self._lock)
        self._source: Source | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._staging: asyncio.Task[None] | None = None  # the batch being applied
        self._applied: list[Applied] = []  # applied, waiting to be published, in poll order
        self._to_ack = asyncio.Event()
        self._flushing = asyncio.Lock()  # held while batches are published and acknowledged
        self._acked = asyncio.Event()  # set when a flush ends
        self._acker: asyncio.Task[None] | None = None  # _acknowledge, while run() runs
        self._ack_failure: TransientError | None = None  # for the loop to back off
        self.applied_messages = 0
        self.progress = Progress(progress_interval_s, now=time.monotonic(), slot=slot)

    async def run(self, source: Source, pipeline: Stages) -> None:
        """Poll, decode and apply one batch at a time, in order, until the stop; publishing,
        the acknowledgements and the commits follow in :meth:`_acknowledge`, off this path.
        The last batches reach their end before it returns; their offsets are committed by the
        revoke callback when the source leaves the group (a commit from here could wait on a
        rebalance that needs us to poll)."""
        self._source = source
        self._loop = loop = asyncio.get_running_loop()
        consumer = self._settings
        max_messages = consumer.batch_max_messages
        linger_s = consumer.batch_linger_ms / 1000
        state = self.state
        self._acker = acker = asyncio.create_task(self._acknowledge(source, pipeline))
        progress = asyncio.create_task(
            log_progress(self.progress, functools.partial(self._threads.run, "poll", source.lag))
        )
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
                commit = self._commit.due()
                if state.paused:
                    timeout_s = PAUSED_POLL_S
                elif state.in_flight or commit:
                    timeout_s = BUSY_POLL_S
                else:
                    timeout_s = IDLE_POLL_S
                polled = await self._threads.run(
                    "poll", source.poll, max_messages, timeout_s, commit, linger_s
                )
                messages = self._owned(polled)
                decoded = pipeline.decode(messages) if messages else None

                # One batch in the database at a time, in poll order.
                failure = await self._staged()
                if acker.done():
                    acker.result()  # a fatal error in the acknowledgements wins: raise it
                failure = failure or self._ack_failure
                if failure is not None:
                    polled_batch = decoded.batch if decoded else None
                    await self._back_off(source, pipeline, failure, polled_batch)
                    continue
                if decoded is not None:
                    batch = decoded.batch
                    with self._lock:
                        seq = state.admit(batch.first_offsets, batch.committable)
                    self._staging = asyncio.create_task(self._apply(pipeline, decoded, seq))

            failure = await self._staged() or await self._drained()
            if failure is not None:
                log.warning(
                    "last batches not applied; they will be consumed again after restart",
                    extra={"fields": {"error": str(failure)}},
                )
        finally:
            acker.cancel()
            progress.cancel()

    def _owned(self, polled: Sequence[RawMessage]) -> Sequence[RawMessage]:
        """The polled messages of partitions still owned (a revoke can land between the fetch
        and the return of a poll)."""
        owned = self.state.owned
        if all(m.partition() in owned for m in polled):
            return polled
        return [m for m in polled if m.partition() in owned]

    async def _apply(self, pipeline: Stages, decoded: Decoded, seq: int) -> None:
        """Apply the batch, then leave it to :meth:`_acknowledge` to publish once there is room
        among the batches waiting. The failure of an earlier batch fails this one too (it is
        retried with it)."""
        applied = await pipeline.apply(decoded, seq)
        while len(self._applied) >= MAX_WAITING_BATCHES and self._ack_failure is None:
            if self._acker is not None and self._acker.done():
                self._acker.result()  # a fatal error ended the acknowledgements: raise it
            self._acked.clear()
            await self._acked.wait()
        if self._ack_failure is not None:
            applied.fail(self._ack_failure)
            raise self._ack_failure
        self._applied.append(applied)
        self._to_ack.set()

    async def _staged(self) -> TransientError | None:
        """Wait for the batch being applied and published; its transient failure, or None. A
        fatal failure raises."""
        staging, self._staging = self._staging, None
        if staging is None:
            return None
        try:
            await staging
        except TransientError as exc:
            return exc
        return None

    async def _acknowledge(self, source: Source, pipeline: Stages) -> None:
        """Forever: wait for applied batches, publish every one waiting, wait for the
        acknowledgement of what they produced (one flush; exactly-once: the commit of their
        transaction, their offsets in it), hand them to the commit step in poll order. A
        transient failure is left in ``_ack_failure`` for the loop to back off."""
        while True:
            await self._to_ack.wait()
            self._to_ack.clear()
            if not self._applied or self._ack_failure is not None:
                continue
            records: list[BatchRecord] = []
            recovered = False
            try:
                async with self._flushing:  # a backoff waits for it: these batches go first
                    applied, self._applied = self._applied, []
                    seqs = {batch.record.seq for batch in applied}
                    try:
                        offsets = self._commit.with_outputs(seqs, source)
                    except PartitionsGoneError as exc:  # nothing produced: nothing to abort
                        for batch in applied:
                            batch.fail(exc)
                        self._ack_failure = exc
                        report.transaction(aborted_by=exc.cause)
                        continue
                    try:
                        published = self._publish(applied)
                        records = await pipeline.acknowledge(published, offsets)
                    except TransientError as exc:
                        self._ack_failure = exc
                        if offsets is not None:
                            report.transaction(aborted_by=getattr(exc, "cause", "batch_failed"))
                    else:
                        recovered = self._commit.done(records)
                        if offsets is not None:
                            report.transaction(committed=1)
            finally:  # after the lock: a batch waiting for room may go now (or learn why not)
                self._acked.set()
            if recovered:
                self._reporter.retrying(False)  # a batch went through again
            for record in records:
                self.applied_messages += record.size
                self.progress.add(record, report.record(record))

    @staticmethod
    def _publish(applied: list[Applied]) -> list[Published]:
        """Enqueue the batches' outputs, in poll order; if one fails, the rest fail with it."""
        published: list[Published] = []
        for i, batch in enumerate(applied):
            try:
                published.append(batch.publish())
            except BaseException as exc:
                for done in published:
                    done.fail(exc)
                for waiting in applied[i + 1 :]:
                    waiting.fail(exc)
                raise
        return published

    async def _drained(self) -> TransientError | None:
        """Wait until every staged batch is acknowledged (or failed); the transient failure,
        or None. A fatal one, which ended the acknowledgements, raises."""
        while (self._applied or self._flushing.locked()) and self._ack_failure is None:
            if self._acker is not None and self._acker.done():
                self._acker.result()
            self._acked.clear()
            await self._acked.wait()
        return self._ack_failure

    async def _back_off(
        self, source: Source, pipeline: Stages, failure: TmError, polled: Batch | None
    ) -> None:
        """Abandon every batch in flight: drop their outputs where the sink can (exactly-once:
        abort the open transaction), rewind the owned partitions to their first offsets (and
        those of the batch just polled), pause everything, and set the time to resume."""
        consumer = self._settings
        async with self._flushing:  # a flush under way ends first (its batches may commit)
            for applied in self._applied:
                applied.fail(failure)
            self._applied = []
            self._ack_failure = None
            if await pipeline.abandon():
                report.transaction(aborted_by="batch_failed")
            delay = backoff_s(
                self.state.attempt,
                initial_s=consumer.retry_backoff_initial_ms / 1000,
                cap_s=consumer.retry_backoff_max_ms / 1000,
                jitter=random.random(),  # noqa: S311 (spreading retries, not security)
            )
            with self._lock:
                attempt = self.state.attempt
                rewind = self.state.failed(
                    asyncio.get_running_loop().time(),
                    delay,
                    polled.first_offsets if polled is not None else None,
                )
                source.rewind(rewind)
                # Paused from now on: an assignment during the backoff is paused too.
                source.pause(sorted(self.state.owned))
        self._reporter.retrying(True)  # readiness reports the degraded state
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

    # -- callbacks: they run in the poll thread, inside poll()/close() -----------------------

    def on_assign(self, assignment: Assignment) -> None:
        with self._lock:
            # Take them here, so the pause flag is set at once: paused while backing off (the
            # loop resumes every owned partition after).
            assignment.take(paused=self.state.paused)
            self.state.assigned(set(assignment.partitions))
            owned = len(self.state.owned)
        metrics.rebalances.labels("assign").inc()
        self._reporter.owned(owned)
        log.info(
            "partitions assigned", extra={"fields": {"partitions": sorted(assignment.partitions)}}
        )

    def on_revoke(self, partitions: list[int]) -> None:
        metrics.rebalances.labels("revoke").inc()
        assert self._loop is not None and self._source is not None  # noqa: S101
        future = asyncio.run_coroutine_threadsafe(self._settled(), self._loop)
        try:
            future.result(REVOKE_BUDGET_S + 5)
        except TimeoutError:
            future.cancel()
            log.warning(
                "revoke: the batches in flight did not finish in time; their partitions go"
                " uncommitted and their messages will be consumed again",
                extra={"fields": {"budget_s": REVOKE_BUDGET_S}},
            )
        else:
            self._commit.before_revoke(self._source)
        self._forget(partitions, "revoked")

    def on_lost(self, partitions: list[int]) -> None:
        # Lost, not revoked: another member may own them already; never commit them again.
        metrics.rebalances.labels("lost").inc()
        self._forget(partitions, "lost")

    def _forget(self, partitions: list[int], how: str) -> None:
        with self._lock:
            self.state.forget(set(partitions))
            owned = len(self.state.owned)
        self._reporter.owned(owned)
        log.info(f"partitions {how}", extra={"fields": {"partitions": sorted(partitions)}})

    def on_commit(self, offsets: dict[int, int], error: str | None, rebalancing: bool) -> None:
        self._commit.on_commit(offsets, error, rebalancing)

    async def _settled(self) -> None:
        """On revoke: wait (up to the budget) until the batch being applied and every published
        batch have reached their end, or one failed (the loop then rewinds what is still ours)."""
        # A fatal error is the loop's to raise: here the partitions just go.
        with contextlib.suppress(TimeoutError, TmError):
            async with asyncio.timeout(REVOKE_BUDGET_S):
                staging = self._staging
                if staging is not None:
                    await asyncio.wait({staging})
                    if staging.cancelled() or staging.exception() is not None:
                        return
                await self._drained()
