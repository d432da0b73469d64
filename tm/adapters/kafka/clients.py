"""The configuration of tm's Kafka clients: what every client shares, then the worker's consumer
and producer."""

from __future__ import annotations

from typing import Any

from tm.connections import KafkaSettings

# librdkafka's default message.max.bytes: tm's producer never goes above it.
PRODUCER_MAX_MESSAGE_BYTES = 1_000_000


def client_config(settings: KafkaSettings) -> dict[str, Any]:
    """Properties every client shares: brokers, client id, security, timeouts, retries. Every
    Kafka client tm makes (worker, pre-flight, API, commands) starts from these, so one set of
    settings secures them all."""
    config: dict[str, Any] = {
        "bootstrap.servers": ",".join(settings.brokers),
        "client.id": settings.client_id,
        "security.protocol": settings.security_protocol.upper(),
        "socket.connection.setup.timeout.ms": settings.connection_timeout_ms,
        "retry.backoff.ms": settings.retry_backoff_ms,
    }
    config.update(_ssl_config(settings))
    config.update(_sasl_config(settings))
    return config


def _ssl_config(settings: KafkaSettings) -> dict[str, Any]:
    if not settings.uses_ssl:
        return {}
    config: dict[str, Any] = {
        # No CA file: the system's CA certificates, which a public managed cluster's chain to.
        "ssl.ca.location": settings.ssl_ca_location or "probe",
        "ssl.endpoint.identification.algorithm": (
            "https" if settings.ssl_verify_hostname else "none"
        ),
        "enable.ssl.certificate.verification": True,
    }
    if settings.ssl_certificate_location and settings.ssl_key_location:
        config["ssl.certificate.location"] = settings.ssl_certificate_location
        config["ssl.key.location"] = settings.ssl_key_location
        if settings.ssl_key_password:
            config["ssl.key.password"] = settings.ssl_key_password
    return config


def _sasl_config(settings: KafkaSettings) -> dict[str, Any]:
    if not settings.uses_sasl:
        return {}
    config: dict[str, Any] = {"sasl.mechanism": settings.sasl_mechanism.upper()}
    if settings.sasl_mechanism != "oauthbearer":
        config["sasl.username"] = settings.sasl_username
        config["sasl.password"] = settings.sasl_password
        return config
    # OIDC client credentials, as librdkafka does them: it asks the token endpoint for a token
    # (and again before it expires) and sends it to the brokers.
    config.update(
        {
            "sasl.oauthbearer.method": "oidc",
            "sasl.oauthbearer.token.endpoint.url": settings.oauthbearer_token_endpoint_url,
            "sasl.oauthbearer.client.id": settings.oauthbearer_client_id,
            "sasl.oauthbearer.client.secret": settings.oauthbearer_client_secret,
        }
    )
    if settings.oauthbearer_scope:
        config["sasl.oauthbearer.scope"] = settings.oauthbearer_scope
    if settings.oauthbearer_ca_location:
        config["https.ca.location"] = settings.oauthbearer_ca_location
    return config


# Per-partition fetch queue of the consumer; librdkafka's default (64 MiB) times partitions
# times workers would blow the 512 MiB memory budget on its own.
QUEUED_MAX_KBYTES = 8192
# How long the producer batches before sending: a batch's publishes go out together anyway,
# and waiting for the acknowledgements dominates.
PRODUCER_LINGER_MS = 2
# The transactional producer's first retry of a protocol request (librdkafka: 100 ms, doubled up
# to retry.backoff.max.ms). A transaction begun right after the previous one committed finds the
# coordinator still writing that one's markers, and its AddOffsetsToTxn is answered
# CONCURRENT_TRANSACTIONS for a few milliseconds: with 100 ms, most batches waited 100 ms.
TRANSACTION_RETRY_BACKOFF_MS = 5


# How partitions move between members. Cooperative (incremental) rebalancing moves only the
# partitions that change owner, in two rounds: the first takes them from their owner, which
# rejoins once it has let them go, and the second gives them to their new owner. A static
# member (KAFKA_GROUP_INSTANCE_ID) killed between the two rounds and restarted under its
# identity within its session is taken by the coordinator for the same member, handed the
# assignment of the first round, and never rejoins: the partitions it was letting go stay
# without an owner until some other rebalance. So static members rebalance eagerly (every
# member lets everything go, and each round's assignment is whole); static membership already
# spares them the rebalances of restarts.
COOPERATIVE_ASSIGNOR = "cooperative-sticky"
EAGER_ASSIGNOR = "range"


def assignor(settings: KafkaSettings) -> str:
    return EAGER_ASSIGNOR if settings.group_instance_id else COOPERATIVE_ASSIGNOR


def consumer_config(settings: KafkaSettings, *, slot: int) -> dict[str, Any]:
    config = client_config(settings)
    config.update(
        {
            "group.id": settings.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": assignor(settings),
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


def transactional_id(settings: KafkaSettings, *, slot: int, process: str) -> str:
    """Exactly-once: the worker's transactional.id, the same for every restart of its slot so
    that a new worker fences its predecessor and aborts the transaction it left open. From the
    group, the static instance id (the pod's name) when set, else ``process`` (the host and
    the supervisor's pid: two tm on one host never share one), and the slot."""
    instance = settings.group_instance_id or process
    return f"tm.{settings.group_id}.{instance}.{slot}"


def transactional_producer_config(
    settings: KafkaSettings, *, max_message_bytes: int, transactional_id: str
) -> dict[str, Any]:
    config = producer_config(settings, max_message_bytes=max_message_bytes)
    config.update(
        {
            "transactional.id": transactional_id,
            "transaction.timeout.ms": settings.transaction_timeout_ms,
            "retry.backoff.ms": TRANSACTION_RETRY_BACKOFF_MS,
        }
    )
    return config
