"""confluent-kafka: client configuration, topic administration and the reachability probe.

librdkafka is not fork-safe: nothing here may be created before a worker forks. Errors from
librdkafka are translated by their error code (``KafkaError.code()``), never by message text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # public, not in its __all__
    AdminClient,
    ConfigResource,
    ResourceType,
)
from confluent_kafka.cimpl import NewTopic

from tm.config import KafkaSettings
from tm.errors import CommitDeferredError, FatalError, KafkaUnavailableError


def client_config(settings: KafkaSettings) -> dict[str, Any]:
    """Properties every client shares: brokers, client id, security, timeouts, retries."""
    protocol = ("SASL_" if settings.sasl_enabled else "") + (
        "SSL" if settings.ssl_enabled else "PLAINTEXT"
    )
    config: dict[str, Any] = {
        "bootstrap.servers": ",".join(settings.brokers),
        "client.id": settings.client_id,
        "security.protocol": protocol,
        "socket.connection.setup.timeout.ms": settings.connection_timeout_ms,
        "retry.backoff.ms": settings.retry_backoff_ms,
    }
    if settings.sasl_enabled:
        config["sasl.mechanism"] = settings.sasl_mechanism.upper()
        config["sasl.username"] = settings.sasl_username
        config["sasl.password"] = settings.sasl_password
    return config


def translate_error(exc: BaseException) -> BaseException:
    """Map a KafkaException to tm's tree: auth/config problems are fatal, the rest transient."""
    if not isinstance(exc, KafkaException):
        return exc
    error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    if error is None:
        return KafkaUnavailableError(str(exc))
    text = f"{error.name()}: {error.str()}"
    if error.fatal() or error.code() in _FATAL_CODES:
        return FatalError(text)
    return KafkaUnavailableError(text)


_FATAL_CODES = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError.MSG_SIZE_TOO_LARGE,  # will never pass: crash loudly rather than loop
        KafkaError._AUTHENTICATION,  # noqa: SLF001 (librdkafka's local error codes)
        KafkaError._INVALID_ARG,  # noqa: SLF001
    }
)


# A commit refused because the group moved to a new generation while we were not polling.
_REBALANCING_CODES = frozenset({KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS})


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    """What a metadata request told us."""

    brokers: int
    topics: dict[str, int]  # name -> partition count


def describe(settings: KafkaSettings, *, timeout_s: float) -> ClusterInfo:
    """One metadata request; raises KafkaUnavailableError (with the broker's last error) if none
    answers within ``timeout_s``."""
    errors: list[str] = []

    def on_error(error: KafkaError) -> None:
        errors.append(f"{error.name()}: {error.str()}")

    config = client_config(settings)
    config.update({"log_level": 0, "error_cb": on_error})
    admin = AdminClient(config)
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        translated = translate_error(exc)
        if errors and isinstance(translated, KafkaUnavailableError):
            raise KafkaUnavailableError(f"{translated} (last broker error: {errors[-1]})") from exc
        raise translated from exc
    return ClusterInfo(
        brokers=len(metadata.brokers),
        topics={name: len(topic.partitions) for name, topic in metadata.topics.items()},
    )


# Kafka's default max.message.bytes (the broker's message.max.bytes), for a topic and a broker
# that report none.
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
# librdkafka's default message.max.bytes: tm's producer never goes above it.
PRODUCER_MAX_MESSAGE_BYTES = 1_000_000
# What a record batch adds around its records: librdkafka's message.max.bytes bounds the
# records of a batch, the broker's max.message.bytes the whole batch (v2 header: 61 bytes).
RECORD_BATCH_OVERHEAD_BYTES = 128
# The smallest producer limit tm works with: below it a dead letter's own dlq_* headers may
# not fit, and every dead letter would be refused (librdkafka's floor is 1000).
MIN_PRODUCE_LIMIT_BYTES = 4096
LIMITS_TIMEOUT_S = 10.0  # for reading the topics' limits at a worker's boot


