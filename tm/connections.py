"""How tm reaches Kafka, PostgreSQL and Redis: their settings, security included (TLS, SASL,
client certificates, an OAuth token endpoint), read from the environment that
:func:`tm.config.load` hands over, with each pair or combination that cannot work refused
as a :class:`~tm.errors.ConfigError` naming the variable.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import msgspec

from tm.environ import Environ
from tm.errors import ConfigError

SECURITY_PROTOCOLS = ("plaintext", "ssl", "sasl_plaintext", "sasl_ssl")
SASL_MECHANISMS = ("plain", "scram-sha-256", "scram-sha-512", "oauthbearer")
# libpq's sslmode values, weakest first (asyncpg takes the same).
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


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
    security_protocol: str  # one of SECURITY_PROTOCOLS
    ssl_ca_location: str | None  # None: the system's CA certificates
    ssl_certificate_location: str | None  # mutual TLS: the client's certificate ...
    ssl_key_location: str | None  # ... and its private key
    ssl_key_password: str | None
    ssl_verify_hostname: bool
    sasl_mechanism: str
    sasl_username: str | None
    sasl_password: str | None
    oauthbearer_token_endpoint_url: str | None  # OIDC client credentials
    oauthbearer_client_id: str | None
    oauthbearer_client_secret: str | None
    oauthbearer_scope: str | None
    oauthbearer_ca_location: str | None  # CA of an https token endpoint; None: the system's
    connection_timeout_ms: int
    request_timeout_ms: int
    session_timeout_ms: int
    heartbeat_interval_ms: int
    retry_backoff_ms: int
    max_retry_attempts: int
    # Exactly-once: how long the broker lets a transaction stay open before it aborts it (a
    # worker gone for good; a restarted one aborts its predecessor's at once).
    transaction_timeout_ms: int = 60000

    @property
    def uses_ssl(self) -> bool:
        return self.security_protocol in ("ssl", "sasl_ssl")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("sasl_")


class PostgresSettings(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    port: int
    user: str
    password: str
    database: str
    sslmode: str  # one of SSL_MODES
    ssl_root_cert: str | None  # None: the system's CA certificates (verify-ca, verify-full)
    ssl_cert: str | None  # a client certificate ...
    ssl_key: str | None  # ... and its private key
    max_connections: int
    idle_timeout_ms: int
    connection_timeout_ms: int
    query_timeout_ms: int


class RedisSettings(msgspec.Struct, frozen=True, kw_only=True):
    url: str | None  # None: no task-event feed, and no Redis client is imported
    stream: str
    stream_maxlen: int
    ssl_ca_file: str | None = None  # rediss://: the CA that signed the server; None: system's


def _security_protocol(env: Environ) -> str:
    """KAFKA_SECURITY_PROTOCOL, or what the original service's two switches say when it is
    unset (KAFKA_SSL_ENABLED, KAFKA_SASL_ENABLED). A switch that is on must agree with it; off,
    a switch says nothing (a ConfigMap lists every setting with its default)."""
    ssl_on = env.flag("KAFKA_SSL_ENABLED", False)
    sasl_on = env.flag("KAFKA_SASL_ENABLED", False)
    implied = ("sasl_" if sasl_on else "") + ("ssl" if ssl_on else "plaintext")
    protocol = env.choice("KAFKA_SECURITY_PROTOCOL", implied, SECURITY_PROTOCOLS)
    for switch, on, given in (
        ("KAFKA_SSL_ENABLED", ssl_on, protocol.endswith("ssl")),
        ("KAFKA_SASL_ENABLED", sasl_on, protocol.startswith("sasl_")),
    ):
        if on and not given:
            raise ConfigError(
                switch, env.optional(switch) or "", f"false with KAFKA_SECURITY_PROTOCOL={protocol}"
            )
    return protocol


def kafka(env: Environ) -> KafkaSettings:
    protocol = _security_protocol(env)
    mechanism = env.choice("KAFKA_SASL_MECHANISM", "plain", SASL_MECHANISMS)
    username = env.optional("KAFKA_SASL_USERNAME")
    password = env.secret("KAFKA_SASL_PASSWORD")
    token_url = env.optional("KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL")
    client_id = env.optional("KAFKA_SASL_OAUTHBEARER_CLIENT_ID")
    client_secret = env.secret("KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET")
    if protocol.startswith("sasl_"):
        if mechanism == "oauthbearer":
            needed = {
                "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": token_url,
                "KAFKA_SASL_OAUTHBEARER_CLIENT_ID": client_id,
                "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": client_secret,
            }
        else:
            needed = {"KAFKA_SASL_USERNAME": username, "KAFKA_SASL_PASSWORD": password}
        for name, value in needed.items():
            if not value:
                raise ConfigError(name, "", f"a value with SASL mechanism {mechanism}")
        if token_url is not None and urlsplit(token_url).scheme not in ("http", "https"):
            raise ConfigError(
                "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL", token_url, "an http(s) URL"
            )
    ca = env.file("KAFKA_SSL_CA_LOCATION")
    certificate = env.file("KAFKA_SSL_CERTIFICATE_LOCATION")
    key = env.file("KAFKA_SSL_KEY_LOCATION")
    if (certificate is None) != (key is None):
        name = "KAFKA_SSL_KEY_LOCATION" if key is None else "KAFKA_SSL_CERTIFICATE_LOCATION"
        raise ConfigError(name, "", "set together with its pair (mutual TLS needs both)")
    if not protocol.endswith("ssl") and (ca or certificate):
        raise ConfigError(
            "KAFKA_SECURITY_PROTOCOL", protocol, "ssl or sasl_ssl when TLS files are given"
        )
    request_timeout_ms = env.integer("KAFKA_REQUEST_TIMEOUT", 30000, lo=1, hi=600_000)
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
        security_protocol=protocol,
        ssl_ca_location=ca,
        ssl_certificate_location=certificate,
        ssl_key_location=key,
        ssl_key_password=env.secret("KAFKA_SSL_KEY_PASSWORD"),
        ssl_verify_hostname=env.flag("KAFKA_SSL_VERIFY_HOSTNAME", True),
        sasl_mechanism=mechanism,
        sasl_username=username,
        sasl_password=password,
        oauthbearer_token_endpoint_url=token_url,
        oauthbearer_client_id=client_id,
        oauthbearer_client_secret=client_secret,
        oauthbearer_scope=env.optional("KAFKA_SASL_OAUTHBEARER_SCOPE"),
        oauthbearer_ca_location=env.file("KAFKA_SASL_OAUTHBEARER_CA_LOCATION"),
        connection_timeout_ms=env.integer("KAFKA_CONNECTION_TIMEOUT", 3000, lo=1, hi=600_000),
        request_timeout_ms=request_timeout_ms,
        session_timeout_ms=env.integer("KAFKA_SESSION_TIMEOUT", 30000, lo=1000, hi=3_600_000),
        # 1 s, not the 3 s the original declared (and never used): a cooperative rebalance
        # takes two rounds, each waiting for a heartbeat, and start-to-ready must stay < 5 s.
        heartbeat_interval_ms=env.integer("KAFKA_HEARTBEAT_INTERVAL", 1000, lo=100, hi=3_600_000),
        retry_backoff_ms=env.integer("KAFKA_RETRY_BACKOFF", 100, lo=1, hi=600_000),
        max_retry_attempts=env.integer("KAFKA_MAX_RETRY_ATTEMPTS", 3, lo=0, hi=1000),
        transaction_timeout_ms=_transaction_timeout_ms(env, request_timeout_ms),
    )


def _transaction_timeout_ms(env: Environ, request_timeout_ms: int) -> int:
    """KAFKA_TRANSACTION_TIMEOUT: at least KAFKA_REQUEST_TIMEOUT, which bounds a message's
    delivery (librdkafka refuses a message timeout above the transaction timeout)."""
    timeout_ms = env.integer("KAFKA_TRANSACTION_TIMEOUT", 60000, lo=1000, hi=900_000)
    if timeout_ms < request_timeout_ms:
        raise ConfigError(
            "KAFKA_TRANSACTION_TIMEOUT",
            str(timeout_ms),
            f">= KAFKA_REQUEST_TIMEOUT ({request_timeout_ms})",
        )
    return timeout_ms


def _sslmode(env: Environ, root_cert: str | None) -> str:
    """POSTGRES_SSLMODE. Unset: ``verify-full`` when a CA is given (POSTGRES_SSL_ROOT_CERT) or the
    original switch POSTGRES_SSL is on, since a CA that is not checked, or a certificate checked
    without its host name, protects against nobody; otherwise ``prefer`` (libpq's default): TLS
    whenever the server offers it, plaintext with a server that has none (a local one)."""
    strict = root_cert is not None or env.flag("POSTGRES_SSL", False)
    return env.choice("POSTGRES_SSLMODE", "verify-full" if strict else "prefer", SSL_MODES)


def postgres(env: Environ) -> PostgresSettings:
    root_cert = env.file("POSTGRES_SSL_ROOT_CERT")
    sslmode = _sslmode(env, root_cert)
    cert = env.file("POSTGRES_SSL_CERT")
    key = env.file("POSTGRES_SSL_KEY")
    if (cert is None) != (key is None):
        name = "POSTGRES_SSL_KEY" if key is None else "POSTGRES_SSL_CERT"
        raise ConfigError(name, "", "set together with its pair (a client certificate needs both)")
    if cert is not None and SSL_MODES.index(sslmode) < SSL_MODES.index("require"):
        raise ConfigError(
            "POSTGRES_SSLMODE", sslmode, "require or stronger with a client certificate"
        )
    return PostgresSettings(
        host=env.text("POSTGRES_HOST", "localhost"),
        port=env.integer("POSTGRES_PORT", 5432, lo=1, hi=65535),
        user=env.text("POSTGRES_USER", "postgres"),
        password=env.secret("POSTGRES_PASSWORD") or "password",
        database=env.text("POSTGRES_DB", "tasks_manager"),
        sslmode=sslmode,
        ssl_root_cert=root_cert,
        ssl_cert=cert,
        ssl_key=key,
        max_connections=env.integer("POSTGRES_MAX_CONNECTIONS", 10, lo=1, hi=1000),
        idle_timeout_ms=env.integer("POSTGRES_IDLE_TIMEOUT", 30000, lo=0, hi=86_400_000),
        connection_timeout_ms=env.integer("POSTGRES_CONNECTION_TIMEOUT", 10000, lo=1, hi=600_000),
        query_timeout_ms=env.integer("POSTGRES_QUERY_TIMEOUT", 30000, lo=1, hi=3_600_000),
    )


def _redis_ca(env: Environ, url: str | None) -> str | None:
    ca = env.file("REDIS_SSL_CA_FILE")
    if ca is not None and not (url or "").startswith("rediss://"):
        raise ConfigError("REDIS_SSL_CA_FILE", ca, "set only with a rediss:// REDIS_URL")
    return ca


def redis(env: Environ) -> RedisSettings:
    url = env.redis_url("REDIS_URL")
    return RedisSettings(
        url=url,
        ssl_ca_file=_redis_ca(env, url),
        stream=env.text("TM_REDIS_STREAM", "tm:task-events"),
        stream_maxlen=env.integer("TM_REDIS_STREAM_MAXLEN", 1_000_000, lo=1_000, hi=1_000_000_000),
    )
