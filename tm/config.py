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
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import msgspec

from tm import cpus
from tm.errors import ConfigError

T = TypeVar("T")

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_HOST_PORT_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")

LOG_FORMATS = ("simple", "structured", "otel")
LOG_LEVELS = ("debug", "info", "warn", "error")
SASL_MECHANISMS = ("plain", "scram-sha-256", "scram-sha-512")
ENVIRONMENTS = ("development", "production", "test")


class KafkaSettings(msgspec.Struct, frozen=True, kw_only=True):
    brokers: tuple[str, ...]
    client_id: str
    group_id: str
    group_instance_id: str | None
    task_status_topic: str
    web_crawl_request_topic: str
    dlq_topic: str
    topic_partitions: int
    topic_replication_factor: int
    ssl_enabled: bool
    sasl_enabled: bool
    sasl_mechanism: str
    sasl_username: str | None
    sasl_password: str | None
    connection_timeout_ms: int
    request_timeout_ms: int
    session_timeout_ms: int
    heartbeat_interval_ms: int
    retry_backoff_ms: int
    max_retry_attempts: int


class PostgresSettings(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    port: int
    user: str
    password: str
    database: str
    ssl: bool
    max_connections: int
    idle_timeout_ms: int
    connection_timeout_ms: int
    query_timeout_ms: int


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


class LogSettings(msgspec.Struct, frozen=True, kw_only=True):
    format: str
    level: str
    service_name: str
    colors: bool
    directory: str | None
    pii: bool


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


class RedisSettings(msgspec.Struct, frozen=True, kw_only=True):
    url: str | None  # None: no task-event feed, and no Redis client is imported
    stream: str
    stream_maxlen: int


class MetricsSettings(msgspec.Struct, frozen=True, kw_only=True):
    # PROMETHEUS_MULTIPROC_DIR: where the processes of `tm run` keep their metric files. None:
    # the supervisor makes a temporary one, and passes it down to its children in their settings.
    directory: str | None


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


class _Env:
    """Reads one variable at a time and raises ConfigError on the first bad one."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def _raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def _parse(self, name: str, default: T, parse: Callable[[str], T | None], expected: str) -> T:
        raw = self._raw(name)
        if raw is None:
            return default
        value = parse(raw)
        if value is None:
            raise ConfigError(name, raw, expected)
        return value

    def text(self, name: str, default: str) -> str:
        return self._raw(name) or default

    def optional(self, name: str) -> str | None:
        return self._raw(name)

    def integer(self, name: str, default: int, *, lo: int, hi: int) -> int:
        def parse(raw: str) -> int | None:
            try:
                value = int(raw)
            except ValueError:
                return None
            return value if lo <= value <= hi else None

        return self._parse(name, default, parse, f"an integer in {lo}..{hi}")

    def number(self, name: str, default: float, *, lo: float, hi: float) -> float:
        def parse(raw: str) -> float | None:
            try:
                value = float(raw)
            except ValueError:
                return None
            return value if lo <= value <= hi else None

        return self._parse(name, default, parse, f"a number in {lo}..{hi}")

    def flag(self, name: str, default: bool) -> bool:
        def parse(raw: str) -> bool | None:
            low = raw.lower()
            return True if low in _TRUE else False if low in _FALSE else None

        return self._parse(name, default, parse, "one of true/false/1/0/yes/no/on/off")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        def parse(raw: str) -> str | None:
            low = raw.lower()
            return low if low in choices else None

        return self._parse(name, default, parse, "one of " + ", ".join(choices))

    def topic(self, name: str, default: str) -> str:
        def parse(raw: str) -> str | None:
            return raw if _TOPIC_RE.match(raw) and raw not in (".", "..") else None

        return self._parse(name, default, parse, "a Kafka topic name ([A-Za-z0-9._-], 1..249)")

    def brokers(self, name: str, default: str) -> tuple[str, ...]:
        def parse(raw: str) -> tuple[str, ...] | None:
            items = tuple(part.strip() for part in raw.split(",") if part.strip())
            ok = items and all(_HOST_PORT_RE.match(item) for item in items)
            return items if ok else None

        return self._parse(name, tuple(default.split(",")), parse, "a list of host:port")

    def int_list(self, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
        def parse(raw: str) -> tuple[int, ...] | None:
            try:
                items = tuple(int(part) for part in raw.split(","))
            except ValueError:
                return None
            return items if all(item > 0 for item in items) else None

        return self._parse(name, default, parse, "a comma-separated list of positive integers")

    def url(self, name: str, default: str) -> str:
        def parse(raw: str) -> str | None:
            parts = urlsplit(raw)
            ok = parts.scheme in ("http", "https") and bool(parts.netloc)
            return raw.rstrip("/") if ok else None

        return self._parse(name, default, parse, "an http(s) base URL")

    def redis_url(self, name: str) -> str | None:
        raw = self._raw(name)
        if raw is None:
            return None
        try:
            parts = urlsplit(raw)
            port_ok = parts.port is None or 0 < parts.port < 65536
            db = parts.path.strip("/")
        except ValueError:
            parts, port_ok, db = urlsplit(""), False, ""
        ok = parts.scheme in ("redis", "rediss") and bool(parts.hostname) and port_ok
        if ok and (not db or db.isdigit()):
            return raw
        shown = re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", raw)  # never print a password
        raise ConfigError(name, shown, "redis://[user:password@]host[:port][/db]")


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Parse the environment (``os.environ`` by default) into Settings, or raise ConfigError."""
    env = _Env(os.environ if environ is None else environ)
    kafka = _kafka(env)
    consumer = _consumer(env)
    return Settings(
        environment=env.choice("NODE_ENV", "development", ENVIRONMENTS),
        kafka=kafka,
        postgres=_postgres(env, consumer.workers),
        consumer=consumer,
        log=LogSettings(
            format=env.choice("LOG_FORMAT", "simple", LOG_FORMATS),
            level=env.choice("LOG_LEVEL", "info", LOG_LEVELS),
            service_name=env.text("SERVICE_NAME", "Task Manager"),
            colors=env.flag("LOG_COLORS", False),
            directory=env.optional("LOG_DIR"),
            pii=env.flag("LOG_PII", False),
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
        redis=RedisSettings(
            url=env.redis_url("REDIS_URL"),
            stream=env.text("TM_REDIS_STREAM", "tm:task-events"),
            stream_maxlen=env.integer(
                "TM_REDIS_STREAM_MAXLEN", 1_000_000, lo=1_000, hi=1_000_000_000
            ),
        ),
        metrics=MetricsSettings(directory=env.optional("PROMETHEUS_MULTIPROC_DIR")),
    )


def _kafka(env: _Env) -> KafkaSettings:
    sasl_enabled = env.flag("KAFKA_SASL_ENABLED", False)
    username = env.optional("KAFKA_SASL_USERNAME")
    password = env.optional("KAFKA_SASL_PASSWORD")
    if sasl_enabled and not (username and password):
        missing = "KAFKA_SASL_USERNAME" if not username else "KAFKA_SASL_PASSWORD"
        raise ConfigError(missing, "", "a value when KAFKA_SASL_ENABLED is true")
    return KafkaSettings(
        brokers=env.brokers("KAFKA_BROKERS", "localhost:9092"),
        client_id=env.text("KAFKA_CLIENT_ID", "task-manager"),
        group_id=env.text("KAFKA_GROUP_ID", "task-manager-group"),
        group_instance_id=env.optional("KAFKA_GROUP_INSTANCE_ID"),
        task_status_topic=env.topic("TASK_STATUS_TOPIC", "task-status"),
        web_crawl_request_topic=env.topic("WEB_CRAWL_REQUEST_TOPIC", "requests-web-crawl"),
        dlq_topic=env.topic("DLQ_TOPIC", "task-status.dlq"),
        topic_partitions=env.integer("TM_TOPIC_PARTITIONS", 6, lo=1, hi=10_000),
        topic_replication_factor=env.integer("TM_TOPIC_REPLICATION_FACTOR", 1, lo=1, hi=100),
        ssl_enabled=env.flag("KAFKA_SSL_ENABLED", False),
        sasl_enabled=sasl_enabled,
        sasl_mechanism=env.choice("KAFKA_SASL_MECHANISM", "plain", SASL_MECHANISMS),
        sasl_username=username,
        sasl_password=password,
        connection_timeout_ms=env.integer("KAFKA_CONNECTION_TIMEOUT", 3000, lo=1, hi=600_000),
        request_timeout_ms=env.integer("KAFKA_REQUEST_TIMEOUT", 30000, lo=1, hi=600_000),
        session_timeout_ms=env.integer("KAFKA_SESSION_TIMEOUT", 30000, lo=1000, hi=3_600_000),
        # 1 s, not the 3 s the original declared (and never used): a cooperative rebalance
        # takes two rounds, each waiting for a heartbeat, and start-to-ready must stay < 5 s.
        heartbeat_interval_ms=env.integer("KAFKA_HEARTBEAT_INTERVAL", 1000, lo=100, hi=3_600_000),
        retry_backoff_ms=env.integer("KAFKA_RETRY_BACKOFF", 100, lo=1, hi=600_000),
        max_retry_attempts=env.integer("KAFKA_MAX_RETRY_ATTEMPTS", 3, lo=0, hi=1000),
    )


def _postgres(env: _Env, workers: int) -> PostgresSettings:
    return PostgresSettings(
        host=env.text("POSTGRES_HOST", "localhost"),
        port=env.integer("POSTGRES_PORT", 5432, lo=1, hi=65535),
        user=env.text("POSTGRES_USER", "postgres"),
        password=env.text("POSTGRES_PASSWORD", "password"),
        database=env.text("POSTGRES_DB", "tasks_manager"),
        ssl=env.flag("POSTGRES_SSL", False),
        max_connections=env.integer("POSTGRES_MAX_CONNECTIONS", 10, lo=1, hi=1000),
        idle_timeout_ms=env.integer("POSTGRES_IDLE_TIMEOUT", 30000, lo=0, hi=86_400_000),
        connection_timeout_ms=env.integer("POSTGRES_CONNECTION_TIMEOUT", 10000, lo=1, hi=600_000),
        query_timeout_ms=env.integer("POSTGRES_QUERY_TIMEOUT", 30000, lo=1, hi=3_600_000),
    )


def _consumer(env: _Env) -> ConsumerSettings:
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
    )


MAX_WORKERS = 256  # the largest TM_WORKERS accepted


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


def _http(env: _Env) -> HttpSettings:
    available = env.int_list("METRICS_AVAILABLE_TIME_RANGES", (1, 6, 12, 24, 48, 72))
    return HttpSettings(
        port=env.integer("APP_PORT", 3000, lo=1, hi=65535),
        api_token=env.optional("API_TOKEN"),
        metrics_default_hours=env.integer("METRICS_DEFAULT_TIME_RANGE_HOURS", 24, lo=1, hi=8760),
        metrics_available_hours=available,
        metrics_refresh_interval_s=env.integer(
            "METRICS_REFRESH_INTERVAL_SECONDS", 15, lo=1, hi=86400
        ),
    )
