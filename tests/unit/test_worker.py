"""The worker's decisions that need no broker: ownership recorded inside the rebalance callbacks
(whatever the event loop is doing), the pause flag an assignment gets, and heartbeats that stop
when a client call hangs in one of the worker's threads."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from tm.config import Settings
from tm.worker import POLL_STUCK_AFTER_S, Worker, stuck_thread


@dataclass
class LinesSent:
    """Stands in for the pipe to the supervisor (tm.supervisor.Reporter)."""

    lines: list[str] = field(default_factory=list)

    def send(self, line: str) -> None:
        self.lines.append(line)


@dataclass
class CallbackSource:
    """The part of KafkaSource the rebalance callbacks use, recording what they asked for."""

    assigned: list[tuple[list[int], bool]] = field(default_factory=list)
    resumed: list[list[int]] = field(default_factory=list)

    def assign_in_callback(self, _consumer: Any, partitions: list[Any], *, paused: bool) -> None:
        self.assigned.append(([tp.partition for tp in partitions], paused))

    def resume_in_callback(self, _consumer: Any, partitions: list[Any]) -> None:
        self.resumed.append([tp.partition for tp in partitions])


@pytest.fixture
def worker(settings: Settings) -> Iterator[Worker]:
    w = Worker(settings, slot=0, reporter=LinesSent())  # type: ignore[arg-type]
    w._source = CallbackSource()  # type: ignore[assignment]
    # A loop that never runs: the callbacks must not need it to record ownership.
    w._loop = asyncio.new_event_loop()
    yield w
    w._loop.close()


def tps(*partitions: int) -> list[TopicPartition]:
    return [TopicPartition("task-status", p) for p in partitions]


def test_assignment_is_recorded_inside_the_callback_even_when_the_loop_is_busy(
    worker: Worker,
) -> None:
    started = time.monotonic()
    worker._on_assign(None, tps(3, 4))
    assert time.monotonic() - started < 1.0  # it did not wait for the loop
    assert worker._state.owned == {3, 4}
    assert worker._reporter.lines == ["A 2"]  # type: ignore[attr-defined]


def test_an_assignment_is_resumed_normally_and_paused_while_backing_off(worker: Worker) -> None:
    source: CallbackSource = worker._source  # type: ignore[assignment]
    worker._on_assign(None, tps(0, 1))
    worker._state.paused = True
    worker._on_assign(None, tps(2))
    assert source.assigned == [([0, 1], False), ([2], True)]


def test_lost_partitions_are_forgotten_and_unpaused_inside_the_callback(worker: Worker) -> None:
    source: CallbackSource = worker._source  # type: ignore[assignment]
    worker._on_assign(None, tps(0, 1, 2))
    worker._state.committable.update({0: 5, 1: 10, 2: 20})
    worker._on_lost(None, tps(1, 2))
    assert worker._state.owned == {0}
    assert worker._state.take_commit() == {0: 5}  # 1 and 2 are another member's now
    assert source.resumed == [[1, 2]]


def test_a_thread_is_stuck_only_past_its_bound() -> None:
    bounds = {"poll": 60.0, "io": 65.0}
    now = 1000.0
    assert stuck_thread(now, {"poll": None, "io": None}, bounds) is None
    assert stuck_thread(now, {"poll": now - 59, "io": now - 64}, bounds) is None
    assert stuck_thread(now, {"poll": None, "io": now - 66}, bounds) == {
        "thread": "io",
        "busy_s": 66.0,
    }


async def test_heartbeats_stop_while_a_poll_hangs(worker: Worker) -> None:
    reporter: LinesSent = worker._reporter  # type: ignore[assignment]
    worker._busy_since["poll"] = time.monotonic() - POLL_STUCK_AFTER_S - 1
    beating = asyncio.create_task(worker._heartbeat())
    await asyncio.sleep(0)  # one turn: the heartbeat's first round
    assert "H" not in reporter.lines
    assert any(line.startswith("F poll thread hung") for line in reporter.lines)
    beating.cancel()


async def test_heartbeats_flow_while_calls_stay_within_their_bounds(worker: Worker) -> None:
    reporter: LinesSent = worker._reporter  # type: ignore[assignment]
    worker._busy_since["poll"] = time.monotonic()  # a poll just began
    beating = asyncio.create_task(worker._heartbeat())
    await asyncio.sleep(0)
    beating.cancel()
    assert reporter.lines == ["H"]
