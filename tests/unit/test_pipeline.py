"""The pipeline with in-memory fakes: what is published, dead-lettered and committed."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import pytest

from tests.fakes import FakeDatabase, FakeMessage, FakeSink, run_stages
from tm import config
from tm.core.policy import REFUSED_BATCHES_TO_STOP, REFUSED_ROWS_TO_STOP
from tm.errors import DatabaseUnavailableError, FatalError, KafkaUnavailableError
from tm.pipeline import BatchRecord, Pipeline

TS = b"2025-08-10T10:18:59.023Z"


def new(n: int, *, partition: int = 0, email: str | None = None) -> FakeMessage:
    headers = [("task_type", b"web-crawl"), ("status", b"new"), ("timestamp", TS)]
    body = {
        "user_email": email or f"user{n}@example.com",
        "user_query": "q",
        "base_url": "https://example.com",
    }
    return FakeMessage(headers, orjson.dumps(body), partition, n)


def update(
    n: int, task_id: uuid.UUID, status: str, text: str, *, partition: int = 0, ts: bytes = TS
) -> FakeMessage:
    headers = [
        ("task_type", b"web-crawl"),
        ("status", status.encode()),
        ("task_id", str(task_id).encode()),
        ("timestamp", ts),
    ]
    field = "crawl_result" if status == "completed" else "error"
    return FakeMessage(headers, orjson.dumps({field: text}), partition, n)


class Events:
    """Stands in for the task-event feed (tm.pipeline.TaskEventSink)."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    def publish(self, events: list[Any]) -> None:
        self.batches.append(events)


class Parts:
    """A pipeline wired to fakes."""

    def __init__(self, *, events: Events | None = None) -> None:
        self.database = FakeDatabase()
        self.sink = FakeSink()
        self.pipeline = Pipeline(
            settings=config.load({}),
            database=self.database,
            sink=self.sink,
            run_io=asyncio.to_thread,
            task_events=events,
        )

    async def run(self, messages: list[FakeMessage]) -> BatchRecord:
        return await run_stages(self.pipeline, messages)


@pytest.fixture
def parts() -> Parts:
    return Parts()


async def test_created_tasks_get_crawl_requests_and_the_batch_is_committed(parts: Parts) -> None:
    record = await parts.run([new(0), new(1, partition=1), new(2)])
    requests = [m for m in parts.sink.acknowledged if m["topic"] == "requests-web-crawl"]
    assert len(requests) == 3
    assert record.outcomes == {"created": 3}
    assert record.committable == {0: 3, 1: 2}


async def test_redelivered_new_tasks_are_duplicates_and_republished_identically(
    parts: Parts,
) -> None:
    await parts.run([new(0), new(1)])
    first = list(parts.sink.acknowledged)
    parts.sink.acknowledged.clear()
    record = await parts.run([new(0), new(1)])
    assert record.outcomes == {"duplicate": 2}
    assert parts.sink.acknowledged == first


async def test_redelivered_new_of_a_finished_task_is_not_republished(parts: Parts) -> None:
    await parts.run([new(0), new(1)])
    finished = next(iter(parts.database.tasks))
    await parts.run([update(2, finished, "completed", "page")])
    parts.sink.acknowledged.clear()

    record = await parts.run([new(0), new(1)])

    assert record.outcomes == {"unchanged": 1, "duplicate": 1}
    requests = [m for m in parts.sink.acknowledged if m["topic"] == "requests-web-crawl"]
    assert [m["key"] for m in requests] == [str(t) for t in parts.database.tasks if t != finished]


async def test_refused_rows_are_isolated_and_dead_lettered_alone(parts: Parts) -> None:
    messages = [new(n, email="refuse@example.com" if n in (3, 6) else None) for n in range(8)]
    record = await parts.run(messages)
    dead = [m for m in parts.sink.acknowledged if m["topic"] == "task-status.dlq"]
    assert sorted(int(m["headers"]["dlq_offset"]) for m in dead) == [3, 6]
    assert {m["headers"]["dlq_reason"] for m in dead} == {"row_rejected"}
    assert record.outcomes == {"created": 6}
    assert len(parts.database.tasks) == 6
    assert record.committable == {0: 8}


async def test_update_outcomes_dead_letter_unknown_tasks_and_refused_transitions(
    parts: Parts,
) -> None:
    await parts.run([new(0)])
    task_id = next(iter(parts.database.tasks))
    unknown = uuid.uuid4()
    record = await parts.run(
        [
            update(1, task_id, "completed", "done"),
            update(2, task_id, "error", "late failure"),
            update(3, unknown, "completed", "x"),
            update(4, task_id, "completed", "done"),
        ]
    )
    assert record.outcomes == {
        "updated": 1,
        "invalid_transition": 1,
        "task_not_found": 1,
        "unchanged": 1,
    }
    dead = {
        m["headers"]["dlq_offset"]: m
        for m in parts.sink.acknowledged
        if "dlq_reason" in m["headers"]
    }
    assert dead["2"]["headers"]["dlq_reason"] == "invalid_transition"
    assert dead["3"]["headers"]["dlq_reason"] == "task_not_found"
    assert str(unknown) in dead["3"]["headers"]["dlq_error"]


