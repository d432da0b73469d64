"""The supervisor's policies, without forking: restarts with backoff, the halt after failures
before boot, the kill of a silent child, the drain order on SIGTERM; and its metrics directory.

The supervisor runs on :class:`FakeProcesses` (our :class:`tm.processes.Processes`) and its clock:
a child is a real pipe that a test writes protocol lines to (the real :class:`Reporter`), and it
exits when the test says so. Only the tests move the clock; :func:`turn` is one loop's turn.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tm import config
from tm.children import MAX_BOOT_FAILURES
from tm.observability import metricfiles
from tm.processes import ChildMain, Spawned
from tm.protocol import EXIT_CRASH, EXIT_FATAL, EXIT_FENCED, EXIT_OK, Reporter
from tm.slots import RESTART_BACKOFF_S, STABLE_AFTER_S
from tm.supervisor import Supervisor

QUIET_HEARTBEATS = {"TM_HEARTBEAT_TIMEOUT_MS": "3600000"}  # tests not about heartbeats

Make = Callable[..., "Supervisor"]  # the make fixture: settings from **env, started


@dataclass(eq=False)
class FakeChild:
    pid: int
    is_api: bool  # only the API process asks for a state pipe
    write_fd: int  # the child's end of its report pipe
    reporter: Reporter
    alive: bool = True

    def close(self) -> None:
        if self.alive:
            self.alive = False
            os.close(self.write_fd)


class FakeProcesses:
    """:class:`tm.processes.Processes` in memory: records spawns and signals; children exit
    when a test calls :meth:`exit` (or when the supervisor waits for them after a SIGKILL)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.children: list[FakeChild] = []
        self.signals: list[tuple[int, int]] = []  # (pid, signum), in the order sent
        self._exited: deque[tuple[int, int]] = deque()

    def monotonic(self) -> float:
        return self.now

    def spawn(self, main: ChildMain, *, state_pipe: bool, inherited: Sequence[int]) -> Spawned:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        pid = 100 + len(self.children)
        self.children.append(FakeChild(pid, state_pipe, write_fd, Reporter(write_fd)))
        return Spawned(pid, read_fd)  # no state pipe: nobody here reads the state lines

    def kill(self, pid: int, signum: int) -> None:
        self.signals.append((pid, signum))

    def reap(self) -> tuple[int, int] | None:
        return self._exited.popleft() if self._exited else None

    def wait(self, pid: int) -> None:
        next(c for c in self.children if c.pid == pid).close()

    # -- for the tests --

    def exit(self, child: FakeChild, code: int) -> None:
        child.close()
        self._exited.append((child.pid, code))

    def workers(self) -> list[FakeChild]:
        return [c for c in self.children if not c.is_api]

    def apis(self) -> list[FakeChild]:
        return [c for c in self.children if c.is_api]

    def signals_to(self, child: FakeChild) -> list[int]:
        return [signum for pid, signum in self.signals if pid == child.pid]


@pytest.fixture
def processes() -> Iterator[FakeProcesses]:
    fake = FakeProcesses()
    yield fake
    for child in fake.children:
        child.close()


@pytest.fixture
def make(processes: FakeProcesses, caplog: pytest.LogCaptureFixture) -> Iterator[Make]:
    """Start a supervisor (two workers unless ``TM_WORKERS`` says otherwise) on the fakes."""
    caplog.set_level(logging.INFO, logger="tm.supervisor")
    made: list[Supervisor] = []

    def make(**env: str) -> Supervisor:
        settings = config.load({"TM_WORKERS": "2", **env})
        made.append(Supervisor(settings, started=processes.now, processes=processes))
        made[-1].start()
        return made[-1]

    yield make
    for slot in (
        slot for supervisor in made for slot in supervisor._children.slots if slot.fd >= 0
    ):
        slot.detach()  # the supervisor's ends of the pipes still open


def turn(supervisor: Supervisor) -> int | None:
    """One turn of the loop, without waiting: the lines already written are read."""
    return supervisor.poll(0)


