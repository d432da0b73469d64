"""The stages of one worker's pipeline, each one verb that hands its result to the next:

    decode (Pipeline.decode)            a poll's messages -> Decoded
    apply (Pipeline.apply)              Decoded -> Applied: one set-based database call per
                                        kind, refused rows isolated; the task events queued
    publish (Applied.publish)           Applied -> Published: crawl requests and dead letters
                                        enqueued, never waiting
    acknowledge (Pipeline.acknowledge)  Published batches -> their BatchRecords, once the
                                        broker acknowledged everything they produced

and the worker (tm.worker.consume) only orders them and commits. Nothing here calls back into
the worker and nothing swallows an error: a TransientError leaves the batch uncommitted for the
worker to rewind and retry, a row the database refuses is dead-lettered alone (the batch is
split in halves to find it), and a FatalError stops the worker.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from tm.config import Settings
from tm.core.batch import Batch
from tm.core.decode import DecodeStats, RawMessage, decode_poll
from tm.core.events import transitions
from tm.core.policy import RowRejectionLimit, halves
from tm.errors import RowRejectedError
from tm.pipeline.ports import Database, Sink, TaskEventSink, TransactionOffsets
from tm.pipeline.publish import Publisher
from tm.pipeline.record import NO_TRACER, BatchRecord, Decoded, Tracer

# Largest dead letter when the caller does not say: librdkafka's default message.max.bytes. The
# worker passes its producer's (which fits the DLQ topic's max.message.bytes).
DEAD_LETTER_MAX_BYTES = 1_000_000
# ``run_io(call, *args)``: runs a blocking call in the worker's io thread
# (tm.worker.threads.ClientThreads.run, which bounds it); returns its result.
RunIo = Callable[..., Awaitable[Any]]


class Applied:
    """A batch the database has applied: it knows how to publish itself."""

    __slots__ = ("_batch", "_messages", "_publisher", "_refused", "record")

    def __init__(
        self,
        record: BatchRecord,
        decoded: Decoded,
        refused: list[tuple[int, str]],
        publisher: Publisher,
    ) -> None:
        self.record = record
        self._batch = decoded.batch
        self._messages = decoded.messages
        self._refused = refused
        self._publisher = publisher

    def publish(self) -> Published:
        """Enqueue the batch's crawl requests and dead letters (not acknowledged yet)."""
        record = self.record
        with record.trace.active():
            record.publishing_at = time.perf_counter()
            try:
                self._publisher.publish(self._batch, self._messages, self._refused, record)
            except BaseException as exc:
                record.trace.fail(exc, record)
                raise
        return Published(record)

    def fail(self, error: BaseException) -> None:
        """The batch will not be published (an earlier one failed): its trace says why."""
        self.record.trace.fail(error, self.record)


class Published:
    """A batch whose messages are enqueued: what :meth:`Pipeline.acknowledge` waits for."""

    __slots__ = ("record",)

    def __init__(self, record: BatchRecord) -> None:
        self.record = record

    def fail(self, error: BaseException) -> None:
        self.record.trace.fail(error, self.record)


