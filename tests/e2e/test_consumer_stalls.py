"""Ways tm could stop consuming without losing anything, end to end: as PID 1 of a container,
with a partition left paused by a backoff, during a database failover, on a signal before the
workers start, and with the supervisor killed under its children.

Each test runs ``tm run`` as a real process tree against the real broker and database; network
faults go through :class:`harness.proxy.TcpProxy`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness import free_port, wait_for
from harness.kafka import Feeder
from harness.outcomes import FAST, RETRYING, SHORT_SESSION, produce_new, wait_all_applied
from harness.procfs import alive
from harness.proxy import TcpProxy, via
from harness.stack import Stack, admin_sql
from harness.tm import TmRun

pytestmark = pytest.mark.e2e

# A PID namespace of its own, as a container without an init process gives: tm is PID 1 there.
AS_PID_1 = ["unshare", "--pid", "--fork", "--mount-proc"]


def inner_pid(tm: TmRun) -> int:
    """The host pid of the process that ``unshare --fork`` started: tm's supervisor, PID 1 of
    the new namespace."""

    def child() -> int:
        with open(f"/proc/{tm.process.pid}/task/{tm.process.pid}/children") as f:
            children = f.read().split()
        return int(children[0]) if children else 0

    return wait_for(child, timeout_s=10, what="unshare's child")


def namespace_pid(pid: int) -> int:
    """``pid`` as its own PID namespace numbers it (the last NSpid field)."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("NSpid:"))
    return int(line.split()[-1])


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found.update(int(child) for child in f.read().split())
    return found


