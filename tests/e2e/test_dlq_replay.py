"""`tm dlq replay`: a dead letter whose cause is gone is applied when replayed."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import orjson
import pytest

from harness import wait_for
from harness.stack import Stack
from harness.tm import TmRun

pytestmark = pytest.mark.e2e

NOW = b"2026-01-01T00:00:00.000Z"


def _replay(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tm", "dlq", "replay", *args],
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_replay_by_reason_applies_an_update_that_came_too_early(
    stack: Stack, tmp_path: Path
) -> None:
    task_id = uuid.uuid4()
    early_update = [
        ("task_type", b"web-crawl"),
        ("status", b"completed"),
        ("task_id", str(task_id).encode()),
        ("timestamp", NOW),
    ]
    gateway_new = [("task_type", b"web-crawl"), ("status", b"new"), ("timestamp", NOW)]
    body = {"user_email": "a@example.com", "user_query": "q", "base_url": "https://e.com"}
    stack.produce(
        [
            (str(task_id).encode(), early_update, b'{"crawl_result": "found it"}'),
            (None, gateway_new, b"{not json"),
        ]
    )
    tm = TmRun(stack, tmp_path, TM_WORKERS="1")
    try:
        wait_for(stack.all_committed, what="both messages committed")
        dead = wait_for(lambda: len(stack.read_topic(stack.dlq_topic)) == 2, what="2 dead letters")
        assert dead
        stack.produce(
            [(None, [*gateway_new, ("task_id", str(task_id).encode())], orjson.dumps(body))]
        )
        wait_for(lambda: stack.count() == 1, what="the task created")

        dry = _replay(stack, "--reason", "task_not_found", "--dry-run")
        done = _replay(stack, "--reason", "task_not_found")
        wait_for(lambda: stack.count("status = 'completed'") == 1, what="the replayed update")
        wait_for(stack.all_committed, what="the replay committed")
    finally:
        assert tm.stop() == 0, tm.output()

    assert dry.returncode == 0, dry.stderr
    assert "would replay 1 dead letter(s)" in dry.stdout
    assert "skipped 1 with another reason" in dry.stdout
    assert done.returncode == 0, done.stderr
    assert "replayed 1 dead letter(s)" in done.stdout
    row = stack.query("SELECT id, result FROM web_crawl_tasks")[0]
    assert (row["id"], row["result"]) == (task_id, "found it")
    # Nothing new was dead-lettered: the replayed message carried its original headers.
    assert len(stack.read_topic(stack.dlq_topic)) == 2
    replayed = stack.read_topic(stack.topic)[-1]
    assert not any(key.startswith("dlq_") for key, _ in replayed.headers())


def test_replayed_new_event_keeps_its_task_id(stack: Stack, tmp_path: Path) -> None:
    """A dead-lettered `new` (a NUL in its query), replayed twice, is one task id."""
    gateway_new = [("task_type", b"web-crawl"), ("status", b"new"), ("timestamp", NOW)]
    refused = {
        "user_email": "a@example.com",
        "user_query": "nul \u0000 here",
        "base_url": "https://e.com",
    }
    stack.produce([(None, gateway_new, orjson.dumps(refused))])
    tm = TmRun(stack, tmp_path, TM_WORKERS="1")
    try:
        wait_for(stack.all_committed, what="the message committed")
        wait_for(lambda: stack.read_topic(stack.dlq_topic), what="the dead letter")
    finally:
        assert tm.stop() == 0, tm.output()
    first = _replay(stack, "--reason", "invalid_body")
    second = _replay(stack, "--reason", "invalid_body")
    assert first.returncode == 0 and second.returncode == 0
    messages = stack.read_topic(stack.topic)
    task_ids = [dict(m.headers()).get("task_id") for m in messages]
    assert len(messages) == 3  # the original and two replays
    assert task_ids.count(None) == 1  # the original, as the gateway sent it
    replayed_ids = {t for t in task_ids if t is not None}
    assert len(replayed_ids) == 1
    uuid.UUID(replayed_ids.pop().decode())
