"""The real broker: topics, headers round-trip, committed offsets."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import msgspec
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from harness import unique
from tm.adapters import kafka
from tm.adapters.kafka import Assignment, KafkaSource
from tm.config import Settings
from tm.errors import KafkaUnavailableError

pytestmark = pytest.mark.integration


def test_create_topics_creates_only_missing(settings: Settings, topic: str) -> None:
    first = kafka.create_topics(settings.kafka, [topic], partitions=3)
    second = kafka.create_topics(settings.kafka, [topic, f"{topic}-b"], partitions=2)
    assert first == {topic: "created"}
    assert second == {topic: "exists", f"{topic}-b": "created"}
    topics = kafka.describe(settings.kafka, timeout_s=10).topics
    assert topics[topic] == 3
    assert topics[f"{topic}-b"] == 2


def test_a_message_round_trips_with_its_headers_and_its_commit_is_the_next_offset(
    settings: Settings, topic: str
) -> None:
    kafka.create_topics(settings.kafka, [topic], partitions=1)
    headers: list[tuple[str, str | bytes | None]] = [  # as produce()'s stubs type them
        ("task_type", b"web-crawl"),
        ("status", b"new"),
        ("timestamp", b"2025-08-10T10:18:59.023Z"),
        ("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    ]
    base = kafka.client_config(settings.kafka)
    producer = Producer({**base, "enable.idempotence": True, "acks": "all"})
    producer.produce(topic, value=b'{"user_email":"a@b.co"}', key=None, headers=headers)
    assert producer.flush(10) == 0

    group = unique("tm-test-group")
    consumer = Consumer(
        {
            **base,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.subscribe([topic])
        message = None
        for _ in range(60):
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                break
        assert message is not None and message.error() is None
        assert message.value() == b'{"user_email":"a@b.co"}'
        assert message.key() is None
        assert message.headers() == headers
        consumer.commit(message=message, asynchronous=False)
        committed = consumer.committed([TopicPartition(topic, 0)], timeout=10)
        offset = message.offset()
        assert offset is not None  # a message without error has its offset
        assert committed[0].offset == offset + 1
    finally:
        consumer.close()


def test_describe_unreachable_broker_raises_transient(settings: Settings) -> None:
    broken = msgspec.structs.replace(settings.kafka, brokers=("127.0.0.1:1",))
    with pytest.raises(KafkaUnavailableError):
        kafka.describe(broken, timeout_s=1.5)


def test_the_group_metadata_is_at_hand_while_a_rebalance_callback_runs(
    settings: Settings, topic: str
) -> None:
    """Exactly-once takes the member's group metadata for each transaction, from the event
    loop, while the poll thread may be inside a rebalance callback that waits for that loop.
    Asked of librdkafka then, the call waits for the callback to return (a deadlock when the
    callback waits for the caller); the source answers from what it took after its last poll."""
    kafka.create_topics(settings.kafka, [topic], partitions=2)
    kafka_settings = msgspec.structs.replace(
        settings.kafka, task_status_topic=topic, group_id=unique("tm-test-group")
    )
    answered: list[object] = []
    in_callback = threading.Event()
    assigned = threading.Event()

    def on_assign(assignment: Assignment) -> None:
        assignment.take(paused=False)
        assigned.set()

    def on_revoke(_partitions: list[int]) -> None:
        asker = threading.Thread(target=lambda: answered.append(first.group_metadata()))
        asker.start()
        asker.join(10)  # the callback waits for it, as the revoke waits for the event loop
        in_callback.set()

    def ignore(*_args: object) -> None:
        pass

    def source(
        assign: Callable[[Assignment], None], revoke: Callable[[list[int]], None]
    ) -> KafkaSource:
        return KafkaSource(
            kafka_settings,
            slot=0,
            on_assign=assign,
            on_revoke=revoke,
            on_lost=ignore,
            on_commit=ignore,
            on_error=ignore,
            transactional=True,
        )

    first = source(on_assign, on_revoke)
    second = None
    try:
        deadline = time.monotonic() + 60
        while not assigned.is_set() and time.monotonic() < deadline:
            first.poll(1, 0.2)
        assert assigned.is_set(), "no assignment within a minute"
        second = source(lambda a: a.take(paused=False), ignore)  # joins: a partition is revoked
        while not in_callback.is_set() and time.monotonic() < deadline:
            first.poll(1, 0.2)
            second.poll(1, 0.2)
        assert in_callback.is_set(), "no revoke within a minute"
        assert len(answered) == 1 and answered[0] is not None  # answered inside the callback
    finally:
        first.close()
        if second is not None:
            second.close()
