"""The fast paths of tm.core.decode give the results of the checks they stand in for: the URL
regex accepts only what urlsplit accepts, the one-regex traceparent check and the formatting of
new_task_id agree with their definitions, a canonical timestamp parses as parse_timestamp
parses it, and decode_poll builds the Batch that decode + Batch.add build."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tests.fakes import FakeMessage
from tm.core.batch import Batch
from tm.core.decode import (
    _COMMON_URL_RE,
    DecodeStats,
    _parse_iso_utc_ms,
    _valid_url,
    _valid_url_split,
    decode,
    decode_poll,
    new_task_id,
    parse_timestamp,
    valid_traceparent,
)
from tm.core.messages import TASK_ID_NAMESPACE, NewTask, Rejected, StatusUpdate

# Characters that urlsplit strips, removes, splits on, raises on or normalises, next to those
# of an ordinary URL.
_URL_CHARS = (
    "aZ09.-_~+%@:;=&[]/?#\\"
    " \t\n\r\x00\x01\x0b\x0c\x1f\x7f"  # what urlsplit strips (leading) or removes (\t\n\r)
    "\u00a0\u0085\u2003\u3000"  # Unicode whitespace
    "\u00e9\u00df\u0130\u212a"  # é, ß, İ (whose lower() is two characters), the Kelvin sign
    "\u2100\uff0f\uff1a\ufe6b"  # ℀ (a/c under NFKC), fullwidth / and :, small @
)
_url_text = st.text(alphabet=st.sampled_from(_URL_CHARS), max_size=12)
_host = st.text(alphabet=st.sampled_from("aZ09.-"), max_size=10)
_port = st.one_of(st.just(""), st.from_regex(r":[0-9]{0,7}", fullmatch=True))
_rest = st.one_of(st.just(""), st.tuples(st.sampled_from("/?#"), _url_text).map("".join))
_SCHEMES = [
    "http://",
    "https://",
    "HTTP://",
    "hTtPs://",
    "http:/",
    "http:",
    "https:///",
    "http//",
    "ftp://",
    "httpx://",
    " http://",
    "\x00https://",
    "\thttp://",
    "ht\ttp://",
    "https:\n//",
    "",
]
_urls = st.one_of(
    # The fast path's shape, tricky characters past the host.
    st.tuples(st.sampled_from(["http://", "https://"]), _host, _port, _rest).map("".join),
    # Near misses: a tricky scheme, host or port.
    st.tuples(
        st.sampled_from(_SCHEMES),
        st.one_of(_host, _url_text),
        st.one_of(_port, _url_text),
        st.one_of(_rest, _url_text),
    ).map("".join),
    st.text(alphabet=st.sampled_from(_URL_CHARS + "htps"), max_size=30),
)


@settings(max_examples=1000)
@given(url=_urls)
def test_the_url_fast_path_accepts_only_what_urlsplit_accepts(url: str) -> None:
    fast = _COMMON_URL_RE.fullmatch(url) is not None
    event("fast path" if fast else "urlsplit accepts" if _valid_url_split(url) else "refused")
    if fast:
        assert _valid_url_split(url), url
    assert _valid_url(url) == _valid_url_split(url)


@settings(max_examples=500)
@given(url=st.from_regex(_COMMON_URL_RE, fullmatch=True))
def test_whatever_the_url_regex_matches_urlsplit_accepts(url: str) -> None:
    assert _valid_url_split(url), url


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/page/1",
        "http://example.com",
        "https://sub.example-shop.co.uk:8443/a/b?q=1&r=%20#top",
        "http://localhost:8080",
        "https://example.com?q",
        "https://example.com#frag",
        "https://example.com/caf\u00e9",  # non-ASCII past the host
    ],
)
def test_usual_urls_take_the_fast_path(url: str) -> None:
    assert _COMMON_URL_RE.fullmatch(url)
    assert _valid_url(url)


@pytest.mark.parametrize(
    ("url", "valid"),
    [
        ("HTTPS://Example.COM/", True),  # urlsplit lowers the scheme
        ("https://user:pw@example.com/", True),
        ("http://[::1]:8080/", True),
        ("http://ex\u00e4mple.com/", True),
        ("http://a:99999999/", True),  # urlsplit does not read the port
        (" https://example.com/", False),  # urlsplit strips the space, the check finds it
        ("http://exa\tmple.com/", True),  # the tab is removed
        ("http:///path", False),
        ("http://:80/", False),
        ("http://example.com/a b", False),
        ("http://[::1/", False),
        ("ftp://example.com/", False),
        ("example.com", False),
    ],
)
def test_other_urls_are_checked_by_urlsplit(url: str, valid: bool) -> None:
    assert not _COMMON_URL_RE.fullmatch(url)
    assert _valid_url_split(url) is valid
    assert _valid_url(url) is valid


def _traceparent_by_groups(raw: str) -> bool:
    """The W3C rule spelled out: the shape, then no version ff and no all-zero ids."""
    match = re.fullmatch(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$", raw)
    return (
        match is not None
        and match.group(1) != "ff"
        and match.group(2) != "0" * 32
        and match.group(3) != "0" * 16
    )


def _hex(size: int) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(alphabet=st.sampled_from("0f"), min_size=size, max_size=size),
        st.text(alphabet=st.sampled_from("0123456789abcdefF"), min_size=size, max_size=size),
        st.text(alphabet=st.sampled_from("0a-\n"), max_size=size + 1),
    )


@given(
    parts=st.tuples(_hex(2), _hex(32), _hex(16), _hex(2)),
    separator=st.sampled_from(["-", "-", "-", "_"]),
    trailer=st.sampled_from(["", "", "\n", "-"]),
)
def test_the_traceparent_regex_is_the_w3c_rule(
    parts: tuple[str, str, str, str], separator: str, trailer: str
) -> None:
    raw = separator.join(parts) + trailer
    assert valid_traceparent(raw) is _traceparent_by_groups(raw)


@pytest.mark.parametrize(
    ("raw", "valid"),
    [
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", True),
        ("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", False),
        ("00-00000000000000000000000000000000-b7ad6b7169203331-01", False),
        ("00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01", False),
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\n", False),
        ("00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01", False),
    ],
)
def test_both_traceparent_checks_accept_the_w3c_example_and_refuse_its_broken_variants(
    raw: str, valid: bool
) -> None:
    assert valid_traceparent(raw) is valid
    assert _traceparent_by_groups(raw) is valid


@given(
    topic=st.text(min_size=1, max_size=20),
    partition=st.integers(min_value=0, max_value=10_000),
    offset=st.integers(min_value=0, max_value=2**63 - 1),
    timestamp_ms=st.integers(min_value=-1, max_value=2**48),
)
def test_new_task_id_is_always_the_uuid5(
    topic: str, partition: int, offset: int, timestamp_ms: int
) -> None:
    name = f"{topic}/{partition}/{offset}/{timestamp_ms}"
    assert new_task_id(topic, partition, offset, timestamp_ms) == str(
        uuid.uuid5(TASK_ID_NAMESPACE, name)
    )


_FIRST = datetime.min.replace(tzinfo=UTC)


@given(
    moment=st.datetimes(min_value=datetime.min, max_value=datetime.max, timezones=st.just(UTC)).map(
        lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000)
    )
)
def test_a_canonical_timestamp_parses_as_parse_timestamp_parses_it(moment: datetime) -> None:
    m = moment
    raw = (
        f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
        f".{m.microsecond // 1000:03d}Z"
    )
    assert _parse_iso_utc_ms(raw) == parse_timestamp(raw)
    assert (_parse_iso_utc_ms(raw) is None) is (moment == _FIRST)


@pytest.mark.parametrize(
    "raw",
    [
        "0001-01-01T00:00:00.000Z",  # asyncpg would store it as -infinity
        "9999-12-31T23:59:59.999Z",
        "2025-02-30T10:18:59.023Z",
        "2025-13-01T10:18:59.023Z",
        "2025-08-10T24:00:00.000Z",
        "2024-02-29T23:59:59.999Z",
    ],
)
def test_the_canonical_timestamp_parser_agrees_with_parse_timestamp_on_edge_dates(raw: str) -> None:
    assert _parse_iso_utc_ms(raw) == parse_timestamp(raw)


def _new_headers(timestamp: bytes) -> list[tuple[str, bytes]]:
    return [("task_type", b"web-crawl"), ("status", b"new"), ("timestamp", timestamp)]


@pytest.mark.parametrize(
    ("timestamp", "text"),
    [
        (b"2025-08-10T10:18:59.023Z", "2025-08-10T10:18:59.023Z"),  # kept as it is
        (b"2025-08-10T12:18:59.023+02:00", "2025-08-10T10:18:59.023Z"),
        (b"1754821139023", "2025-08-10T10:18:59.023Z"),
    ],
)
def test_a_new_task_keeps_a_canonical_timestamp_and_rewrites_others(
    timestamp: bytes, text: str
) -> None:
    body = b'{"user_email":"a@example.com","user_query":"q","base_url":"https://example.com"}'
    result = decode(
        _new_headers(timestamp),
        body,
        topic="t",
        partition=0,
        offset=0,
        timestamp_ms=0,
        max_result_chars=100,
        stats=DecodeStats(),
    )
    assert isinstance(result, NewTask)
    assert result.timestamp == text


def _poll() -> list[FakeMessage]:
    good_new = {"user_email": "a@example.com", "user_query": "q", "base_url": "https://e.com/x"}
    messages = []
    for n in range(60):
        partition = n % 4
        if n % 3 == 0:
            headers = _new_headers(b"2025-08-10T10:18:59.023Z")
            body = orjson.dumps(good_new)
        elif n % 3 == 1:
            status = b"completed" if n % 2 else b"error"
            field = "crawl_result" if n % 2 else "error"
            headers = [
                ("task_type", b"web-crawl"),
                ("status", status),
                ("task_id", str(uuid.UUID(int=n)).encode()),
                ("timestamp", b"1754821139023"),
            ]
            body = orjson.dumps({field: f"text {n}"})
        else:
            headers = _new_headers(b"soon")
            body = b"{}"
        messages.append(FakeMessage(headers, body, partition, 100 - n, _timestamp_ms=n))
    return messages


def _by_decode_and_add(messages: list[FakeMessage]) -> Batch:
    batch = Batch()
    stats = DecodeStats()
    for ref, message in enumerate(messages):
        item = decode(
            message.headers(),
            message.value(),
            topic="t",
            partition=message.partition(),
            offset=message.offset(),
            timestamp_ms=message.timestamp()[1],
            max_result_chars=100,
            stats=stats,
        )
        batch.add(ref, message.partition(), message.offset(), item, message.timestamp()[1])
    return batch


def _fields(batch: Batch) -> dict[str, Any]:
    return {name: getattr(batch, name) for name in Batch.__slots__}


def test_decode_poll_builds_the_batch_of_decode_and_add() -> None:
    messages = _poll()

    batch = decode_poll(messages, topic="t", max_result_chars=100, stats=DecodeStats())

    assert _fields(batch) == _fields(_by_decode_and_add(messages))
    assert batch.size == 60
    assert [type(item) for item in batch.creates] == [NewTask] * 20
    assert [type(item) for item in batch.updates] == [StatusUpdate] * 20
    assert [type(item) for _, item in batch.rejected] == [Rejected] * 20
    assert batch.create_refs == list(range(0, 60, 3))
    assert batch.first_offsets == {0: 100, 1: 99, 2: 98, 3: 97}  # the first seen, not the least
    assert batch.committable == {0: 45, 1: 44, 2: 43, 3: 42}  # the last seen + 1
    assert batch.timestamps_ms == list(range(60))


def test_decode_poll_of_nothing_is_an_empty_batch() -> None:
    batch = decode_poll([], topic="t", max_result_chars=100, stats=DecodeStats())

    assert not batch
    assert _fields(batch) == _fields(Batch())


def test_decode_poll_counts_dropped_trace_contexts() -> None:
    headers = [*_new_headers(b"2025-08-10T10:18:59.023Z"), ("traceparent", b"00-bad")]
    body = b'{"user_email":"a@example.com","user_query":"q","base_url":"https://e.com"}'
    stats = DecodeStats()

    batch = decode_poll(
        [FakeMessage(headers, body), FakeMessage(headers, body, _offset=1)],
        topic="t",
        max_result_chars=100,
        stats=stats,
    )

    assert stats.invalid_trace_context == 2
    assert [task.traceparent for task in batch.creates] == [None, None]
