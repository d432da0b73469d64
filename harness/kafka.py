"""Kafka as the tests and the benches see it from outside tm: producers (acknowledged bulk,
paced in a thread, a paced gateway that records each delivery), readers (a topic's messages,
its end offsets, a group's committed offsets and assignment) and watchers that look again and
again in a thread (:class:`CommitWatcher`, :class:`GroupWatcher`).

Every function takes a librdkafka client configuration (``tm.adapters.kafka.client_config``),
so that the secured stack's listeners work the same way.
"""

from __future__ import annotations

import bisect
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from confluent_kafka import Consumer, ConsumerGroupState, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from harness import HarnessError, unique
from tm.traffic import new_task_message, update_message

COMMIT_POLL_S = 0.010  # how often the committed offsets are read: the latency resolution
COMMITTED_TIMEOUT_S = 5.0  # one OffsetFetch; the broker answers in about a millisecond
GROUP_POLL_S = 0.05  # how often the group is described while waiting for it to settle
FLUSH_TIMEOUT_S = 120.0  # every acknowledgement of a bulk or paced production
LOOK_TIMEOUT_S = 10.0  # one metadata, watermark or committed-offsets request
PACED_TICK_S = 0.001  # a paced producer sends what is due every millisecond

Headers = list[tuple[str, bytes]]  # as the tests write them
# Headers as confluent-kafka's produce() takes them (its stubs' list), and as tm.traffic makes them.
KafkaHeaders = list[tuple[str, str | bytes | None]]
AnyHeaders = Headers | KafkaHeaders
Message = tuple[bytes | None, AnyHeaders, bytes | None]  # key, headers, value

# Bulk: as fast as one Python producer goes (big lz4 batches; only failures report).
BULK_PRODUCER = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 20,
    "compression.type": "lz4",
    "batch.size": 1_000_000,
    "queue.buffering.max.messages": 1_000_000,
    "queue.buffering.max.kbytes": 1_048_576,
    "delivery.report.only.error": True,
    "log_level": 3,
}
# Paced: a gateway sends each event at once; the Kafka timestamp is taken at produce(), so
# producer-side batching would count as tm's latency.
PACED_PRODUCER = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 1,
    "compression.type": "lz4",
    "log_level": 3,
}


def _send(producer: Producer, topic: str, **kwargs: Any) -> None:
    """produce(), waiting for room while the local queue is full."""
    while True:
        try:
            producer.produce(topic, **kwargs)
            return
        except BufferError:
            producer.poll(0.05)


def produce(
    config: dict[str, Any],
    topic: str,
    messages: Sequence[Message],
    *,
    partition: int | None = None,
) -> float:
    """Produce (key, headers, value) messages and wait for every acknowledgement; return the
    seconds it took. ``partition``: all to that one (default: the partitioner's choice)."""
    failures: list[str] = []

    def on_delivery(error: Any, _message: Any) -> None:
        if error is not None:
            failures.append(str(error))

    producer = Producer({**config, **BULK_PRODUCER, "on_delivery": on_delivery})
    where = {} if partition is None else {"partition": partition}
    started = time.monotonic()
    for i, (key, headers, value) in enumerate(messages):
        _send(producer, topic, key=key, value=value, headers=headers, **where)
        if i % 10_000 == 0:
            producer.poll(0)
    left = producer.flush(FLUSH_TIMEOUT_S)
    if left or failures:
        raise HarnessError(f"producing to {topic}: {left} unacknowledged, {failures[:3]} failed")
    return time.monotonic() - started


