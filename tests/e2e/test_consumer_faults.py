"""Faults under load, end to end: the database goes away or hangs, workers are killed or stop
answering, the service is stopped while busy, a dependency is wrong at start-up. After each,
every task is applied exactly once and the group has committed to the end (DESIGN §3).

Tasks are told apart by their unique ``user_email`` (``new_task_message(n)``), so "exactly once"
is ``count(*) == N`` and ``count(DISTINCT user_email) == N``. Network faults go through
:class:`tests.e2e.proxy.TcpProxy` (STYLE §5).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from confluent_kafka import Producer

from bench.stack import unique
from tests.e2e.harness import Stack, TmRun, wait_for
from tests.e2e.proxy import TcpProxy
from tm.adapters import kafka, postgres
from tm.config import Settings
from tm.supervisor import PREFLIGHT_TIMEOUT_S
from tm.traffic import new_task_message, update_message
from tm.worker.threads import REVOKE_BUDGET_S

pytestmark = pytest.mark.e2e

SPAWNED = re.compile(r"worker spawned.* slot=(\d+) pid=(\d+)")
STARTED = re.compile(r"worker started.* slot=(\d+) pid=(\d+)")
DIED = re.compile(r"worker died; restarting.* slot=(\d+) .*restart_in_s=([\d.]+)")
RETRYING = "batch failed; nothing committed, retrying"

# Fast retries and short timeouts so that a fault and its recovery fit in a few seconds.
FAST = {
    "TM_RETRY_BACKOFF_INITIAL_MS": "100",
    "TM_RETRY_BACKOFF_MAX_MS": "1000",
    "POSTGRES_QUERY_TIMEOUT": "2000",
    "POSTGRES_CONNECTION_TIMEOUT": "2000",
}
# A killed worker's group membership expires after the session timeout; keep it short.
SHORT_SESSION = {"KAFKA_SESSION_TIMEOUT": "6000", "KAFKA_HEARTBEAT_INTERVAL": "1000"}


# -- helpers -----------------------------------------------------------------------------------


class Feeder:
    """Produces ``new_task_message(n)`` for n in [start, start + count) at ``rate`` messages per
    second from a thread, so that tm is busy when a fault happens.

    With ``completed_lag`` > 0, each `new` event carries a task_id header and goes to partition
    ``n % partitions``, followed on that partition by a `completed` update of task ``n - lag``:
    tm's batches then hold new tasks and updates together, applied in one transaction."""

    def __init__(
        self, stack: Stack, *, count: int, rate: float, start: int = 0, completed_lag: int = 0
    ) -> None:
        self.expected = {f"user{n}@example.com" for n in range(start, start + count)}
        self.completed = max(count - completed_lag, 0) if completed_lag else 0
        self._stack, self._start, self._count, self._rate = stack, start, count, rate
        self._lag = completed_lag
        self._failures: list[str] = []
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            config = kafka.client_config(self._stack.settings.kafka)
            config.update({"enable.idempotence": True, "acks": "all", "linger.ms": 5})
            producer = Producer(config)

            def on_delivery(error: Any, _message: Any) -> None:
                if error is not None:
                    self._failures.append(str(error))

            began = time.monotonic()
            for i in range(self._count):
                ahead = began + i / self._rate - time.monotonic()
                if ahead > 0 and self._stop.wait(ahead):  # pacing, not waiting for an outcome
                    break
                for partition, headers, value in self._messages(self._start + i):
                    while True:
                        try:
                            producer.produce(
                                self._stack.topic,
                                value=value,
                                headers=headers,
                                on_delivery=on_delivery,
                                partition=partition,
                            )
                            break
                        except BufferError:
                            producer.poll(0.05)
                producer.poll(0)
            if producer.flush(30):
                self._failures.append("messages left unacknowledged")
        except BaseException as exc:  # reported by join()
            self._error = exc

    def _messages(self, n: int) -> list[tuple[int, Any, bytes]]:
        """(partition, headers, value) of what the n-th step produces; partition -1: the
        producer's partitioner chooses."""
        headers, value = new_task_message(n)
        if not self._lag:
            return [(-1, headers, value)]
        partitions = self._stack.partitions
        headers = [*headers, ("task_id", str(feeder_task_id(n)).encode())]
        out = [(n % partitions, headers, value)]
        if n - self._lag >= self._start:
            before = n - self._lag
            update_headers, update = update_message(feeder_task_id(before), failed=False)
            out.append((before % partitions, update_headers, update))
        return out

    def join(self) -> None:
        self._thread.join(60)
        assert not self._thread.is_alive(), "the feeder did not finish"
        if self._error is not None:
            raise self._error
        assert self._failures == []

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def feeder_task_id(n: int) -> uuid.UUID:
    """The task_id header Feeder gives task n when it also sends updates."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"tm-e2e-feeder/{n}")


def produce_new(stack: Stack, numbers: range, *, partition: int | None = None) -> set[str]:
    messages = []
    for n in numbers:
        headers, value = new_task_message(n)
        messages.append((None, headers, value))
    stack.produce(messages, partition=partition)
    return {f"user{n}@example.com" for n in numbers}


def emails(stack: Stack) -> set[str]:
    return {row[0] for row in stack.query("SELECT user_email FROM web_crawl_tasks")}


def assert_exactly_once(stack: Stack, expected: set[str]) -> None:
    total, distinct = stack.query(
        "SELECT count(*), count(DISTINCT user_email) FROM web_crawl_tasks"
    )[0]
    applied = emails(stack)
    assert not expected - applied, f"{len(expected - applied)} task(s) missing"
    assert not applied - expected, f"{len(applied - expected)} unexpected task(s)"
    assert (total, distinct) == (len(expected), len(expected)), "a task was applied twice"


def wait_all_applied(stack: Stack, expected: set[str], timeout_s: float = 30.0) -> None:
    wait_for(lambda: stack.count() >= len(expected), timeout_s=timeout_s, what="every task")
    wait_for(stack.all_committed, timeout_s=timeout_s, what="offsets committed to the end")
    assert_exactly_once(stack, expected)


@dataclass
class Snapshot:
    """The group's committed offsets, and the tasks in the table read right after them."""

    committed: dict[int, int]
    applied: set[str]


