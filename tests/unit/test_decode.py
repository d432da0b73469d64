"""Decoding against the golden corpus in tests/messages/ (one file per case), plus properties:
bad input never raises, and ids of `new` events are stable across redeliveries."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tm.core.decode import DecodeStats, decode, new_task_id, parse_timestamp
from tm.core.messages import TASK_ID_NAMESPACE, NewTask, Reason, Rejected, StatusUpdate

CORPUS = Path(__file__).resolve().parents[1] / "messages"
CASES = sorted(CORPUS.glob("*/*.json"))


def _run(case: dict[str, Any], stats: DecodeStats | None = None) -> Any:
    headers = [(k, v.encode()) for k, v in case["headers"]]
    if "raw_header" in case:
        key, hex_value = case["raw_header"]
        headers = [(k, v) for k, v in headers if k != key] + [(key, bytes.fromhex(hex_value))]
    value = case["value"].encode() if case["value"] is not None else None
    return decode(
        headers,
        value,
        topic="task-status",
        partition=3,
        offset=42,
        timestamp_ms=1_754_821_139_023,
        max_result_chars=case.get("max_result_chars", 1_048_576),
        stats=stats or DecodeStats(),
    )


def test_corpus_is_not_empty() -> None:
    assert len([c for c in CASES if c.parent.name == "valid"]) >= 5
    assert len([c for c in CASES if c.parent.name == "invalid"]) >= 10


@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_each_corpus_message_decodes_as_its_file_expects(path: Path) -> None:
    case = json.loads(path.read_text())
    expect = case["expect"]
    stats = DecodeStats()
    result = _run(case, stats)
    kind = expect["kind"]
    if kind == "rejected":
        assert isinstance(result, Rejected), result
        assert result.reason == expect["reason"]
        assert expect.get("error_contains", "") in result.error
        return
    if kind == "new":
        assert isinstance(result, NewTask), result
        expected_id = expect.get("id") or str(new_task_id("task-status", 3, 42, 1_754_821_139_023))
        assert str(result.id) == expected_id
    else:
        assert isinstance(result, StatusUpdate), result
        assert result.status == kind
    for field in ("user_email", "base_url", "traceparent", "tracestate", "result"):
        if field in expect:
            assert getattr(result, field) == expect[field]
    if "result_startswith" in expect:
        assert result.result == expect["result_startswith"]
    for field in ("received_at", "finished_at"):
        if field in expect:
            assert getattr(result, field).isoformat() == expect[field]
    assert stats.invalid_trace_context == expect.get("invalid_trace_context", 0)


def test_new_task_id_is_the_uuid5_of_the_coordinates() -> None:
    first = new_task_id("task-status", 1, 2, 3)
    assert first == new_task_id("task-status", 1, 2, 3)
    assert first == str(uuid.uuid5(TASK_ID_NAMESPACE, "task-status/1/2/3"))
    assert first != new_task_id("task-status", 1, 3, 3)
    assert first != new_task_id("other-topic", 1, 2, 3)


def test_task_id_header_is_canonicalised() -> None:
    upper = "6F1C2D3E-4B5A-4978-8A6B-5C4D3E2F1A0B"
    headers = [
        ("task_type", b"web-crawl"),
        ("status", b"error"),
        ("task_id", upper.encode()),
        ("timestamp", b"2025-08-10T10:18:59Z"),
    ]
    result = decode(
        headers,
        b'{"error": "e"}',
        topic="t",
        partition=0,
        offset=0,
        timestamp_ms=0,
        max_result_chars=10,
        stats=DecodeStats(),
    )
    assert isinstance(result, StatusUpdate)
    assert result.id == upper.lower()


@pytest.mark.parametrize(
    ("raw", "iso"),
    [
        ("2025-08-10T10:18:59.023Z", "2025-08-10T10:18:59.023000+00:00"),
        ("2025-08-10T12:18:59+02:00", "2025-08-10T12:18:59+02:00"),
        ("2025-08-10T10:18:59", "2025-08-10T10:18:59+00:00"),
        ("1754821139023", "2025-08-10T10:18:59.023000+00:00"),
    ],
)
def test_parse_timestamp_reads_iso_with_any_offset_naive_as_utc_and_epoch_millis(
    raw: str, iso: str
) -> None:
    parsed = parse_timestamp(raw)
    assert parsed is not None and parsed.isoformat() == iso


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "soon",
        "2025-13-01",
        "99999999999999999999",
        "\u00b2",  # a digit to str.isdigit, not to int()
        "\u0661\u0662\u0663",  # Arabic-Indic digits: epoch milliseconds are ASCII digits
        "0001-01-01T00:00:00+05:00",  # before year 1 in UTC
        "9999-12-31T23:59:59-05:00",  # after year 9999 in UTC
        "0001-01-01T00:00:00",  # asyncpg would store it as -infinity
        "9999-12-31T23:59:59.999999+00:00",  # and this as infinity
    ],
)
def test_parse_timestamp_refuses_garbage_non_ascii_digits_and_out_of_range_instants(
    raw: str,
) -> None:
    assert parse_timestamp(raw) is None


_header_names = st.sampled_from(
    ["task_type", "status", "timestamp", "task_id", "traceparent", "tracestate", "other"]
)
_header_values = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"web-crawl", b"new", b"completed", b"error", b"2025-08-10T10:18:59Z"]),
    st.just(str(uuid.uuid4()).encode()),
)


@given(
    headers=st.lists(st.tuples(_header_names, _header_values), max_size=8),
    value=st.one_of(st.none(), st.binary(max_size=200), st.just(b'{"user_email": 1}')),
)
def test_decode_never_raises(headers: list[tuple[str, bytes]], value: bytes | None) -> None:
    result = decode(
        headers,
        value,
        topic="t",
        partition=0,
        offset=0,
        timestamp_ms=0,
        max_result_chars=100,
        stats=DecodeStats(),
    )
    assert isinstance(result, NewTask | StatusUpdate | Rejected)


_NUL_ERROR = "Contains a NUL character (\\u0000), which PostgreSQL text cannot hold - at `$.{}`"
_GOOD_BODIES = {
    "new": {
        "user_email": "ada@example.com",
        "user_query": "Find product information",
        "base_url": "https://example.com/shop",
    },
    "completed": {"crawl_result": "<html>three products</html>"},
    "error": {"error": "x" * 1500},  # truncated to 1000 chars: a NUL past them counts too
}
_TEXT_FIELDS = [(status, name) for status, body in _GOOD_BODIES.items() for name in body]


def _decode_body(status: str, body: dict[str, str]) -> Any:
    headers = [("task_type", b"web-crawl"), ("status", status.encode())]
    headers.append(("timestamp", b"2025-08-10T10:18:59.023Z"))
    if status != "new":
        headers.append(("task_id", str(uuid.uuid4()).encode()))
    return decode(
        headers,
        json.dumps(body).encode(),
        topic="t",
        partition=0,
        offset=0,
        timestamp_ms=0,
        max_result_chars=1_048_576,
        stats=DecodeStats(),
    )


@pytest.mark.parametrize("where", ["start", "middle", "end"])
@pytest.mark.parametrize(("status", "field"), _TEXT_FIELDS, ids=[f for _, f in _TEXT_FIELDS])
def test_nul_in_a_text_field_is_refused_with_its_path(status: str, field: str, where: str) -> None:
    """PostgreSQL text cannot hold NUL: refused at decode, never sent to the database."""
    good = _GOOD_BODIES[status][field]
    text = {"start": "\x00" + good, "middle": good[:3] + "\x00" + good[3:], "end": good + "\x00"}
    body = {**_GOOD_BODIES[status], field: text[where]}

    result = _decode_body(status, body)

    assert result == Rejected(Reason.INVALID_BODY, _NUL_ERROR.format(field))


@given(
    status=st.sampled_from(list(_GOOD_BODIES)),
    field=st.sampled_from(["user_email", "user_query", "base_url", "crawl_result", "error"]),
    text=st.text(alphabet=st.sampled_from("ab\x00.@/:"), min_size=1, max_size=20),
)
def test_nothing_decoded_holds_a_nul(status: str, field: str, text: str) -> None:
    body = {**_GOOD_BODIES[status], field: text}

    result = _decode_body(status, body)

    if isinstance(result, Rejected):
        return
    if isinstance(result, NewTask):
        stored = [result.user_email, result.user_query, result.base_url, result.timestamp]
    else:
        stored = [result.result]
    assert not any("\x00" in s for s in stored), result


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (
            "new",
            b'{"user_email": "ada@example.com", "user_query": "\xff", "base_url": "https://e.com/"}',
        ),
        ("completed", b'{"crawl_result": "<html>\xc3</html>"}'),
        ("error", b'{"error": "\xed\xa0\x80"}'),
    ],
    ids=["new", "completed", "error"],
)
def test_a_string_field_that_is_not_utf8_is_invalid_json(status: str, body: bytes) -> None:
    """msgspec raises UnicodeDecodeError, not DecodeError, for such a string: it must come
    back as a rejection, never as an exception that would stop the worker."""
    headers = [("task_type", b"web-crawl"), ("status", status.encode())]
    headers.append(("timestamp", b"2025-08-10T10:18:59.023Z"))
    if status != "new":
        headers.append(("task_id", str(uuid.uuid4()).encode()))

    result = decode(
        headers,
        body,
        topic="t",
        partition=0,
        offset=0,
        timestamp_ms=0,
        max_result_chars=1_048_576,
        stats=DecodeStats(),
    )

    assert isinstance(result, Rejected) and result.reason == Reason.INVALID_JSON, result
    assert "not valid UTF-8" in result.error


@pytest.mark.parametrize(
    "timestamp", [b"0001-01-01T00:00:00+05:00", b"9999-12-31T23:59:59-05:00", b"\xc2\xb2"]
)
@pytest.mark.parametrize("status", ["new", "completed"])
def test_a_timestamp_out_of_range_in_utc_is_an_invalid_header(
    status: str, timestamp: bytes
) -> None:
    headers = [("task_type", b"web-crawl"), ("status", status.encode()), ("timestamp", timestamp)]
    if status != "new":
        headers.append(("task_id", str(uuid.uuid4()).encode()))
    body = _GOOD_BODIES[status]

    result = decode(
        headers,
        json.dumps(body).encode(),
        topic="t",
        partition=0,
        offset=0,
        timestamp_ms=0,
        max_result_chars=1_048_576,
        stats=DecodeStats(),
    )

    assert isinstance(result, Rejected) and result.reason == Reason.INVALID_HEADERS, result


@pytest.mark.parametrize("status", ["new", "completed", "error"])
def test_json_nested_too_deeply_is_invalid_json(status: str) -> None:
    """An unknown field nested thousands deep: msgspec raises RecursionError skipping it."""
    headers = [("task_type", b"web-crawl"), ("status", status.encode())]
    headers.append(("timestamp", b"2025-08-10T10:18:59.023Z"))
    if status != "new":
        headers.append(("task_id", str(uuid.uuid4()).encode()))

    result = decode(
        headers,
        b'{"a":' * 5000,
        topic="t",
        partition=0,
        offset=0,
        timestamp_ms=0,
        max_result_chars=1_048_576,
        stats=DecodeStats(),
    )

    assert result == Rejected(Reason.INVALID_JSON, "JSON nested too deeply")
