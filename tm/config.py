"""Settings: every environment variable tm reads, parsed once into one frozen object.

This module is the only reader of ``os.environ``. :func:`load` turns the environment into a
:class:`Settings` and raises :class:`~tm.errors.ConfigError` naming the first bad variable, its
value and what was expected; ``tm`` prints that one line and exits with status 2.

Names and defaults follow the service tm replaces (``KAFKA_*``, ``POSTGRES_*``, ``LOG_*``,
``OTEL_*``, ...), so its deployments keep working; tm's own knobs start with ``TM_``, and
``PROMETHEUS_MULTIPROC_DIR`` is prometheus-client's own. Booleans accept
``true/false/1/0/yes/no/on/off`` in any case: ``"false"`` is false (the old service read it as
true). Durations keep the unit of the original variable (milliseconds) in their names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import msgspec

from tm import connections, cpus
from tm.connections import KafkaSettings, PostgresSettings, RedisSettings
from tm.environ import Environ
from tm.errors import ConfigError

LOG_FORMATS = ("simple", "structured", "otel")
LOG_LEVELS = ("debug", "info", "warn", "error")
ENVIRONMENTS = ("development", "production", "test")
AT_LEAST_ONCE, EXACTLY_ONCE = "at-least-once", "exactly-once"
DELIVERY_MODES = (AT_LEAST_ONCE, EXACTLY_ONCE)


class ConsumerSettings(msgspec.Struct, frozen=True, kw_only=True):
    workers: int
    is_workers_default: bool  # TM_WORKERS unset: the supervisor caps it at the partition count
    batch_max_messages: int
    batch_linger_ms: int
    retry_backoff_initial_ms: int
    retry_backoff_max_ms: int
    max_result_chars: int
    heartbeat_timeout_ms: int
    graceful_shutdown_timeout_ms: int
    # TM_DELIVERY: at-least-once (offsets committed after the outputs are acknowledged) or
    # exactly-once (outputs and offsets in one Kafka transaction per batch).
    delivery: str = AT_LEAST_ONCE

    @property
    def is_exactly_once(self) -> bool:
        return self.delivery == EXACTLY_ONCE


class LogSettings(msgspec.Struct, frozen=True, kw_only=True):
    format: str
    level: str
    service_name: str
    colors: bool
    directory: str | None
    pii: bool
    progress_interval_s: float = 30.0  # TM_PROGRESS_INTERVAL_S; 0: no progress lines


class OtelSettings(msgspec.Struct, frozen=True, kw_only=True):
    enabled: bool
    service_name: str
    service_version: str
    exporter_endpoint: str
    sampling_rate: float
    max_queue_size: int
    max_batch_size: int
    delay_ms: int
    timeout_ms: int


class HttpSettings(msgspec.Struct, frozen=True, kw_only=True):
    port: int
    api_token: str | None
    metrics_default_hours: int
    metrics_available_hours: tuple[int, ...]
    metrics_refresh_interval_s: int


class MetricsSettings(msgspec.Struct, frozen=True, kw_only=True):
    # PROMETHEUS_MULTIPROC_DIR: where the processes of `tm run` keep their metric files. None:
    # the supervisor makes a temporary one, and passes it down to its children in their settings.
    directory: str | None


class RetentionSettings(msgspec.Struct, frozen=True, kw_only=True):
    # TM_RETENTION_DAYS: finished tasks (completed, error) created longer ago than this are
    # removed by `tm db prune`. None (unset): keep every task; `tm db prune` deletes nothing.
    days: int | None = None


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    environment: str
    kafka: KafkaSettings
    postgres: PostgresSettings
    consumer: ConsumerSettings
    log: LogSettings
    otel: OtelSettings
    http: HttpSettings
    redis: RedisSettings
    metrics: MetricsSettings
    retention: RetentionSettings = RetentionSettings()


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Parse the environment (``os.environ`` by default) into Settings, or raise ConfigError."""
    env = Environ(os.environ if environ is None else environ)
    consumer = _consumer(env)
    return Settings(
        environment=env.choice("NODE_ENV", "development", ENVIRONMENTS),
        kafka=connections.kafka(env),
        postgres=connections.postgres(env),
        consumer=consumer,
        log=LogSettings(
            format=env.choice("LOG_FORMAT", "simple", LOG_FORMATS),
            level=env.choice("LOG_LEVEL", "info", LOG_LEVELS),
            service_name=env.text("SERVICE_NAME", "Task Manager"),
            colors=env.flag("LOG_COLORS", False),
            directory=env.optional("LOG_DIR"),
            pii=env.flag("LOG_PII", False),
            progress_interval_s=env.number("TM_PROGRESS_INTERVAL_S", 30.0, lo=0.0, hi=86400.0),
        ),
        otel=OtelSettings(
            enabled=env.flag("OTEL_ENABLED", False),
            service_name=env.text("OTEL_SERVICE_NAME", "task-manager"),
            service_version=env.text("OTEL_SERVICE_VERSION", "0.1.0"),
            exporter_endpoint=env.url("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318"),
            sampling_rate=env.number("TRACING_SAMPLING_RATE", 1.0, lo=0.0, hi=1.0),
            max_queue_size=env.integer("TRACING_MAX_QUEUE_SIZE", 2048, lo=1, hi=1_000_000),
            max_batch_size=env.integer("TRACING_MAX_BATCH_SIZE", 512, lo=1, hi=100_000),
            delay_ms=env.integer("TRACING_DELAY_MS", 5000, lo=1, hi=3_600_000),
            timeout_ms=env.integer("TRACING_TIMEOUT_MS", 30000, lo=1, hi=3_600_000),
        ),
        http=_http(env),
        redis=connections.redis(env),
        metrics=MetricsSettings(directory=env.optional("PROMETHEUS_MULTIPROC_DIR")),
        retention=RetentionSettings(
            days=env.optional_integer("TM_RETENTION_DAYS", lo=1, hi=MAX_RETENTION_DAYS)
        ),
    )


