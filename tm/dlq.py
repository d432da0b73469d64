"""``tm dlq replay``: put dead letters back on the topic they came from, optionally only those
of one reason, once the cause is fixed (a task created late, a limit raised, a bug fixed).

The replay reads the dead-letter topic from its beginning to its end at the time of the call,
and produces each chosen message to its ``dlq_topic`` with its original key, value and headers
(the ``dlq_*`` headers removed). A replayed ``new`` event without a ``task_id`` header gets one:
the id tm gave it from its original coordinates, so replaying twice cannot create two tasks.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import cast

from tm.adapters.kafka.tools import Headers, Publisher, TopicReader
from tm.config import Settings
from tm.core.decode import new_task_id
from tm.core.messages import DLQ_HEADERS, DLQ_OFFSET, DLQ_PARTITION, DLQ_REASON, DLQ_TOPIC
from tm.errors import KafkaUnavailableError

READ_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class ReplayResult:
    replayed: int
    skipped: int


def _original_headers(headers: Headers, timestamp_ms: int) -> Headers:
    """The headers as the producer sent them, plus the task id a `new` event was given."""
    found = {k: v for k, v in headers}
    kept = [(k, v) for k, v in headers if k not in DLQ_HEADERS]
    if found.get("status") == b"new" and "task_id" not in found:
        try:
            task_id = new_task_id(
                (cast(bytes, found[DLQ_TOPIC])).decode(),
                int(cast(bytes, found[DLQ_PARTITION])),
                int(cast(bytes, found[DLQ_OFFSET])),
                timestamp_ms,
            )
        except (KeyError, ValueError, AttributeError):
            return kept
        kept.append(("task_id", str(task_id).encode()))
    return kept


def replay(settings: Settings, *, reason: str | None, dry_run: bool = False) -> ReplayResult:
    k = settings.kafka
    publisher = Publisher(k)
    replayed = skipped = 0
    with TopicReader(k, group_id=f"{k.group_id}-dlq-replay-{uuid.uuid4().hex[:8]}") as reader:
        ends = reader.ends(k.dlq_topic, timeout_s=READ_TIMEOUT_S)
        if ends is None:
            raise KafkaUnavailableError(f"dead-letter topic {k.dlq_topic} not found")
        try:
            for record in reader.read(k.dlq_topic, ends, timeout_s=READ_TIMEOUT_S):
                found = dict(record.headers)
                message_reason = cast(bytes | None, found.get(DLQ_REASON))
                if reason is not None and message_reason != reason.encode():
                    skipped += 1
                    continue
                source = cast(bytes | None, found.get(DLQ_TOPIC))
                target = source.decode() if source else k.task_status_topic
                replayed += 1
                if dry_run:
                    continue
                publisher.produce(
                    target,
                    key=record.key,
                    value=record.value,
                    headers=_original_headers(record.headers, record.timestamp_ms),
                )
        except TimeoutError as exc:
            raise KafkaUnavailableError("reading the dead-letter topic timed out") from exc
        delivery = publisher.flush(READ_TIMEOUT_S)
        if not delivery.is_complete:
            raise KafkaUnavailableError(
                f"{delivery.unacknowledged} replayed message(s) unacknowledged,"
                f" {len(delivery.failures)} failed"
            )
    return ReplayResult(replayed=replayed, skipped=skipped)
