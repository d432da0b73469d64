"""Settings: defaults, booleans, and one clear error for each kind of bad value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tm import config, connections, cpus
from tm.errors import ConfigError


def test_defaults_follow_the_original_service() -> None:
    s = config.load({})
    assert s.kafka.brokers == ("localhost:9092",)
    assert s.kafka.client_id == "task-manager"
    assert s.kafka.group_id == "task-manager-group"
    assert s.kafka.group_instance_id is None
    assert s.kafka.task_status_topic == "task-status"
    assert s.kafka.web_crawl_request_topic == "requests-web-crawl"
    assert s.kafka.dlq_topic == "task-status.dlq"
    assert s.kafka.security_protocol == "plaintext"
    assert s.kafka.ssl_verify_hostname is True
    assert (s.postgres.host, s.postgres.port) == ("localhost", 5432)
    assert (s.postgres.user, s.postgres.password) == ("postgres", "password")
    assert s.postgres.database == "tasks_manager"
    assert s.postgres.sslmode == "prefer"
    assert s.postgres.max_connections == 10
    assert s.http.port == 3000
    assert s.http.api_token is None
    assert s.http.metrics_default_hours == 24
    assert s.http.metrics_available_hours == (1, 6, 12, 24, 48, 72)
    assert s.log.format == "simple"
    assert s.log.level == "info"
    assert s.log.service_name == "Task Manager"
    assert (s.log.colors, s.log.pii, s.log.directory) == (False, False, None)
    assert s.otel.service_name == "task-manager"
    assert s.otel.exporter_endpoint == "http://localhost:4318"
    assert s.consumer.workers == config.default_workers()
    assert s.consumer.is_workers_default is True
    assert s.consumer.graceful_shutdown_timeout_ms == 30000
    assert s.consumer.max_result_chars == 1_048_576
    assert s.consumer.delivery == "at-least-once"
    assert s.kafka.transaction_timeout_ms == 60000


def test_settings_are_frozen() -> None:
    s = config.load({})
    with pytest.raises(AttributeError):
        s.postgres.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("off", False),
        (" false ", False),
    ],
)
def test_boolean_settings_read_true_1_yes_on_and_false_0_no_off_in_any_case_trimmed(
    raw: str, expected: bool
) -> None:
    s = config.load({"POSTGRES_SSL": raw, "OTEL_ENABLED": raw, "LOG_COLORS": raw})
    assert s.postgres.sslmode == ("verify-full" if expected else "prefer")
    assert s.otel.enabled is expected
    assert s.log.colors is expected


def test_empty_value_means_default() -> None:
    assert config.load({"POSTGRES_PORT": "", "LOG_PII": "  "}).postgres.port == 5432


def test_given_values_are_parsed_into_typed_trimmed_and_normalised_settings() -> None:
    s = config.load(
        {
            "KAFKA_BROKERS": " a:9092 , b:9093 ",
            "POSTGRES_PORT": "6543",
            "TM_WORKERS": "3",
            "LOG_FORMAT": "Structured",
            "METRICS_AVAILABLE_TIME_RANGES": "1,2,3",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
            "TRACING_SAMPLING_RATE": "0.25",
            "KAFKA_SASL_ENABLED": "yes",
            "KAFKA_SASL_USERNAME": "u",
            "KAFKA_SASL_PASSWORD": "p",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        }
    )
    assert s.kafka.brokers == ("a:9092", "b:9093")
    assert s.postgres.port == 6543
    assert s.consumer.workers == 3
    assert s.log.format == "structured"
    assert s.http.metrics_available_hours == (1, 2, 3)
    assert s.otel.exporter_endpoint == "http://collector:4318"
    assert s.otel.sampling_rate == 0.25
    assert s.kafka.sasl_mechanism == "scram-sha-512"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("POSTGRES_PORT", "abc", "an integer in 1..65535"),
        ("POSTGRES_PORT", "70000", "an integer in 1..65535"),
        ("TM_WORKERS", "0", "an integer in 1..256"),
        ("POSTGRES_SSL", "maybe", "one of true/false"),
        ("LOG_FORMAT", "xml", "one of simple, structured, otel"),
        ("LOG_LEVEL", "verbose", "one of debug, info, warn, error"),
        ("TASK_STATUS_TOPIC", "bad topic!", "a Kafka topic name"),
        ("KAFKA_BROKERS", "localhost", "a list of host:port"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318", "an http(s) base URL"),
        ("TRACING_SAMPLING_RATE", "2", "a number in 0.0..1.0"),
        ("TM_PROGRESS_INTERVAL_S", "-1", "a number in 0.0..86400.0"),
        ("TM_RETENTION_DAYS", "0", "an integer in 1..36500"),
        ("TM_RETENTION_DAYS", "30d", "an integer in 1..36500"),
        ("METRICS_AVAILABLE_TIME_RANGES", "1,x", "positive integers"),
        ("KAFKA_SASL_MECHANISM", "gssapi", "one of plain"),
        ("KAFKA_SECURITY_PROTOCOL", "tls", "one of plaintext, ssl, sasl_plaintext, sasl_ssl"),
        ("POSTGRES_SSLMODE", "on", "one of disable, allow, prefer, require, verify-ca"),
        ("KAFKA_SSL_CA_LOCATION", "/nonexistent/ca.pem", "a readable file (no such file"),
        ("POSTGRES_SSL_ROOT_CERT", "/nonexistent/ca.pem", "a readable file (no such file"),
        ("POSTGRES_PASSWORD_FILE", "/nonexistent/pw", "a readable file (no such file"),
    ],
)
def test_bad_value_names_variable_value_and_expectation(
    variable: str, value: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config.load({variable: value})
    message = str(info.value)
    assert (info.value.variable, info.value.value) == (variable, value)
    assert message.startswith(f"{variable}={value!r} is invalid: expected ")
    assert expected in message
    assert "\n" not in message


def test_retention_is_off_unless_set() -> None:
    assert config.load({}).retention.days is None
    assert config.load({"TM_RETENTION_DAYS": ""}).retention.days is None
    assert config.load({"TM_RETENTION_DAYS": "30"}).retention.days == 30


def test_sasl_without_credentials_is_refused() -> None:
    with pytest.raises(ConfigError, match="KAFKA_SASL_USERNAME"):
        config.load({"KAFKA_SASL_ENABLED": "true"})


@pytest.mark.parametrize(
    ("environ", "protocol"),
    [
        ({}, "plaintext"),
        ({"KAFKA_SSL_ENABLED": "true"}, "ssl"),
        ({"KAFKA_SASL_ENABLED": "true", "KAFKA_SSL_ENABLED": "true"}, "sasl_ssl"),
        ({"KAFKA_SASL_ENABLED": "true"}, "sasl_plaintext"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "sasl_ssl"),
        ({"KAFKA_SECURITY_PROTOCOL": "ssl", "KAFKA_SSL_ENABLED": "true"}, "ssl"),
        ({"KAFKA_SECURITY_PROTOCOL": "sasl_ssl", "KAFKA_SSL_ENABLED": "false"}, "sasl_ssl"),
    ],
)
def test_security_protocol_is_given_or_follows_the_original_switches(
    environ: dict[str, str], protocol: str
) -> None:
    creds = {"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"}
    assert config.load({**creds, **environ}).kafka.security_protocol == protocol


def test_a_switch_that_contradicts_the_security_protocol_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        config.load({"KAFKA_SECURITY_PROTOCOL": "sasl_plaintext", "KAFKA_SSL_ENABLED": "on"})
    assert info.value.variable == "KAFKA_SSL_ENABLED"
    assert "false with KAFKA_SECURITY_PROTOCOL=sasl_plaintext" in str(info.value)


def test_oauthbearer_needs_its_token_endpoint_client_id_and_secret(tmp_path: Path) -> None:
    base = {"KAFKA_SECURITY_PROTOCOL": "sasl_ssl", "KAFKA_SASL_MECHANISM": "oauthbearer"}
    with pytest.raises(ConfigError) as info:
        config.load(base)
    assert info.value.variable == "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL"
    full = {
        **base,
        "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": "https://idp.example/token",
        "KAFKA_SASL_OAUTHBEARER_CLIENT_ID": "tm",
    }
    with pytest.raises(ConfigError) as info:
        config.load(full)
    assert info.value.variable == "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET"
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    s = config.load({**full, "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE": str(secret)})
    assert s.kafka.oauthbearer_client_secret == "s3cret"
    assert s.kafka.sasl_username is None


def test_a_client_certificate_needs_its_key_and_tls_files_need_a_tls_protocol(
    tmp_path: Path,
) -> None:
    pem = tmp_path / "cert.pem"
    pem.write_text("not checked here: librdkafka reads it")
    with pytest.raises(ConfigError) as info:
        config.load({"KAFKA_SECURITY_PROTOCOL": "ssl", "KAFKA_SSL_CERTIFICATE_LOCATION": str(pem)})
    assert info.value.variable == "KAFKA_SSL_KEY_LOCATION"
    with pytest.raises(ConfigError) as info:
        config.load({"KAFKA_SSL_CA_LOCATION": str(pem)})
    assert info.value.variable == "KAFKA_SECURITY_PROTOCOL"
    assert "ssl or sasl_ssl when TLS files are given" in str(info.value)


def test_secrets_come_from_the_environment_or_from_a_file_never_both(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("file-secret\r\n")
    token = tmp_path / "token"
    token.write_text("t0ken")
    s = config.load({"POSTGRES_PASSWORD_FILE": str(password), "API_TOKEN_FILE": str(token)})
    assert (s.postgres.password, s.http.api_token) == ("file-secret", "t0ken")
    with pytest.raises(ConfigError) as info:
        config.load({"POSTGRES_PASSWORD": "env-secret", "POSTGRES_PASSWORD_FILE": str(password)})
    assert info.value.variable == "POSTGRES_PASSWORD_FILE"
    assert "file-secret" not in str(info.value)
    assert "env-secret" not in str(info.value)


def test_a_secret_file_that_cannot_be_read_names_the_file_setting_not_the_secret(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as info:
        config.load({"KAFKA_SASL_PASSWORD_FILE": str(tmp_path)})  # a directory
    assert info.value.variable == "KAFKA_SASL_PASSWORD_FILE"
    assert str(info.value).startswith(f"KAFKA_SASL_PASSWORD_FILE='{tmp_path}' is invalid")


@pytest.mark.parametrize(
    ("environ", "sslmode"),
    [
        ({}, "prefer"),
        ({"POSTGRES_SSL": "true"}, "verify-full"),
        ({"POSTGRES_SSL": "false"}, "prefer"),
        ({"POSTGRES_SSL": "false", "POSTGRES_SSL_ROOT_CERT": "CA"}, "verify-full"),
        ({"POSTGRES_SSLMODE": "disable"}, "disable"),
        ({"POSTGRES_SSL_ROOT_CERT": "CA"}, "verify-full"),
        ({"POSTGRES_SSL_ROOT_CERT": "CA", "POSTGRES_SSLMODE": "verify-ca"}, "verify-ca"),
        ({"POSTGRES_SSLMODE": "Require"}, "require"),
    ],
)
def test_postgres_sslmode_is_given_or_the_safe_default(
    environ: dict[str, str], sslmode: str, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    environ = {k: str(ca) if v == "CA" else v for k, v in environ.items()}
    assert config.load(environ).postgres.sslmode == sslmode


def test_a_postgres_client_certificate_needs_a_mode_that_uses_tls(tmp_path: Path) -> None:
    pem = tmp_path / "client.pem"
    pem.write_text("")
    files = {"POSTGRES_SSL_CERT": str(pem), "POSTGRES_SSL_KEY": str(pem)}
    with pytest.raises(ConfigError) as info:
        config.load({**files, "POSTGRES_SSLMODE": "prefer"})
    assert info.value.variable == "POSTGRES_SSLMODE"
    assert config.load({**files, "POSTGRES_SSLMODE": "require"}).postgres.ssl_cert == str(pem)


def test_a_redis_ca_file_goes_with_rediss_only(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    with pytest.raises(ConfigError) as info:
        config.load({"REDIS_URL": "redis://localhost:6379", "REDIS_SSL_CA_FILE": str(ca)})
    assert info.value.variable == "REDIS_SSL_CA_FILE"
    s = config.load({"REDIS_URL": "rediss://localhost:6380", "REDIS_SSL_CA_FILE": str(ca)})
    assert s.redis.ssl_ca_file == str(ca)


def test_backoff_cap_below_initial_is_refused() -> None:
    with pytest.raises(ConfigError, match="TM_RETRY_BACKOFF_MAX_MS"):
        config.load({"TM_RETRY_BACKOFF_INITIAL_MS": "500", "TM_RETRY_BACKOFF_MAX_MS": "100"})


def test_cli_exits_2_with_one_line_on_a_bad_setting() -> None:
    env = {**os.environ, "POSTGRES_PORT": "not-a-port"}
    done = subprocess.run(
        [sys.executable, "-m", "tm", "check"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "tm: POSTGRES_PORT='not-a-port' is invalid: expected an integer in 1..65535"
    ]


# -- TM_WORKERS by default: the CPUs of the container, not of the node --------------------------


def fake_tree(root: Path, cgroup: str, files: dict[str, str]) -> Path:
    """A fake filesystem: ``/proc/self/cgroup`` holding ``cgroup``, plus ``files`` (path: text)."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


