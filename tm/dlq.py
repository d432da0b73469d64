"""``tm dlq replay``: put dead letters back on the topic they came from, optionally only those
of one reason, once the cause is fixed (a task created late, a limit raised, a bug fixed).

The replay reads the dead-letter topic from its beginning to its end at the time of the call,
and produces each chosen message to its ``dlq_topic`` with its original key, value and headers
(the ``dlq_*`` headers removed). A replayed ``new`` event without a ``task_id`` header gets one:
the id tm gave it from its original coordinates, so replaying twice cannot create two tasks.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import cast

from confluent_kafka import Consumer, Producer, TopicPartition

from tm.adapters import kafka
from tm.config import Settings
from tm.core.decode import new_task_id
from tm.core.messages import DLQ_HEADERS, DLQ_OFFSET, DLQ_PARTITION, DLQ_REASON, DLQ_TOPIC
from tm.errors import KafkaUnavailableError

READ_TIMEOUT_S = 30.0

Headers = list[tuple[str, str | bytes | None]]


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
    base = kafka.client_config(k)
    consumer = Consumer(
        {
            **base,
            "group.id": f"{k.group_id}-dlq-replay-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    producer = Producer({**base, "enable.idempotence": True, "acks": "all"})
    failures: list[str] = []

    def on_delivery(error: object, _message: object) -> None:
        if error is not None:
            failures.append(str(error))

    replayed = skipped = 0
    try:
        meta = consumer.list_topics(k.dlq_topic, timeout=READ_TIMEOUT_S)
        topic = meta.topics.get(k.dlq_topic)
        if topic is None or topic.error is not None:
            raise KafkaUnavailableError(f"dead-letter topic {k.dlq_topic} not found")
        ends: dict[int, int] = {}
        for p in topic.partitions:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(k.dlq_topic, p), timeout=READ_TIMEOUT_S
            )
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(k.dlq_topic, p, 0) for p in ends])
        done = {p: False for p in ends}
        deadline = time.monotonic() + READ_TIMEOUT_S
        while not all(done.values()):
            if time.monotonic() > deadline:
                raise KafkaUnavailableError("reading the dead-letter topic timed out")
            for message in consumer.consume(500, 0.5):
                if message.error() is not None:
                    continue
                partition, offset = message.partition(), message.offset()
                if partition is None or offset is None:
                    continue
                if offset + 1 >= ends[partition]:
                    done[partition] = True
                if offset >= ends[partition]:
                    continue
                headers = cast(Headers, message.headers() or [])
                found = dict(headers)
                message_reason = cast(bytes | None, found.get(DLQ_REASON))
                if reason is not None and message_reason != reason.encode():
                    skipped += 1
                    continue
                source = cast(bytes | None, found.get(DLQ_TOPIC))
                target = source.decode() if source else k.task_status_topic
                replayed += 1
                if dry_run:
                    continue
                producer.produce(
                    target,
                    key=message.key(),
                    value=message.value(),
                    headers=_original_headers(headers, message.timestamp()[1]),
                    on_delivery=on_delivery,
                )
                producer.poll(0)
        left = producer.flush(READ_TIMEOUT_S)
        if left or failures:
            raise KafkaUnavailableError(
                f"{left} replayed message(s) unacknowledged, {len(failures)} failed"
            )
    finally:
        consumer.close()
    return ReplayResult(replayed=replayed, skipped=skipped)
