"""The clients of the operator commands and of the API's lag watcher; none is a worker's.

- :class:`Publisher`: an idempotent producer (``tm send``, ``tm dlq replay``);
- :class:`TopicReader`: reads a topic from its start to its end at the time of the call, or only
  the last records of each partition, outside any group's assignment (``tm dlq replay``, the
  status page's dead letters);
- :class:`GroupReader`: the cluster's metadata, which partitions of a topic the group's members
  own, and the group's committed offsets beside the partitions' watermarks, without ever joining
  the group (the API's :class:`~tm.api.kafka_watch.KafkaWatch`).

What they return is plain data (dataclasses, dicts, lists of partition numbers); what they raise is
tm's errors, translated by :mod:`tm.adapters.kafka.errors`. Every call blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

from confluent_kafka import (
    Consumer,
    ConsumerGroupState,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from tm.adapters.kafka.clients import client_config
from tm.adapters.kafka.errors import text, translated
from tm.adapters.kafka.producer import BufferedProducer
from tm.connections import KafkaSettings
from tm.errors import KafkaUnavailableError

Headers = list[tuple[str, str | bytes | None]]

READ_BATCH = 500  # messages per consume() call of a TopicReader
READ_WAIT_S = 0.5  # one consume() call waits at most this long


# -- producing -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a :meth:`Publisher.flush` found: messages still unacknowledged when it gave up, and
    the errors of those the broker refused (as :func:`~tm.adapters.kafka.errors.text`)."""

    unacknowledged: int
    failures: list[str]

    @property
    def is_complete(self) -> bool:
        return not self.unacknowledged and not self.failures


class Publisher(BufferedProducer):
    """An idempotent producer (``acks=all``). :meth:`produce` enqueues, waiting for room when the
    local queue is full; :meth:`flush` waits for the acknowledgements."""

    @translated
    def __init__(self, settings: KafkaSettings, *, linger_ms: int | None = None) -> None:
        config = client_config(settings)
        config.update({"enable.idempotence": True, "acks": "all"})
        if linger_ms is not None:
            config["linger.ms"] = linger_ms
        super().__init__(config)

    def flush(self, timeout_s: float) -> Delivery:
        """Wait up to ``timeout_s`` for everything produced since the last flush."""
        remaining, failures = self._flush(timeout_s)
        return Delivery(unacknowledged=remaining, failures=[text(f) for f in failures])


# -- reading a topic -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """One message as it was stored."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int


class TopicReader:
    """A consumer that assigns itself partitions: ``group_id`` only names it (it joins no group
    and commits nothing). Use it as a context manager, which closes it."""

    @translated
    def __init__(self, settings: KafkaSettings, *, group_id: str) -> None:
        config = client_config(settings)
        config.update(
            {"group.id": group_id, "enable.auto.commit": False, "enable.partition.eof": False}
        )
        self._consumer = Consumer(config)

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.close()

    @translated
    def close(self) -> None:
        self._consumer.close()

    @translated
    def ends(self, topic: str, *, timeout_s: float) -> dict[int, tuple[int, int]] | None:
        """``{partition: (low, high)}`` watermarks now, for the partitions holding records; None
        when the topic does not exist."""
        found = self._consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if found is None or found.error is not None:
            return None
        ends: dict[int, tuple[int, int]] = {}
        for partition in found.partitions:
            low, high = self._consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout_s
            )
            if high > low:
                ends[partition] = (low, high)
        return ends

    def read(
        self, topic: str, ends: dict[int, tuple[int, int]], *, timeout_s: float
    ) -> Iterator[Record]:
        """The records of each partition of ``ends`` from its low watermark up to (not including)
        its high one. Raises TimeoutError when they are not all read within ``timeout_s``, as
        ``concurrent.futures.as_completed`` does."""
        with translated:
            yield from self._read(topic, ends, timeout_s)

    def _read(
        self, topic: str, ends: dict[int, tuple[int, int]], timeout_s: float
    ) -> Iterator[Record]:
        self._consumer.assign([TopicPartition(topic, p, low) for p, (low, _) in ends.items()])
        done = dict.fromkeys(ends, False)
        deadline = time.monotonic() + timeout_s
        while not all(done.values()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic} not read to its end in {timeout_s:.0f} s")
            for message in self._consumer.consume(READ_BATCH, READ_WAIT_S):
                if message.error() is not None:
                    continue
                partition, offset = message.partition(), message.offset()
                if partition is None or offset is None:
                    continue
                end = ends[partition][1]
                if offset + 1 >= end:
                    done[partition] = True
                if offset >= end:
                    continue
                yield _record(message, partition, offset)

    @translated
    def tail(self, topic: str, count: int, *, timeout_s: float) -> list[Record]:
        """Up to the last ``count`` records of each partition of ``topic`` (fewer where
        transaction markers hold offsets), read from where they start up to the end at the time
        of the call. Gives up at ``timeout_s`` with what it has; empty when the topic does not
        exist."""
        ends = self.ends(topic, timeout_s=timeout_s)
        if not ends:
            return []
        bounds = {p: (max(low, high - count), high) for p, (low, high) in ends.items()}
        self._consumer.assign([TopicPartition(topic, p, b[0]) for p, b in bounds.items()])
        records: list[Record] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for message in self._consumer.consume(READ_BATCH, READ_WAIT_S):
                partition, offset = message.partition(), message.offset()
                if message.error() is not None or partition is None or offset is None:
                    continue
                if offset < bounds[partition][1]:
                    records.append(_record(message, partition, offset))
            # The position passes transaction markers too, which are never delivered.
            positions = self._consumer.position([TopicPartition(topic, p) for p in bounds])
            if all(tp.offset >= bounds[tp.partition][1] for tp in positions):
                break
        return records