class Pipeline:
    def __init__(
        self,
        *,
        settings: Settings,
        database: Database,
        sink: Sink,
        run_io: RunIo,
        tracing: Tracer = NO_TRACER,
        dead_letter_max_bytes: int = DEAD_LETTER_MAX_BYTES,
        task_events: TaskEventSink | None = None,
    ) -> None:
        self._task_events = task_events  # None: REDIS_URL unset, no event is even built
        self._tracing = tracing
        self._topic = settings.kafka.task_status_topic
        self._max_result_chars = settings.consumer.max_result_chars
        self._database = database
        self._sink = sink
        self._run_io = run_io
        self._publisher = Publisher(settings, sink, dead_letter_max_bytes=dead_letter_max_bytes)
        self._row_limit = RowRejectionLimit()

    def decode(self, messages: Sequence[RawMessage]) -> Decoded:
        """Decode a poll's messages into a batch (a few microseconds per message)."""
        started = time.perf_counter()
        stats = DecodeStats()
        batch = decode_poll(
            messages, topic=self._topic, max_result_chars=self._max_result_chars, stats=stats
        )
        return Decoded(
            batch,
            messages,
            decode_s=time.perf_counter() - started,
            invalid_trace_contexts=stats.invalid_trace_context,
        )

    async def apply(self, decoded: Decoded, seq: int) -> Applied:
        """Apply the batch (``seq``: the worker's number for it) in the database and queue its
        task events. Raises TransientError (retry the batch) or FatalError."""
        batch = decoded.batch
        record = BatchRecord(decoded, seq, self._tracing.start_batch(batch, decoded.messages))
        with record.trace.active():  # the batch span is current (log lines carry its trace id)
            try:
                record.db_started = time.perf_counter()
                record.created, record.updated, refused = await self._apply(batch)
                if self._task_events is not None:
                    # Committed in PostgreSQL: a created task's event is queued before its
                    # crawl request is even produced, so it precedes the crawler's update.
                    self._task_events.publish(transitions(batch, record.created, record.updated))
                record.applied_at = time.perf_counter()
                record.db_s = record.applied_at - record.db_started
            except BaseException as exc:
                record.trace.fail(exc, record)
                raise
        return Applied(record, decoded, refused, self._publisher)

    async def acknowledge(
        self, published: Sequence[Published], offsets: TransactionOffsets | None = None
    ) -> list[BatchRecord]:
        """Wait until everything produced so far is acknowledged, which covers the ``published``
        batches (and nothing more if no batch was published meanwhile): they may then be
        committed; their records are returned, in order. ``offsets`` (exactly-once): the
        batches' next offsets, committed in one transaction with their outputs. Raises
        KafkaUnavailableError (none of them may be committed) or FatalError."""
        started = time.perf_counter()
        try:
            await self._run_io(self._sink.flush, offsets)
        except BaseException as exc:
            for batch in published:
                batch.fail(exc)
            raise
        acknowledged = time.perf_counter()
        records = []
        for batch in published:
            record = batch.record
            record.publish_s = acknowledged - record.applied_at
            if offsets is not None:
                record.transaction_s = acknowledged - started
            record.trace.end(record)
            records.append(record)
        return records

    async def abandon(self) -> bool:
        """The batches produced since the last acknowledgement will be retried: drop their
        outputs where the sink can (exactly-once: abort the transaction; True if it did)."""
        return bool(await self._run_io(self._sink.abort))

    async def _apply(
        self, batch: Batch
    ) -> tuple[list[str | None], list[str | None], list[tuple[int, str]]]:
        """Apply every row; isolate rows the database refuses by splitting the batch in halves.
        Returns the outcomes (None for a refused row) and ``(message ref, error)`` of refused
        rows."""
        creates, updates = batch.creates, batch.updates
        n = len(creates)
        created: list[str | None] = [None] * n
        updated: list[str | None] = [None] * len(updates)
        refused: list[tuple[int, str]] = []

        async def run(start: int, stop: int) -> None:
            some_creates = creates[start:stop] if start < n else []
            some_updates = updates[max(start - n, 0) : max(stop - n, 0)]
            try:
                got_created, got_updated = await self._database.apply(some_creates, some_updates)
            except RowRejectedError as exc:
                if stop - start == 1:
                    ref = batch.create_refs[start] if start < n else batch.update_refs[start - n]
                    refused.append((ref, str(exc)))
                    return
                for part in halves(start, stop):
                    await run(*part)
                return
            created[start : start + len(got_created)] = got_created
            first_update = max(start - n, 0)
            updated[first_update : first_update + len(got_updated)] = got_updated

        rows = n + len(updates)
        if rows:
            await run(0, rows)
            self._row_limit.record(rejected=len(refused), applied=rows - len(refused))
        return created, updated, refused
