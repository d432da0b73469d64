"""The librdkafka properties tm derives from its settings."""

from __future__ import annotations

from tm import config
from tm.adapters.kafka import client_config, consumer_config, producer_config


def test_consumer_commits_by_hand_from_the_earliest_offset_with_cooperative_rebalancing() -> None:
    props = consumer_config(config.load({}).kafka, slot=1)
    assert props["group.id"] == "task-manager-group"
    assert props["enable.auto.commit"] is False
    assert props["enable.auto.offset.store"] is False
    assert props["auto.offset.reset"] == "earliest"
    assert props["partition.assignment.strategy"] == "cooperative-sticky"
    assert props["client.id"] == "task-manager-1"
    assert "group.instance.id" not in props


def test_static_membership_names_each_worker_slot() -> None:
    settings = config.load({"KAFKA_GROUP_INSTANCE_ID": "tm-pod-7"}).kafka
    assert consumer_config(settings, slot=0)["group.instance.id"] == "tm-pod-7-0"
    assert consumer_config(settings, slot=3)["group.instance.id"] == "tm-pod-7-3"


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
    assert config.load({"KAFKA_SSL_ENABLED": "false"}).kafka.ssl_enabled is False
