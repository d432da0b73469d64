"""The real broker: the exactly-once producer's transactions. What an aborted transaction
produced is never seen by a read_committed reader; offsets commit with the transaction or not at
all; a new producer with the same transactional id fences the old one and aborts what it left
open."""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgspec
import pytest
from confluent_kafka import Consumer, TopicPartition

from harness import unique
from harness.kafka import read_topic
from tm.adapters import kafka
from tm.adapters.kafka import TransactionalSink
from tm.adapters.kafka.transactions import OVERRUN_S, TransactionAbortedError
from tm.config import Settings
from tm.errors import FatalError
from tm.pipeline import TransactionOffsets

pytestmark = pytest.mark.integration

HEADERS: list[tuple[str, bytes | str | None]] = [("status", b"new")]


@pytest.fixture
def topics(settings: Settings, topic: str) -> Iterator[tuple[Settings, str]]:
    """A task-status topic (``topic``) and an output topic, and settings pointing at the first."""
    kafka.create_topics(settings.kafka, [topic, f"{topic}-out"], partitions=1)
    kafka_settings = msgspec.structs.replace(settings.kafka, task_status_topic=topic)
    yield msgspec.structs.replace(settings, kafka=kafka_settings), f"{topic}-out"


def sink(settings: Settings, transactional_id: str) -> TransactionalSink:
    made = TransactionalSink(
        settings.kafka, max_message_bytes=100_000, transactional_id=transactional_id
    )
    made.start()
    return made


def values(settings: Settings, topic: str, *, committed_only: bool) -> list[bytes]:
    config = kafka.client_config(settings.kafka)
    return [m.value() for m in read_topic(config, topic, uncommitted=not committed_only)]


def produce(target: TransactionalSink, topic: str, *names: bytes) -> None:
    for name in names:
        target.produce(topic, key=None, value=name, headers=HEADERS)


def test_what_an_aborted_transaction_produced_is_never_read_committed(
    topics: tuple[Settings, str],
) -> None:
    settings, out = topics
    producer = sink(settings, unique("tm-test-txn"))
    try:
        produce(producer, out, b"a1", b"a2", b"a3")
        assert producer.abort() is True
        produce(producer, out, b"b1", b"b2")
        producer.flush()
    finally:
        producer.close(10)
    assert values(settings, out, committed_only=True) == [b"b1", b"b2"]
    # The aborted ones did reach the log: only their transaction's abort hides them.
    assert values(settings, out, committed_only=False) == [b"a1", b"a2", b"a3", b"b1", b"b2"]


def test_offsets_are_committed_with_their_transaction_and_not_without_it(
    topics: tuple[Settings, str],
) -> None:
    settings, out = topics
    source_topic = settings.kafka.task_status_topic
    group = unique("tm-test-group")
    config = kafka.client_config(settings.kafka)
    consumer = Consumer({**config, "group.id": group, "enable.auto.commit": False})
    producer = sink(settings, unique("tm-test-txn"))
    try:
        consumer.subscribe([source_topic])
        for _ in range(60):  # until the member has joined: its metadata has a generation
            consumer.poll(0.5)
            if consumer.assignment():
                break
        assert consumer.assignment()
        metadata = consumer.consumer_group_metadata()

        produce(producer, out, b"aborted")
        producer.abort()  # nothing committed: no offsets sent in an aborted transaction
        produce(producer, out, b"committed")
        producer.flush(TransactionOffsets({0: 7}, metadata))

        committed = consumer.committed([TopicPartition(source_topic, 0)], timeout=10)
        assert committed[0].offset == 7
    finally:
        producer.close(10)
        consumer.close()
    assert values(settings, out, committed_only=True) == [b"committed"]


def test_a_new_producer_with_the_same_id_fences_the_old_and_aborts_its_transaction(
    topics: tuple[Settings, str],
) -> None:
    settings, out = topics
    transactional_id = unique("tm-test-txn")
    old = sink(settings, transactional_id)
    produce(old, out, b"from-the-old-one")
    old._producer.flush(10)  # delivered, in its open transaction
    new = sink(settings, transactional_id)  # fences the old producer, aborts its transaction
    try:
        with pytest.raises(FatalError):
            old.flush()
        produce(new, out, b"from-the-new-one")
        new.flush()
    finally:
        new.close(10)
        old.close(1)
    assert values(settings, out, committed_only=True) == [b"from-the-new-one"]


def test_offsets_taken_before_the_member_rejoined_abort_the_transaction_and_do_not_fence(
    topics: tuple[Settings, str],
) -> None:
    """A static member whose session timed out (the broker out of reach for longer than it)
    joins again under its instance id with a new member id. Offsets sent with the group
    metadata taken before are refused with FENCED_INSTANCE_ID: this is the member's own
    rejoin, not another process with its identity (the consumer itself is fenced then). The
    transaction aborts and the batch is retried with fresh metadata; nothing halts."""
    settings, out = topics
    source_topic = settings.kafka.task_status_topic
    config = kafka.client_config(settings.kafka)
    member = {
        **config,
        "group.id": unique("tm-test-group"),
        "group.instance.id": unique("tm-test-member"),
        "enable.auto.commit": False,
    }
    before = joined(Consumer(member), source_topic)
    stale = before.consumer_group_metadata()
    before.close()  # a static member leaves no LeaveGroup behind: its session goes on
    after = joined(Consumer(member), source_topic)  # the same instance, a new member id
    producer = sink(settings, unique("tm-test-txn"))
    try:
        produce(producer, out, b"with-stale-offsets")
        with pytest.raises(TransactionAbortedError) as aborted:
            producer.flush(TransactionOffsets({0: 3}, stale))
        assert aborted.value.cause == "FENCED_INSTANCE_ID"
        produce(producer, out, b"retried")
        producer.flush(TransactionOffsets({0: 3}, after.consumer_group_metadata()))
        assert after.committed([TopicPartition(source_topic, 0)], timeout=10)[0].offset == 3
    finally:
        producer.close(10)
        after.close()
    assert values(settings, out, committed_only=True) == [b"retried"]


def joined(consumer: Consumer, topic: str) -> Consumer:
    """``consumer`` subscribed to ``topic`` and polled until the group gave it partitions."""
    consumer.subscribe([topic])
    for _ in range(60):
        consumer.poll(0.5)
        if consumer.assignment():
            return consumer
    raise AssertionError("the member got no partitions in 30 s")


def test_a_librdkafka_call_running_past_its_own_timeout_is_overdue(
    topics: tuple[Settings, str],
) -> None:
    """What the worker's watch asks (tm.worker.threads): the call now running, once it has run
    OVERRUN_S past the timeout it was given; nothing between calls."""
    settings, _ = topics
    producer = sink(settings, unique("tm-test-txn"))
    seen: list[tuple[str | None, str | None]] = []

    def call(timeout_s: float) -> None:  # stands for a librdkafka call, its timeout last
        now = time.monotonic()
        later = now + timeout_s + OVERRUN_S + 1
        seen.append((producer.overdue(now), producer.overdue(later)))

    try:
        producer._call(time.monotonic() + 5, call)  # the timed call itself
        assert seen[0][0] is None
        assert seen[0][1] is not None and seen[0][1].startswith("call, 5 s past its")
        assert producer.overdue(time.monotonic() + 3600) is None  # nothing runs now
    finally:
        producer.close(5)