def zombie_children(pid: int) -> list[int]:
    zombies = []
    for child in children(pid):
        try:
            with open(f"/proc/{child}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    zombies.append(child)
        except FileNotFoundError:
            continue
    return zombies


# -- 1. PID 1 ------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare is missing")
def test_as_pid_1_tm_consumes_reaps_orphans_and_drains_on_sigterm(
    stack: Stack, tmp_path: Path
) -> None:
    tm = TmRun(stack, tmp_path, wrap=AS_PID_1, TM_WORKERS="2", **FAST)
    try:
        supervisor = inner_pid(tm)
        assert namespace_pid(supervisor) == 1
        tm.wait_assigned(6)
        expected = produce_new(stack, range(3000))
        wait_all_applied(stack, expected)

        # An orphan in the namespace (a process whose parent exited) becomes PID 1's child; the
        # supervisor must reap it, or zombies pile up in the container.
        own = children(supervisor)  # its workers and API process
        subprocess.run(
            [
                "nsenter",
                f"--target={supervisor}",
                "--pid",
                "--mount",
                "--",
                "sh",
                "-c",
                "sleep 0.5 & exit 0",
            ],
            check=True,
        )
        # The orphan is the supervisor's child once `sh` has exited (before nsenter returns):
        # it must end and then be gone, reaped, not left a zombie.
        wait_for(lambda: children(supervisor) <= own, timeout_s=10, what="the orphan reaped")
        assert zombie_children(supervisor) == []

        os.kill(supervisor, signal.SIGTERM)  # what the kubelet sends to PID 1
        code = tm.process.wait(timeout=30)
    finally:
        tm.close()
    output = tm.output()
    assert code == 0, output
    assert "stopped clean=True" in output, output
    assert "worker died" not in output, output
    assert stack.all_committed()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare is missing")
def test_as_pid_1_sigterm_during_the_preflight_check_stops_cleanly(
    stack: Stack, proxy: TcpProxy, tmp_path: Path
) -> None:
    proxy.blackhole()  # the pre-flight check waits on PostgreSQL
    tm = TmRun(stack, tmp_path, wrap=AS_PID_1, POSTGRES_CONNECTION_TIMEOUT="30000", **via(proxy))
    try:
        supervisor = inner_pid(tm)
        wait_for(lambda: proxy.accepted > 0, what="the pre-flight check connecting")
        os.kill(supervisor, signal.SIGTERM)
        code = tm.process.wait(timeout=10)
    finally:
        tm.close()
    output = tm.output()
    assert code == 0, output
    assert "stopped before start" in output, output
    assert "worker spawned" not in output, output


# -- 2. a partition paused for a backoff ---------------------------------------------------------


def test_partition_paused_for_a_backoff_is_fetched_again_when_it_comes_back(
    stack: Stack, proxy: TcpProxy, tmp_path: Path
) -> None:
    """Database blip -> A pauses 0-5 for a long backoff -> B joins, A gives up three partitions
    while paused -> the backoff ends, A resumes the three it owns -> B leaves, A gets the other
    three back: they must be fetched (librdkafka kept their pause flag)."""
    long_backoff = {
        "TM_RETRY_BACKOFF_INITIAL_MS": "30000",  # 15-30 s with jitter: B joins meanwhile
        "TM_RETRY_BACKOFF_MAX_MS": "30000",
        "POSTGRES_QUERY_TIMEOUT": "2000",
        "POSTGRES_CONNECTION_TIMEOUT": "2000",
    }
    first = TmRun(stack, tmp_path, TM_WORKERS="1", **long_backoff, **SHORT_SESSION, **via(proxy))
    second: TmRun | None = None
    try:
        first.wait_assigned(6)
        expected = produce_new(stack, range(60))
        wait_all_applied(stack, expected)

        proxy.cut()
        expected |= produce_new(stack, range(60, 120))
        wait_for(lambda: RETRYING in first.output(), what="a batch failing: A backs off")
        proxy.restore()

        second = TmRun(stack, tmp_path, TM_WORKERS="1", **SHORT_SESSION)
        wait_for(
            lambda: len(first.owned()) == 3 and len(second.owned()) == 3,
            what="3 partitions each",
        )
        given_up = set(range(6)) - first.owned()
        wait_all_applied(stack, expected, timeout_s=60)  # A's backoff is over

        assert second.stop() == 0, second.output()
        wait_for(lambda: len(first.owned()) == 6, what="A owns all six again")
        for p in sorted(given_up):
            expected |= produce_new(stack, range(1000 + p * 100, 1050 + p * 100), partition=p)
        wait_all_applied(stack, expected)
    finally:
        if second is not None:
            second.close()
        code = first.stop()
    output = first.output()
    assert code == 0, output
    # The sequence happened as described: A gave partitions up while it was backing off.
    assert output.index("partitions revoked") < output.index("resuming after backoff"), output


# -- 3. a database failover ----------------------------------------------------------------------


def test_database_failover_with_a_worker_restarting_does_not_halt(
    stack: Stack, proxy: TcpProxy, tmp_path: Path
) -> None:
    tm = TmRun(stack, tmp_path, TM_WORKERS="2", **FAST, **SHORT_SESSION, **via(proxy))
    feeder: Feeder | None = None
    try:
        tm.wait_assigned(6)
        feeder = stack.feed(count=6000, rate=500)
        wait_for(lambda: stack.count() > 1000, what="tm busy")
        proxy.cut()
        slot, victim = min(tm.workers().items())
        os.kill(victim, signal.SIGKILL)  # its restart cannot open its pool
        tm.wait_worker(slot, not_pid=victim)
        time.sleep(10)  # the outage: a deliberately timed window
        assert tm.process.poll() is None, tm.output()
        proxy.restore()
        feeder.join()
        wait_all_applied(stack, feeder.expected, timeout_s=60)
    finally:
        if feeder is not None:
            feeder.stop()
        code = tm.stop()
    output = tm.output()
    assert code == 0, output
    assert "halting" not in output, output
    assert "cannot connect; retrying" in output, output


def test_read_only_database_is_waited_out(stack: Stack, tmp_path: Path) -> None:
    """A standby answers every write with SQLSTATE 25006 until it is promoted."""
    tm = TmRun(stack, tmp_path, TM_WORKERS="2", **FAST)
    try:
        tm.wait_assigned(6)
        expected = produce_new(stack, range(500))
        wait_all_applied(stack, expected)
        stack.query(f'ALTER DATABASE "{stack.database}" SET default_transaction_read_only = on')
        stack.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'tm' AND datname = $1 AND pid <> pg_backend_pid()",
            stack.database,
        )
        expected |= produce_new(stack, range(500, 1000))
        wait_for(lambda: "read-only" in tm.output(), what="writes refused as read-only")
        # From another database: this one refuses ALTER DATABASE now, being read-only.
        admin_sql(
            stack.settings, f'ALTER DATABASE "{stack.database}" RESET default_transaction_read_only'
        )
        wait_all_applied(stack, expected, timeout_s=60)
    finally:
        code = tm.stop()
    output = tm.output()
    assert code == 0, output
    assert "worker died" not in output, output
    assert RETRYING in output, output


# -- 4. the supervisor killed under its children -------------------------------------------------


def test_api_process_goes_with_a_killed_supervisor_and_the_next_start_binds_its_port(
    stack: Stack, tmp_path: Path
) -> None:
    port = str(free_port())
    tm = TmRun(stack, tmp_path, TM_WORKERS="1", APP_PORT=port, **SHORT_SESSION)
    again: TmRun | None = None
    try:
        tm.wait_assigned(6)
        wait_for(lambda: "api listening" in tm.output(), what="the API process listening")
        children = [pid for pid in tm.roles() if pid != tm.pid]
        tm.process.kill()  # SIGKILL of the supervisor alone: no drain, no forwarding
        tm.process.wait(10)
        wait_for(
            lambda: not any(alive(pid) for pid in children),
            timeout_s=30,
            what="the workers and the API process gone with their parent",
        )
        again = TmRun(stack, tmp_path, TM_WORKERS="1", APP_PORT=port, **SHORT_SESSION)
        wait_for(lambda: "api listening" in again.output(), what="the new API process listening")
        expected = produce_new(stack, range(200))
        wait_all_applied(stack, expected)
    finally:
        tm.close()
        code = again.stop() if again is not None else 0
    assert again is not None
    assert code == 0, again.output()
    assert "halting" not in again.output()
