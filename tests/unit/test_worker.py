"""The worker's decisions that need no broker, with fakes of our own Protocols: ownership
recorded inside the rebalance callbacks (whatever the event loop is doing), the pause flag an
assignment gets, the drain order at a stop, the rewind after a failure, and a client call that
hangs in one of the worker's threads ending the worker."""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import msgspec
import orjson
import pytest

from tests.fakes import FakeDatabase, FakeMessage, FakeSink
from tm.config import EXACTLY_ONCE, Settings
from tm.core.decode import RawMessage
from tm.errors import DatabaseUnavailableError
from tm.pipeline import Pipeline
from tm.protocol import LineReader, Reporter
from tm.worker import Worker
from tm.worker.threads import HungCallError

TS = b"2025-08-10T10:18:59.023Z"


class Pipe:
    """The real Reporter on a real pipe, read back as the supervisor reads it."""

    def __init__(self) -> None:
        self._read, write = os.pipe()
        os.set_blocking(self._read, False)
        self.reporter = Reporter(write)
        self._reader = LineReader()
        self.lines: list[str] = []

    def read(self) -> list[str]:
        try:
            chunk = os.read(self._read, 65536)
        except BlockingIOError:
            chunk = b""
        for line in self._reader.feed(chunk):
            assert line.code is not None
            self.lines.append(f"{line.code.value} {line.text}".strip())
        return self.lines


@dataclass
class FakeAssignment:
    """What the assign callback gets (tm.adapters.kafka.Assignment), recording take()."""

    partitions: list[int]
    taken: list[bool] = field(default_factory=list)

    def take(self, *, paused: bool) -> None:
        self.taken.append(paused)


@dataclass
class FakeSource:
    """The consumer (tm.worker.consume.Source): hands out the polls given, then nothing;
    records what the loop asked of it."""

    polls: list[list[FakeMessage]]
    calls: list[tuple[str, object]] = field(default_factory=list)
    after_first_poll: threading.Event = field(default_factory=threading.Event)
    after_pause: threading.Event = field(default_factory=threading.Event)

    def poll(
        self, max_messages: int, timeout_s: float, commit: dict[int, int] | None, linger_s: float
    ) -> Sequence[RawMessage]:
        if commit:
            self.calls.append(("commit async", commit))
        if not self.polls:
            time.sleep(timeout_s)
            return []
        polled = self.polls.pop(0)
        self.after_first_poll.set()
        return polled

    def commit(self, committable: dict[int, int]) -> None:
        self.calls.append(("commit", committable))

    def rewind(self, first_offsets: dict[int, int]) -> None:
        self.calls.append(("rewind", first_offsets))

    def pause(self, partitions: list[int]) -> None:
        self.calls.append(("pause", partitions))
        self.after_pause.set()

    def resume(self, partitions: list[int]) -> None:
        self.calls.append(("resume", partitions))

    def group_metadata(self) -> object:
        return "generation-1"

    def lag(self) -> int:
        return 0


def new(offset: int, partition: int = 0) -> FakeMessage:
    headers = [("task_type", b"web-crawl"), ("status", b"new"), ("timestamp", TS)]
    body = {"user_email": f"u{offset}@example.com", "user_query": "q", "base_url": "https://x.io"}
    return FakeMessage(headers, orjson.dumps(body), partition, offset)


@pytest.fixture
def pipe() -> Pipe:
    return Pipe()


@pytest.fixture
def worker(settings: Settings, pipe: Pipe) -> Iterator[Worker]:
    w = Worker(settings, slot=0, reporter=pipe.reporter)
    yield w
    w.threads.shutdown()


def start(
    worker: Worker, settings: Settings, source: FakeSource, database: FakeDatabase, sink: FakeSink
) -> asyncio.Task[None]:
    """The worker's consume loop on the real pipeline, over fakes, as a task."""
    pipeline = Pipeline(
        settings=settings,
        database=database,
        sink=sink,
        run_io=functools.partial(worker.threads.run, "io"),
    )
    return asyncio.create_task(worker.consumption.run(source, pipeline))


def test_an_assignment_is_recorded_inside_the_callback_while_no_event_loop_runs(
    worker: Worker, pipe: Pipe
) -> None:
    worker.consumption.on_assign(FakeAssignment([3, 4]))  # type: ignore[arg-type]
    assert worker.consumption.state.owned == {3, 4}
    assert pipe.read() == ["A 2"]


def test_an_assignment_is_resumed_normally_and_paused_while_backing_off(worker: Worker) -> None:
    first, second = FakeAssignment([0, 1]), FakeAssignment([2])
    worker.consumption.on_assign(first)  # type: ignore[arg-type]
    worker.consumption.state.paused = True
    worker.consumption.on_assign(second)  # type: ignore[arg-type]
    assert (first.taken, second.taken) == ([False], [True])