def _record(message: Message, partition: int, offset: int) -> Record:
    return Record(
        partition=partition,
        offset=offset,
        key=message.key(),
        value=message.value(),
        headers=cast(Headers, message.headers() or []),
        timestamp_ms=message.timestamp()[1],
    )


# -- watching a group ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cluster:
    """What one metadata request said."""

    brokers: int
    topics: int
    cluster_id: str | None
    controller_id: int | None  # None: not known
    partitions: list[int]  # of the topic asked about, sorted; empty when it does not exist


@dataclass(frozen=True, slots=True)
class PartitionOffsets:
    """A partition's watermarks, and the group's committed offset in it (None: none yet)."""

    low: int
    high: int
    committed: int | None


@dataclass(frozen=True, slots=True)
class Member:
    """One member of the group, and the partitions of the watched topic it owns."""

    client_id: str
    instance_id: str | None  # its static group instance id; None: dynamic membership
    host: str
    partitions: tuple[int, ...]  # sorted


@dataclass(frozen=True, slots=True)
class Group:
    """What one describe request said of the group."""

    is_stable: bool
    members: tuple[Member, ...]

    @property
    def assigned(self) -> int:
        """Partitions of the watched topic owned by the members, if the group is stable; 0 while
        it rebalances (or has no member)."""
        return sum(len(m.partitions) for m in self.members) if self.is_stable else 0


class GroupReader:
    """One consumer carrying the group's id (it never subscribes, so it never joins the group)
    and one admin client. Driven from one thread; ``on_error`` receives the clients' own errors
    (a broker down) as text, from inside the calls."""

    @translated
    def __init__(self, settings: KafkaSettings, *, on_error: Callable[[str], None]) -> None:
        self._group_id = settings.group_id
        config: dict[str, Any] = client_config(settings)
        config.update(
            {
                "client.id": f"{settings.client_id}-api",
                "enable.auto.commit": False,
                "log_level": 0,  # broker errors reach on_error, not stderr
                "error_cb": lambda error: on_error(text(error)),
            }
        )
        self._admin = AdminClient(config)
        self._consumer = Consumer({**config, "group.id": settings.group_id})

    @translated
    def close(self) -> None:
        self._consumer.close()

    @translated
    def cluster(self, topic: str, *, timeout_s: float) -> Cluster:
        metadata = self._consumer.list_topics(timeout=timeout_s)
        found = metadata.topics.get(topic)
        controller = metadata.controller_id
        return Cluster(
            brokers=len(metadata.brokers),
            topics=len(metadata.topics),
            cluster_id=metadata.cluster_id or None,
            controller_id=controller if controller is not None and controller >= 0 else None,
            partitions=sorted(found.partitions) if found is not None and not found.error else [],
        )

    @translated
    def group(self, topic: str, *, timeout_s: float) -> Group:
        """The group's state and, per member, the partitions of ``topic`` it owns."""
        futures = self._admin.describe_consumer_groups([self._group_id])
        try:
            description = futures[self._group_id].result(timeout_s)
        except TimeoutError as exc:
            raise KafkaUnavailableError(f"group not described in {timeout_s:.0f} s") from exc
        members = tuple(
            Member(
                client_id=member.client_id,
                instance_id=member.group_instance_id,
                host=member.host,
                partitions=tuple(
                    sorted(
                        tp.partition
                        for tp in member.assignment.topic_partitions
                        if tp.topic == topic
                    )
                    if member.assignment is not None
                    else ()
                ),
            )
            for member in description.members
        )
        return Group(is_stable=description.state == ConsumerGroupState.STABLE, members=members)

    @translated
    def offsets(
        self, topic: str, partitions: list[int], *, timeout_s: float
    ) -> dict[int, PartitionOffsets]:
        """Per partition, its watermarks and the group's committed offset; raises
        KafkaUnavailableError when a request is not answered within ``timeout_s``."""
        committed = self._consumer.committed(
            [TopicPartition(topic, p) for p in partitions], timeout=timeout_s
        )
        offsets: dict[int, PartitionOffsets] = {}
        for tp in committed:
            watermarks = self._consumer.get_watermark_offsets(
                TopicPartition(topic, tp.partition), timeout=timeout_s
            )
            if watermarks is None:
                raise KafkaUnavailableError(f"watermarks not read in {timeout_s:.0f} s")
            low, high = watermarks
            offsets[tp.partition] = PartitionOffsets(
                low=low, high=high, committed=tp.offset if tp.offset >= 0 else None
            )
        return offsets