def max_message_bytes(
    settings: KafkaSettings, topics: list[str], *, timeout_s: float
) -> dict[str, int]:
    """Each topic's ``max.message.bytes``: its own, or the broker's default when the topic has
    no override. Raises KafkaUnavailableError (or FatalError: not authorized)."""
    config = client_config(settings)
    config["log_level"] = 0
    admin = AdminClient(config)
    limits: dict[str, int] = {}
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in topics]
    try:
        futures = admin.describe_configs(resources, request_timeout=timeout_s)
        for resource, future in futures.items():
            entry = future.result(timeout=timeout_s).get("max.message.bytes")
            if entry is not None and entry.value:
                limits[resource.name] = int(entry.value)
        if len(limits) < len(topics):
            default = _broker_max_message_bytes(admin, timeout_s)
            limits.update({name: default for name in topics if name not in limits})
    except KafkaException as exc:
        raise translate_error(exc) from exc
    except TimeoutError as exc:
        raise KafkaUnavailableError(f"topic configs not described in {timeout_s:.0f} s") from exc
    return limits


def _broker_max_message_bytes(admin: AdminClient, timeout_s: float) -> int:
    brokers = admin.list_topics(timeout=timeout_s).brokers
    if not brokers:
        return KAFKA_DEFAULT_MAX_MESSAGE_BYTES
    resource = ConfigResource(ResourceType.BROKER, str(next(iter(brokers))))
    future = admin.describe_configs([resource], request_timeout=timeout_s)[resource]
    entry = future.result(timeout=timeout_s).get("message.max.bytes")
    return (
        int(entry.value) if entry is not None and entry.value else KAFKA_DEFAULT_MAX_MESSAGE_BYTES
    )


def produce_limit(settings: KafkaSettings, *, timeout_s: float = LIMITS_TIMEOUT_S) -> int:
    """The producer's ``message.max.bytes``: a record, and a batch of them, fit every topic tm
    produces to (crawl requests, dead letters). Raises KafkaUnavailableError, or FatalError when
    a topic's limit is too small for tm."""
    topics = [settings.web_crawl_request_topic, settings.dlq_topic]
    limits = max_message_bytes(settings, topics, timeout_s=timeout_s)
    limit = min(
        PRODUCER_MAX_MESSAGE_BYTES, *(v - RECORD_BATCH_OVERHEAD_BYTES for v in limits.values())
    )
    if limit < MIN_PRODUCE_LIMIT_BYTES:
        raise FatalError(
            f"max.message.bytes of the topics {limits} is too small: tm needs at least"
            f" {MIN_PRODUCE_LIMIT_BYTES + RECORD_BATCH_OVERHEAD_BYTES}"
        )
    return limit


