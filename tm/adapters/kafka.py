"""confluent-kafka: client configuration, topic administration and the reachability probe.

librdkafka is not fork-safe: nothing here may be created before a worker forks. Errors from
librdkafka are translated by their error code (``KafkaError.code()``), never by message text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from tm.config import KafkaSettings
from tm.errors import FatalError, KafkaUnavailableError


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
        KafkaError._AUTHENTICATION,  # noqa: SLF001 (librdkafka's local error codes)
        KafkaError._INVALID_ARG,  # noqa: SLF001
    }
)


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
