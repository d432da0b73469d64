"""Faults under load, end to end: the database goes away or hangs, workers are killed or stop
answering, the service is stopped while busy, a dependency is wrong at start-up. After each,
every task is applied exactly once and the group has committed to the end (DESIGN §3).

Tasks are told apart by their unique ``user_email`` (``new_task_message(n)``), so "exactly once"
is ``count(*) == N`` and ``count(DISTINCT user_email) == N``. Network faults go through
:class:`harness.proxy.TcpProxy` (STYLE §5).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from harness import unique, wait_for
from harness.kafka import Feeder, describe_group, group_assigned, group_state
from harness.outcomes import (
    FAST,
    RETRYING,
    SHORT_SESSION,
    assert_committed_prefixes_applied,
    produce_new,
    snapshot,
    terminate_backends,
    wait_all_applied,
)
from harness.procfs import alive
from harness.proxy import TcpProxy, via
from harness.stack import Stack
from harness.tm import TmRun
from tm.adapters import postgres
from tm.config import Settings
from tm.preflight import PREFLIGHT_TIMEOUT_S
from tm.worker.threads import REVOKE_BUDGET_S

pytestmark = pytest.mark.e2e

# The supervisor's line for a dead worker, with the back-off it chose.
DIED = re.compile(r"worker died; restarting.* slot=(\d+) .*restart_in_s=([\d.]+)")


# -- 1. the database goes away -------------------------------------------------------------------


def test_database_cut_mid_stream_commits_nothing_unapplied(
    stack: Stack, proxy: TcpProxy, tmp_path: Path
) -> None:
    tm = TmRun(stack, tmp_path, TM_WORKERS="2", **FAST, **via(proxy))
    feeder: Feeder | None = None
    try:
        tm.wait_assigned(6)
        feeder = stack.feed(count=10_000, rate=1000)
        wait_for(lambda: stack.count() > 1500, what="tm busy")
        before = snapshot(stack)

        proxy.cut()
        snapshots = [before]
        retried = False
        window_end = time.monotonic() + 3.0  # the outage: a deliberately timed window
        while not retried or time.monotonic() < window_end:
            snapshots.append(snapshot(stack))
            retried = RETRYING in tm.output()
            if time.monotonic() > window_end + 20:
                pytest.fail("no batch failed while the database was cut:\n" + tm.output())
        during = stack.count()
        proxy.restore()

        feeder.join()
        wait_all_applied(stack, feeder.expected)
        snapshots.append(snapshot(stack))
        assert_committed_prefixes_applied(stack, snapshots)
    finally:
        if feeder is not None:
            feeder.stop()
        code = tm.stop()
    output = tm.output()
    assert code == 0, output
    assert RETRYING in output
    assert proxy.refused > 0  # tm did try to reconnect during the outage
    assert during < len(feeder.expected)  # the outage happened before the end of the stream
    assert "worker died" not in output, output


def test_database_backends_terminated_under_load_are_retried_and_every_task_applied(
    stack: Stack, tmp_path: Path
) -> None:
    tm = TmRun(stack, tmp_path, TM_WORKERS="2", **FAST)
    feeder: Feeder | None = None
    try:
        tm.wait_assigned(6)
        feeder = stack.feed(count=10_000, rate=1000)
        snapshots = []
        terminated = 0
        for round_ in range(4):
            floor = 1000 * (round_ + 1)

            def counted(floor: int = floor) -> bool:
                return stack.count() > floor

            wait_for(counted, what=f"{floor} tasks")
            snapshots.append(snapshot(stack))
            terminated += terminate_backends(stack)
            snapshots.append(snapshot(stack))
        feeder.join()
        wait_all_applied(stack, feeder.expected)
        snapshots.append(snapshot(stack))
        assert_committed_prefixes_applied(stack, snapshots)
    finally:
        if feeder is not None:
            feeder.stop()
        code = tm.stop()
    output = tm.output()
    assert code == 0, output
    assert terminated > 0
    assert RETRYING in output, output
    assert "worker died" not in output, output


def test_connection_freeze_before_commit_does_not_hold_rows_hostage(
    stack: Stack, proxy: TcpProxy, tmp_path: Path
) -> None:
    """A connection dies without a FIN reaching the server (NAT drop, blackholed network) after
    the statements of a batch and before its COMMIT: the orphaned backend sits idle in
    transaction holding the rows' locks, and every retry's INSERT ... ON CONFLICT waits on them.
    The server must end the orphan on its own, so that tm gets through within about a minute
    (not when TCP keepalive gives up, hours later), with nothing lost and nothing doubled."""
    env = {**FAST, "POSTGRES_QUERY_TIMEOUT": "3000"}
    tm = TmRun(stack, tmp_path, TM_WORKERS="2", **env, **via(proxy))
    feeder: Feeder | None = None
    try:
        tm.wait_assigned(6)
        feeder = stack.feed(count=5000, rate=500, completed_lag=50)
        wait_for(lambda: stack.count() > 500, what="tm busy")
        proxy.freeze_on(b"COMMIT")  # the first batch holding both new tasks and updates
        wait_for(lambda: proxy.frozen > 0, what="a connection frozen before its COMMIT")
        frozen_at = stack.count()
        feeder.join()
        wait_all_applied(stack, feeder.expected, timeout_s=60)
        wait_for(
            lambda: stack.count("status = 'completed'") == feeder.completed,
            what="every update applied",
        )
    finally:
        if feeder is not None:
            feeder.stop()
        code = tm.stop()
    output = tm.output()
    assert code == 0, output
    assert frozen_at < len(feeder.expected)  # frozen mid-stream
    assert RETRYING in output, output
    assert "worker died" not in output, output
    assert stack.read_topic(stack.dlq_topic, timeout_s=2) == []


# -- 2. kill -9 of a worker ----------------------------------------------------------------------


def test_killed_worker_is_restarted_and_nothing_is_lost(stack: Stack, tmp_path: Path) -> None:
    tm = TmRun(stack, tmp_path, TM_WORKERS="2", **FAST, **SHORT_SESSION)
    feeder: Feeder | None = None
    try:
        tm.wait_assigned(6)
        feeder = stack.feed(count=10_000, rate=1000)
        wait_for(lambda: stack.count() > 2000, what="tm busy")
        slot, victim = min(tm.workers().items())
        os.kill(victim, signal.SIGKILL)
        replacement = tm.wait_worker(slot, not_pid=victim)
        feeder.join()
        wait_all_applied(stack, feeder.expected)
    finally:
        if feeder is not None:
            feeder.stop()
        code = tm.stop()
    output = tm.output()
    assert code == 0, output
    died = DIED.findall(output)
    assert [int(s) for s, _ in died] == [slot], output
    assert f"code={-signal.SIGKILL}" in next(
        line for line in output.splitlines() if "worker died" in line
    )
    assert replacement != victim and not alive(victim)


# -- 3. a rebalance: one member leaves, the other takes over ------------------------------------


def test_survivor_takes_over_the_partitions_of_a_member_that_left(
    stack: Stack, tmp_path: Path
) -> None:
    first = TmRun(stack, tmp_path, TM_WORKERS="1")
    second: TmRun | None = None
    try:
        wait_for(lambda: len(first.owned()) == 6, what="the first member owns 6 partitions")
        second = TmRun(stack, tmp_path, TM_WORKERS="1")
        wait_for(
            lambda: len(first.owned()) == 3 and len(second.owned()) == 3,
            what="3 partitions each",
        )
        assert first.owned() | second.owned() == set(range(6))
        expected = set()
        for p in range(6):
            expected |= produce_new(stack, range(p * 100, p * 100 + 100), partition=p)
        wait_all_applied(stack, expected)

        assert first.stop() == 0, first.output()
        wait_for(lambda: len(second.owned()) == 6, what="the survivor owns 6 partitions")
        for p in range(6):
            expected |= produce_new(stack, range(1000 + p * 100, 1000 + p * 100 + 100), partition=p)
        wait_all_applied(stack, expected)
    finally:
        first.close()
        code = second.stop() if second is not None else 0
    assert code == 0, second.output() if second is not None else ""


def test_member_joining_under_load_gets_its_partitions_without_waiting_the_revoke_budget(
    stack: Stack, tmp_path: Path
) -> None:
    """A cooperative rebalance moves 3 partitions in about a second: the revoking member's
    in-flight batch takes milliseconds, far less than REVOKE_BUDGET_S, the most the revoke
    callback may wait for it."""
    first = TmRun(stack, tmp_path, TM_WORKERS="1")
    second: TmRun | None = None
    feeder: Feeder | None = None
    try:
        wait_for(lambda: len(first.owned()) == 6, what="the first member owns 6 partitions")
        feeder = stack.feed(count=15_000, rate=1500)
        wait_for(lambda: stack.count() > 2000, what="tm busy")
        second = TmRun(stack, tmp_path, TM_WORKERS="1")
        wait_for(lambda: "partitions assigned" in second.output(), what="the second member in")
        wait_for(
            lambda: len(first.owned()) == 3 and len(second.owned()) == 3,
            timeout_s=REVOKE_BUDGET_S / 2,
            what="3 partitions each (the revoke callback waits out its budget?)",
        )
        feeder.join()
        wait_all_applied(stack, feeder.expected)
    finally:
        if feeder is not None:
            feeder.stop()
        first.stop()
        if second is not None:
            second.stop()
    assert first.process.returncode == 0, first.output()
    assert second.process.returncode == 0, second.output()


EAGER_WAIT_S = 5.0  # a cooperative rebalance's first round is over well before this


def test_a_static_member_killed_while_it_revokes_leaves_no_partition_unowned(
    stack: Stack, proxy: TcpProxy, tmp_path: Path
) -> None:
    """Static membership (a pod's name as KAFKA_GROUP_INSTANCE_ID) and a kill -9 in the middle
    of a rebalance: the first member is revoking partitions for a newcomer (its revoke waits
    for a batch stuck in the database) when it is killed, and restarts with the same identity
    before its session ends. The coordinator takes the restart for the same member and hands
    it the assignment it had; no partition may stay without an owner."""
    first_env = {"TM_WORKERS": "1", "KAFKA_GROUP_INSTANCE_ID": "tm-a", **SHORT_SESSION}
    first = TmRun(stack, tmp_path, POSTGRES_QUERY_TIMEOUT="60000", **first_env, **via(proxy))
    second: TmRun | None = None
    again: TmRun | None = None
    try:
        first.wait_assigned(6)
        proxy.blackhole()
        expected = set()
        for p in range(6):
            expected |= produce_new(stack, range(p * 10, p * 10 + 10), partition=p)
        wait_for(lambda: proxy.stuck() > 0, what="a batch stuck in the database")
        second = TmRun(stack, tmp_path, TM_WORKERS="1", KAFKA_GROUP_INSTANCE_ID="tm-b")
        joined = time.monotonic()
        # The rebalance as far as it goes without the first member, whose batch is stuck: the
        # first round of a cooperative one is over (the newcomer's first, empty, answer); an
        # eager one is still preparing, seconds after the newcomer joined.
        wait_for(
            lambda: (
                "partitions assigned" in second.output()
                or (
                    time.monotonic() - joined > EAGER_WAIT_S
                    and group_state(stack.kafka_config, stack.group) == "PREPARING_REBALANCING"
                )
            ),
            what="a rebalance waiting for the first member",
        )
        first.close()  # kill -9, before its revoke (it waits for the stuck batch)
        again = TmRun(stack, tmp_path, **first_env)
        proxy.restore()
        try:
            wait_for(
                lambda: group_assigned(stack.kafka_config, stack.group, stack.topic) == 6,
                timeout_s=60,
                what="every partition owned by a member",
            )
        except AssertionError as exc:
            raise AssertionError(describe_group(stack.kafka_config, stack.group)) from exc
        for p in range(6):
            expected |= produce_new(stack, range(100 + p * 10, 100 + p * 10 + 10), partition=p)
        wait_all_applied(stack, expected)
    finally:
        first.close()
        codes = [run.stop() for run in (second, again) if run is not None]
    assert codes == [0, 0]


# -- 4. SIGTERM while busy -----------------------------------------------------------------------


def test_sigterm_under_load_then_restart_loses_and_doubles_nothing(
    stack: Stack, tmp_path: Path
) -> None:
    grace_s = 10
    env = {"TM_WORKERS": "2", "GRACEFUL_SHUTDOWN_TIMEOUT": str(grace_s * 1000), **FAST}
    tm = TmRun(stack, tmp_path, **env)
    again: TmRun | None = None
    feeder: Feeder | None = None
    try:
        tm.wait_assigned(6)
        feeder = stack.feed(count=12_000, rate=1500)
        wait_for(lambda: stack.count() > 3000, what="tm busy")
        tm.signal(signal.SIGTERM)
        code = tm.process.wait(timeout=grace_s)
        after_stop = snapshot(stack)
        assert code == 0, tm.output()
        assert "stopped clean=True" in tm.output()
        assert len(after_stop.applied) < len(feeder.expected)  # stopped mid-stream

        again = TmRun(stack, tmp_path, **env)
        feeder.join()
        wait_all_applied(stack, feeder.expected)
        assert_committed_prefixes_applied(stack, [after_stop])
    finally:
        if feeder is not None:
            feeder.stop()
        tm.close()
        code = again.stop() if again is not None else 0
    assert code == 0, again.output() if again is not None else ""


# -- 5. a second signal during shutdown ----------------------------------------------------------


def test_second_signal_during_a_stuck_drain_exits_at_once(
    stack: Stack, proxy: TcpProxy, tmp_path: Path
) -> None:
    # Long timeouts: the in-flight batch waits for the database that does not answer.
    slow = {"POSTGRES_QUERY_TIMEOUT": "60000", "GRACEFUL_SHUTDOWN_TIMEOUT": "60000"}
    tm = TmRun(stack, tmp_path, TM_WORKERS="2", **slow, **SHORT_SESSION, **via(proxy))
    feeder: Feeder | None = None
    try:
        tm.wait_assigned(6)
        feeder = stack.feed(count=5000, rate=1000)
        wait_for(lambda: stack.count() > 500, what="tm busy")
        proxy.blackhole()
        wait_for(lambda: proxy.stuck() >= 1, what="a query stuck in the database")
        workers = tm.worker_pids()
        tm.signal(signal.SIGTERM)
        wait_for(
            lambda: "stopping: finishing the in-flight batch" in tm.output(),
            what="the workers draining",
        )
        assert tm.process.poll() is None, tm.output()  # the drain is stuck
        tm.signal(signal.SIGTERM)
        code = tm.process.wait(timeout=10)
        output = tm.output()
        assert code != 0, output
        assert "second signal: killing workers and exiting at once" in output
        # Gone: no such process, or a zombie left to an init that does not reap (this sandbox's
        # PID 1 does not); either way nothing runs any more.
        wait_for(lambda: not any(alive(pid) for pid in workers), timeout_s=10, what="workers gone")

        # Killed mid-batch: a restart still applies everything exactly once.
        proxy.restore()
        feeder.join()
        again = TmRun(stack, tmp_path, TM_WORKERS="2", **FAST, **SHORT_SESSION)
        try:
            wait_all_applied(stack, feeder.expected)
        finally:
            assert again.stop() == 0, again.output()
    finally:
        if feeder is not None:
            feeder.stop()
        tm.close()


# -- 6. wrong settings at start-up: one line, no restart loop ------------------------------------


@pytest.fixture
def empty_database(settings: Settings, pg_up: None) -> Iterator[str]:
    name = unique("tm_e2e_empty")

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(**postgres.connect_kwargs(settings.postgres))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def assert_refuses_to_start(tm: TmRun, *needles: str) -> str:
    try:
        code = tm.process.wait(timeout=PREFLIGHT_TIMEOUT_S)
    finally:
        tm.close()
    output = tm.output()
    lines = [line for line in output.splitlines() if line.strip()]
    assert code != 0, output
    assert "worker spawned" not in output, output
    assert len(lines) == 1, output
    for needle in needles:
        assert re.search(needle, lines[0], re.IGNORECASE), lines[0]
    return lines[0]


def test_wrong_password_stops_at_preflight(stack: Stack, tmp_path: Path) -> None:
    tm = TmRun(stack, tmp_path, **{"POSTGRES_PASSWORD": "wrong"})
    assert_refuses_to_start(tm, "PostgreSQL", "password|authentication")


def test_kafka_unreachable_stops_at_preflight(stack: Stack, tmp_path: Path) -> None:
    tm = TmRun(stack, tmp_path, KAFKA_BROKERS="127.0.0.1:1")
    assert_refuses_to_start(tm, "Kafka", "127.0.0.1:1")


def test_database_not_migrated_stops_at_preflight(
    stack: Stack, empty_database: str, tmp_path: Path
) -> None:
    tm = TmRun(stack, tmp_path, POSTGRES_DB=empty_database)
    assert_refuses_to_start(tm, "not migrated", re.escape("tm db migrate"))


def test_missing_topic_stops_at_preflight(stack: Stack, tmp_path: Path) -> None:
    missing = unique("tm-missing").replace("_", "-")
    tm = TmRun(stack, tmp_path, TASK_STATUS_TOPIC=missing)
    assert_refuses_to_start(tm, re.escape(missing), re.escape("tm topics create"))


# -- 7. a worker that stops sending heartbeats ---------------------------------------------------


def test_silent_worker_is_killed_and_restarted(stack: Stack, tmp_path: Path) -> None:
    tm = TmRun(stack, tmp_path, TM_WORKERS="2", TM_HEARTBEAT_TIMEOUT_MS="2000", **SHORT_SESSION)
    victim = 0
    try:
        tm.wait_assigned(6)
        expected = produce_new(stack, range(1000))
        wait_all_applied(stack, expected)
        slot, victim = min(tm.workers().items())
        os.kill(victim, signal.SIGSTOP)
        wait_for(
            lambda: "worker stopped sending heartbeats" in tm.output(), what="heartbeat timeout"
        )
        tm.wait_worker(slot, not_pid=victim)
        expected |= produce_new(stack, range(1000, 3000))
        wait_all_applied(stack, expected)
    finally:
        if victim and alive(victim):
            os.kill(victim, signal.SIGCONT)
        code = tm.stop()
    output = tm.output()
    assert code == 0, output
    assert f"slot={slot} pid={victim}" in next(
        line for line in output.splitlines() if "worker stopped sending heartbeats" in line
    )
    assert not alive(victim)


# -- 8. a worker that keeps crashing after boot --------------------------------------------------


def test_worker_crashing_after_boot_is_restarted_with_backoff(stack: Stack, tmp_path: Path) -> None:
    tm = TmRun(stack, tmp_path, TM_WORKERS="2", **SHORT_SESSION)
    try:
        tm.wait_assigned(6)
        slot, pid = 0, 0
        for _ in range(4):
            pid = tm.wait_worker(slot, not_pid=pid, joined=True)  # a new worker, booted
            os.kill(pid, signal.SIGKILL)
        tm.wait_worker(slot, not_pid=pid)
        assert tm.process.poll() is None, tm.output()
        expected = produce_new(stack, range(2000))
        wait_all_applied(stack, expected)
    finally:
        code = tm.stop()
    output = tm.output()
    assert code == 0, output
    assert "halting" not in output
    delays = [float(d) for s, d in DIED.findall(output) if int(s) == slot]
    assert delays == sorted(delays) and len(delays) == 4, output
    assert delays[-1] > delays[0]
