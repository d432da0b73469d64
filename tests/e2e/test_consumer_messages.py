"""Inbound messages end to end (DESIGN §1-§3): status updates as crawlers send them, every
transition of the task state machine, each kind of dead letter beside valid neighbours,
redelivery from offset 0, and the gateway's header and body details.

Each test drives a real `tm run` over a fresh database and fresh topics, and looks only at what a
user sees: the rows, the crawl requests and dead letters on their topics, the committed offsets.
"""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from harness import wait_for
from harness.kafka import Headers, KafkaHeaders
from harness.stack import Stack
from harness.tm import TmRun
from tm.adapters import kafka

pytestmark = pytest.mark.e2e

Message = tuple[bytes | None, Headers, bytes | None]

GATEWAY_TS = "2025-08-10T10:18:59.023Z"
DLQ_HEADER_NAMES = {
    "dlq_reason",
    "dlq_error",
    "dlq_topic",
    "dlq_partition",
    "dlq_offset",
    "dlq_timestamp",
}
ROW_COLUMNS = {
    "id",
    "user_email",
    "user_query",
    "original_url",
    "received_at",
    "status",
    "result",
    "finished_at",
    "created_at",
    "updated_at",
}


# -- messages, as the gateway and the crawlers send them ---------------------------------------


def at(second: int) -> str:
    """A distinct ISO-8601 timestamp header, one per event of a test."""
    return f"2025-08-10T11:{second // 60:02d}:{second % 60:02d}.500Z"


def moment(iso: str) -> datetime:
    return datetime.fromisoformat(iso).astimezone(UTC)


def headers(
    status: str,
    *,
    task_id: uuid.UUID | str | None = None,
    timestamp: str = GATEWAY_TS,
    task_type: str = "web-crawl",
    case: str | None = None,
) -> Headers:
    out: Headers = [
        ("task_type", task_type.encode()),
        ("status", status.encode()),
        ("timestamp", timestamp.encode()),
    ]
    if task_id is not None:
        out.append(("task_id", str(task_id).encode()))
    if case is not None:  # an unknown header: tm ignores it, the tests use it to find a message
        out.append(("x-case", case.encode()))
    return out


def body_of(query: str, **fields: Any) -> dict[str, Any]:
    return {
        "user_email": "ada@example.com",
        "user_query": query,
        "base_url": "https://example.com/shop",
        **fields,
    }


def new_task(
    query: str,
    *,
    task_id: uuid.UUID | None = None,
    timestamp: str = GATEWAY_TS,
    case: str | None = None,
    **fields: Any,
) -> Message:
    """A `new` event as the gateway sends it: no key; a task_id header only when given."""
    hdrs = headers("new", task_id=task_id, timestamp=timestamp, case=case)
    return (None, hdrs, orjson.dumps(body_of(query, **fields)))


def completed(
    task_id: uuid.UUID, result: str, *, timestamp: str, case: str | None = None
) -> Message:
    """A `completed` event as a crawler sends it: key = task id, extra body fields."""
    hdrs = headers("completed", task_id=task_id, timestamp=timestamp, case=case)
    body = {"crawl_result": result, "crawler": "crawler-7", "pages": 3}
    return (str(task_id).encode(), hdrs, orjson.dumps(body))


def error(task_id: uuid.UUID, text: str, *, timestamp: str, case: str | None = None) -> Message:
    """An `error` event as a crawler sends it: key = task id, extra body fields."""
    hdrs = headers("error", task_id=task_id, timestamp=timestamp, case=case)
    body = {"error": text, "crawler": "crawler-7", "attempt": 2}
    return (str(task_id).encode(), hdrs, orjson.dumps(body))


# -- running tm and looking at the outcome ----------------------------------------------------


@contextmanager
def tm_running(stack: Stack, tmp_path: Path, **env: str) -> Iterator[TmRun]:
    """A `tm run` (one worker unless told otherwise) that must exit 0 when stopped."""
    tm = TmRun(stack, tmp_path, **{"TM_WORKERS": "1", **env})
    try:
        yield tm
    except BaseException:
        tm.stop()
        raise
    status = tm.stop()
    assert status == 0, tm.output()


def wait_committed(stack: Stack, tm: TmRun, what: str, timeout_s: float = 30.0) -> None:
    """Wait for the group to commit every message in the topic; on timeout show tm's log."""
    try:
        wait_for(stack.all_committed, timeout_s=timeout_s, what=what)
    except pytest.fail.Exception as exc:
        tail = "\n".join(tm.output().splitlines()[-15:])
        pytest.fail(f"{exc}\n--- end of tm's log ---\n{tail}")


def rows_by_id(stack: Stack) -> dict[uuid.UUID, dict[str, Any]]:
    return {row["id"]: dict(row) for row in stack.query("SELECT * FROM web_crawl_tasks")}


