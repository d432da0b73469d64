"""Micro-benchmarks of the CPU work a worker does per poll, with no Kafka and no PostgreSQL:
decoding one message (a gateway ``new``, a crawler ``completed``, invalid ones), and assembling
a 2000-message poll into a Batch (decode + ``Batch.add``; and ``Pipeline.decode``, which is
``decode_poll``, on real ``confluent_kafka.Message`` objects, which this confluent-kafka version
can construct).

    .venv/bin/pytest bench/test_micro.py --benchmark-only -q -p no:cacheprovider

Outside the default pytest run (``testpaths = ["tests"]``). Divide a 2000-message figure by
2000 for the per-message cost.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, Message

from tm import config
from tm.core.batch import Batch
from tm.core.decode import DecodeStats, decode
from tm.core.messages import NewTask, Rejected, StatusUpdate
from tm.pipeline import Pipeline
from tm.traffic import new_task_message, update_message

POLL_SIZE = 2000  # tm's default TM_BATCH_MAX_MESSAGES: one full poll
PARTITIONS = 6
TOPIC = "task-status"
MAX_RESULT_CHARS = 1_048_576
TIMESTAMP_MS = 1_754_821_139_023

Raw = tuple[list[tuple[str, Any]], bytes]


def _decode(raw: Raw, *, offset: int = 0) -> Any:
    headers, value = raw
    return decode(
        headers,
        value,
        topic=TOPIC,
        partition=0,
        offset=offset,
        timestamp_ms=TIMESTAMP_MS,
        max_result_chars=MAX_RESULT_CHARS,
        stats=DecodeStats(),
    )


def _with_body(raw: Raw, body: bytes) -> Raw:
    return raw[0], body


NEW = new_task_message(1)
COMPLETED = update_message(uuid.uuid4(), failed=False)
ERROR = update_message(uuid.uuid4(), failed=True)
INVALID_JSON = _with_body(new_task_message(2), b'{"user_email": "ada@example.com", ')
INVALID_EMAIL = _with_body(
    new_task_message(3),
    b'{"user_email":"not-an-address","user_query":"q","base_url":"https://example.com/"}',
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(NEW, NewTask, id="new"),
        pytest.param(COMPLETED, StatusUpdate, id="completed"),
        pytest.param(ERROR, StatusUpdate, id="error"),
        pytest.param(INVALID_JSON, Rejected, id="invalid_json"),
        pytest.param(INVALID_EMAIL, Rejected, id="invalid_email"),
    ],
)
def test_decode(benchmark: Any, raw: Raw, expected: type) -> None:
    result = benchmark(_decode, raw)
    assert type(result) is expected


def _poll(kind: str) -> list[tuple[int, int, Raw]]:
    """(partition, offset, raw) of a 2000-message poll: all `new`, all updates (half completed,
    half error), or the mix of a busy topic (70 % new, 25 % updates, 5 % invalid)."""
    poll = []
    for n in range(POLL_SIZE):
        if kind == "updates":
            raw = update_message(uuid.uuid4(), failed=n % 2 == 1)
        elif kind == "new" or n % 20 < 14:
            raw = new_task_message(n)
        elif n % 20 < 19:
            raw = update_message(uuid.uuid4(), failed=n % 5 == 0)
        else:
            raw = _with_body(new_task_message(n), b"{not json")
        poll.append((n % PARTITIONS, n // PARTITIONS, raw))
    return poll


def _assemble(poll: list[tuple[int, int, Raw]]) -> Batch:
    """What Pipeline.decode does, on plain tuples: decode each message, add it to a Batch."""
    batch = Batch()
    stats = DecodeStats()
    for ref, (partition, offset, (headers, value)) in enumerate(poll):
        item = decode(
            headers,
            value,
            topic=TOPIC,
            partition=partition,
            offset=offset,
            timestamp_ms=TIMESTAMP_MS,
            max_result_chars=MAX_RESULT_CHARS,
            stats=stats,
        )
        batch.add(ref, partition, offset, item, TIMESTAMP_MS)
    return batch


@pytest.mark.parametrize("kind", ["new", "updates", "mixed"])
def test_assemble_2000(benchmark: Any, kind: str) -> None:
    poll = _poll(kind)
    batch = benchmark(_assemble, poll)
    assert batch.size == POLL_SIZE
    if kind == "new":
        assert len(batch.creates) == POLL_SIZE
    if kind == "updates":
        assert len(batch.updates) == POLL_SIZE


def _messages(kind: str) -> list[Message]:
    now_ms = int(time.time() * 1000)
    return [
        Message(
            topic=TOPIC,
            partition=partition,
            offset=offset,
            key=None,
            value=value,
            headers=headers,
            timestamp=(TIMESTAMP_CREATE_TIME, now_ms),
        )
        for partition, offset, (headers, value) in _poll(kind)
    ]


def _offset(message: Message) -> int:
    offset = message.offset()
    assert offset is not None  # _messages() gives each one
    return offset


def _pipeline() -> Pipeline:
    """A Pipeline for decode() only: it touches no adapter."""
    settings = config.load({"TASK_STATUS_TOPIC": TOPIC})
    return Pipeline(
        settings=settings,
        database=None,  # type: ignore[arg-type]
        sink=None,  # type: ignore[arg-type]
        run_io=None,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("kind", ["new", "updates", "mixed"])
def test_pipeline_decode_2000(benchmark: Any, kind: str) -> None:
    pipeline = _pipeline()
    messages = _messages(kind)
    batch = benchmark(pipeline.decode, messages).batch
    assert batch.size == POLL_SIZE
    assert batch.committable == {
        p: max(_offset(m) for m in messages if m.partition() == p) + 1 for p in range(PARTITIONS)
    }