async def test_a_transient_database_failure_publishes_nothing(parts: Parts) -> None:
    parts.database.fail_with = DatabaseUnavailableError("connection refused")
    with pytest.raises(DatabaseUnavailableError):
        await parts.run([new(0), new(1)])
    assert parts.sink.acknowledged == []


async def test_unacknowledged_publishes_fail_the_batch(parts: Parts) -> None:
    parts.sink.fail_flush = True
    with pytest.raises(KafkaUnavailableError):
        await parts.run([new(0)])


async def test_bad_messages_are_dead_lettered_with_their_original_bytes(parts: Parts) -> None:
    bad = FakeMessage([("task_type", b"web-crawl")], b"{oops", 0, 0, _key=b"k")
    record = await parts.run([bad, new(1)])
    (dead,) = [m for m in parts.sink.acknowledged if m["topic"] == "task-status.dlq"]
    assert (dead["key"], dead["value"]) == (b"k", b"{oops")
    assert dead["headers"]["task_type"] == b"web-crawl"
    assert dead["headers"]["dlq_reason"] == "invalid_headers"
    assert record.outcomes == {"created": 1}
    assert record.committable == {0: 2}


async def test_a_batch_with_many_refused_rows_among_good_ones_is_applied(parts: Parts) -> None:
    """Real crawl data: far more refused rows in one batch than the bad-deploy threshold, beside
    good ones, batch after batch. Data never stops a worker."""
    for round_ in range(REFUSED_BATCHES_TO_STOP + 1):
        offsets = range(round_ * 1000, (round_ + 1) * 1000)
        refused = [n for n in offsets if n % 7 == 0]
        messages = [new(n, email="refuse@example.com" if n in refused else None) for n in offsets]
        parts.sink.acknowledged.clear()

        record = await parts.run(messages)

        dead = [m for m in parts.sink.acknowledged if m["topic"] == "task-status.dlq"]
        assert sorted(int(m["headers"]["dlq_offset"]) for m in dead) == refused
        assert {m["headers"]["dlq_reason"] for m in dead} == {"row_rejected"}
        assert record.outcomes == {"created": 1000 - len(refused)}
        assert record.committable == {0: offsets.stop}
    sent = (REFUSED_BATCHES_TO_STOP + 1) * 1000
    assert len(parts.database.tasks) == sent - len(range(0, sent, 7))


async def test_a_run_of_batches_with_every_row_refused_stops_the_worker(parts: Parts) -> None:
    """A bad deploy: PostgreSQL applies nothing, batch after batch."""
    per_batch = -(-REFUSED_ROWS_TO_STOP // REFUSED_BATCHES_TO_STOP)
    offsets = iter(range(10_000))

    def refused_batch() -> list[FakeMessage]:
        return [new(next(offsets), email="refuse@example.com") for _ in range(per_batch)]

    for _ in range(REFUSED_BATCHES_TO_STOP - 1):
        record = await parts.run(refused_batch())
        assert record.dead_letters == {"row_rejected": per_batch}
    with pytest.raises(FatalError, match="refused by PostgreSQL"):
        await parts.run(refused_batch())
    assert parts.database.tasks == {}


async def test_task_events_are_the_batch_transitions_in_applied_order() -> None:
    events = Events()
    parts = Parts(events=events)
    task = uuid.uuid4()
    first = new(0)
    assert first._headers is not None
    first._headers = [*first._headers, ("task_id", str(task).encode())]
    await parts.run([first, new(1)])
    created = events.batches[0]
    assert [(e[1], e[2], e[3]) for e in created] == [("new", TS.decode(), None)] * 2
    assert created[0][0] == str(task)

    again = new(0)
    again._headers = first._headers
    await parts.run(
        [
            again,  # a duplicate: no event
            update(2, task, "error", "timeout"),
            update(3, task, "completed", "page"),
            update(4, task, "completed", "page"),  # unchanged: no event
            update(5, uuid.uuid4(), "completed", "page"),  # task_not_found: no event
        ]
    )
    assert [(e[0], e[1]) for e in events.batches[1]] == [
        (str(task), "error"),
        (str(task), "completed"),
    ]


async def test_task_event_times_are_iso_utc_milliseconds_whatever_form_the_header_had() -> None:
    events = Events()
    parts = Parts(events=events)
    tasks = [uuid.uuid4() for _ in range(3)]
    for n, task in enumerate(tasks):
        first = new(n)
        assert first._headers is not None
        first._headers = [*first._headers, ("task_id", str(task).encode())]
        await parts.run([first])
    await parts.run(
        [
            update(10, tasks[0], "completed", "page"),  # the crawlers' form: kept as it came
            update(11, tasks[1], "completed", "page", ts=b"1754821139023"),  # epoch ms
            update(12, tasks[2], "error", "oops", ts=b"2025-08-10T12:18:59.023+02:00"),
        ]
    )
    assert [(e[0], e[2]) for e in events.batches[-1]] == [
        (str(tasks[0]), TS.decode()),
        (str(tasks[1]), TS.decode()),
        (str(tasks[2]), TS.decode()),
    ]