def row_by_query(rows: dict[uuid.UUID, dict[str, Any]], query: str) -> dict[str, Any]:
    found = [row for row in rows.values() if row["user_query"] == query]
    assert len(found) == 1, f"{len(found)} rows with user_query {query!r}"
    return found[0]


def read_exactly(stack: Stack, topic: str, n: int) -> list[Any]:
    """The messages of ``topic`` once there are ``n`` of them (and not more)."""
    messages = wait_for(
        lambda: (got := stack.read_topic(topic)) and len(got) >= n and got,
        what=f"{n} messages on {topic}",
    )
    assert len(messages) == n, [(m.key(), m.headers()) for m in messages]
    return messages


def case_of(message: Any) -> str:
    case: bytes = dict(message.headers() or [])["x-case"]
    return case.decode()


def assert_new_row(
    row: dict[str, Any], *, query: str, received_at: str, email: str = "ada@example.com"
) -> None:
    assert set(row) == ROW_COLUMNS
    assert row["user_email"] == email
    assert row["user_query"] == query
    assert row["original_url"] == "https://example.com/shop"
    assert row["received_at"] == moment(received_at)
    assert row["status"] == "new"
    assert row["result"] is None
    assert row["finished_at"] is None
    assert row["created_at"] is not None
    assert row["updated_at"] >= row["created_at"]


def assert_finished(
    row: dict[str, Any], before: dict[str, Any], *, status: str, result: str, finished_at: str
) -> None:
    """The row moved to ``status``: result and finished_at set, the task's own fields kept."""
    assert row["status"] == status
    assert row["result"] == result
    assert row["finished_at"] == moment(finished_at)
    for column in ("id", "user_email", "user_query", "original_url", "received_at", "created_at"):
        assert row[column] == before[column], column
    assert row["updated_at"] > before["updated_at"]


def assert_crawl_request(request: Any, row: dict[str, Any]) -> None:
    """A crawl request for ``row``, without trace context (no test here sends a valid one)."""
    assert request.key() == str(row["id"]).encode()
    assert orjson.loads(request.value()) == {
        "user_email": row["user_email"],
        "user_query": row["user_query"],
        "base_url": row["original_url"],
    }
    sent = dict(request.headers())
    assert sent["task_id"] == str(row["id"]).encode()
    received_at = row["received_at"].astimezone(UTC)
    assert moment(sent["timestamp"].decode()) == received_at
    assert sent["timestamp"].decode().endswith("Z")
    assert set(sent) == {"task_id", "timestamp"}


def assert_dead_letter(letter: Any, source: Any, reason: str) -> dict[str, str]:
    """``letter`` is ``source`` unchanged plus the dlq_* headers; returns those headers."""
    assert letter.key() == source.key()
    assert letter.value() == source.value()
    original = source.headers() or []
    got = letter.headers() or []
    assert got[: len(original)] == original
    added = {name: value.decode() for name, value in got[len(original) :]}
    assert set(added) == DLQ_HEADER_NAMES, added
    assert added["dlq_reason"] == reason
    assert added["dlq_error"].strip()
    assert added["dlq_topic"] == source.topic()
    assert added["dlq_partition"] == str(source.partition())
    assert added["dlq_offset"] == str(source.offset())
    stamp = datetime.fromisoformat(added["dlq_timestamp"])
    assert stamp.tzinfo is not None
    # The original Kafka timestamp travels with it: a replayed `new` gets back its task id.
    assert letter.timestamp()[1] == source.timestamp()[1]
    return added


def dead_letters_by_source(stack: Stack, n: int) -> list[tuple[Any, Any]]:
    """Each dead letter with the source message its dlq_partition/dlq_offset point at."""
    letters = read_exactly(stack, stack.dlq_topic, n)
    sources = {(m.partition(), m.offset()): m for m in stack.read_topic(stack.topic)}
    out = []
    for letter in letters:
        hdrs = dict(letter.headers())
        coordinates = (int(hdrs["dlq_partition"]), int(hdrs["dlq_offset"]))
        out.append((letter, sources[coordinates]))
    return out


def assert_all_committed_to_end(stack: Stack) -> None:
    ends = stack.end_offsets()
    committed = stack.committed()
    assert {p: committed[p] for p, end in ends.items() if end > 0} == {
        p: end for p, end in ends.items() if end > 0
    }