V2_POD = "sys/fs/cgroup/kubepods.slice/pod1.slice"


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("200000 100000", 2), ("150000 100000", 2), ("50000 100000", 1), ("max 100000", None)],
)
def test_cgroup_v2_quota_is_rounded_up(tmp_path: Path, cpu_max: str, expected: int | None) -> None:
    root = fake_tree(
        tmp_path,
        "0::/kubepods.slice/pod1.slice/ctr.scope\n",
        {f"{V2_POD}/ctr.scope/cpu.max": cpu_max},
    )
    assert cpus.cgroup_cpu_limit(root) == expected


def test_cgroup_v2_quota_of_a_parent_limits_too(tmp_path: Path) -> None:
    root = fake_tree(
        tmp_path,
        "0::/kubepods.slice/pod1.slice/ctr.scope\n",
        {f"{V2_POD}/ctr.scope/cpu.max": "max 100000", f"{V2_POD}/cpu.max": "300000 100000"},
    )
    assert cpus.cgroup_cpu_limit(root) == 3


def test_cgroup_v2_namespaced_container_reads_the_mount_root(tmp_path: Path) -> None:
    root = fake_tree(tmp_path, "0::/\n", {"sys/fs/cgroup/cpu.max": "400000 100000"})
    assert cpus.cgroup_cpu_limit(root) == 4