def create_topics(
    settings: KafkaSettings, names: list[str], *, partitions: int, timeout_s: float = 30.0
) -> dict[str, str]:
    """Create each missing topic; return ``{name: "created" | "exists"}``. Existing topics are
    left as they are, whatever their partition count."""
    config = client_config(settings)
    config["log_level"] = 0
    admin = AdminClient(config)
    existing = describe(settings, timeout_s=timeout_s).topics
    result = {name: "exists" for name in names if name in existing}
    missing = [
        NewTopic(
            name, num_partitions=partitions, replication_factor=settings.topic_replication_factor
        )
        for name in names
        if name not in existing
    ]
    if not missing:
        return result
    for name, future in admin.create_topics(missing, operation_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            result[name] = "created"
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                result[name] = "exists"  # another tm created it meanwhile
            else:
                raise translate_error(exc) from exc
    return result


# ---------------------------------------------------------------------------------------------
# The consumer and the producer of a worker. Built after the fork, used from worker threads.

# Per-partition fetch queue of the consumer; librdkafka's default (64 MiB) times partitions
# times workers would blow the 512 MiB memory budget on its own.
QUEUED_MAX_KBYTES = 8192
# How long the producer batches before sending: a batch's publishes go out together anyway,
# and waiting for the acknowledgements dominates.
PRODUCER_LINGER_MS = 2


def consumer_config(settings: KafkaSettings, *, slot: int) -> dict[str, Any]:
    config = client_config(settings)
    config.update(
        {
            "group.id": settings.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": settings.session_timeout_ms,
            "heartbeat.interval.ms": settings.heartbeat_interval_ms,
            "queued.max.messages.kbytes": QUEUED_MAX_KBYTES,
            "client.id": f"{settings.client_id}-{slot}",
        }
    )
    if settings.group_instance_id:
        config["group.instance.id"] = f"{settings.group_instance_id}-{slot}"
    return config


def producer_config(
    settings: KafkaSettings, *, max_message_bytes: int = PRODUCER_MAX_MESSAGE_BYTES
) -> dict[str, Any]:
    config = client_config(settings)
    config.update(
        {
            # Also bounds a batch's records: a batch must fit the topic as a single record must.
            "message.max.bytes": max_message_bytes,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": PRODUCER_LINGER_MS,
            # A Python call per acknowledged message costs more than the rest of publishing.
            "delivery.report.only.error": True,
            "compression.type": "lz4",
            "message.timeout.ms": settings.request_timeout_ms,
            "request.timeout.ms": settings.request_timeout_ms,
        }
    )
    return config


class KafkaSink:
    """The producer: crawl requests and dead letters. ``produce`` only enqueues; ``flush``
    blocks until every enqueued message is acknowledged (call it from a thread).

    ``max_message_bytes`` is the largest record it sends (:func:`produce_limit`, read at a
    worker's boot), which a dead letter is cut to fit."""

    def __init__(
        self, settings: KafkaSettings, *, max_message_bytes: int, logger: Any = None
    ) -> None:
        self.max_message_bytes = max_message_bytes
        config = producer_config(settings, max_message_bytes=self.max_message_bytes)
        config["on_delivery"] = self._on_delivery
        self._flush_timeout_s = settings.request_timeout_ms / 1000 + 5
        self._producer = Producer(config, logger=logger) if logger else Producer(config)
        # Failed delivery reports since the last flush; appended from the flushing thread.
        self._failures: list[KafkaError] = []

    def _on_delivery(self, error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            self._failures.append(error)

    def produce(
        self,
        topic: str,
        *,
        key: bytes | str | None,
        value: bytes | None,
        headers: list[tuple[str, bytes | str | None]],
        timestamp_ms: int = 0,
    ) -> None:
        # The delivery callback is the producer's default (set in its config): one fewer
        # argument per call, on the path of every crawl request.
        produce = self._producer.produce
        while True:
            try:
                produce(topic, value, key, headers=headers, timestamp=timestamp_ms)
                return
            except BufferError:
                # The local queue is full: serve delivery reports to make room.
                self._producer.poll(0.05)
            except KafkaException as exc:
                raise translate_error(exc) from exc

    def flush(self) -> None:
        """Wait for the acknowledgement of everything produced since the last flush; raise
        KafkaUnavailableError if any message was not delivered (FatalError if it never will)."""
        remaining = self._producer.flush(self._flush_timeout_s)
        failures, self._failures = self._failures, []
        if remaining:
            raise KafkaUnavailableError(f"{remaining} message(s) not acknowledged in time")
        if failures:
            first = failures[0]
            text = f"{len(failures)} message(s) not delivered: {first.name()}: {first.str()}"
            if any(f.fatal() or f.code() in _FATAL_CODES for f in failures):
                raise FatalError(text)
            raise KafkaUnavailableError(text)

    def close(self, timeout_s: float) -> int:
        """Flush what is queued; return how many messages were left undelivered."""
        return int(self._producer.flush(timeout_s))


def _commit_reporter(
    on_commit: Callable[[dict[int, int], str | None, bool], None],
) -> Callable[[KafkaError | None, list[TopicPartition]], None]:
    """librdkafka's commit callback, as ``on_commit(offsets, error, rebalancing)``: the
    offsets of the request, the first error (of the request or of a partition) or None, and
    whether that error is a rebalance's refusal (the offsets can be sent again later)."""

    def report(error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        offsets = {tp.partition: tp.offset for tp in partitions}
        failed = error or next((tp.error for tp in partitions if tp.error is not None), None)
        if failed is None:
            on_commit(offsets, None, False)
        else:
            text = f"{failed.name()}: {failed.str()}"
            on_commit(offsets, text, failed.code() in _REBALANCING_CODES)

    return report


class KafkaSource:
    """The consumer of one worker. Every method blocks; the worker calls them from its Kafka
    thread (``poll``, ``close``: rebalance callbacks run inside them) or its commit thread."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        slot: int,
        on_assign: Any,
        on_revoke: Any,
        on_lost: Any,
        logger: Any = None,
        error_cb: Any = None,
        on_commit: Callable[[dict[int, int], str | None, bool], None] | None = None,
    ) -> None:
        config = consumer_config(settings, slot=slot)
        if error_cb is not None:
            config["error_cb"] = error_cb
        if on_commit is not None:
            config["on_commit"] = _commit_reporter(on_commit)
        self.topic = settings.task_status_topic
        self._consumer = Consumer(config, logger=logger) if logger else Consumer(config)
        self._consumer.subscribe(
            [self.topic], on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost
        )

    def poll(
        self,
        max_messages: int,
        timeout_s: float,
        commit: dict[int, int] | None = None,
        linger_s: float = 0.0,
    ) -> list[Message]:
        """Wait at most ``timeout_s`` for a first message, then take up to ``max_messages`` in
        all of what is already fetched, waiting at most ``linger_s`` more for the rest (not at
        all by default: a batch is what arrived while the last one was being applied). ``commit``:
        offsets to commit asynchronously first; the result reaches ``on_commit`` from inside
        this or a later poll. (The client's calls wait for each other, so a commit is sent from
        the thread that polls.)"""
        consumer = self._consumer
        try:
            if commit:
                offsets = [TopicPartition(self.topic, p, o) for p, o in commit.items()]
                consumer.commit(offsets=offsets, asynchronous=True)
            first = consumer.poll(timeout_s)
            if first is None:
                return []
            if max_messages == 1:
                return [first]
            return [first, *consumer.consume(max_messages - 1, linger_s)]
        except KafkaException as exc:
            raise translate_error(exc) from exc

    def commit(self, committable: dict[int, int]) -> None:
        if not committable:
            return
        offsets = [TopicPartition(self.topic, p, o) for p, o in committable.items()]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            if error is not None and error.code() in _REBALANCING_CODES:
                raise CommitDeferredError(f"{error.name()}: {error.str()}") from exc
            raise translate_error(exc) from exc

    def rewind(self, first_offsets: dict[int, int]) -> None:
        """Seek each partition back so that its next fetch starts at the given offset."""
        for partition, offset in first_offsets.items():
            try:
                self._consumer.seek(TopicPartition(self.topic, partition, offset))
            except KafkaException as exc:
                raise translate_error(exc) from exc

    def pause(self, partitions: list[int]) -> None:
        if partitions:
            self._consumer.pause([TopicPartition(self.topic, p) for p in partitions])

    def resume(self, partitions: list[int]) -> None:
        if partitions:
            self._consumer.resume([TopicPartition(self.topic, p) for p in partitions])

    @staticmethod
    def assign_in_callback(
        consumer: Consumer, partitions: list[TopicPartition], *, paused: bool
    ) -> None:
        """From inside the assign callback: take the partitions now (so confluent-kafka does not
        assign them after the callback) and set their pause flag, which librdkafka would
        otherwise carry over from an earlier assignment."""
        try:
            consumer.incremental_assign(partitions)
            if paused:
                consumer.pause(partitions)
            else:
                consumer.resume(partitions)
        except KafkaException as exc:
            raise translate_error(exc) from exc

    @staticmethod
    def resume_in_callback(consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """From inside the revoke or lost callback: clear the pause flag of partitions that go,
        so that they are fetched again if they come back."""
        try:
            consumer.resume(partitions)
        except KafkaException as exc:
            raise translate_error(exc) from exc

    def committed(self, partitions: list[int], timeout_s: float) -> dict[int, int]:
        tps = [TopicPartition(self.topic, p) for p in partitions]
        return {tp.partition: tp.offset for tp in self._consumer.committed(tps, timeout_s)}

    def close(self) -> None:
        """Leave the group (runs the revoke callback) and free the client."""
        self._consumer.close()
