"""The librdkafka properties tm derives from its settings, and what it says when they fail."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import KafkaError

from tm import config
from tm.adapters.kafka import client_config, consumer_config, producer_config, transactional_id
from tm.adapters.kafka.clients import transactional_producer_config
from tm.adapters.kafka.errors import connection_problem
from tm.connections import KafkaSettings


def test_consumer_commits_by_hand_from_the_earliest_offset_with_cooperative_rebalancing() -> None:
    props = consumer_config(config.load({}).kafka, slot=1)
    assert props["group.id"] == "task-manager-group"
    assert props["enable.auto.commit"] is False
    assert props["enable.auto.offset.store"] is False
    assert props["auto.offset.reset"] == "earliest"
    assert props["partition.assignment.strategy"] == "cooperative-sticky"
    assert props["client.id"] == "task-manager-1"
    assert "group.instance.id" not in props


def test_static_membership_names_each_worker_slot_and_rebalances_eagerly() -> None:
    settings = config.load({"KAFKA_GROUP_INSTANCE_ID": "tm-pod-7"}).kafka
    assert consumer_config(settings, slot=0)["group.instance.id"] == "tm-pod-7-0"
    assert consumer_config(settings, slot=3)["group.instance.id"] == "tm-pod-7-3"
    # A static member restarted between the two rounds of a cooperative rebalance would leave
    # the partitions it was letting go without an owner.
    assert consumer_config(settings, slot=0)["partition.assignment.strategy"] == "range"


def test_producer_is_idempotent_and_waits_for_all_replicas() -> None:
    props = producer_config(config.load({"KAFKA_REQUEST_TIMEOUT": "12000"}).kafka)
    assert props["enable.idempotence"] is True
    assert props["acks"] == "all"
    assert props["message.timeout.ms"] == 12000


def test_security_settings_reach_librdkafka() -> None:
    plain = client_config(config.load({}).kafka)
    assert plain["security.protocol"] == "PLAINTEXT"
    assert "sasl.mechanism" not in plain
    secure = client_config(
        config.load(
            {
                "KAFKA_SSL_ENABLED": "true",
                "KAFKA_SASL_ENABLED": "true",
                "KAFKA_SASL_MECHANISM": "scram-sha-256",
                "KAFKA_SASL_USERNAME": "u",
                "KAFKA_SASL_PASSWORD": "p",
                "KAFKA_BROKERS": "a:9093,b:9093",
            }
        ).kafka
    )
    assert secure["security.protocol"] == "SASL_SSL"
    assert secure["sasl.mechanism"] == "SCRAM-SHA-256"
    assert (secure["sasl.username"], secure["sasl.password"]) == ("u", "p")
    assert secure["bootstrap.servers"] == "a:9093,b:9093"
    assert config.load({"KAFKA_SSL_ENABLED": "false"}).kafka.security_protocol == "plaintext"
    assert secure["ssl.ca.location"] == "probe"  # no CA file: the system's
    assert secure["ssl.endpoint.identification.algorithm"] == "https"


def test_tls_files_and_hostname_verification_reach_librdkafka(tmp_path: Path) -> None:
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("")
    props = client_config(
        config.load(
            {
                "KAFKA_SECURITY_PROTOCOL": "ssl",
                "KAFKA_SSL_CA_LOCATION": str(tmp_path / "ca.pem"),
                "KAFKA_SSL_CERTIFICATE_LOCATION": str(tmp_path / "client.pem"),
                "KAFKA_SSL_KEY_LOCATION": str(tmp_path / "client.key"),
                "KAFKA_SSL_KEY_PASSWORD": "kp",
                "KAFKA_SSL_VERIFY_HOSTNAME": "false",
            }
        ).kafka
    )
    assert props["security.protocol"] == "SSL"
    assert props["ssl.ca.location"] == str(tmp_path / "ca.pem")
    assert props["ssl.certificate.location"] == str(tmp_path / "client.pem")
    assert props["ssl.key.location"] == str(tmp_path / "client.key")
    assert props["ssl.key.password"] == "kp"
    assert props["ssl.endpoint.identification.algorithm"] == "none"
    assert "sasl.mechanism" not in props


def test_oauthbearer_reaches_librdkafka_as_oidc_client_credentials(tmp_path: Path) -> None:
    (tmp_path / "idp-ca.pem").write_text("")
    props = client_config(
        config.load(
            {
                "KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
                "KAFKA_SASL_MECHANISM": "oauthbearer",
                "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": "https://idp.example/token",
                "KAFKA_SASL_OAUTHBEARER_CLIENT_ID": "tm",
                "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": "s",
                "KAFKA_SASL_OAUTHBEARER_SCOPE": "kafka",
                "KAFKA_SASL_OAUTHBEARER_CA_LOCATION": str(tmp_path / "idp-ca.pem"),
            }
        ).kafka
    )
    assert props["sasl.mechanism"] == "OAUTHBEARER"
    assert props["sasl.oauthbearer.method"] == "oidc"
    assert props["sasl.oauthbearer.token.endpoint.url"] == "https://idp.example/token"
    assert (props["sasl.oauthbearer.client.id"], props["sasl.oauthbearer.client.secret"]) == (
        "tm",
        "s",
    )
    assert props["sasl.oauthbearer.scope"] == "kafka"
    assert props["https.ca.location"] == str(tmp_path / "idp-ca.pem")
    assert "sasl.username" not in props


def test_a_transactional_id_is_stable_per_slot_and_follows_the_pod_when_static() -> None:
    plain = config.load({}).kafka
    assert transactional_id(plain, slot=2, process="host-41") == "tm.task-manager-group.host-41.2"
    static = config.load({"KAFKA_GROUP_INSTANCE_ID": "tm-3"}).kafka
    assert transactional_id(static, slot=0, process="host-41") == "tm.task-manager-group.tm-3.0"


def test_the_transactional_producer_carries_its_id_and_the_transaction_timeout() -> None:
    settings = config.load({"KAFKA_TRANSACTION_TIMEOUT": "45000"}).kafka
    props = transactional_producer_config(
        settings, max_message_bytes=100_000, transactional_id="tm.g.tm-0.1"
    )
    assert props["transactional.id"] == "tm.g.tm-0.1"
    assert props["transaction.timeout.ms"] == 45000
    assert props["message.timeout.ms"] <= props["transaction.timeout.ms"]
    assert props["enable.idempotence"] is True
    # The next transaction's AddOffsetsToTxn, refused while the last one's markers are written,
    # is asked again within milliseconds (librdkafka's default waits 100 ms).
    assert props["retry.backoff.ms"] <= 10


def _tls_settings(tmp_path: Path) -> KafkaSettings:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read here")
    return config.load({"KAFKA_SECURITY_PROTOCOL": "ssl", "KAFKA_SSL_CA_LOCATION": str(ca)}).kafka


BROKER_CERTIFICATE_REFUSED = (
    "sasl_ssl://127.0.0.1:9192/bootstrap: error:0A000086:SSL routines::certificate verify failed"
    " (after 3ms in state SSL_HANDSHAKE)"
)


@pytest.mark.parametrize(
    "errors",
    [
        # The handshake failed while reading: librdkafka says _SSL.
        [KafkaError(KafkaError._SSL, "SSL handshake failed: " + BROKER_CERTIFICATE_REFUSED)],
        # It failed on a write: the same refusal comes as _TRANSPORT, with OpenSSL's reason.
        [KafkaError(KafkaError._TRANSPORT, BROKER_CERTIFICATE_REFUSED)],
        # A disconnect first, the refusal next: the refusal is what tells.
        [
            KafkaError(KafkaError._TRANSPORT, "Disconnected: connection reset by peer"),
            KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"),
            KafkaError(KafkaError._SSL, "SSL handshake failed: " + BROKER_CERTIFICATE_REFUSED),
        ],
    ],
    ids=["ssl", "transport", "after-a-disconnect"],
)
def test_a_refused_broker_certificate_names_the_ca_and_the_host_name(
    tmp_path: Path, errors: list[KafkaError]
) -> None:
    line = connection_problem(_tls_settings(tmp_path), errors)
    assert line.startswith("KAFKA_SSL_CA_LOCATION, KAFKA_SSL_VERIFY_HOSTNAME, KAFKA_BROKERS: ")


def test_a_handshake_the_broker_ends_names_the_client_certificate(tmp_path: Path) -> None:
    errors = [KafkaError(KafkaError._TRANSPORT, "Disconnected: connection reset by peer")]
    line = connection_problem(_tls_settings(tmp_path), errors)
    assert line.startswith("KAFKA_SSL_CERTIFICATE_LOCATION, KAFKA_SSL_KEY_LOCATION")