V1_CGROUP = """12:pids:/docker/abc
4:cpu,cpuacct:/docker/abc
3:cpuset:/docker/abc
1:name=systemd:/docker/abc
0::/docker/abc
"""


@pytest.mark.parametrize(("quota", "expected"), [("250000", 3), ("100000", 1), ("-1", None)])
def test_cgroup_v1_quota_over_period_is_rounded_up(
    tmp_path: Path, quota: str, expected: int | None
) -> None:
    base = "sys/fs/cgroup/cpu,cpuacct/docker/abc"
    root = fake_tree(
        tmp_path,
        V1_CGROUP,
        {f"{base}/cpu.cfs_quota_us": quota, f"{base}/cpu.cfs_period_us": "100000"},
    )
    assert cpus.cgroup_cpu_limit(root) == expected


def test_cgroup_v1_without_a_cgroup_namespace_reads_the_quota_at_the_controller_root(
    tmp_path: Path,
) -> None:
    """/proc/self/cgroup names the host's path, but the container sees its own cgroup mounted
    at the controller's root."""
    base = "sys/fs/cgroup/cpu"
    root = fake_tree(
        tmp_path,
        V1_CGROUP.replace("cpu,cpuacct", "cpu"),
        {f"{base}/cpu.cfs_quota_us": "200000", f"{base}/cpu.cfs_period_us": "100000"},
    )
    assert cpus.cgroup_cpu_limit(root) == 2