def snapshot(stack: Stack) -> Snapshot:
    committed = stack.committed()
    return Snapshot(committed, emails(stack))  # rows are never deleted: read after the offsets


def assert_committed_prefixes_applied(stack: Stack, snapshots: list[Snapshot]) -> None:
    """Every message below a committed offset was in the table when that offset was seen."""
    where = {}  # (partition, offset) -> user_email
    for message in stack.read_topic(stack.topic, timeout_s=30):
        email = orjson.loads(message.value())["user_email"]
        where[(message.partition(), message.offset())] = email
    for i, shot in enumerate(snapshots):
        unapplied = sorted(
            (p, o)
            for (p, o), email in where.items()
            if o < shot.committed.get(p, -1) and email not in shot.applied
        )
        assert not unapplied, (
            f"snapshot {i}: committed {shot.committed} passes {len(unapplied)} message(s) not"
            f" in the table, first {unapplied[:5]}"
        )


def spawned(tm: TmRun) -> list[tuple[int, int]]:
    """(slot, pid) of every "worker spawned" line, in order."""
    return [(int(s), int(p)) for s, p in SPAWNED.findall(tm.output())]


def started_pids(tm: TmRun) -> set[int]:
    """Pids of the workers that logged "worker started" (they have booted)."""
    return {int(p) for _, p in STARTED.findall(tm.output())}


def owned(tm: TmRun) -> set[int]:
    """The partitions a TmRun's workers own now, from their assigned/revoked lines."""
    return tm.owned()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie nobody reaped yet is dead too
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def terminate_backends(stack: Stack) -> int:
    rows = stack.query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'tm' AND datname = $1 AND pid <> pg_backend_pid()",
        stack.database,
    )
    return sum(1 for row in rows if row[0])


