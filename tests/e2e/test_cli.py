"""`tm db migrate`, `tm topics create` and `tm check`, run as an operator runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from harness.stack import query, with_database
from tm.adapters import migrations
from tm.config import Settings

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


# -- tm db prune -------------------------------------------------------------------------------

PLAIN = {"LOG_FORMAT": "structured", "LOG_COLORS": "false"}


def _fill(database: str, settings: Settings) -> None:
    """Old tasks: 6 completed and 2 error 40 days old, 3 `new` 400 days old; young: 2 completed
    an hour old."""
    query(
        with_database(settings, database),
        "INSERT INTO web_crawl_tasks (user_email, user_query, original_url, received_at, status,"
        " result, finished_at, created_at)"
        " SELECT 'u@example.com', 'q', 'https://example.com/', t, s, r, f, t"
        " FROM unnest($1::task_status[], $2::interval[]) AS x(s, age),"
        " LATERAL (SELECT now() - x.age AS t,"
        "   CASE WHEN x.s = 'new' THEN NULL ELSE 'r' END AS r,"
        "   CASE WHEN x.s = 'new' THEN NULL ELSE now() - x.age END AS f) y",
        ["completed"] * 6 + ["error"] * 2 + ["new"] * 3 + ["completed"] * 2,
        [timedelta(days=40)] * 8 + [timedelta(days=400)] * 3 + [timedelta(hours=1)] * 2,
    )


def _lines(done: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_db_prune_without_retention_says_so_and_deletes_nothing(
    database: str, settings: Settings
) -> None:
    env = {"POSTGRES_DB": database, **PLAIN}
    tm("db", "migrate", env=env)
    _fill(database, settings)
    done = tm("db", "prune", env=env)
    assert done.returncode == 0, done.stderr
    (line,) = _lines(done)
    assert line["message"] == "retention is not set (TM_RETENTION_DAYS or --days): nothing deleted"
    rows = query(with_database(settings, database), "SELECT count(*) FROM web_crawl_tasks")
    assert rows[0][0] == 13


def test_db_prune_dry_run_then_prune_report_rows_batches_and_cutoff(
    database: str, settings: Settings
) -> None:
    env = {"POSTGRES_DB": database, "TM_RETENTION_DAYS": "30", **PLAIN}
    tm("db", "migrate", env=env)
    _fill(database, settings)
    dry = tm("db", "prune", "--dry-run", "--batch-size", "4", env=env)
    done = tm("db", "prune", "--batch-size", "4", "--pause", "0", env=env)
    again = tm("db", "prune", "--days", "1", env=env)

    assert dry.returncode == 0, dry.stderr
    (line,) = _lines(dry)
    assert line["message"] == "prune dry run: would delete"
    assert (line["deleted"], line["batches"], line["read"], line["dry_run"]) == (8, 3, 11, True)
    assert done.returncode == 0, done.stderr
    (line,) = _lines(done)
    assert line["message"] == "pruned"
    assert (line["deleted"], line["batches"], line["read"], line["days"]) == (8, 3, 11, 30)
    cutoff = datetime.fromisoformat(str(line["cutoff"]))
    assert timedelta(days=29) < datetime.now(UTC) - cutoff < timedelta(days=31)
    assert isinstance(line["duration_s"], float)
    assert again.returncode == 0, again.stderr
    assert _lines(again)[0]["deleted"] == 0  # --days overrides: the hour-old tasks are younger
    rows = query(
        with_database(settings, database),
        "SELECT status::text, count(*) FROM web_crawl_tasks GROUP BY 1 ORDER BY 1",
    )
    assert [tuple(r) for r in rows] == [("completed", 2), ("new", 3)]


@pytest.mark.parametrize(
    ("args", "env", "error"),
    [
        ((), {"TM_RETENTION_DAYS": "thirty"}, "TM_RETENTION_DAYS='thirty' is invalid"),
        (("--days", "0"), {}, "--days='0' is invalid"),
        (("--batch-size", "0"), {"TM_RETENTION_DAYS": "30"}, "--batch-size='0' is invalid"),
        (("--pause", "-1"), {"TM_RETENTION_DAYS": "30"}, "--pause='-1.0' is invalid"),
    ],
)
def test_db_prune_refuses_a_bad_setting_with_one_line(
    args: tuple[str, ...], env: dict[str, str], error: str
) -> None:
    done = tm("db", "prune", *args, env=env)
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"tm: {error}: expected ")