def test_a_hybrid_v1_and_empty_v2_layout_without_a_quota_means_no_limit(tmp_path: Path) -> None:
    """This machine's layout: v1 controllers plus an empty v2 hierarchy under unified/."""
    root = fake_tree(
        tmp_path,
        "4:memory:/job/1\n1:cpu:/\n0::/\n",
        {
            "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1",
            "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000",
            "sys/fs/cgroup/unified/cgroup.controllers": "",
        },
    )
    assert cpus.cgroup_cpu_limit(root) is None


def test_no_cgroup_information_means_no_quota(tmp_path: Path) -> None:
    assert cpus.cgroup_cpu_limit(tmp_path) is None
    garbled = fake_tree(tmp_path / "garbled", "nonsense\n", {})
    assert cpus.cgroup_cpu_limit(garbled) is None


@pytest.mark.parametrize(
    ("cpu_max", "affinity", "expected"),
    [
        ("200000 100000", 32, 2),  # a 2-CPU pod on a 32-CPU node
        ("800000 100000", 1, 1),  # taskset -c 0 in a pod with more quota
        ("max 100000", 6, 6),  # no quota: the affinity mask
        ("1000 100000", 4, 1),  # a hundredth of a CPU: still one worker
    ],
)
def test_default_workers_is_the_smaller_of_quota_and_affinity(
    tmp_path: Path, cpu_max: str, affinity: int, expected: int
) -> None:
    root = fake_tree(tmp_path, "0::/\n", {"sys/fs/cgroup/cpu.max": cpu_max})
    assert config.default_workers(root=root, affinity=affinity) == expected


