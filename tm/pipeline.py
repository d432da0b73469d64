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
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Protocol

from tm.config import Settings
from tm.core import dead_letter
from tm.core.batch import Batch
from tm.core.decode import DecodeStats, RawMessage, decode_poll, iso_utc
from tm.core.events import transitions
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

_PUBLISHED = frozenset({Outcome.CREATED, Outcome.DUPLICATE})
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
    """What one batch did: its outcomes (for its trace and the task events), its counts (for
    metrics and the per-batch debug line) and its stage times (``time.perf_counter()``)."""

    __slots__ = (
        "committable",
        "created",
        "db_s",
        "db_started",
        "dead_lettered",
        "dead_letters",
        "decode_s",
        "outcomes",
        "publish_s",
        "publishing_at",
        "seq",
        "size",
        "staged_at",
        "timestamps_ms",
        "trace",
        "updated",
    )

    def __init__(self, batch: Batch, trace: Trace) -> None:
        self.size = batch.size
        self.committable = batch.committable
        self.timestamps_ms = batch.timestamps_ms
        self.trace = trace
        # One outcome per create and per update, in batch order (None: the row was refused).
        self.created: list[str | None] = []
        self.updated: list[str | None] = []
        self.outcomes: Counter[str] = Counter()
        self.dead_letters: Counter[str] = Counter()
        self.dead_lettered: list[tuple[int, Reason]] = []  # (message ref, reason)
        # Stage durations in seconds; decode is timed by the worker. publish_s runs from the
        # end of the database call to the acknowledgement of everything the batch produced.
        self.decode_s = self.db_s = self.publish_s = 0.0
        self.db_started = self.staged_at = self.publishing_at = 0.0
        self.seq = 0  # the worker's sequence number of the batch (tm.core.offsets)


class Trace(Protocol):
    """The trace of one batch (tm.observability.tracing.BatchTrace): it reads the Summary."""

    @property
    def traceparents(self) -> Mapping[int, str]:
        """Message ref -> the traceparent its crawl request carries, for the traced messages
        only; every other message's crawl request carries its upstream traceparent unchanged."""
        ...

    def active(self) -> AbstractContextManager[object]: ...
    def end(self, summary: Summary) -> None: ...
    def fail(self, error: BaseException, summary: Summary) -> None: ...


class Tracer(Protocol):
    """Starts a Trace per batch (tm.observability.tracing.Tracing)."""

    def start_batch(self, batch: Batch, messages: Sequence[RawMessage]) -> Trace: ...
    def close(self) -> None: ...


class _NoTrace:
    """Tracing off: a trace that records nothing."""

    traceparents: Mapping[int, str] = MappingProxyType({})  # (a class attribute)

    def active(self) -> AbstractContextManager[object]:
        return self._context

    def end(self, summary: Summary) -> None:
        pass

    def fail(self, error: BaseException, summary: Summary) -> None:
        pass

    _context = contextlib.nullcontext()


class _NoTracer:
    def start_batch(self, batch: Batch, messages: Sequence[RawMessage]) -> Trace:
        return NO_TRACE

    def close(self) -> None:
        pass


NO_TRACE: Trace = _NoTrace()
NO_TRACER: Tracer = _NoTracer()