def _consumer(env: Environ) -> ConsumerSettings:
    initial = env.integer("TM_RETRY_BACKOFF_INITIAL_MS", 100, lo=1, hi=3_600_000)
    cap = env.integer("TM_RETRY_BACKOFF_MAX_MS", 30000, lo=1, hi=3_600_000)
    if cap < initial:
        raise ConfigError(
            "TM_RETRY_BACKOFF_MAX_MS", str(cap), f">= TM_RETRY_BACKOFF_INITIAL_MS ({initial})"
        )
    return ConsumerSettings(
        workers=env.integer("TM_WORKERS", default_workers(), lo=1, hi=MAX_WORKERS),
        is_workers_default=env.optional("TM_WORKERS") is None,
        batch_max_messages=env.integer("TM_BATCH_MAX_MESSAGES", 2000, lo=1, hi=100_000),
        batch_linger_ms=env.integer("TM_BATCH_LINGER_MS", 5, lo=0, hi=60_000),
        retry_backoff_initial_ms=initial,
        retry_backoff_max_ms=cap,
        max_result_chars=env.integer("TM_MAX_RESULT_CHARS", 1_048_576, lo=1, hi=100_000_000),
        heartbeat_timeout_ms=env.integer("TM_HEARTBEAT_TIMEOUT_MS", 30000, lo=1000, hi=3_600_000),
        graceful_shutdown_timeout_ms=env.integer(
            "GRACEFUL_SHUTDOWN_TIMEOUT", 30000, lo=1000, hi=3_600_000
        ),
        delivery=env.choice("TM_DELIVERY", AT_LEAST_ONCE, DELIVERY_MODES),
    )


MAX_WORKERS = 256  # the largest TM_WORKERS accepted
MAX_RETENTION_DAYS = 36_500  # a century: a bigger value is a typo, not a policy


def default_workers(*, root: Path = Path("/"), affinity: int | None = None) -> int:
    """TM_WORKERS when unset: the CPUs this process may run on (:func:`tm.cpus.usable`), at
    most MAX_WORKERS. Not ``os.cpu_count()``: in a container that is the node's, not the
    pod's limit."""
    return min(cpus.usable(root=root, affinity=affinity), MAX_WORKERS)


def cap_workers(settings: Settings, *, partitions: int) -> Settings:
    """The settings with a default worker count of at most ``partitions`` (the topic's, known
    after the pre-flight check): a worker beyond them would own nothing. An explicit
    TM_WORKERS is kept as it is."""
    consumer = settings.consumer
    if not consumer.is_workers_default or partitions < 1 or consumer.workers <= partitions:
        return settings
    return msgspec.structs.replace(
        settings, consumer=msgspec.structs.replace(consumer, workers=partitions)
    )


def _http(env: Environ) -> HttpSettings:
    available = env.int_list("METRICS_AVAILABLE_TIME_RANGES", (1, 6, 12, 24, 48, 72))
    return HttpSettings(
        port=env.integer("APP_PORT", 3000, lo=1, hi=65535),
        api_token=env.secret("API_TOKEN"),
        metrics_default_hours=env.integer("METRICS_DEFAULT_TIME_RANGE_HOURS", 24, lo=1, hi=8760),
        metrics_available_hours=available,
        metrics_refresh_interval_s=env.integer(
            "METRICS_REFRESH_INTERVAL_SECONDS", 15, lo=1, hi=86400
        ),
    )
