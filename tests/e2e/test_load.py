"""The locust load test in short (``make load`` runs it for a minute): its users, headless for
a few seconds, against a real `tm run` on a fresh stack. Every stage of a task and every API
endpoint must have been seen, and nothing may have failed. No timing is asserted."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from harness.stack import Stack
from harness.tm import TmRun
from loadtests.options import STAGES
from loadtests.run import CSV_PREFIX, locust_command, problems, read_stats, render, run_locust

pytestmark = pytest.mark.e2e

SECONDS = 12
GATEWAY_USERS = 3  # x LOAD_USER_RATE=10: 30 tasks a second
HTTP_USERS = 2
ENDPOINTS = {"/api/tasks/{id}", "/api/tasks (first page)", "/api/metrics", "/metrics"}


def test_locust_users_drive_every_stage_without_failures(stack: Stack, tmp_path: Path) -> None:
    token = secrets.token_urlsafe(12)
    tm = TmRun(stack, tmp_path, API_TOKEN=token)
    try:
        tm.wait_assigned(stack.partitions)
        env = {
            **os.environ,
            **stack.env,
            "APP_PORT": str(tm.port),
            "API_TOKEN": token,
            "LOAD_USER_RATE": "10",
            "LOAD_HTTP_USERS": str(HTTP_USERS),
            "LOAD_HTTP_RATE": "10",
            "LOAD_DRAIN_S": "10",
        }
        command = locust_command(
            host=f"http://127.0.0.1:{tm.port}",
            users=GATEWAY_USERS + HTTP_USERS,
            seconds=SECONDS,
            out=tmp_path,
        )
        status = run_locust(command, env, timeout_s=SECONDS + 60)
    finally:
        code = tm.stop()
    assert status == 0
    assert code == 0, tm.output()
    rows = read_stats(tmp_path / f"{CSV_PREFIX}_stats.csv")
    table = render(rows)
    print(table)

    assert problems(rows) == [], table
    stages = {r.name: r for r in rows if r.is_stage}
    for stage in STAGES:
        assert stages[stage].count >= 50, table
    seen = {r.name for r in rows if not r.is_stage}
    assert seen >= ENDPOINTS, table
    assert any(name.startswith("/api/health") for name in seen), table
    assert (tmp_path / "report.html").stat().st_size > 10_000