def rewind_group(stack: Stack) -> None:
    """Commit offset 0 on every partition for tm's group (tm must not be running)."""
    consumer = Consumer(
        {
            **kafka.client_config(stack.settings.kafka),
            "group.id": stack.group,
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.commit(
            offsets=[TopicPartition(stack.topic, p, 0) for p in range(stack.partitions)],
            asynchronous=False,
        )
    finally:
        consumer.close()
    assert stack.committed() == dict.fromkeys(range(stack.partitions), 0)


# -- 1. completed and error updates -------------------------------------------------------------


def test_completed_and_error_updates_finish_the_tasks(stack: Stack, tmp_path: Path) -> None:
    done, failed, failed_long = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    stack.produce(
        [
            new_task("to complete", task_id=done, timestamp=at(1)),
            new_task("to fail", task_id=failed, timestamp=at(2)),
            new_task("to fail at length", task_id=failed_long, timestamp=at(3)),
        ],
        partition=0,
    )
    long_error = "Traceback: " + "connection reset by peer; " * 80  # > 1000 chars
    assert len(long_error) > 1000
    with tm_running(stack, tmp_path) as tm:
        wait_committed(stack, tm, "the new tasks committed")
        before = rows_by_id(stack)
        stack.produce(
            [
                completed(done, "<html>three products</html>", timestamp=at(10)),
                error(failed, "DNS lookup failed for example.com", timestamp=at(11)),
                error(failed_long, long_error, timestamp=at(12)),
            ],
            partition=0,
        )
        wait_committed(stack, tm, "the updates committed")
    after = rows_by_id(stack)

    assert set(before) == set(after) == {done, failed, failed_long}
    assert_new_row(before[done], query="to complete", received_at=at(1))
    assert_new_row(before[failed], query="to fail", received_at=at(2))
    assert_new_row(before[failed_long], query="to fail at length", received_at=at(3))
    assert_finished(
        after[done],
        before[done],
        status="completed",
        result="<html>three products</html>",
        finished_at=at(10),
    )
    assert_finished(
        after[failed],
        before[failed],
        status="error",
        result="DNS lookup failed for example.com",
        finished_at=at(11),
    )
    # Truncated with a marker, not rejected.
    stored = after[failed_long]["result"]
    assert after[failed_long]["status"] == "error"
    assert after[failed_long]["finished_at"] == moment(at(12))
    assert stored.startswith(long_error[:1000])
    assert stored != long_error
    assert len(stored) < len(long_error)
    assert "truncated" in stored[1000:]

    requests = read_exactly(stack, stack.requests_topic, 3)
    for request in requests:
        assert_crawl_request(request, after[uuid.UUID(request.key().decode())])
    assert stack.read_topic(stack.dlq_topic, timeout_s=2) == []
    assert_all_committed_to_end(stack)


# -- 2. the state machine ---------------------------------------------------------------------


def test_valid_transitions_apply_repeats_are_no_ops_and_invalid_ones_dead_letter(
    stack: Stack, tmp_path: Path
) -> None:
    ids = {name: uuid.uuid4() for name in ("c", "e_to_c", "e_same", "c_to_e", "c_to_c", "e_to_e")}
    stack.produce(
        [new_task(name, task_id=task_id, timestamp=at(1)) for name, task_id in ids.items()],
        partition=0,
    )
    with tm_running(stack, tmp_path) as tm:
        wait_committed(stack, tm, "the new tasks committed")
        created = rows_by_id(stack)
        first_updates = [
            completed(ids["c"], "result c", timestamp=at(10)),  # new -> completed
            error(ids["e_to_c"], "timeout", timestamp=at(11)),  # new -> error
            error(ids["e_same"], "HTTP 503", timestamp=at(12)),  # new -> error
            completed(ids["c_to_e"], "result c_to_e", timestamp=at(13)),
            completed(ids["c_to_c"], "result c_to_c", timestamp=at(14)),
            error(ids["e_to_e"], "HTTP 500", timestamp=at(15)),
        ]
        stack.produce(first_updates, partition=0)
        wait_committed(stack, tm, "the first updates committed")
        finished = rows_by_id(stack)
        stack.produce(
            [
                first_updates[0],  # completed, the identical update again: no-op
                completed(ids["e_to_c"], "found on retry", timestamp=at(20), case="e->c"),
                first_updates[2],  # error, the identical update again: no-op
                error(ids["c_to_e"], "late failure", timestamp=at(21), case="c->e"),
                completed(ids["c_to_c"], "another result", timestamp=at(22), case="c->c"),
                error(ids["e_to_e"], "HTTP 502", timestamp=at(23), case="e->e"),
            ],
            partition=0,
        )
        wait_committed(stack, tm, "the second updates committed")
    last = rows_by_id(stack)

    for name, task_id in ids.items():
        assert_new_row(created[task_id], query=name, received_at=at(1))
    # First round: new -> completed and new -> error.
    for name, update in zip(ids, first_updates, strict=True):
        task_id = ids[name]
        text = orjson.loads(update[2] or b"")
        status = "completed" if "crawl_result" in text else "error"
        result = text.get("crawl_result") or text["error"]
        finished_at = dict(update[1])["timestamp"].decode()
        assert_finished(
            finished[task_id],
            created[task_id],
            status=status,
            result=result,
            finished_at=finished_at,
        )
    # Second round: error -> completed is applied...
    assert_finished(
        last[ids["e_to_c"]],
        finished[ids["e_to_c"]],
        status="completed",
        result="found on retry",
        finished_at=at(20),
    )
    # ...repeated identical updates and refused transitions leave the row as it was, to the
    # microsecond of updated_at.
    for name in ("c", "e_same", "c_to_e", "c_to_c", "e_to_e"):
        assert last[ids[name]] == finished[ids[name]], name

    letters = dead_letters_by_source(stack, 3)
    assert sorted(case_of(source) for _, source in letters) == ["c->c", "c->e", "e->e"]
    for letter, source in letters:
        added = assert_dead_letter(letter, source, "invalid_transition")
        assert source.key().decode() in added["dlq_error"]
    assert len(read_exactly(stack, stack.requests_topic, len(ids))) == len(ids)
    assert_all_committed_to_end(stack)


# -- 3. dead letters beside valid neighbours --------------------------------------------------


def test_bad_messages_are_dead_lettered_and_their_neighbours_applied(
    stack: Stack, tmp_path: Path
) -> None:
    one, two, three, unknown = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    exact_result = "r" * 100  # exactly TM_MAX_RESULT_CHARS: accepted
    messages: list[Message] = [
        new_task("one", task_id=one, timestamp=at(1), case="ok new one"),
        (None, headers("new", timestamp=at(1), case="not json"), b'{"user_email": "ada@ex'),
        new_task("two", task_id=two, timestamp=at(2), case="ok new two"),
        (
            None,
            [("task_type", b"web-crawl"), ("timestamp", at(3).encode()), ("x-case", b"no status")],
            orjson.dumps(body_of("no status")),
        ),
        (
            None,
            headers("new", task_type="web-scrape", timestamp=at(3), case="wrong task_type"),
            orjson.dumps(body_of("wrong type")),
        ),
        (
            b"not-a-uuid",
            headers("completed", task_id="not-a-uuid", timestamp=at(3), case="bad task_id"),
            orjson.dumps({"crawl_result": "x"}),
        ),
        (
            None,
            headers("new", timestamp="yesterday at noon", case="bad timestamp"),
            orjson.dumps(body_of("bad timestamp")),
        ),
        completed(one, "result one", timestamp=at(10), case="ok completed one"),
        new_task("bad email", user_email="ada.example.com", case="bad email"),
        new_task("", case="empty query"),
        new_task("ftp url", base_url="ftp://example.com/file", case="ftp url"),
        completed(unknown, "lost", timestamp=at(11), case="unknown id"),
        error(one, "too late", timestamp=at(12), case="completed -> error"),
        completed(two, "x" * 101, timestamp=at(13), case="result too large"),
        new_task("find \x00 this", case="NUL in query"),
        new_task("three", task_id=three, timestamp=at(4), case="ok new three"),
        error(two, "timeout", timestamp=at(14), case="ok error two"),
        completed(three, exact_result, timestamp=at(15), case="ok completed three"),
        new_task("four", timestamp=at(5), case="ok new four"),
    ]
    expected_reasons = {
        "not json": "invalid_json",
        "no status": "invalid_headers",
        "wrong task_type": "invalid_headers",
        "bad task_id": "invalid_headers",
        "bad timestamp": "invalid_headers",
        "bad email": "invalid_body",
        "empty query": "invalid_body",
        "ftp url": "invalid_body",
        "unknown id": "task_not_found",
        "completed -> error": "invalid_transition",
        "result too large": "result_too_large",
        "NUL in query": "invalid_body",
    }
    error_mentions = {
        "no status": "status",
        "wrong task_type": "task_type",
        "bad task_id": "task_id",
        "bad timestamp": "timestamp",
        "bad email": "$.user_email",
        "empty query": "$.user_query",
        "ftp url": "$.base_url",
        "unknown id": str(unknown),
        "result too large": "$.crawl_result",
        "NUL in query": "which PostgreSQL text cannot hold - at `$.user_query`",
    }
    stack.produce(messages, partition=0)
    with tm_running(stack, tmp_path, TM_MAX_RESULT_CHARS="100") as tm:
        wait_committed(stack, tm, "every message committed")
    rows = rows_by_id(stack)

    assert len(rows) == 4
    finished = {
        one: ("one", at(1), "completed", "result one", at(10)),
        two: ("two", at(2), "error", "timeout", at(14)),
        three: ("three", at(4), "completed", exact_result, at(15)),
    }
    for task_id, (query, received_at, status, result, finished_at) in finished.items():
        row = rows[task_id]
        assert_new_row(
            row | {"status": "new", "result": None, "finished_at": None},
            query=query,
            received_at=received_at,
        )
        assert (row["status"], row["result"]) == (status, result)
        assert row["finished_at"] == moment(finished_at)
    assert_new_row(row_by_query(rows, "four"), query="four", received_at=at(5))

    letters = dead_letters_by_source(stack, len(expected_reasons))
    assert {case_of(source): letter for letter, source in letters}.keys() == set(expected_reasons)
    for letter, source in letters:
        case = case_of(source)
        added = assert_dead_letter(letter, source, expected_reasons[case])
        if case in error_mentions:
            assert error_mentions[case] in added["dlq_error"], (case, added["dlq_error"])

    requests = read_exactly(stack, stack.requests_topic, 4)
    for request in requests:
        assert_crawl_request(request, rows[uuid.UUID(request.key().decode())])
    assert stack.committed()[0] == len(messages)
    assert_all_committed_to_end(stack)


def test_result_over_the_default_limit_is_dead_lettered(stack: Stack, tmp_path: Path) -> None:
    """A crawl_result over the default TM_MAX_RESULT_CHARS (1,048,576) is `result_too_large`.
    Such a message exists when the crawler compresses (the broker limits the compressed
    batch): this one is 1 MiB + 1 char of text, a few KiB on the wire."""
    task_id = uuid.uuid4()
    stack.produce([new_task("big", task_id=task_id, timestamp=at(1))], partition=0)
    key, hdrs, value = completed(task_id, "x" * (1_048_576 + 1), timestamp=at(2))
    producer = Producer(
        {
            **kafka.client_config(stack.settings.kafka),
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": "lz4",
            "message.max.bytes": 4_000_000,
        }
    )
    # A copy typed as produce()'s stubs want it (str | bytes | None values; list is invariant).
    wire: KafkaHeaders = list(hdrs)
    producer.produce(stack.topic, key=key, value=value, headers=wire, partition=0)
    assert producer.flush(30) == 0

    with tm_running(stack, tmp_path) as tm:
        wait_committed(stack, tm, "the oversized result committed", timeout_s=20)
    rows = rows_by_id(stack)

    assert_new_row(rows[task_id], query="big", received_at=at(1))
    [(letter, source)] = dead_letters_by_source(stack, 1)
    # Too long for a dead letter uncompressed: the value is cut to fit the DLQ topic's limit
    # (the broker's default, 1,048,588 bytes), and its length recorded.
    added = {k: v.decode() for k, v in letter.headers() if k.startswith("dlq_")}
    assert added["dlq_reason"] == "result_too_large"
    assert added["dlq_value_bytes"] == str(len(source.value()))
    assert 900_000 < len(letter.value()) < 1_000_000
    assert letter.value() == source.value()[: len(letter.value())]
    assert letter.key() == source.key()
    assert_all_committed_to_end(stack)


SMALL_DLQ_MAX_BYTES = 20_000


@pytest.fixture
def small_dlq(stack: Stack) -> Iterator[str]:
    """A DLQ topic that takes records of at most SMALL_DLQ_MAX_BYTES (max.message.bytes)."""
    name = f"{stack.topic}.small-dlq"
    admin = AdminClient(kafka.client_config(stack.settings.kafka))
    topic = NewTopic(name, 1, 1, config={"max.message.bytes": str(SMALL_DLQ_MAX_BYTES)})
    admin.create_topics([topic], operation_timeout=30)[name].result(30)
    try:
        yield name
    finally:
        admin.delete_topics([name], operation_timeout=30)[name].result(30)


def test_dead_letter_over_the_dlq_topic_limit_is_cut_to_fit(
    stack: Stack, small_dlq: str, tmp_path: Path
) -> None:
    """Two messages that are not JSON, 100 kB (random bytes: compression does not save them), one
    with 10 kB of extra headers, one with 30 kB, and a DLQ topic that takes 20 kB: each dead
    letter is cut to fit, with its reason and what was cut; the neighbours are applied."""
    rng = random.Random(7)
    value = b"{" + rng.randbytes(100_000)  # not JSON
    extra = [(f"x-extra-{i:02d}", rng.randbytes(1000)) for i in range(30)]
    some = (None, [*headers("new", case="some headers"), *extra[:10]], value)
    many = (None, [*headers("new", case="many headers"), *extra], value)
    stack.produce(
        [new_task("before", timestamp=at(1)), some, many, new_task("after", timestamp=at(2))],
        partition=0,
    )
    with tm_running(stack, tmp_path, DLQ_TOPIC=small_dlq) as tm:
        wait_committed(stack, tm, "every message committed")
    output = tm.output()
    rows = rows_by_id(stack)

    assert "worker died" not in output, output
    assert_new_row(row_by_query(rows, "before"), query="before", received_at=at(1))
    assert_new_row(row_by_query(rows, "after"), query="after", received_at=at(2))
    assert len(rows) == 2
    sources = {(m.partition(), m.offset()): m for m in stack.read_topic(stack.topic)}
    letters = read_exactly(stack, small_dlq, 2)
    for letter in letters:
        got = letter.headers()
        added = {k: v.decode() for k, v in got if k.startswith("dlq_")}
        source = sources[(int(added["dlq_partition"]), int(added["dlq_offset"]))]
        kept = [(k, v) for k, v in got if not k.startswith("dlq_")]
        size = len(letter.value()) + sum(len(k) + len(v) for k, v in got)
        assert size < SMALL_DLQ_MAX_BYTES, size
        assert added["dlq_reason"] == "invalid_json"
        assert added["dlq_error"].strip()
        assert added["dlq_topic"] == source.topic()
        assert added["dlq_value_bytes"] == str(len(value))
        assert letter.value() == value[: len(letter.value())]
        assert letter.key() == source.key()
        original = source.headers()
        assert kept == original[: len(kept)]  # the original headers, in order, while they fit
        dropped = len(original) - len(kept)
        assert added.get("dlq_headers_dropped", "0") == str(dropped)
        if case_of(source) == "some headers":
            assert dropped == 0
            assert len(letter.value()) > 5000  # the rest of the budget went to the value
        else:
            assert 0 < dropped < len(extra)
    assert {case_of(letter) for letter in letters} == {"some headers", "many headers"}
    assert_all_committed_to_end(stack)


# -- 4. redelivery ----------------------------------------------------------------------------


def test_redelivery_from_offset_zero_changes_nothing(stack: Stack, tmp_path: Path) -> None:
    # Gateway events (no task_id header, no key) spread over the partitions; crawler updates
    # for tasks with a known id after their `new` events on partition 0.
    gateway = [new_task(f"gateway {i}", timestamp=at(i)) for i in range(12)]
    done, failed = uuid.uuid4(), uuid.uuid4()
    ordered = [
        new_task("done", task_id=done, timestamp=at(20)),
        new_task("failed", task_id=failed, timestamp=at(21)),
        completed(done, "the result", timestamp=at(30)),
        error(failed, "HTTP 404", timestamp=at(31)),
    ]
    stack.produce(gateway)
    stack.produce(ordered, partition=0)
    assert len([p for p, end in stack.end_offsets().items() if end > 0]) > 1

    with tm_running(stack, tmp_path) as tm:
        wait_committed(stack, tm, "the first delivery committed")
    first_rows = rows_by_id(stack)
    first_requests = read_exactly(stack, stack.requests_topic, 14)

    assert len(first_rows) == 14
    assert first_rows[done]["status"] == "completed"
    assert first_rows[failed]["status"] == "error"
    for i in range(12):
        row = row_by_query(first_rows, f"gateway {i}")
        assert_new_row(row, query=f"gateway {i}", received_at=at(i))
        assert row["id"].version == 5

    rewind_group(stack)
    with tm_running(stack, tmp_path) as tm:
        wait_committed(stack, tm, "the redelivery committed")
    second_rows = rows_by_id(stack)
    # The 12 tasks still `new` are asked for again; the finished two are not crawled again.
    all_requests = read_exactly(stack, stack.requests_topic, 26)

    assert second_rows == first_rows
    by_key: dict[bytes, list[tuple[bytes, list[tuple[str, bytes]]]]] = defaultdict(list)
    for request in all_requests:
        by_key[request.key()].append((request.value(), request.headers()))
    assert set(by_key) == {str(task_id).encode() for task_id in first_rows}
    for key, copies in by_key.items():
        if key in (str(done).encode(), str(failed).encode()):
            assert len(copies) == 1, key
            continue
        assert len(copies) == 2, key
        assert copies[0] == copies[1], key
    for request in first_requests:
        assert_crawl_request(request, first_rows[uuid.UUID(request.key().decode())])
    assert stack.read_topic(stack.dlq_topic, timeout_s=2) == []
    assert_all_committed_to_end(stack)


def test_redelivery_of_a_retried_task_dead_letters_nothing(stack: Stack, tmp_path: Path) -> None:
    """error -> completed (a retried crawl succeeded), delivered twice: the second delivery of
    the `error` event is an old event of an applied history, not an invalid transition."""
    task_id = uuid.uuid4()
    stack.produce(
        [
            new_task("retried", task_id=task_id, timestamp=at(1)),
            error(task_id, "timeout", timestamp=at(2)),
            completed(task_id, "found on retry", timestamp=at(3)),
        ],
        partition=0,
    )
    with tm_running(stack, tmp_path) as tm:
        wait_committed(stack, tm, "the first delivery committed")
    first_rows = rows_by_id(stack)
    assert first_rows[task_id]["status"] == "completed"
    assert first_rows[task_id]["result"] == "found on retry"

    rewind_group(stack)
    with tm_running(stack, tmp_path) as tm:
        wait_committed(stack, tm, "the redelivery committed")

    assert rows_by_id(stack) == first_rows
    letters = stack.read_topic(stack.dlq_topic, timeout_s=2)
    got = [dict(letter.headers()) for letter in letters]
    assert [(h["status"], h["dlq_reason"], h["dlq_error"]) for h in got] == []
    assert_all_committed_to_end(stack)


# -- 5. gateway details -------------------------------------------------------------------------


def test_every_gateway_variant_is_applied_in_utc_with_its_id_and_nothing_dead_lettered(
    stack: Stack, tmp_path: Path
) -> None:
    given_id = uuid.uuid4()
    upper_traceparent = b"00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01"
    stack.produce(
        [
            # Epoch milliseconds in the timestamp header.
            (None, headers("new", timestamp="1754821139023"), orjson.dumps(body_of("epoch"))),
            # A zone offset: stored and forwarded in UTC.
            new_task("offset", timestamp="2025-08-10T12:18:59.023+02:00"),
            # A task_id header is the task id.
            new_task("given id", task_id=given_id),
            # An invalid traceparent drops the trace context, not the message.
            (
                None,
                [
                    ("traceparent", upper_traceparent),
                    ("tracestate", b"vendor=value"),
                    *headers("new"),
                ],
                orjson.dumps(body_of("bad trace")),
            ),
            # Unknown headers and body fields are ignored; so is a key.
            (
                b"gateway-key",
                [
                    ("x-request-id", b"5f0c"),
                    ("content-type", b"application/json"),
                    *headers("new"),
                    ("x-tenant", b"acme"),
                ],
                orjson.dumps(body_of("extras", priority=3, tags=["a", "b"], user_id=42)),
            ),
        ],
        partition=0,
    )
    with tm_running(stack, tmp_path) as tm:
        wait_committed(stack, tm, "the gateway events committed")
    rows = rows_by_id(stack)

    assert len(rows) == 5
    epoch = row_by_query(rows, "epoch")
    assert_new_row(epoch, query="epoch", received_at=GATEWAY_TS)
    assert_new_row(row_by_query(rows, "offset"), query="offset", received_at=GATEWAY_TS)
    assert_new_row(rows[given_id], query="given id", received_at=GATEWAY_TS)
    bad_trace = row_by_query(rows, "bad trace")
    assert_new_row(bad_trace, query="bad trace", received_at=GATEWAY_TS)
    extras = row_by_query(rows, "extras")
    assert_new_row(extras, query="extras", received_at=GATEWAY_TS)
    for row in rows.values():
        if row["id"] != given_id:
            assert row["id"].version == 5  # from the Kafka coordinates, not the key
    assert extras["id"] != uuid.uuid5(uuid.NAMESPACE_OID, "gateway-key")

    requests = {r.key(): r for r in read_exactly(stack, stack.requests_topic, 5)}
    assert set(requests) == {str(task_id).encode() for task_id in rows}
    for row in rows.values():
        # No traceparent header on any of them: none carried a valid one.
        assert_crawl_request(requests[str(row["id"]).encode()], row)
    assert dict(requests[str(epoch["id"]).encode()].headers())["timestamp"] == GATEWAY_TS.encode()
    assert stack.read_topic(stack.dlq_topic, timeout_s=2) == []
    assert_all_committed_to_end(stack)


# -- 6. real crawl data: many refused rows in one burst ------------------------------------------

BURST = 1000


def _burst_of_completions(
    stack: Stack, tmp_path: Path, results: list[str]
) -> tuple[list[uuid.UUID], str]:
    """Create one task per result and wait until they are applied; then send one `completed`
    per task in one burst, waiting in the topic when tm starts (a backlog), so that one poll
    takes it in one batch. Returns the task ids and tm's output while it applied the burst."""
    ids = [uuid.uuid4() for _ in results]
    stack.produce([new_task(f"task {i}", task_id=t, timestamp=at(1)) for i, t in enumerate(ids)])
    with tm_running(stack, tmp_path) as tm:
        wait_committed(stack, tm, f"{len(ids)} new tasks committed")
    assert stack.count("status = 'new'") == len(ids)
    stack.produce(
        [completed(t, result, timestamp=at(2)) for t, result in zip(ids, results, strict=True)]
    )
    with tm_running(stack, tmp_path, TM_BATCH_LINGER_MS="1000") as tm:
        wait_committed(stack, tm, "the burst committed", timeout_s=60)
    return ids, tm.output()


def test_burst_of_results_with_nul_characters_is_applied(stack: Stack, tmp_path: Path) -> None:
    """Every seventh crawl result holds a NUL (a binary page): refused at decode as
    invalid_body; PostgreSQL, which cannot store it, never sees it; the rest are applied."""
    is_bad = [i % 7 == 6 for i in range(BURST)]
    results = [
        f"%PDF-1.7 page {i}\x00\x00\x01 binary" if bad else f"<html>page {i}</html>"
        for i, bad in enumerate(is_bad)
    ]

    ids, output = _burst_of_completions(stack, tmp_path, results)

    rows = rows_by_id(stack)
    for task_id, result, bad in zip(ids, results, is_bad, strict=True):
        row = rows[task_id]
        if bad:
            assert (row["status"], row["result"]) == ("new", None), task_id
        else:
            assert (row["status"], row["result"]) == ("completed", result), task_id
    bad_ids = {str(t).encode() for t, bad in zip(ids, is_bad, strict=True) if bad}
    letters = dead_letters_by_source(stack, len(bad_ids))
    assert {source.key() for _, source in letters} == bad_ids
    for letter, source in letters:
        added = assert_dead_letter(letter, source, "invalid_body")
        assert "NUL" in added["dlq_error"]
        assert "`$.crawl_result`" in added["dlq_error"]
    assert "worker died" not in output
    assert len(read_exactly(stack, stack.requests_topic, BURST)) == BURST
    assert_all_committed_to_end(stack)


def test_burst_with_many_rows_postgres_refuses_is_applied(stack: Stack, tmp_path: Path) -> None:
    """Rows that only the database refuses (here a trigger raising P0001, as a constraint or
    a check of the real schema might), 150 of one batch of 1,000: each is isolated and
    dead-lettered as row_rejected, the rest applied. A share of bad rows never stops a
    worker."""
    stack.query(
        """CREATE FUNCTION refuse_marked_results() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               IF NEW.result LIKE 'REFUSE%' THEN
                   RAISE EXCEPTION 'result refused by the test trigger' USING ERRCODE = 'P0001';
               END IF;
               RETURN NEW;
           END $$"""
    )
    stack.query(
        "CREATE TRIGGER refuse_marked_results BEFORE UPDATE ON web_crawl_tasks"
        " FOR EACH ROW EXECUTE FUNCTION refuse_marked_results()"
    )
    is_bad = [i % 20 in (3, 9, 16) for i in range(BURST)]
    assert sum(is_bad) == 150
    results = [
        f"REFUSE page {i}" if bad else f"<html>page {i}</html>" for i, bad in enumerate(is_bad)
    ]

    ids, output = _burst_of_completions(stack, tmp_path, results)

    rows = rows_by_id(stack)
    for task_id, result, bad in zip(ids, results, is_bad, strict=True):
        expected = ("new", None) if bad else ("completed", result)
        assert (rows[task_id]["status"], rows[task_id]["result"]) == expected, task_id
    bad_ids = {str(t).encode() for t, bad in zip(ids, is_bad, strict=True) if bad}
    letters = dead_letters_by_source(stack, len(bad_ids))
    assert {source.key() for _, source in letters} == bad_ids
    for letter, source in letters:
        added = assert_dead_letter(letter, source, "row_rejected")
        assert "refused by the test trigger" in added["dlq_error"]
    assert "worker died" not in output
    assert_all_committed_to_end(stack)


# -- 7. redelivery of finished tasks --------------------------------------------------------------


def test_redelivered_new_of_a_finished_task_is_not_crawled_again(
    stack: Stack, tmp_path: Path
) -> None:
    """From offset 0 again: a task still `new` gets its crawl request again (same key, same
    request); a task already completed or failed does not: it would be crawled twice."""
    done, failed, pending = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    stack.produce(
        [
            new_task("done", task_id=done, timestamp=at(1)),
            new_task("failed", task_id=failed, timestamp=at(2)),
            new_task("pending", task_id=pending, timestamp=at(3)),
            completed(done, "the result", timestamp=at(10)),
            error(failed, "HTTP 404", timestamp=at(11)),
        ],
        partition=0,
    )
    with tm_running(stack, tmp_path) as tm:
        wait_committed(stack, tm, "the first delivery committed")
    first_rows = rows_by_id(stack)
    assert {t: r["status"] for t, r in first_rows.items()} == {
        done: "completed",
        failed: "error",
        pending: "new",
    }
    read_exactly(stack, stack.requests_topic, 3)

    rewind_group(stack)
    with tm_running(stack, tmp_path) as tm:
        wait_committed(stack, tm, "the redelivery committed")

    assert rows_by_id(stack) == first_rows
    requests = read_exactly(stack, stack.requests_topic, 4)
    by_key: dict[bytes, list[tuple[bytes, Headers]]] = defaultdict(list)
    for request in requests:
        by_key[request.key()].append((request.value(), request.headers()))
    assert {key: len(copies) for key, copies in by_key.items()} == {
        str(done).encode(): 1,
        str(failed).encode(): 1,
        str(pending).encode(): 2,
    }
    first, again = by_key[str(pending).encode()]
    assert first == again
    (pending_request,) = {r.key(): r for r in requests if r.key() == str(pending).encode()}.values()
    assert_crawl_request(pending_request, first_rows[pending])
    assert stack.read_topic(stack.dlq_topic, timeout_s=2) == []
    assert_all_committed_to_end(stack)