class Pipeline:
    def __init__(
        self,
        *,
        settings: Settings,
        database: Database,
        sink: Sink,
        io_executor: Executor,
        tracing: Tracer = NO_TRACER,
        dead_letter_max_bytes: int = DEAD_LETTER_MAX_BYTES,
        task_events: TaskEventSink | None = None,
    ) -> None:
        self._task_events = task_events  # None: REDIS_URL unset, no event is even built
        self._dead_letter_max_bytes = dead_letter_max_bytes
        self._tracing = tracing
        self._topic = settings.kafka.task_status_topic
        self._requests_topic = settings.kafka.web_crawl_request_topic
        self._dlq_topic = settings.kafka.dlq_topic
        self._max_result_chars = settings.consumer.max_result_chars
        self._database = database
        self._sink = sink
        self._io = io_executor
        self._row_limit = RowRejectionLimit()
        self.decode_stats = DecodeStats()

    def assemble(self, messages: Sequence[RawMessage]) -> Batch:
        """Decode a poll's messages into a batch (a few microseconds per message)."""
        return decode_poll(
            messages,
            topic=self._topic,
            max_result_chars=self._max_result_chars,
            stats=self.decode_stats,
        )

    async def process(self, batch: Batch, messages: Sequence[RawMessage]) -> Summary:
        """:meth:`stage` then :meth:`acknowledge`: the batch is then ready to commit."""
        summary = await self.stage(batch, messages)
        await self.acknowledge([summary])
        return summary

    async def stage(
        self,
        batch: Batch,
        messages: Sequence[RawMessage],
        before_publishing: Callable[[], Awaitable[None]] | None = None,
    ) -> Summary:
        """Apply the batch, await ``before_publishing`` if given, then enqueue its crawl
        requests and dead letters; they are not acknowledged yet (:meth:`acknowledge`).
        Raises TransientError (retry the batch) or FatalError."""
        summary = Summary(batch, self._tracing.start_batch(batch, messages))
        with summary.trace.active():  # the batch span is current (log lines carry its trace id)
            try:
                await self._stage(batch, messages, summary, before_publishing)
            except BaseException as exc:
                summary.trace.fail(exc, summary)
                raise
        return summary

    async def _stage(
        self,
        batch: Batch,
        messages: Sequence[RawMessage],
        summary: Summary,
        before_publishing: Callable[[], Awaitable[None]] | None,
    ) -> None:
        summary.db_started = time.perf_counter()
        summary.created, summary.updated, refused = await self._apply(batch)
        if self._task_events is not None:
            # Committed in PostgreSQL: a created task's event is queued before its crawl
            # request is even produced, so it precedes the crawler's update of the task.
            self._task_events.publish(transitions(batch, summary.created, summary.updated))
        summary.staged_at = time.perf_counter()  # publish_s counts the wait for the previous
        summary.db_s = summary.staged_at - summary.db_started
        if before_publishing is not None:
            await before_publishing()
        summary.publishing_at = time.perf_counter()
        self._publish(batch, messages, refused, summary)

    async def acknowledge(self, summaries: Sequence[Summary]) -> None:
        """Wait until everything produced so far is acknowledged, which covers the staged
        batches ``summaries`` (and nothing more if no batch is staged meanwhile: see
        ``before_publishing``): they may then be committed. Raises KafkaUnavailableError (none
        of them may be committed) or FatalError."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._io, self._sink.flush)
        except BaseException as exc:
            for summary in summaries:
                summary.trace.fail(exc, summary)
            raise
        acknowledged = time.perf_counter()
        for summary in summaries:
            summary.publish_s = acknowledged - summary.staged_at
            summary.trace.end(summary)

    def _publish(
        self,
        batch: Batch,
        messages: Sequence[RawMessage],
        refused: list[tuple[int, str]],
        summary: Summary,
    ) -> None:
        """Produce the crawl requests of created (and duplicate) tasks, and the dead letters."""
        created, updated = summary.created, summary.updated
        outcomes = summary.outcomes
        outcomes.update(o for o in created if o is not None)  # counted in C, not per row
        outcomes.update(o for o in updated if o is not None)
        traceparents = summary.trace.traceparents
        for task, ref, outcome in zip(batch.creates, batch.create_refs, created, strict=True):
            if outcome in _PUBLISHED:
                self._publish_request(task, traceparents.get(ref, task.traceparent))
        for update, ref, outcome in zip(batch.updates, batch.update_refs, updated, strict=True):
            reason = _DEAD.get(outcome) if outcome is not None else None
            if reason is not None:
                text = (
                    f"task {update.id} does not exist"
                    if reason is Reason.TASK_NOT_FOUND
                    else f"task {update.id} cannot move to {update.status} from its current"
                    " status (allowed: new -> completed|error, error -> completed)"
                )
                self._dead_letter(messages, ref, reason, text, summary)
        for ref, rejected in batch.rejected:
            self._dead_letter(messages, ref, rejected.reason, rejected.error, summary)
        for ref, text in refused:
            self._dead_letter(messages, ref, Reason.ROW_REJECTED, text, summary)

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

    def _publish_request(self, task: NewTask, traceparent: str | None) -> None:
        """``traceparent``: the message's consumer span when traced (DESIGN §2), otherwise the
        upstream context unchanged (tm exported nothing to name instead)."""
        task_id = task.id
        headers: list[tuple[str, bytes | str | None]] = [
            ("task_id", task_id),
            ("timestamp", task.timestamp),
        ]
        if traceparent is not None:
            headers.append(("traceparent", traceparent))
            if task.tracestate is not None:
                headers.append(("tracestate", task.tracestate))
        value = CRAWL_REQUEST_ENCODER.encode(
            CrawlRequest(task.user_email, task.user_query, task.base_url)
        )
        self._sink.produce(self._requests_topic, key=task_id, value=value, headers=headers)

    def _dead_letter(
        self,
        messages: Sequence[RawMessage],
        ref: int,
        reason: Reason,
        error: str,
        summary: Summary,
    ) -> None:
        message = messages[ref]
        summary.dead_letters[reason] += 1
        summary.dead_lettered.append((ref, reason))
        # Cut to fit (the source topic may take larger records, or hold them compressed): a
        # dead letter the DLQ topic refuses would fail the batch at every retry.
        key, value, headers = dead_letter.fit(
            max_bytes=self._dead_letter_max_bytes,
            key=message.key(),
            value=message.value(),
            headers=list(message.headers() or ()),
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
