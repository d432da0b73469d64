"""`tm db migrate`, `tm topics create` and `tm check`, run as an operator runs them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tm.adapters import migrations

pytestmark = pytest.mark.e2e


def tm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tm", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_db_migrate_applies_every_migration_then_reports_nothing_to_apply(database: str) -> None:
    first = tm("db", "migrate", env={"POSTGRES_DB": database})
    second = tm("db", "migrate", env={"POSTGRES_DB": database})
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        f"applied {m.version:04d}_{m.name}" for m in migrations.discover()
    ]
    assert first.stdout.splitlines()[:3] == [
        "applied 0001_schema",
        "applied 0002_original_functions",
        "applied 0003_batch_functions",
    ]
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == ["schema is up to date; nothing to apply"]


def test_check_reports_each_dependency(database: str, kafka_up: None) -> None:
    before = tm("check", env={"POSTGRES_DB": database})
    tm("db", "migrate", env={"POSTGRES_DB": database})
    after = tm("check", env={"POSTGRES_DB": database})
    assert before.returncode == 0, before.stdout + before.stderr
    lines = before.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["postgres", "kafka"]
    assert f"schema {len(migrations.discover())} pending" in lines[0]
    assert "reached" in lines[1]
    assert "schema migrated" in after.stdout.splitlines()[0]


def test_check_names_kafka_when_it_is_down(database: str) -> None:
    done = tm("check", env={"POSTGRES_DB": database, "KAFKA_BROKERS": "127.0.0.1:1"})
    assert done.returncode == 1
    postgres_line, kafka_line = done.stdout.splitlines()
    assert postgres_line.startswith("postgres: reached")
    assert kafka_line.startswith("kafka: NOT reached: ")


def test_check_names_postgres_with_a_wrong_password(kafka_up: None) -> None:
    done = tm("check", env={"POSTGRES_PASSWORD": "wrong-password"})
    assert done.returncode == 1
    postgres_line = done.stdout.splitlines()[0]
    assert postgres_line.startswith("postgres: NOT reached: ")
    assert "password" in postgres_line


def test_topics_create_only_when_missing(topic: str) -> None:
    env = {
        "TASK_STATUS_TOPIC": topic,
        "WEB_CRAWL_REQUEST_TOPIC": f"{topic}-requests",
        "DLQ_TOPIC": f"{topic}.dlq",
    }
    first = tm("topics", "create", "--partitions", "4", env=env)
    second = tm("topics", "create", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        f"created {topic} (4 partitions)",
        f"created {topic}-requests (4 partitions)",
        f"created {topic}.dlq (4 partitions)",
    ]
    assert second.returncode == 0, second.stderr
    assert sorted(second.stdout.splitlines()) == sorted(
        [f"exists {topic}", f"exists {topic}-requests", f"exists {topic}.dlq"]
    )