def test_default_workers_never_above_the_topic_partitions() -> None:
    default = config.load({})
    capped = config.cap_workers(default, partitions=1)
    assert capped.consumer.workers == 1
    assert (
        config.cap_workers(default, partitions=10_000).consumer.workers == default.consumer.workers
    )
    explicit = config.load({"TM_WORKERS": "4"})
    assert explicit.consumer.is_workers_default is False
    assert config.cap_workers(explicit, partitions=1).consumer.workers == 4  # the operator's say


def test_without_redis_url_there_is_no_task_event_feed() -> None:
    assert config.load({}).redis == connections.RedisSettings(
        url=None, ssl_ca_file=None, stream="tm:task-events", stream_maxlen=1_000_000
    )


@pytest.mark.parametrize(
    "url", ["redis://localhost", "redis://127.0.0.1:6379/2", "rediss://user:secret@cache:6380/0"]
)
def test_redis_urls_are_accepted(url: str) -> None:
    assert config.load({"REDIS_URL": url}).redis.url == url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://localhost:6379", "http://localhost:6379"),
        ("redis://", "redis://"),
        ("redis://cache:99999", "redis://cache:99999"),
        ("redis://cache/db", "redis://cache/db"),
        ("redis://user:secret@", "redis://user:***@"),  # the password is never printed
    ],
)
def test_a_bad_redis_url_is_refused_without_showing_its_password(url: str, shown: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config.load({"REDIS_URL": url})
    assert str(raised.value) == (
        f"REDIS_URL={shown!r} is invalid: expected redis://[user:password@]host[:port][/db]"
    )


def test_the_delivery_mode_is_one_of_two() -> None:
    assert config.load({"TM_DELIVERY": "exactly-once"}).consumer.is_exactly_once
    assert not config.load({"TM_DELIVERY": "at-least-once"}).consumer.is_exactly_once
    with pytest.raises(ConfigError) as info:
        config.load({"TM_DELIVERY": "exactly_once"})
    assert str(info.value).startswith("TM_DELIVERY=")
    assert "at-least-once" in str(info.value) and "exactly-once" in str(info.value)


def test_a_transaction_timeout_below_the_request_timeout_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        config.load({"KAFKA_TRANSACTION_TIMEOUT": "10000", "KAFKA_REQUEST_TIMEOUT": "20000"})
    assert str(info.value).startswith("KAFKA_TRANSACTION_TIMEOUT='10000' is invalid")