def via(proxy: TcpProxy) -> dict[str, str]:
    return {"POSTGRES_HOST": proxy.host, "POSTGRES_PORT": str(proxy.port)}


# -- 1. the database goes away -------------------------------------------------------------------


def test_database_cut_mid_stream_commits_nothing_unapplied(
    stack: Stack, proxy: TcpProxy, tmp_path: Path
) -> None:
    tm = TmRun(stack, tmp_path, TM_WORKERS="2", **FAST, **via(proxy))
    feeder: Feeder | None = None
    try:
        tm.wait_assigned(6)
        feeder = Feeder(stack, count=10_000, rate=1000)
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
        feeder = Feeder(stack, count=10_000, rate=1000)
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
        feeder = Feeder(stack, count=5000, rate=500, completed_lag=50)
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
        feeder = Feeder(stack, count=10_000, rate=1000)
        wait_for(lambda: stack.count() > 2000, what="tm busy")
        slot, victim = spawned(tm)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: [s for s, _ in spawned(tm)].count(slot) == 2,
            what=f"slot {slot} respawned",
        )
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
    assert victim not in [pid for _, pid in spawned(tm)[2:]]


# -- 3. a rebalance: one member leaves, the other takes over ------------------------------------


def test_survivor_takes_over_the_partitions_of_a_member_that_left(
    stack: Stack, tmp_path: Path
) -> None:
    first = TmRun(stack, tmp_path, TM_WORKERS="1")
    second: TmRun | None = None
    try:
        wait_for(lambda: len(owned(first)) == 6, what="the first member owns 6 partitions")
        second = TmRun(stack, tmp_path, TM_WORKERS="1")
        wait_for(
            lambda: len(owned(first)) == 3 and len(owned(second)) == 3,
            what="3 partitions each",
        )
        assert owned(first) | owned(second) == set(range(6))
        expected = set()
        for p in range(6):
            expected |= produce_new(stack, range(p * 100, p * 100 + 100), partition=p)
        wait_all_applied(stack, expected)

        assert first.stop() == 0, first.output()
        wait_for(lambda: len(owned(second)) == 6, what="the survivor owns 6 partitions")
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
        wait_for(lambda: len(owned(first)) == 6, what="the first member owns 6 partitions")
        feeder = Feeder(stack, count=15_000, rate=1500)
        wait_for(lambda: stack.count() > 2000, what="tm busy")
        second = TmRun(stack, tmp_path, TM_WORKERS="1")
        wait_for(lambda: "partitions assigned" in second.output(), what="the second member in")
        wait_for(
            lambda: len(owned(first)) == 3 and len(owned(second)) == 3,
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
        feeder = Feeder(stack, count=12_000, rate=1500)
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
        feeder = Feeder(stack, count=5000, rate=1000)
        wait_for(lambda: stack.count() > 500, what="tm busy")
        proxy.blackhole()
        wait_for(lambda: proxy.stuck() >= 1, what="a query stuck in the database")
        workers = [pid for _, pid in spawned(tm)]
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
        slot, victim = spawned(tm)[0]
        os.kill(victim, signal.SIGSTOP)
        wait_for(
            lambda: "worker stopped sending heartbeats" in tm.output(), what="heartbeat timeout"
        )
        wait_for(
            lambda: [s for s, _ in spawned(tm)].count(slot) == 2,
            what=f"slot {slot} respawned",
        )
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
        slot = 0
        for crash in range(4):
            pids = [pid for s, pid in spawned(tm) if s == slot]
            assert len(pids) == crash + 1

            def booted(pid: int = pids[-1]) -> bool:
                return pid in started_pids(tm)

            wait_for(booted, what="the worker booted")
            os.kill(pids[-1], signal.SIGKILL)

            def respawned(n: int = crash + 2) -> bool:
                return [s for s, _ in spawned(tm)].count(slot) == n

            wait_for(respawned, what=f"slot {slot} respawned")
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