def logged(caplog: pytest.LogCaptureFixture, message: str) -> list[dict[str, Any]]:
    """The fields of every supervisor log line with this message."""
    return [
        getattr(r, "fields", {})
        for r in caplog.records
        if r.name == "tm.supervisor" and r.getMessage() == message
    ]


def boot(supervisor: Supervisor, *children: FakeChild) -> None:
    for child in children:
        child.reporter.booted()
    turn(supervisor)


def respawn_delay(supervisor: Supervisor, processes: FakeProcesses) -> float:
    """Move the clock on in tenths of a second until a new child is spawned; return how long
    that took."""
    died_at, spawned = processes.now, len(processes.children)
    for tenths in range(1, 10 * 120):
        processes.now = died_at + tenths / 10
        turn(supervisor)
        if len(processes.children) > spawned:
            return tenths / 10
    raise AssertionError("no child was spawned again within 120 s")


# -- the restart policy ------------------------------------------------------------------------


def test_a_worker_that_keeps_dying_after_booting_is_restarted_with_a_growing_backoff(
    make: Make, processes: FakeProcesses, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor = make(TM_WORKERS="1", **QUIET_HEARTBEATS)
    delays = []
    for _ in range(len(RESTART_BACKOFF_S) + 2):
        child = processes.workers()[-1]
        boot(supervisor, child)
        processes.now += 1.0  # up a second: far from stable
        processes.exit(child, EXIT_CRASH)
        assert turn(supervisor) is None
        delays.append(respawn_delay(supervisor, processes))

    expected = [*RESTART_BACKOFF_S, RESTART_BACKOFF_S[-1], RESTART_BACKOFF_S[-1]]
    assert delays == expected
    assert [f["restart_in_s"] for f in logged(caplog, "worker died; restarting")] == expected
    assert "halting" not in caplog.text


def test_a_worker_that_was_up_for_a_minute_restarts_with_the_shortest_backoff_again(
    make: Make, processes: FakeProcesses
) -> None:
    supervisor = make(TM_WORKERS="1", **QUIET_HEARTBEATS)
    delays = []
    for up_s in (1.0, 1.0, STABLE_AFTER_S, 1.0):
        child = processes.workers()[-1]
        boot(supervisor, child)
        processes.now += up_s
        processes.exit(child, EXIT_CRASH)
        turn(supervisor)
        delays.append(respawn_delay(supervisor, processes))

    first, second = RESTART_BACKOFF_S[:2]
    assert delays == [first, second, first, second]


# -- the halt policy ---------------------------------------------------------------------------


def fail_before_boot(
    supervisor: Supervisor, processes: FakeProcesses, reason: str, *, api: bool = False
) -> int | None:
    """The newest worker (or API process) sends its F line and exits before booting."""
    child = [c for c in (processes.apis() if api else processes.workers()) if c.alive][-1]
    child.reporter.failed(reason)
    processes.exit(child, EXIT_FATAL)
    return turn(supervisor)


def fail_in_a_row(
    supervisor: Supervisor, processes: FakeProcesses, reason: str, *, api: bool = False
) -> None:
    """MAX_BOOT_FAILURES - 1 failures before boot in the newest child's slot, each restarted."""
    for _ in range(MAX_BOOT_FAILURES - 1):
        assert fail_before_boot(supervisor, processes, reason, api=api) is None
        respawn_delay(supervisor, processes)


def test_a_worker_that_fails_three_times_before_booting_halts_the_service_with_its_reason(
    make: Make,
    processes: FakeProcesses,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    supervisor = make(**QUIET_HEARTBEATS)
    healthy = processes.workers()[0]  # the oldest: worker 1 and its restarts are the newest
    boot(supervisor, healthy)
    reason = "PostgreSQL refused the password for user tm"
    fail_in_a_row(supervisor, processes, reason)

    assert fail_before_boot(supervisor, processes, reason) is None  # worker 0 is told to stop
    assert processes.signals_to(healthy) == [signal.SIGTERM]
    processes.exit(healthy, EXIT_OK)
    assert turn(supervisor) == 1
    halt = f"worker 1 failed {MAX_BOOT_FAILURES} times before it booted: {reason}"
    assert f"halting: {halt}" in caplog.messages
    assert capsys.readouterr().err == f"tm: {halt}\n"
    assert len(processes.workers()) == 1 + MAX_BOOT_FAILURES  # no fourth start of worker 1


def test_a_worker_fenced_by_another_process_halts_the_service_instead_of_fencing_it_back(
    make: Make,
    processes: FakeProcesses,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    supervisor = make(**QUIET_HEARTBEATS)
    fenced, other = processes.workers()
    boot(supervisor, fenced)
    boot(supervisor, other)
    reason = "consumer: FENCED_INSTANCE_ID: Broker: Static consumer fenced by other consumer"
    fenced.reporter.failed(reason)
    processes.exit(fenced, EXIT_FENCED)
    assert turn(supervisor) is None
    (api,) = processes.apis()
    assert processes.signals_to(other) == processes.signals_to(api) == [signal.SIGTERM]
    processes.exit(other, EXIT_OK)
    processes.exit(api, EXIT_OK)
    assert turn(supervisor) == 1
    assert capsys.readouterr().err == f"tm: worker 0 was fenced: {reason}\n"
    assert len(processes.workers()) == 2  # never restarted


def test_a_boot_in_between_resets_the_count_of_failures_before_boot(
    make: Make, processes: FakeProcesses, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor = make(TM_WORKERS="1", **QUIET_HEARTBEATS)
    fail_in_a_row(supervisor, processes, "Kafka is down")
    child = processes.workers()[-1]
    boot(supervisor, child)
    processes.exit(child, EXIT_CRASH)  # dies after booting: a restart, and the count is 0
    turn(supervisor)
    respawn_delay(supervisor, processes)
    fail_in_a_row(supervisor, processes, "Kafka is down")

    assert "halting" not in caplog.text
    fail_before_boot(supervisor, processes, "Kafka is down")
    assert caplog.messages[-1] == (
        f"halting: worker 0 failed {MAX_BOOT_FAILURES} times before it booted: Kafka is down"
    )


def test_an_api_process_that_fails_three_times_before_booting_halts_the_service(
    make: Make, processes: FakeProcesses, capsys: pytest.CaptureFixture[str]
) -> None:
    supervisor = make(**QUIET_HEARTBEATS)
    workers = processes.workers()
    boot(supervisor, *workers)  # the API process starts once every worker booted
    reason = "cannot listen on APP_PORT 3000: Address already in use"
    fail_in_a_row(supervisor, processes, reason, api=True)
    assert fail_before_boot(supervisor, processes, reason, api=True) is None  # workers stop
    for worker in workers:
        processes.exit(worker, EXIT_OK)

    assert turn(supervisor) == 1
    halt = f"the API process failed {MAX_BOOT_FAILURES} times before it booted: {reason}"
    assert capsys.readouterr().err == f"tm: {halt}\n"


# -- heartbeats --------------------------------------------------------------------------------


def test_a_child_silent_for_the_heartbeat_timeout_is_killed_once_and_then_restarted(
    make: Make, processes: FakeProcesses, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor = make(TM_HEARTBEAT_TIMEOUT_MS="10000")
    quiet, chatty = processes.workers()
    boot(supervisor, quiet, chatty)
    (api,) = processes.apis()
    boot(supervisor, api)
    for second in range(1, 20):  # silent for 19 s: 10 s is the timeout, then not another one
        processes.now += 1.0
        chatty.reporter.heartbeat()
        api.reporter.heartbeat()
        turn(supervisor)
        # Asked for its stacks first (faulthandler prints them), killed a second later.
        asked = [(quiet.pid, signal.SIGUSR1)] if second > 10 else []
        killed = [(quiet.pid, signal.SIGKILL)] if second > 11 else []
        assert processes.signals == asked + killed

    assert logged(caplog, "worker stopped sending heartbeats; killing it") == [
        {"slot": 0, "pid": quiet.pid}
    ]
    processes.exit(quiet, -signal.SIGKILL)
    turn(supervisor)
    assert logged(caplog, "worker died; restarting")[0]["error"] == "no heartbeat for 10 s"
    respawn_delay(supervisor, processes)
    assert logged(caplog, "worker spawned")[-1]["slot"] == 0


# -- the drain on SIGTERM ----------------------------------------------------------------------


def running(make: Make, processes: FakeProcesses) -> tuple[Supervisor, list[FakeChild], FakeChild]:
    """Two booted workers and a booted API process."""
    supervisor = make(**QUIET_HEARTBEATS)
    workers = processes.workers()
    boot(supervisor, *workers)
    (api,) = processes.apis()
    boot(supervisor, api)
    return supervisor, workers, api


def test_sigterm_stops_the_workers_first_and_the_api_once_every_worker_has_exited(
    make: Make, processes: FakeProcesses, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor, (first, second), api = running(make, processes)

    supervisor.on_signal(signal.SIGTERM)
    assert turn(supervisor) is None
    assert processes.signals == [(first.pid, signal.SIGTERM), (second.pid, signal.SIGTERM)]
    processes.exit(first, EXIT_OK)
    assert turn(supervisor) is None
    assert processes.signals_to(api) == []  # still answering: readiness 503 while draining

    processes.exit(second, EXIT_OK)
    assert turn(supervisor) is None
    assert turn(supervisor) is None
    assert processes.signals_to(api) == [signal.SIGTERM]  # once
    processes.exit(api, EXIT_OK)

    assert turn(supervisor) == 0
    assert logged(caplog, "stopping workers")[0]["signal"] == "SIGTERM"
    assert logged(caplog, "stopped") == [{"clean": True}]


def test_a_worker_that_does_not_drain_cleanly_makes_the_stop_exit_1(
    make: Make, processes: FakeProcesses, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor, (first, second), api = running(make, processes)

    supervisor.on_signal(signal.SIGTERM)
    turn(supervisor)
    processes.exit(first, EXIT_OK)
    processes.exit(second, EXIT_CRASH)
    turn(supervisor)
    processes.exit(api, EXIT_OK)

    assert turn(supervisor) == 1
    assert logged(caplog, "stopped") == [{"clean": False}]


def test_children_still_running_at_the_grace_deadline_are_killed_and_the_exit_is_1(
    make: Make, processes: FakeProcesses
) -> None:
    supervisor, (first, second), api = running(make, processes)
    grace_s = supervisor._grace_s()

    supervisor.on_signal(signal.SIGTERM)
    turn(supervisor)
    processes.exit(first, EXIT_OK)
    processes.now += grace_s
    assert turn(supervisor) is None
    processes.now += 0.5

    assert turn(supervisor) == 1
    assert processes.signals_to(second) == [signal.SIGTERM, signal.SIGKILL]
    assert processes.signals_to(api) == [signal.SIGKILL]


def test_a_second_signal_kills_every_child_at_once_and_exits_128_plus_its_number(
    make: Make, processes: FakeProcesses
) -> None:
    supervisor, (first, second), api = running(make, processes)

    supervisor.on_signal(signal.SIGTERM)
    turn(supervisor)
    supervisor.on_signal(signal.SIGINT)

    assert turn(supervisor) == 128 + signal.SIGINT
    for child in (first, second, api):
        assert processes.signals_to(child)[-1] == signal.SIGKILL
        assert not child.alive


# -- the metrics directory ---------------------------------------------------------------------


def test_the_metrics_directory_is_an_operators_emptied_or_a_temporary_one_and_exported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(metricfiles.ENV, "restored after the test")
    (tmp_path / "counter_123.db").write_bytes(b"a dead run's values")
    (tmp_path / "notes.txt").write_text("not ours")
    configured = config.load({metricfiles.ENV: f" {tmp_path} "}).metrics.directory
    with metricfiles.directory(configured) as used:
        assert used == str(tmp_path) and os.environ[metricfiles.ENV] == used
        assert os.listdir(used) == ["notes.txt"]
    assert (tmp_path / "notes.txt").exists()

    with metricfiles.directory(config.load({}).metrics.directory) as made:
        assert os.listdir(made) == [] and os.environ[metricfiles.ENV] == made
    assert not os.path.exists(made)