def test_lost_partitions_are_forgotten_inside_the_callback_and_never_committed(
    worker: Worker, pipe: Pipe
) -> None:
    consumption = worker.consumption
    consumption.on_assign(FakeAssignment([0, 1, 2]))  # type: ignore[arg-type]
    consumption.state.committable.update({0: 5, 1: 10, 2: 20})
    consumption.on_lost([1, 2])
    assert consumption.state.owned == {0}
    assert consumption.state.take_commit() == {0: 5}  # 1 and 2 are another member's now
    assert pipe.read() == ["A 3", "A 1"]


async def test_at_a_stop_the_last_batch_is_applied_and_acknowledged_before_revoke_commits_it(
    worker: Worker, settings: Settings
) -> None:
    consumption = worker.consumption
    consumption.on_assign(FakeAssignment([0]))  # type: ignore[arg-type]
    source = FakeSource(polls=[[new(7), new(8)]])
    database, sink = FakeDatabase(), FakeSink()
    running = start(worker, settings, source, database, sink)
    await asyncio.to_thread(source.after_first_poll.wait, 10)
    worker._stopping.set()  # the SIGTERM handler's doing
    await running
    # Drained: the batch is in the database and its crawl requests are acknowledged...
    assert len(database.tasks) == 2
    assert len(sink.acknowledged) == 2
    assert source.calls == []  # ...and nothing was committed from the loop:
    # the revoke callback (in the poll thread, inside close) commits it before the partition goes.
    await asyncio.to_thread(consumption.on_revoke, [0])
    assert source.calls == [("commit", {0: 9})]
    assert consumption.state.owned == set()


async def test_a_failed_batch_rewinds_its_partitions_pauses_and_commits_nothing(
    worker: Worker, settings: Settings, pipe: Pipe
) -> None:
    consumption = worker.consumption
    consumption.on_assign(FakeAssignment([0, 1]))  # type: ignore[arg-type]
    source = FakeSource(polls=[[new(3, 0), new(5, 1)], []])
    database = FakeDatabase(fail_with=DatabaseUnavailableError("connection refused"))
    running = start(worker, settings, source, database, FakeSink())
    await asyncio.to_thread(source.after_pause.wait, 10)
    worker._stopping.set()
    await running
    assert source.calls[:2] == [("rewind", {0: 3, 1: 5}), ("pause", [0, 1])]
    assert not any(call == "commit" or call == "commit async" for call, _ in source.calls)
    assert consumption.state.paused
    assert "R 1" in pipe.read()  # readiness reports the retry


@pytest.fixture
def exactly_once(settings: Settings, pipe: Pipe) -> Iterator[Worker]:
    consumer = msgspec.structs.replace(settings.consumer, delivery=EXACTLY_ONCE)
    w = Worker(msgspec.structs.replace(settings, consumer=consumer), slot=0, reporter=pipe.reporter)
    yield w
    w.threads.shutdown()


async def test_exactly_once_commits_the_offsets_in_the_transaction_of_the_outputs_only(
    exactly_once: Worker, settings: Settings
) -> None:
    worker = exactly_once
    consumption = worker.consumption
    consumption.on_assign(FakeAssignment([0, 1]))  # type: ignore[arg-type]
    source = FakeSource(polls=[[new(7), new(8), new(3, 1)]])
    sink = FakeSink(transactional=True)
    running = start(worker, settings, source, FakeDatabase(), sink)
    await asyncio.to_thread(source.after_first_poll.wait, 10)
    worker._stopping.set()
    await running
    await asyncio.to_thread(consumption.on_revoke, [0, 1])
    # One transaction: the batch's three crawl requests and its offsets...
    assert [(len(messages), offsets) for messages, offsets in sink.committed] == [(3, {0: 9, 1: 4})]
    # ...and the consumer commits nothing, neither with a poll nor on the revoke.
    assert source.calls == []


async def test_exactly_once_an_aborted_transaction_rewinds_and_commits_nothing(
    exactly_once: Worker, settings: Settings, pipe: Pipe
) -> None:
    worker = exactly_once
    consumption = worker.consumption
    consumption.on_assign(FakeAssignment([0]))  # type: ignore[arg-type]
    source = FakeSource(polls=[[new(3), new(4)], []])
    sink = FakeSink(transactional=True, fail_flush=True)
    running = start(worker, settings, source, FakeDatabase(), sink)
    await asyncio.to_thread(source.after_pause.wait, 10)
    worker._stopping.set()
    await running
    assert [len(messages) for messages in sink.aborted] == [2]
    assert sink.committed == []
    assert source.calls[:2] == [("rewind", {0: 3}), ("pause", [0])]
    assert "R 1" in pipe.read()


async def first_transaction_held(
    worker: Worker, settings: Settings, source: FakeSource, partitions: list[int], *, tasks: int
) -> tuple[asyncio.Task[None], FakeSink, threading.Event]:
    """The consume loop over ``source`` with the first transaction's commit held (a slow
    broker) until ``tasks`` rows are applied; the loop, the sink and the event that lets the
    commit go."""
    worker.consumption.on_assign(FakeAssignment(partitions))  # type: ignore[arg-type]
    database = FakeDatabase()
    hold = threading.Event()
    sink = FakeSink(transactional=True, hold_first_flush=hold)
    running = start(worker, settings, source, database, sink)
    await asyncio.to_thread(sink.flushing.wait, 10)
    while len(database.tasks) < tasks:  # noqa: ASYNC110 (the fake database has no event)
        await asyncio.sleep(0.01)
    return running, sink, hold


