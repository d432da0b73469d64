"""The worker's consumer: a group member on the task-status topic, driven from one thread.

Every method blocks, and the rebalance and commit callbacks run inside ``poll`` and ``close``,
in that thread, before the call returns. The callbacks receive partition numbers and tm's own
types; nothing of confluent-kafka leaves this module except the messages, which callers read
through tm.core.decode.RawMessage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from tm.adapters.kafka.clients import COOPERATIVE_ASSIGNOR, consumer_config
from tm.adapters.kafka.errors import (
    check_event,
    consumer_translated,
    is_fatal,
    is_rebalancing,
    text,
)
from tm.connections import KafkaSettings
from tm.errors import KafkaUnavailableError

log = logging.getLogger("tm.kafka")

# ``on_commit(offsets, error, rebalancing)``: the offsets of an asynchronous commit request,
# its first error (of the request or of a partition) as text or None, and whether that error
# is a rebalance's refusal (the offsets can be sent again later).
OnCommit = Callable[[dict[int, int], str | None, bool], None]
# ``on_error(text, fatal)``: an error of the client itself (a broker down, authentication).
OnError = Callable[[str, bool], None]


class Assignment:
    """Partitions being assigned, inside the assign callback. :meth:`take` them there (so that
    confluent-kafka does not assign them after the callback) with their pause flag set:
    librdkafka would otherwise carry it over from an earlier assignment."""

    __slots__ = ("_consumer", "_incremental", "_tps", "partitions")

    def __init__(self, consumer: Consumer, tps: list[TopicPartition], *, incremental: bool) -> None:
        self._consumer = consumer
        self._tps = tps
        self._incremental = incremental  # cooperative: added to the others; eager: the whole
        self.partitions = [tp.partition for tp in tps]

    @consumer_translated
    def take(self, *, paused: bool) -> None:
        if self._incremental:
            self._consumer.incremental_assign(self._tps)
        else:
            self._consumer.assign(self._tps)
        if paused:
            self._consumer.pause(self._tps)
        else:
            self._consumer.resume(self._tps)


OnAssign = Callable[[Assignment], None]
# Partitions that go: revoked (the callback may still commit them, synchronously, with
# KafkaSource.commit) or lost (another member may own them already: never commit them).
OnRevoke = Callable[[list[int]], None]


class KafkaSource:
    def __init__(
        self,
        settings: KafkaSettings,
        *,
        slot: int,
        on_assign: OnAssign,
        on_revoke: OnRevoke,
        on_lost: OnRevoke,
        on_commit: OnCommit,
        on_error: OnError,
        logger: logging.Logger | None = None,
        transactional: bool = False,
    ) -> None:
        """``transactional``: take the member's group metadata after every poll, for
        :meth:`group_metadata` (exactly-once)."""
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._on_lost = on_lost
        config = consumer_config(settings, slot=slot)
        self._incremental = config["partition.assignment.strategy"] == COOPERATIVE_ASSIGNOR
        config["error_cb"] = lambda error: on_error(text(error), is_fatal(error))
        config["on_commit"] = _commit_reporter(on_commit)
        self.topic = settings.task_status_topic
        self._transactional = transactional
        self._group_metadata: object | None = None
        self._consumer = Consumer(config, logger=logger) if logger else Consumer(config)
        self._consumer.subscribe(
            [self.topic], on_assign=self._assign, on_revoke=self._revoke, on_lost=self._lose
        )

    @consumer_translated
    def poll(
        self,
        max_messages: int,
        timeout_s: float,
        commit: dict[int, int] | None = None,
        linger_s: float = 0.0,
    ) -> list[Message]:
        """Wait at most ``timeout_s`` for a first message, then take up to ``max_messages`` in
        all of what is already fetched, waiting at most ``linger_s`` more for the rest (not at
        all by default: a batch is what arrived while the last one was being applied). Returns
        only real messages: a fatal error event raises FatalError (as does a topic that is
        gone), another is logged and left out. ``commit``: offsets to commit asynchronously
        first; the result reaches ``on_commit`` from inside this or a later poll. (The client's
        calls wait for each other, so a commit is sent from the thread that polls.)"""
        consumer = self._consumer
        if commit:
            offsets = [TopicPartition(self.topic, p, o) for p, o in commit.items()]
            consumer.commit(offsets=offsets, asynchronous=True)
        first = consumer.poll(timeout_s)
        if first is None:
            polled = []
        elif max_messages == 1:
            polled = [first]
        else:
            polled = [first, *consumer.consume(max_messages - 1, linger_s)]
        if self._transactional:  # out of the rebalance callbacks (see group_metadata)
            self._group_metadata = consumer.consumer_group_metadata()
        if all(m.error() is None for m in polled):
            return polled
        return [m for m in polled if _usable(m)]

    @consumer_translated
    def commit(self, committable: dict[int, int]) -> None:
        """Commit synchronously (from the revoke callback, or with the thread that polls);
        raises CommitDeferredError when a rebalance refuses it."""
        if committable:
            offsets = [TopicPartition(self.topic, p, o) for p, o in committable.items()]
            self._consumer.commit(offsets=offsets, asynchronous=False)

    @consumer_translated
    def rewind(self, first_offsets: dict[int, int]) -> None:
        """Seek each partition back so that its next fetch starts at the given offset."""
        for partition, offset in first_offsets.items():
            self._consumer.seek(TopicPartition(self.topic, partition, offset))

    @consumer_translated
    def pause(self, partitions: list[int]) -> None:
        if partitions:
            self._consumer.pause([TopicPartition(self.topic, p) for p in partitions])

    @consumer_translated
    def resume(self, partitions: list[int]) -> None:
        if partitions:
            self._consumer.resume([TopicPartition(self.topic, p) for p in partitions])

    @consumer_translated
    def lag(self) -> int:
        """Messages behind on the partitions assigned now: per partition, its high watermark as
        the last fetch saw it minus the position of the next message to hand out, summed (a
        partition not fetched yet counts 0). Local reads, no request."""
        consumer = self._consumer
        behind = 0
        for tp in consumer.position(consumer.assignment()):
            high = consumer.get_watermark_offsets(tp, cached=True)[1]
            if tp.offset >= 0 and high >= 0:
                behind += max(high - tp.offset, 0)
        return behind

    def group_metadata(self) -> object:
        """The member's group metadata (group, generation, member id) as of the last poll,
        which a transaction's offsets carry so that the broker refuses them from a member that
        is no longer in that generation (KIP-447). Taken by :meth:`poll` in the poll thread,
        after librdkafka's calls: asked of librdkafka from another thread, it waits while a
        rebalance callback runs, and the revoke callback waits for the batches in flight."""
        if self._group_metadata is None:
            raise KafkaUnavailableError("no group metadata before the first poll")
        return self._group_metadata

    @consumer_translated
    def close(self) -> None:
        """Leave the group (runs the revoke callback) and free the client."""
        self._consumer.close()

    # librdkafka's rebalance callbacks, in the thread that polls or closes.

    def _assign(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        self._on_assign(Assignment(consumer, tps, incremental=self._incremental))

    def _revoke(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        self._on_revoke([tp.partition for tp in tps])
        self._release(consumer, tps)

    def _lose(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        self._on_lost([tp.partition for tp in tps])
        self._release(consumer, tps)

    @staticmethod
    @consumer_translated
    def _release(consumer: Consumer, tps: list[TopicPartition]) -> None:
        """Clear the pause flag of partitions that go, so that they are fetched again if they
        come back (librdkafka keeps it across a revoke and a later assignment)."""
        consumer.resume(tps)


def _usable(message: Message) -> bool:
    """A message, not an error event; a fatal event raises (:func:`check_event`), a passing
    one is logged and left out."""
    error = message.error()
    if error is None:
        return True
    check_event(error)
    log.warning("consumer error", extra={"fields": {"error": error.str()}})
    return False


def _commit_reporter(on_commit: OnCommit) -> Callable[[KafkaError | None, list[Any]], None]:
    """librdkafka's commit callback, as ``on_commit``."""

    def report(error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        offsets = {tp.partition: tp.offset for tp in partitions}
        failed = error or next((tp.error for tp in partitions if tp.error is not None), None)
        if failed is None:
            on_commit(offsets, None, False)
        else:
            on_commit(offsets, text(failed), is_rebalancing(failed))

    return report
