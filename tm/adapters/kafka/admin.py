"""Topic administration and metadata: the reachability probe, the topics' record limits, topic
creation. Each call builds its own AdminClient (they are rare: boot, pre-flight, commands)."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # public, not in its __all__
    AdminClient,
    ConfigResource,
    ResourceType,
)
from confluent_kafka.cimpl import NewTopic

from tm.adapters.kafka.clients import PRODUCER_MAX_MESSAGE_BYTES, client_config
from tm.adapters.kafka.errors import connection_problem, kafka_error, translated
from tm.connections import KafkaSettings
from tm.errors import FatalError, KafkaUnavailableError


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    """What a metadata request told us."""

    brokers: int
    topics: dict[str, int]  # name -> partition count


def describe(settings: KafkaSettings, *, timeout_s: float) -> ClusterInfo:
    """One metadata request; raises KafkaUnavailableError if no broker answers within
    ``timeout_s``, saying why in terms of the settings (a refused password, an untrusted
    certificate, ...: :func:`~tm.adapters.kafka.errors.connection_problem`)."""
    errors: list[KafkaError] = []
    config = client_config(settings)
    config.update({"log_level": 0, "error_cb": errors.append})
    admin = AdminClient(config)
    try:
        with translated:
            metadata = admin.list_topics(timeout=timeout_s)
    except KafkaUnavailableError as exc:
        admin.poll(0)  # the client's errors while it tried, served to error_cb
        raise KafkaUnavailableError(connection_problem(settings, errors)) from exc
    return ClusterInfo(
        brokers=len(metadata.brokers),
        topics={name: len(topic.partitions) for name, topic in metadata.topics.items()},
    )


# Kafka's default max.message.bytes (the broker's message.max.bytes), for a topic and a broker
# that report none.
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
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
        with translated:
            futures = admin.describe_configs(resources, request_timeout=timeout_s)
            for resource, future in futures.items():
                entry = future.result(timeout=timeout_s).get("max.message.bytes")
                if entry is not None and entry.value:
                    limits[resource.name] = int(entry.value)
            if len(limits) < len(topics):
                default = _broker_max_message_bytes(admin, timeout_s)
                limits.update({name: default for name in topics if name not in limits})
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
    with translated:
        for name, future in admin.create_topics(missing, operation_timeout=timeout_s).items():
            result[name] = _created(future, timeout_s)
    return result


def _created(future: Future[None], timeout_s: float) -> str:
    """``created``, or ``exists`` when another tm created the topic meanwhile."""
    try:
        future.result(timeout=timeout_s)
    except KafkaException as exc:
        error = kafka_error(exc)
        if error is not None and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
            return "exists"
        raise
    return "created"
