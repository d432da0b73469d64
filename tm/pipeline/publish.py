"""What a batch produces once the database has applied it: the crawl requests of created (and
duplicate) tasks, and the dead letters of refused messages, each cut to fit its topic. It only
enqueues; the acknowledgement is a step of its own (tm.pipeline.stages.Pipeline.acknowledge)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from tm.config import Settings
from tm.core import dead_letter
from tm.core.batch import Batch
from tm.core.decode import RawMessage, iso_utc
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
)
from tm.pipeline.ports import Sink
from tm.pipeline.record import BatchRecord

_PUBLISHED = frozenset({Outcome.CREATED, Outcome.DUPLICATE})
_DEAD: dict[str, Reason] = {
    Outcome.TASK_NOT_FOUND.value: Reason.TASK_NOT_FOUND,
    Outcome.INVALID_TRANSITION.value: Reason.INVALID_TRANSITION,
}


class Publisher:
    def __init__(self, settings: Settings, sink: Sink, *, dead_letter_max_bytes: int) -> None:
        self._sink = sink
        self._topic = settings.kafka.task_status_topic
        self._requests_topic = settings.kafka.web_crawl_request_topic
        self._dlq_topic = settings.kafka.dlq_topic
        self._dead_letter_max_bytes = dead_letter_max_bytes

    def publish(
        self,
        batch: Batch,
        messages: Sequence[RawMessage],
        refused: list[tuple[int, str]],
        record: BatchRecord,
    ) -> None:
        """Produce the crawl requests of created (and duplicate) tasks, and the dead letters."""
        created, updated = record.created, record.updated
        outcomes = record.outcomes
        outcomes.update(o for o in created if o is not None)  # counted in C, not per row
        outcomes.update(o for o in updated if o is not None)
        traceparents = record.trace.traceparents
        for task, ref, outcome in zip(batch.creates, batch.create_refs, created, strict=True):
            if outcome in _PUBLISHED:
                self._crawl_request(task, traceparents.get(ref, task.traceparent))
        for update, ref, outcome in zip(batch.updates, batch.update_refs, updated, strict=True):
            reason = _DEAD.get(outcome) if outcome is not None else None
            if reason is not None:
                text = (
                    f"task {update.id} does not exist"
                    if reason is Reason.TASK_NOT_FOUND
                    else f"task {update.id} cannot move to {update.status} from its current"
                    " status (allowed: new -> completed|error, error -> completed)"
                )
                self._dead_letter(messages, ref, reason, text, record)
        for ref, rejected in batch.rejected:
            self._dead_letter(messages, ref, rejected.reason, rejected.error, record)
        for ref, text in refused:
            self._dead_letter(messages, ref, Reason.ROW_REJECTED, text, record)

    def _crawl_request(self, task: NewTask, traceparent: str | None) -> None:
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
        record: BatchRecord,
    ) -> None:
        message = messages[ref]
        record.dead_letters[reason] += 1
        record.dead_lettered.append((ref, reason))
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