def read_topic(
    config: dict[str, Any], topic: str, *, timeout_s: float = 10.0, uncommitted: bool = False
) -> list[Any]:
    """Every message currently in ``topic`` (all partitions, from the beginning), as a reader
    with ``isolation.level=read_committed`` sees them (librdkafka's default: nothing of an
    aborted or open transaction), or every record written with ``uncommitted``."""
    consumer = Consumer(
        {
            **config,
            "group.id": unique("reader"),
            "enable.auto.commit": False,
            "isolation.level": "read_uncommitted" if uncommitted else "read_committed",
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=timeout_s)
        ends = {}
        for p in meta.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out.extend(m for m in consumer.consume(500, 0.2) if m.error() is None)
            # The position passes what a read_committed reader skips (aborted records and
            # transaction markers) too.
            positions = consumer.position([TopicPartition(topic, p) for p in ends])
            if all(tp.offset >= ends[tp.partition] for tp in positions):
                break
        return out
    finally:
        consumer.close()


# A reader of committed offsets: the offsets committed now. With read_committed (librdkafka's
# default) the broker answers UNSTABLE_OFFSET_COMMIT while a transaction holding offsets of the
# group is open, and librdkafka asks again until its timeout: in exactly-once mode, where a
# transaction is nearly always open, a look would block or time out.
_NOT_WAITING_FOR_STABLE = {"isolation.level": "read_uncommitted", "log_level": 3}


class OffsetReader:
    """A group's committed offsets and a topic's end offsets, per partition, read again and
    again by one consumer that never joins the group."""

    def __init__(self, config: dict[str, Any], *, group: str, topic: str, partitions: int) -> None:
        self._consumer = Consumer({**config, **_NOT_WAITING_FOR_STABLE, "group.id": group})
        self._tps = [TopicPartition(topic, p) for p in range(partitions)]

    def committed(self) -> dict[int, int]:
        """Per partition, the next offset the group will read (negative: none committed)."""
        answer = self._consumer.committed(self._tps, timeout=LOOK_TIMEOUT_S)
        return {tp.partition: tp.offset for tp in answer}

    def ends(self) -> dict[int, int]:
        """Per partition, the offset the next message will get."""
        return {
            tp.partition: self._consumer.get_watermark_offsets(tp, timeout=LOOK_TIMEOUT_S)[1]
            for tp in self._tps
        }

    def committed_total(self) -> int:
        """Committed offsets summed over the partitions (none committed counts 0)."""
        return sum(max(offset, 0) for offset in self.committed().values())

    def ends_total(self) -> int:
        return sum(self.ends().values())

    def close(self) -> None:
        self._consumer.close()


def committed(config: dict[str, Any], group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offsets per partition (negative: none)."""
    reader = OffsetReader(config, group=group, topic=topic, partitions=partitions)
    try:
        return reader.committed()
    finally:
        reader.close()


def end_offsets(config: dict[str, Any], topic: str, partitions: int) -> dict[int, int]:
    """Each partition's end offset (the offset the next message will get)."""
    reader = OffsetReader(config, group=unique("reader"), topic=topic, partitions=partitions)
    try:
        return reader.ends()
    finally:
        reader.close()


def count_records(config: dict[str, Any], topic: str, *, timeout_s: float = 60.0) -> int:
    """How many records of ``topic`` a read_committed reader reads: its end offsets count too
    the transaction markers (one per partition and transaction) of a transactional producer."""
    return len(read_topic(config, topic, timeout_s=timeout_s))


def group_assigned(config: dict[str, Any], group: str, topic: str) -> int:
    """How many partitions of ``topic`` the group coordinator has assigned to members of a
    stable group (0 while it rebalances)."""
    admin = AdminClient(config)
    description = admin.describe_consumer_groups([group])[group].result(LOOK_TIMEOUT_S)
    if description.state != ConsumerGroupState.STABLE:
        return 0
    return sum(
        1
        for member in description.members
        for tp in member.assignment.topic_partitions
        if tp.topic == topic
    )


def group_state(config: dict[str, Any], group: str) -> str:
    """The group's state as its coordinator reports it (``STABLE``, ``PREPARING_REBALANCING``,
    ``COMPLETING_REBALANCING``, ``EMPTY``, ...)."""
    admin = AdminClient(config)
    return str(admin.describe_consumer_groups([group])[group].result(LOOK_TIMEOUT_S).state.name)


def describe_group(config: dict[str, Any], group: str) -> str:
    """The coordinator's view of ``group`` in one line per member, for a failure's report:
    its state, and each member's instance id, client id, host and partitions."""
    admin = AdminClient(config)
    try:
        d = admin.describe_consumer_groups([group])[group].result(LOOK_TIMEOUT_S)
    except KafkaException as exc:
        return f"group {group}: not described ({exc})"
    lines = [f"group {group}: {d.state.name}, {len(d.members)} member(s)"]
    for m in d.members:
        partitions = sorted(tp.partition for tp in m.assignment.topic_partitions)
        lines.append(
            f"  instance {m.group_instance_id} client {m.client_id} host {m.host}: {partitions}"
        )
    return "\n".join(lines)


# -- paced producers -----------------------------------------------------------------------------


def _paced(rate: float, count: int, stop: threading.Event | None = None) -> Iterator[int]:
    """Yield 0 .. count-1, number n not before ``n / rate`` seconds after the first; what is
    due comes at once. Stops early when ``stop`` is set."""
    started = time.monotonic()
    for n in range(count):
        ahead = started + n / rate - time.monotonic()
        if ahead > 0:
            if stop is not None and stop.wait(ahead):
                return
            if stop is None:
                time.sleep(max(PACED_TICK_S, ahead))
        yield n


@dataclass
class Sent:
    """One paced run: ``delivered`` holds (task_id, partition, offset, CreateTime ms)."""

    count: int
    seconds: float
    started_wall: float  # time.time() and time.monotonic() when the first event was due
    started: float
    delivered: list[tuple[str, int, int, int]]


class Gateway:
    """A paced gateway sending `new` events (``tm.traffic.new_task_message`` with a task_id
    header), recording where and when each was delivered; one for a whole run, warmed up
    before each rate so that its own start-up does not count as tm's latency."""

    def __init__(self, config: dict[str, Any], *, topic: str, warm_up_topic: str) -> None:
        self._producer = Producer({**config, **PACED_PRODUCER})
        self._topic = topic
        self._warm_up_topic = warm_up_topic
        self._delivered: list[tuple[str, int, int, int]] = []
        self._failures: list[str] = []

    def warm_up(self) -> None:
        """Metadata, the idempotent producer id and the connections."""
        self._producer.list_topics(self._topic, timeout=FLUSH_TIMEOUT_S)
        self._producer.produce(self._warm_up_topic, value=b"warm-up")
        if self._producer.flush(FLUSH_TIMEOUT_S):
            raise HarnessError("paced producer: warm-up message not acknowledged")

    def _on_delivery(self, task_id: str, error: Any, message: Any) -> None:
        if error is not None:
            self._failures.append(str(error))
        else:
            self._delivered.append(
                (task_id, message.partition(), message.offset(), message.timestamp()[1])
            )

    def paced(self, *, rate: float, seconds: float, first: int) -> Sent:
        """``rate`` events per second for ``seconds``: event n is due ``n / rate`` s after the
        start; what is due goes out at once."""
        self._delivered, self._failures = [], []
        total = max(1, int(rate * seconds))
        started_wall, started = time.time(), time.monotonic()
        for n in _paced(rate, total):
            task_id = str(uuid.uuid4())
            headers, value = new_task_message(first + n)
            headers.append(("task_id", task_id.encode()))
            on_delivery = partial(self._on_delivery, task_id)
            _send(
                self._producer, self._topic, value=value, headers=headers, on_delivery=on_delivery
            )
            self._producer.poll(0)
        elapsed = time.monotonic() - started
        left = self._producer.flush(FLUSH_TIMEOUT_S)
        if left or self._failures:
            raise HarnessError(
                f"paced producer: {left} unacknowledged, {len(self._failures)} failed"
            )
        return Sent(total, elapsed, started_wall, started, self._delivered)


def feeder_task_id(n: int) -> uuid.UUID:
    """The task_id header :class:`Feeder` gives task n when it also sends updates."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"tm-e2e-feeder/{n}")


class Feeder:
    """Produces ``new_task_message(n)`` for n in [start, start + count) at ``rate`` messages per
    second from a thread, so that tm is busy when a fault happens.

    With ``completed_lag`` > 0, each `new` event carries a task_id header and goes to partition
    ``n % partitions``, followed on that partition by a `completed` update of task ``n - lag``:
    tm's batches then hold new tasks and updates together, applied in one transaction."""

    def __init__(
        self,
        config: dict[str, Any],
        topic: str,
        *,
        partitions: int,
        count: int,
        rate: float,
        start: int = 0,
        completed_lag: int = 0,
    ) -> None:
        self.expected = {f"user{n}@example.com" for n in range(start, start + count)}
        self.completed = max(count - completed_lag, 0) if completed_lag else 0
        self._config, self._topic, self._partitions = config, topic, partitions
        self._start, self._count, self._rate, self._lag = start, count, rate, completed_lag
        self._failures: list[str] = []
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            producer = Producer({**self._config, **PACED_PRODUCER, "linger.ms": 5})

            def on_delivery(error: Any, _message: Any) -> None:
                if error is not None:
                    self._failures.append(str(error))

            for i in _paced(self._rate, self._count, self._stop):
                for partition, headers, value in self._messages(self._start + i):
                    _send(
                        producer,
                        self._topic,
                        value=value,
                        headers=headers,
                        on_delivery=on_delivery,
                        partition=partition,
                    )
                producer.poll(0)
            if producer.flush(FLUSH_TIMEOUT_S):
                self._failures.append("messages left unacknowledged")
        except BaseException as exc:  # reported by join()
            self._error = exc

    def _messages(self, n: int) -> list[tuple[int, Any, bytes]]:
        """(partition, headers, value) of what the n-th step produces; partition -1: the
        producer's partitioner chooses."""
        headers, value = new_task_message(n)
        if not self._lag:
            return [(-1, headers, value)]
        headers = [*headers, ("task_id", str(feeder_task_id(n)).encode())]
        out = [(n % self._partitions, headers, value)]
        if n - self._lag >= self._start:
            before = n - self._lag
            update_headers, update = update_message(feeder_task_id(before), failed=False)
            out.append((before % self._partitions, update_headers, update))
        return out

    def join(self) -> None:
        self._thread.join(60)
        assert not self._thread.is_alive(), "the feeder did not finish"
        if self._error is not None:
            raise self._error
        assert self._failures == []

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


# -- watchers ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Observation:
    """The committed offsets as one look saw them: ``monotonic``/``wall`` are taken when the
    answer arrived, so they are upper bounds of when the commits happened."""

    monotonic: float
    wall: float
    offsets: tuple[int, ...]  # next offset per partition; 0 when nothing is committed

    @property
    def total(self) -> int:
        return sum(self.offsets)


class CommitWatcher(threading.Thread):
    """Reads the group's committed offsets every ``poll_s`` with ``Consumer.committed`` (which
    never joins the group) and keeps every change."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        group: str,
        topic: str,
        partitions: int,
        poll_s: float = COMMIT_POLL_S,
    ) -> None:
        super().__init__(name="harness-commit-watcher", daemon=True)
        self._poll_s = poll_s
        self._consumer = Consumer(
            {**config, **_NOT_WAITING_FOR_STABLE, "group.id": group, "enable.auto.commit": False}
        )
        self._tps = [TopicPartition(topic, p) for p in range(partitions)]
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self.changes: list[Observation] = []
        self.looks = 0
        self.look_s_total = 0.0
        self.look_s_max = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                began = time.monotonic()
                answer = self._consumer.committed(self._tps, timeout=COMMITTED_TIMEOUT_S)
                now, wall = time.monotonic(), time.time()
                offsets = tuple(max(tp.offset, 0) for tp in answer)
                took = now - began
                with self._lock:
                    self.looks += 1
                    self.look_s_total += took
                    self.look_s_max = max(self.look_s_max, took)
                    if not self.changes or self.changes[-1].offsets != offsets:
                        self.changes.append(Observation(now, wall, offsets))
                self._stop_event.wait(max(0.0, self._poll_s - took))
        except BaseException as exc:  # reported by wait_for, in the main thread
            self.error = exc
        finally:
            self._consumer.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)

    @property
    def mark(self) -> int:
        """Where the next phase's observations start."""
        with self._lock:
            return len(self.changes)

    def latest(self) -> Observation | None:
        with self._lock:
            return self.changes[-1] if self.changes else None

    @property
    def total(self) -> int:
        """Committed offsets summed over the partitions, as last seen (0 before any look)."""
        seen = self.latest()
        return seen.total if seen else 0

    @property
    def changed_at(self) -> float:
        """When :attr:`total` was last seen to change (monotonic; 0 before any look)."""
        seen = self.latest()
        return seen.monotonic if seen else 0.0

    def mean_look_ms(self) -> float:
        with self._lock:
            return 1000 * self.look_s_total / self.looks if self.looks else 0.0

    def wait_for(
        self, targets: list[int], *, timeout_s: float, alive: Callable[[], str | None]
    ) -> Observation:
        """Block until every partition's committed offset reaches its target; raise
        HarnessError at the deadline or as soon as ``alive()`` returns a reason to stop."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.error is not None:
                raise HarnessError(f"reading committed offsets failed: {self.error}")
            seen = self.latest()
            if seen is not None and all(o >= t for o, t in zip(seen.offsets, targets, strict=True)):
                return seen
            problem = alive()
            if problem:
                raise HarnessError(problem)
            if time.monotonic() > deadline:
                got = seen.total if seen else 0
                raise HarnessError(
                    f"only {got} of {sum(targets)} offsets committed after {timeout_s:.0f} s"
                )
            time.sleep(COMMIT_POLL_S)

    def phase(self, start: int, targets: list[int]) -> tuple[Observation, Observation]:
        """The first observation of the phase that started at ``start`` with a new commit, and
        the first at which every target was reached."""
        with self._lock:
            seen = self.changes[start:]
            before = self.changes[start - 1].total if start > 0 else 0
        first = next(o for o in seen if o.total > before)
        last = next(o for o in seen if all(c >= t for c, t in zip(o.offsets, targets, strict=True)))
        return first, last

    def commit_series(self, *, start: int) -> list[tuple[list[float], list[int]]]:
        """Per partition, the wall times at which its committed offset was seen to rise and the
        offsets seen then (from observation ``start`` on). A message at ``offset`` was
        committed at ``walls[bisect_right(offsets, offset)]``."""
        with self._lock:
            seen = self.changes[start:]
        series: list[tuple[list[float], list[int]]] = [([], []) for _ in self._tps]
        for o in seen:
            for partition, value in enumerate(o.offsets):
                walls, offsets = series[partition]
                if offsets and value <= offsets[-1]:
                    continue  # a rewind would go backwards; the first time counts
                walls.append(o.wall)
                offsets.append(value)
        return series


def committed_at(series: tuple[list[float], list[int]], offset: int) -> float | None:
    """Wall time at which ``offset`` was first seen committed in one partition's series."""
    walls, offsets = series
    index = bisect.bisect_right(offsets, offset)
    return walls[index] if index < len(walls) else None


class GroupWatcher(threading.Thread):
    """Describes the consumer group (the broker's view) until it is stable with ``workers``
    members that each own at least one partition and all ``partitions`` owned: DESIGN §8's
    "all workers assigned". ``settled_at`` is then the monotonic time of that description."""

    def __init__(
        self, config: dict[str, Any], *, group: str, workers: int, partitions: int
    ) -> None:
        super().__init__(name="harness-group-watcher", daemon=True)
        self._admin = AdminClient({**config, "log_level": 3})
        self._group = group
        self._workers = workers
        self._partitions = partitions
        self._stop_event = threading.Event()
        self.settled_at: float | None = None
        self.last_seen = "not described yet"

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                future = self._admin.describe_consumer_groups([self._group], request_timeout=5)
                description = future[self._group].result()
            except Exception as exc:  # a group not yet known, a slow broker: look again
                self.last_seen = f"describe failed: {exc}"
                self._stop_event.wait(GROUP_POLL_S)
                continue
            now = time.monotonic()
            owned = [
                {tp.partition for tp in m.assignment.topic_partitions} for m in description.members
            ]
            everyone = set().union(*owned) if owned else set()
            self.last_seen = (
                f"state {description.state.name}, {len(owned)} members owning"
                f" {[sorted(o) for o in owned]}"
            )
            if (
                description.state == ConsumerGroupState.STABLE
                and len(owned) == self._workers
                and sum(1 for o in owned if o) == min(self._workers, self._partitions)
                and len(everyone) == self._partitions
            ):
                self.settled_at = now
                return
            self._stop_event.wait(GROUP_POLL_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)