async def test_batches_applied_while_a_transaction_commits_share_the_next_one(
    exactly_once: Worker, settings: Settings
) -> None:
    worker = exactly_once
    source = FakeSource(polls=[[new(1)], [new(2)], [new(3), new(4)], [new(5)]])
    # While the first transaction commits, the next batches are polled and applied...
    running, sink, hold = await first_transaction_held(worker, settings, source, [0], tasks=5)
    # ...but nothing of theirs is produced into the transaction committing.
    assert [m["value"] for m in sink.produced] == [new(1).value()]
    hold.set()
    worker._stopping.set()
    await running
    # Two transactions: the first batch's, then the three batches that waited for it.
    assert [(len(messages), offsets) for messages, offsets in sink.committed] == [
        (1, {0: 2}),
        (4, {0: 6}),
    ]


async def test_exactly_once_a_batch_whose_partition_went_in_flight_commits_nothing(
    exactly_once: Worker, settings: Settings
) -> None:
    worker = exactly_once
    source = FakeSource(polls=[[new(1)], [new(2), new(5, 1)]])
    running, sink, hold = await first_transaction_held(worker, settings, source, [0, 1], tasks=3)
    # The second batch waits for the first one's transaction when partition 1 is lost.
    await asyncio.to_thread(worker.consumption.on_lost, [1])
    hold.set()
    await asyncio.to_thread(source.after_pause.wait, 10)
    worker._stopping.set()
    await running
    # The first batch's transaction only: the second's request for partition 1's task is the
    # new owner's to publish, so none of its outputs is committed; it is consumed again.
    assert [(len(messages), offsets) for messages, offsets in sink.committed] == [(1, {0: 2})]
    assert ("rewind", {0: 2}) in source.calls


async def test_a_client_call_past_its_bound_fails_and_every_later_call_at_once(
    worker: Worker,
) -> None:
    threads = worker.threads
    threads.bound_s["io"] = 0.2
    release = threading.Event()
    try:
        with pytest.raises(HungCallError, match="has not returned after 0 s in the io thread"):
            await threads.run("io", release.wait, 30)
        # The io thread is still in that call: nothing else may queue behind it.
        with pytest.raises(HungCallError):
            await threads.run("poll", time.sleep, 0)
    finally:
        release.set()


async def test_a_watched_call_is_hung_as_soon_as_its_watch_says_it_is_overdue(
    worker: Worker,
) -> None:
    threads = worker.threads
    threads.watch_interval_s = 0.01
    late: list[str] = []
    threads.watch("io", lambda _now: late[0] if late else None)
    release = threading.Event()
    assert await threads.run("io", sum, [1, 2]) == 3  # on time: its answer
    try:
        running = asyncio.create_task(threads.run("io", release.wait, 30))
        await asyncio.sleep(0.05)
        assert not running.done()  # within its bound, and not overdue yet
        late.append("send_offsets_to_transaction, 5 s past its 10.0 s timeout")
        with pytest.raises(HungCallError, match="is stuck in send_offsets_to_transaction"):
            await asyncio.wait_for(running, 10)
    finally:
        release.set()


async def test_a_call_that_raises_timeout_itself_is_not_taken_for_hung(worker: Worker) -> None:
    def times_out() -> None:
        raise TimeoutError("the call's own")

    with pytest.raises(TimeoutError, match="the call's own"):
        await worker.threads.run("io", times_out)
    assert worker.threads.hung is None
    assert await worker.threads.run("io", sum, [1, 2]) == 3


async def test_a_flush_that_hangs_ends_the_worker_without_committing_its_batch(
    worker: Worker, settings: Settings
) -> None:
    """A transactional call that librdkafka does not return from (its timeout ignored): the
    worker ends with a fatal error at the io thread's bound, and its batch stays uncommitted
    (the supervisor starts a new worker, which consumes it again)."""
    consumption = worker.consumption
    consumption.on_assign(FakeAssignment([0]))  # type: ignore[arg-type]
    source = FakeSource(polls=[[new(7), new(8)]])
    hang = threading.Event()
    sink = FakeSink(hold_first_flush=hang)
    worker.threads.bound_s["io"] = 0.5
    running = start(worker, settings, source, FakeDatabase(), sink)
    try:
        with pytest.raises(HungCallError, match="in the io thread"):
            await asyncio.wait_for(running, 30)
    finally:
        hang.set()
    assert sink.acknowledged == []
    assert consumption.state.take_all() == {}  # nothing committable
    assert not any(call.startswith("commit") for call, _ in source.calls)


async def test_heartbeats_flow_while_the_event_loop_turns(worker: Worker, pipe: Pipe) -> None:
    beating = asyncio.create_task(worker.heartbeat())
    await asyncio.sleep(0)
    beating.cancel()
    assert pipe.read() == ["H"]
