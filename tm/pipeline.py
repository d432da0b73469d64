"""The pipeline of one worker, wired in one place: decode a poll into a batch, apply it with one
set-based call per kind, enqueue crawl requests and dead letters (:meth:`Pipeline.stage`),
then wait for their acknowledgements (:meth:`Pipeline.acknowledge`, which covers every batch
staged so far). What comes out is a Summary per batch; the worker commits its offsets once it is
acknowledged, in poll order (tm.core.offsets).

Nothing here swallows an error. A TransientError leaves the batch uncommitted for the worker to
rewind and retry; a row the database refuses is isolated by splitting the batch and only that
row is dead-lettered; FatalError stops the worker.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol, cast

from confluent_kafka import Message

from tm.config import Settings
from tm.core import dead_letter
from tm.core.batch import Batch
from tm.core.decode import DecodeStats, decode_poll, iso_utc
from tm.core.messages import (
    CRAWL_REQUEST_ENCODER,
    DLQ_ERROR,
    DLQ_OFFSET,
    DLQ_PARTITION,
    DLQ_REASON,
    DLQ_TIMESTAMP,
    DLQ_TOPIC,
    CrawlRequest,
    NewTask,
    Outcome,
    Reason,
    StatusUpdate,
    TaskEvent,
)
from tm.core.policy import RowRejectionLimit, halves
from tm.errors import RowRejectedError

if TYPE_CHECKING:
    from tm.observability.tracing import BatchTrace, Tracing

# What a consumed message's headers() returns (the stubs also allow a dict, for produce()).
_Headers = list[tuple[str, bytes | None]] | None
_PUBLISHED = frozenset({Outcome.CREATED, Outcome.DUPLICATE})
_CREATED, _UPDATED = Outcome.CREATED.value, Outcome.UPDATED.value  # plain str: fast to compare
# Largest dead letter when the caller does not say: librdkafka's default message.max.bytes. The
# worker passes its producer's (which fits the DLQ topic's max.message.bytes).
DEAD_LETTER_MAX_BYTES = 1_000_000
_DEAD: dict[str, Reason] = {
    Outcome.TASK_NOT_FOUND.value: Reason.TASK_NOT_FOUND,
    Outcome.INVALID_TRANSITION.value: Reason.INVALID_TRANSITION,
}


class Sink(Protocol):
    """The producer. ``produce`` only enqueues and never blocks for long; ``flush`` blocks
    until every message produced since the last flush is acknowledged and raises
    KafkaUnavailableError when any was not (run it in a thread)."""

    def produce(
        self,
        topic: str,
        *,
        key: bytes | str | None,
        value: bytes | None,
        headers: list[tuple[str, bytes | str | None]],
        timestamp_ms: int = 0,
    ) -> None: ...

    def flush(self) -> None: ...


class TaskEventSink(Protocol):
    """The task-event feed (tm.adapters.redis.TaskEvents). ``publish`` only queues: it never
    blocks and never raises (what cannot be sent is dropped and counted)."""

    def publish(self, events: list[TaskEvent]) -> None: ...


class Database(Protocol):
    """One transaction per call: new tasks first, then status updates; one outcome per row, in
    order. Raises RowRejectedError when one row's data is refused (nothing is written),
    DatabaseUnavailableError when the call may succeed later, FatalError otherwise."""

    async def apply(
        self, creates: list[NewTask], updates: list[StatusUpdate]
    ) -> tuple[list[str], list[str]]: ...


class Summary:
    """What one batch did, for metrics and the per-batch debug line."""

    __slots__ = (
        "committable",
        "db_s",
        "dead_letters",
        "decode_s",
        "outcomes",
        "publish_s",
        "seq",
        "size",
        "staged_at",
        "timestamps_ms",
        "trace",
    )

    def __init__(self, batch: Batch) -> None:
        self.size = batch.size
        self.committable = batch.committable
        self.timestamps_ms = batch.timestamps_ms
        self.outcomes: Counter[str] = Counter()
        self.dead_letters: Counter[str] = Counter()
        # Stage durations in seconds; decode is timed by the worker. publish_s runs from the
        # end of the database call to the acknowledgement of everything the batch produced.
        self.decode_s = self.db_s = self.publish_s = self.staged_at = 0.0
        self.seq = 0  # the worker's sequence number of the batch (tm.core.offsets)
        self.trace: BatchTrace | None = None


class Pipeline:
    def __init__(
        self,
        *,
        settings: Settings,
        database: Database,
        sink: Sink,
        io_executor: Executor,
        tracing: Tracing | None = None,
        dead_letter_max_bytes: int = DEAD_LETTER_MAX_BYTES,
        task_events: TaskEventSink | None = None,
    ) -> None:
        self._task_events = task_events  # None: REDIS_URL unset, no event is even built
        self._dead_letter_max_bytes = dead_letter_max_bytes
        self._tracing = tracing  # None: tracing is off, and costs one `if` per batch/request
        self._topic = settings.kafka.task_status_topic
        self._requests_topic = settings.kafka.web_crawl_request_topic
        self._dlq_topic = settings.kafka.dlq_topic
        self._max_result_chars = settings.consumer.max_result_chars
        self._database = database
        self._sink = sink
        self._io = io_executor
        self._row_limit = RowRejectionLimit()
        self.decode_stats = DecodeStats()

    def assemble(self, messages: Sequence[Message]) -> Batch:
        """Decode a poll's messages into a batch (a few microseconds per message)."""
        return decode_poll(
            messages,
            topic=self._topic,
            max_result_chars=self._max_result_chars,
            stats=self.decode_stats,
        )

    async def process(self, batch: Batch, messages: Sequence[Message]) -> Summary:
        """:meth:`stage` then :meth:`acknowledge`: the batch is then ready to commit."""
        summary = await self.stage(batch, messages)
        await self.acknowledge([summary])
        return summary

    async def stage(
        self,
        batch: Batch,
        messages: Sequence[Message],
        before_publishing: Callable[[], Awaitable[None]] | None = None,
    ) -> Summary:
        """Apply the batch, await ``before_publishing`` if given, then enqueue its crawl
        requests and dead letters; they are not acknowledged yet (:meth:`acknowledge`).
        Raises TransientError (retry the batch) or FatalError."""
        if self._tracing is None:
            return await self._stage(batch, messages, None, before_publishing)
        trace = self._tracing.start_batch(batch, messages)
        with trace.active():  # the batch span is current; an exception ends the spans with it
            summary = await self._stage(batch, messages, trace, before_publishing)
        summary.trace = trace
        return summary

    async def acknowledge(self, summaries: Sequence[Summary]) -> None:
        """Wait until everything produced so far is acknowledged, which covers the staged
        batches ``summaries`` (and nothing more if no batch is staged meanwhile: see
        ``before_publishing``): they may then be committed. Raises KafkaUnavailableError (none
        of them may be committed) or FatalError."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._io, self._sink.flush)
        except BaseException as exc:
            for summary in summaries:
                if summary.trace is not None:
                    summary.trace.fail(exc)
            raise
        acknowledged = time.perf_counter()
        for summary in summaries:
            summary.publish_s = acknowledged - summary.staged_at
            if summary.trace is not None:
                summary.trace.end(summary.outcomes, summary.dead_letters)

    async def _stage(
        self,
        batch: Batch,
        messages: Sequence[Message],
        trace: BatchTrace | None,
        before_publishing: Callable[[], Awaitable[None]] | None,
    ) -> Summary:
        summary = Summary(batch)
        started = time.perf_counter()
        if trace is not None:
            trace.db_started(rows=len(batch.creates) + len(batch.updates))
        created, updated, refused = await self._apply(batch)
        if self._task_events is not None:
            # Committed in PostgreSQL: a created task's event is queued before its crawl
            # request is even produced, so it precedes the crawler's update of the task.
            self._task_events.publish(_transitions(batch, created, updated))
        applied = time.perf_counter()
        if trace is not None:
            trace.db_ended()
        summary.db_s = applied - started
        summary.staged_at = applied  # publish_s counts the wait for the previous batch too
        if before_publishing is not None:
            await before_publishing()
        outcomes = summary.outcomes
        outcomes.update(o for o in created if o is not None)  # counted in C, not per row
        outcomes.update(o for o in updated if o is not None)
        for task, ref, outcome in zip(batch.creates, batch.create_refs, created, strict=True):
            if outcome is None:
                continue
            if trace is not None:
                trace.outcome(ref, task.id, outcome)
            if outcome in _PUBLISHED:
                self._publish_request(task, ref, trace)
        for update, ref, outcome in zip(batch.updates, batch.update_refs, updated, strict=True):
            if outcome is None:
                continue
            if trace is not None:
                trace.outcome(ref, update.id, outcome)
            reason = _DEAD.get(outcome)
            if reason is not None:
                text = (
                    f"task {update.id} does not exist"
                    if reason is Reason.TASK_NOT_FOUND
                    else f"task {update.id} cannot move to {update.status} from its current"
                    " status (allowed: new -> completed|error, error -> completed)"
                )
                self._dead_letter(messages[ref], reason, text, summary)
                if trace is not None:
                    trace.dead_lettered(ref, reason, self._dlq_topic)
        for ref, rejected in batch.rejected:
            self._dead_letter(messages[ref], rejected.reason, rejected.error, summary)
            if trace is not None:
                trace.dead_lettered(ref, rejected.reason, self._dlq_topic)
        for ref, text in refused:
            self._dead_letter(messages[ref], Reason.ROW_REJECTED, text, summary)
            if trace is not None:
                trace.dead_lettered(ref, Reason.ROW_REJECTED, self._dlq_topic)

        return summary

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

    def _publish_request(self, task: NewTask, ref: int, trace: BatchTrace | None) -> None:
        task_id = task.id
        headers: list[tuple[str, bytes | str | None]] = [
            ("task_id", task_id),
            ("timestamp", task.timestamp),
        ]
        traceparent = task.traceparent
        if traceparent is not None:
            # Traced: the message's consumer span is the parent (DESIGN §2). Otherwise the
            # upstream context passes through unchanged: tm exported nothing to name instead.
            if trace is not None:
                traceparent = trace.crawl_request(ref, self._requests_topic, task_id, traceparent)
            headers.append(("traceparent", traceparent))
            if task.tracestate is not None:
                headers.append(("tracestate", task.tracestate))
        value = CRAWL_REQUEST_ENCODER.encode(
            CrawlRequest(task.user_email, task.user_query, task.base_url)
        )
        self._sink.produce(self._requests_topic, key=task_id, value=value, headers=headers)

    def _dead_letter(
        self,
        message: Message,
        reason: Reason,
        error: str,
        summary: Summary,
    ) -> None:
        summary.dead_letters[reason] += 1
        # Cut to fit (the source topic may take larger records, or hold them compressed): a
        # dead letter the DLQ topic refuses would fail the batch at every retry.
        key, value, headers = dead_letter.fit(
            max_bytes=self._dead_letter_max_bytes,
            key=message.key(),
            value=message.value(),
            headers=list(cast(_Headers, message.headers()) or ()),
            dlq_headers=[
                (DLQ_REASON, reason.value),
                (DLQ_ERROR, error),
                (DLQ_TOPIC, message.topic() or self._topic),
                (DLQ_PARTITION, str(message.partition())),
                (DLQ_OFFSET, str(message.offset())),
                (DLQ_TIMESTAMP, iso_utc(datetime.now(UTC))),
            ],
        )
        self._sink.produce(
            self._dlq_topic,
            key=key,
            value=value,
            headers=headers,
            # Keep the original timestamp: a replayed `new` event gets back its task id.
            timestamp_ms=message.timestamp()[1],
        )


def _transitions(
    batch: Batch, created: list[str | None], updated: list[str | None]
) -> list[TaskEvent]:
    """The task events of an applied batch: tasks created and updates applied, in the order
    the database applied them (new tasks first, then updates in input order). About a
    microsecond per event: plain tuples, the trace id sliced out of the traceparent."""
    events: list[TaskEvent] = [
        (task.id, "new", task.timestamp, task.traceparent[3:35] if task.traceparent else None)
        for task, outcome in zip(batch.creates, created, strict=True)
        if outcome == _CREATED
    ]
    if updated:
        events += [
            (
                update.id,
                update.status.value,
                iso_utc(update.finished_at),
                update.traceparent[3:35] if update.traceparent else None,
            )
            for update, outcome in zip(batch.updates, updated, strict=True)
            if outcome == _UPDATED
        ]
    return events
