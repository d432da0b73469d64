"""Messages for the bad-input test (tests/e2e/test_bad_input.py): hypothesis strategies of
task-status messages, valid and invalid, and the oracle that says what tm must do with each.

A strategy draws one *item*: the messages of one task on one partition (a gateway `new`; a `new`
with its crawlers' updates; a message broken in one known way; or anything at all), with what
the item is meant to be (``intent``): ``good`` (must be applied), ``bad:<reason>`` (must be
dead-lettered with that ``dlq_reason``) or ``fuzz`` (either, as the oracle says). Task ids are
placeholders until :func:`lay_out` gives every item fresh ones, so that no two items touch the
same task and the outcome of each message is exact.

The oracle (:func:`expect`) replays the messages in partition and offset order through
``tm.core.decode.decode`` and the state machine of ``tm_apply_status_updates``
(sql/0003_batch_functions.sql), and says for each: created, duplicate, updated or unchanged, or
dead-lettered with which reason; and which rows the table must hold, in which state.
"""

from __future__ import annotations

import random
import re
import string
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
from hypothesis import strategies as st

from tm.core.decode import DecodeStats, decode
from tm.core.messages import NewTask, Outcome, Rejected, StatusUpdate, TaskStatus, update_outcome

Headers = list[tuple[str, bytes | None]]
ID = b"<task-id>"  # placeholder of an item's task id, in headers and keys
_UUID = re.compile(rb"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
KAFKA_MAX_VALUE = 900_000  # below the producer's and the topics' 1 MB limits, with headers
RESULT_LIMIT = 4096  # TM_MAX_RESULT_CHARS of the test's tm: results over it are refused


@dataclass
class Item:
    intent: str
    messages: list[tuple[bytes | None, Headers, bytes | None]]
    partition: int = 0


@dataclass
class Sent:
    """One message as produced, with where Kafka put it."""

    intent: str
    key: bytes | None
    headers: Headers
    value: bytes | None
    partition: int
    offset: int = -1
    timestamp_ms: int = 0

    def describe(self) -> str:
        value = self.value if self.value is None or len(self.value) < 300 else self.value[:300]
        return (
            f"{self.intent} p{self.partition}@{self.offset} key={self.key!r:.80}"
            f" headers={self.headers!r:.400} value={value!r}"
        )


# -- pieces of valid messages ----------------------------------------------------------------------

_LOCAL = st.text(
    string.ascii_letters + string.digits + ".!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=20
)
_LABEL = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=10)
_DOMAIN = st.builds(
    lambda label, tld: f"{label}.{tld}", _LABEL, st.sampled_from(["com", "org", "io", "example"])
)
EMAILS = st.builds(lambda local, domain: f"{local}@{domain}", _LOCAL, _DOMAIN)
# Text PostgreSQL can hold: any code point but NUL (and no surrogates: not UTF-8).
TEXT = st.characters(codec="utf-8", exclude_characters="\x00")
QUERIES = st.one_of(st.text(TEXT, min_size=1, max_size=60), st.just("q" * 1000))
_HOSTS = st.one_of(_DOMAIN, st.just("localhost"), st.just("127.0.0.1"))
_PATHS = st.text(string.ascii_letters + string.digits + "-._~/%?=&#", max_size=40)
URLS = st.builds(
    lambda scheme, host, path: f"{scheme}://{host}/{path}",
    st.sampled_from(["http", "https"]),
    _HOSTS,
    _PATHS,
)
_ZONES = st.one_of(
    st.just(UTC),
    st.builds(lambda m: timezone(timedelta(minutes=m)), st.integers(-23 * 60 - 59, 23 * 60 + 59)),
)
# Every instant but the first and last day: there, a zone offset can leave Python's range in
# UTC, and asyncpg stores the first and last instants as -infinity/infinity (both refused,
# and tried by the fuzz below).
MOMENTS = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=_ZONES
)
EDGE_TIMESTAMPS = [
    b"0001-01-01T00:00:00+05:00",
    b"9999-12-31T23:59:59-05:00",
    b"0001-01-01T00:00:00Z",
    b"9999-12-31T23:59:59.999999",
    b"0001-01-01T00:00:00.000001Z",
    b"253402300799999",
    b"253402300800000",
    b"\xc2\xb2",
    b"\xd9\xa1\xd9\xa2",
    b"2025-08-10T10:18:59.023+24:00",
]


def _iso_z(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Every form the timestamp header may take: the gateway's, any ISO-8601 with or without a
# zone, epoch milliseconds. (Extreme years with an offset are the point: 0001-01-01T00:00+05:00
# is before year 1 in UTC.)
TIMESTAMPS = st.one_of(
    st.builds(lambda m: m.isoformat(), MOMENTS),
    st.builds(lambda m: m.replace(tzinfo=None).isoformat(), MOMENTS),
    st.builds(
        lambda m: _iso_z(m),
        st.datetimes(
            min_value=datetime(1971, 1, 1), max_value=datetime(9998, 1, 1), timezones=st.just(UTC)
        ),
    ),
    st.builds(str, st.integers(0, 253_402_300_799_999)),
)
RESULTS = st.text(TEXT, min_size=1, max_size=80)
ERRORS = st.one_of(
    st.text(TEXT, min_size=1, max_size=80),
    st.builds(lambda c, n: c * n, st.text(TEXT, min_size=1, max_size=3), st.integers(300, 700)),
)
_TRACEPARENTS = st.builds(
    lambda t, s, f: f"00-{t:032x}-{s:016x}-{f:02x}",
    st.integers(1, 2**128 - 1),
    st.integers(1, 2**64 - 1),
    st.integers(0, 255),
)
_EXTRA_HEADERS: st.SearchStrategy[Headers] = st.lists(
    st.tuples(
        st.sampled_from(["x-request-id", "content-type", "tracestate", "x-case"]),
        st.binary(max_size=20),
    ),
    max_size=2,
)
_EXTRA_FIELDS = st.dictionaries(
    st.sampled_from(["crawler", "attempt", "pages", "user_id"]),
    st.one_of(st.integers(-5, 5), st.text(max_size=5)),
    max_size=2,
)


def _headers(
    status: str, timestamp: str, *, task_id: bool, traceparent: str | None, extra: Headers
) -> Headers:
    out: Headers = []
    if traceparent is not None:
        out.append(("traceparent", traceparent.encode()))
    out += [
        ("task_type", b"web-crawl"),
        ("status", status.encode()),
        ("timestamp", timestamp.encode()),
    ]
    if task_id:
        out.append(("task_id", ID))
    return out + extra


@st.composite
def gateway_news(draw: st.DrawFn) -> Item:
    """A `new` event as the gateway sends it: no key, no task_id header."""
    body = {
        "user_email": draw(EMAILS),
        "user_query": draw(QUERIES),
        "base_url": draw(URLS),
        **draw(_EXTRA_FIELDS),
    }
    headers = _headers(
        "new",
        draw(TIMESTAMPS),
        task_id=False,
        traceparent=draw(st.none() | _TRACEPARENTS),
        extra=draw(_EXTRA_HEADERS),
    )
    return Item("good", [(None, headers, orjson.dumps(body))])


def _update(
    draw: st.DrawFn, status: str, *, result: str | None = None, at: str | None = None
) -> tuple[bytes | None, Headers, bytes]:
    text = result if result is not None else draw(RESULTS if status == "completed" else ERRORS)
    body = {"crawl_result" if status == "completed" else "error": text, **draw(_EXTRA_FIELDS)}
    timestamp = at if at is not None else draw(TIMESTAMPS)
    headers = _headers(
        status,
        timestamp,
        task_id=True,
        traceparent=draw(st.none() | _TRACEPARENTS),
        extra=draw(_EXTRA_HEADERS),
    )
    key = draw(st.sampled_from([ID, None]))
    return key, headers, orjson.dumps(body)


@st.composite
def stories(draw: st.DrawFn) -> Item:
    """A `new` event with a task_id header and what its crawlers then send: nothing, a result,
    an error then a result, the same update twice, or an update that breaks the state machine
    (a finished task told something else: dead-lettered as invalid_transition)."""
    body = {"user_email": draw(EMAILS), "user_query": draw(QUERIES), "base_url": draw(URLS)}
    new = (
        None,
        _headers("new", draw(TIMESTAMPS), task_id=True, traceparent=None, extra=[]),
        orjson.dumps(body),
    )
    shape = draw(
        st.sampled_from(
            [
                "new only",
                "completed",
                "error",
                "error then completed",
                "repeated",
                "completed then error",
            ]
        )
    )
    base = datetime(2025, 8, 10, tzinfo=UTC) + timedelta(seconds=draw(st.integers(0, 10**6)))
    at = [_iso_z(base + timedelta(seconds=i)) for i in range(3)]
    updates = []
    if shape in ("completed", "error"):
        updates = [_update(draw, shape, at=at[0])]
    elif shape == "error then completed":
        updates = [_update(draw, "error", at=at[0]), _update(draw, "completed", at=at[1])]
    elif shape == "repeated":
        status = draw(st.sampled_from(["completed", "error"]))
        result = draw(RESULTS if status == "completed" else ERRORS)
        one = _update(draw, status, result=result, at=at[0])
        updates = [one, one]
    elif shape == "completed then error":
        updates = [_update(draw, "completed", at=at[0]), _update(draw, "error", at=at[1])]
    return Item("story", [new, *updates])


GOOD = st.one_of(gateway_news(), stories())

# -- messages broken in one known way --------------------------------------------------------------


def _good_body(draw: st.DrawFn, status: str) -> dict[str, Any]:
    if status == "new":
        return {"user_email": draw(EMAILS), "user_query": draw(QUERIES), "base_url": draw(URLS)}
    if status == "completed":
        return {"crawl_result": draw(RESULTS)}
    return {"error": draw(RESULTS)}


_STATUSES = st.sampled_from(["new", "completed", "error"])
_NOT_UTF8 = st.sampled_from([b"\xff", b"web-\xc3", b"\xed\xa0\x80", b"\x80abc"])


_WRONG = {
    "task_type": [b"web-scrape", b"WEB-CRAWL", b""],
    "status": [b"done", b"NEW", b""],
    "timestamp": [b"", b"soon", b"2025-13-01", b"99999999999999999999", b"2025-08-10T10:18Z\x00"],
}
_NOT_UUIDS = st.sampled_from([b"", b"42", b"not-a-uuid", b"{" + b"0" * 36 + b"}", ID + b"0"])


@st.composite
def bad_headers(draw: st.DrawFn) -> Item:
    """A valid body under headers with one thing wrong."""
    status = draw(_STATUSES)
    how = draw(
        st.sampled_from(["drop", "wrong", "null", "not utf-8", "task_id not a uuid", "no task_id"])
    )
    if how == "no task_id":
        status = draw(st.sampled_from(["completed", "error"]))
    has_id = status != "new" and how != "no task_id"
    headers = _headers(status, draw(TIMESTAMPS), task_id=has_id, traceparent=None, extra=[])
    if how in ("drop", "wrong", "null"):
        victim = draw(st.sampled_from(sorted(_WRONG)))
        if how == "drop":
            headers = [(n, v) for n, v in headers if n != victim]
        else:
            bad = draw(st.sampled_from(_WRONG[victim])) if how == "wrong" else None
            headers = [(n, bad if n == victim else v) for n, v in headers]
    elif how == "not utf-8":
        victim = draw(st.sampled_from([n for n, _ in headers]))
        headers = [(n, draw(_NOT_UTF8) if n == victim else v) for n, v in headers]
    elif how == "task_id not a uuid":
        headers = [(n, v) for n, v in headers if n != "task_id"] + [("task_id", draw(_NOT_UUIDS))]
    return Item("bad:invalid_headers", [(None, headers, orjson.dumps(_good_body(draw, status)))])


@st.composite
def bad_json(draw: st.DrawFn) -> Item:
    """Valid headers, a value that is not JSON: a proper prefix of a JSON object (never valid),
    or such a prefix with bytes that are not UTF-8."""
    status = draw(_STATUSES)
    body = orjson.dumps(_good_body(draw, status))
    # (Not a closing quote: `{"error":""` would be refused for its empty string first.)
    value = body[: draw(st.integers(0, len(body) - 1))] + draw(
        st.sampled_from([b"", b"\xff", b"\xc3"])
    )
    headers = _headers(
        status, draw(TIMESTAMPS), task_id=status != "new", traceparent=None, extra=[]
    )
    return Item("bad:invalid_json", [(None, headers, value)])


_NOT_STRINGS: st.SearchStrategy[int | list[int] | dict[str, Any] | None] = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=2),
    st.just({}),
)


@st.composite
def bad_bodies(draw: st.DrawFn) -> Item:
    """Valid headers, JSON that breaks one rule of DESIGN §1."""
    status = draw(_STATUSES)
    body = _good_body(draw, status)
    field_name = draw(st.sampled_from(sorted(body)))
    how = draw(
        st.sampled_from(["missing", "not a string", "nul", "empty", "too long", "malformed"])
    )
    if how == "missing":
        del body[field_name]
    elif how == "not a string":
        body[field_name] = draw(_NOT_STRINGS)
    elif how == "nul":
        text = body[field_name]
        cut = draw(st.integers(0, len(text)))
        body[field_name] = text[:cut] + "\x00" + text[cut:]
    elif how == "empty":
        body[field_name] = ""
    elif how == "too long":
        limit = {"user_email": 255, "user_query": 1000, "base_url": 2048}.get(field_name)
        if limit is None:  # results: only empty or not a string is invalid here
            body[field_name] = draw(_NOT_STRINGS)
        else:
            head = {
                "user_email": "a" * 250 + "@",
                "user_query": "",
                "base_url": "https://example.com/",
            }[field_name]
            tail = {"user_email": "example.com"}.get(field_name, "x" * (limit + 1))
            body[field_name] = head + tail
    else:  # malformed address or URL (a result cannot be malformed)
        bad = {
            "user_email": [
                "ada.example.com",
                "ada@",
                "@example.com",
                "ada @example.com",
                "ada@example.com\n",
                "ada@-x.com",
            ],
            "base_url": [
                "ftp://example.com/f",
                "https://",
                "example.com/page",
                "https://exa mple.com/",
                "javascript:alert(1)",
                "http://[::1/",
            ],
        }.get(field_name)
        body[field_name] = draw(st.sampled_from(bad)) if bad else draw(_NOT_STRINGS)
    # An update's body is checked before its task is looked for: no task is needed here.
    headers = _headers(
        status, draw(TIMESTAMPS), task_id=status != "new", traceparent=None, extra=[]
    )
    return Item("bad:invalid_body", [(None, headers, orjson.dumps(body))])


@st.composite
def unknown_tasks(draw: st.DrawFn) -> Item:
    """A valid update for a task nobody created."""
    status = draw(st.sampled_from(["completed", "error"]))
    return Item("bad:task_not_found", [_update(draw, status)])


@st.composite
def oversized(draw: st.DrawFn) -> Item:
    """Big: a result over TM_MAX_RESULT_CHARS (``limit``), up to KAFKA_MAX_VALUE bytes of
    garbage, a JSON body far over every field's limit, or many headers."""
    how = draw(st.sampled_from(["result", "garbage", "huge body", "many headers"]))
    chunk = draw(st.binary(min_size=1, max_size=8))
    if how == "result":
        story = draw(stories())
        unit = draw(st.text(TEXT, min_size=1, max_size=4))
        size = draw(st.integers((RESULT_LIMIT + 1) * 4, KAFKA_MAX_VALUE - 1000))  # bytes
        text = unit * (size // len(unit.encode()))
        value = orjson.dumps({"crawl_result": text})
        while len(value) > KAFKA_MAX_VALUE:  # control characters take 6 bytes in JSON
            text = text[: len(text) * 3 // 4]
            value = orjson.dumps({"crawl_result": text})
        update = _headers("completed", draw(TIMESTAMPS), task_id=True, traceparent=None, extra=[])
        return Item("story", [story.messages[0], (ID, update, value)])
    status = draw(_STATUSES)
    headers = _headers(
        status, draw(TIMESTAMPS), task_id=status != "new", traceparent=None, extra=[]
    )
    if how == "garbage":
        value = b"{" + chunk * (draw(st.integers(10_000, KAFKA_MAX_VALUE)) // len(chunk))
        return Item("bad:invalid_json", [(None, headers, value[:KAFKA_MAX_VALUE])])
    if how == "huge body":
        name = {"new": "user_query", "completed": "crawl_result", "error": "error"}[status]
        body = {
            **_good_body(draw, status),
            name: "x" * draw(st.integers(100_000, KAFKA_MAX_VALUE - 1000)),
        }
        return Item("fuzz", [(None, headers, orjson.dumps(body))])
    extra: Headers = [(f"x-extra-{i}", chunk * 200) for i in range(draw(st.integers(50, 400)))]
    return Item("fuzz", [(None, headers + extra, orjson.dumps(_good_body(draw, status)))])


# -- anything at all -------------------------------------------------------------------------------

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(TEXT, max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
_WANTED_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        name: _JSON | TEXT.map(str) | EMAILS | URLS
        for name in ("user_email", "user_query", "base_url", "crawl_result", "error")
    },
)
_HEADER_NAMES = st.one_of(
    st.sampled_from(["task_type", "status", "timestamp", "task_id", "traceparent", "tracestate"]),
    st.text(max_size=8),
)
_HEADER_VALUES = st.one_of(
    st.none(),
    st.binary(max_size=24),
    st.sampled_from([b"web-crawl", b"new", b"completed", b"error", ID, ID.upper()]),
    st.sampled_from(EDGE_TIMESTAMPS),
    TIMESTAMPS.map(str.encode),
    _TRACEPARENTS.map(str.encode),
    st.text(max_size=12).map(str.encode),
)
_VALUES = st.one_of(
    st.none(),
    st.binary(max_size=64),
    _JSON.map(orjson.dumps),
    _WANTED_FIELDS.map(orjson.dumps),
    st.sampled_from(
        [
            b"",
            b"{}",
            b"[]",
            b"null",
            b"1e999999",
            b'{"user_query": "\\ud800"}',
            b"[" * 5000,
            b'{"a":' * 3000,
        ]
    ),
)


@st.composite
def fuzz(draw: st.DrawFn) -> Item:
    """Headers, key and value from anything plausible or not (the oracle decides)."""
    status = draw(st.none() | _STATUSES)
    headers: Headers = []
    if status is not None:  # often close to valid, so that the body is looked at too
        headers = _headers(
            status,
            draw(TIMESTAMPS | st.sampled_from([t.decode() for t in EDGE_TIMESTAMPS])),
            task_id=status != "new" and draw(st.booleans()),
            traceparent=None,
            extra=[],
        )
    headers += draw(st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), max_size=6))
    order = draw(st.permutations(range(len(headers))))
    key = draw(st.none() | st.binary(max_size=40) | st.just(ID))
    return Item("fuzz", [(key, [headers[i] for i in order], draw(_VALUES))])


BAD = st.one_of(bad_headers(), bad_json(), bad_bodies(), unknown_tasks(), fuzz())

# -- lay-out and oracle ----------------------------------------------------------------------------


def lay_out(items: list[Item], *, partitions: int, rng: random.Random) -> list[Sent]:
    """Fresh task ids for every item (the placeholder, and any task_id header that is a UUID),
    a partition for each item, and the items of each partition merged in random order (each
    item's messages keep theirs). Returns the messages in production order."""
    lanes: dict[int, list[list[Sent]]] = defaultdict(list)
    for item in items:
        task_id = str(uuid.UUID(int=rng.getrandbits(128), version=4)).encode()
        partition = rng.randrange(partitions)
        sents = []
        for key, headers, value in item.messages:
            fixed: Headers = []
            for name, raw in headers:
                if raw == ID:
                    raw = task_id
                elif raw == ID.upper():
                    raw = task_id.upper()
                elif name == "task_id" and raw is not None and _UUID.fullmatch(raw):
                    fresh = str(uuid.UUID(int=rng.getrandbits(128), version=4)).encode()
                    raw = fresh.upper() if raw.upper() == raw else fresh
                fixed.append((name, raw))
            sents.append(Sent(item.intent, task_id if key == ID else key, fixed, value, partition))
        lanes[partition].append(sents)
    out: list[Sent] = []
    for partition in sorted(lanes):
        queues = lanes[partition]
        while queues:
            pick = rng.randrange(len(queues))
            out.append(queues[pick].pop(0))
            if not queues[pick]:
                queues.pop(pick)
    return out


@dataclass
class Row:
    email: str
    query: str
    url: str
    received_at: datetime
    status: str = "new"
    result: str | None = None
    finished_at: datetime | None = None


@dataclass
class Expected:
    outcomes: dict[tuple[int, int], str] = field(
        default_factory=dict
    )  # created ... or dlq:<reason>
    rows: dict[str, Row] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)


def expect(messages: list[Sent], *, topic: str, result_limit: int) -> Expected:
    """What tm must do with each message (by partition and offset) and the rows it must leave."""
    out = Expected()
    stats = DecodeStats()
    for m in sorted(messages, key=lambda m: (m.partition, m.offset)):
        where = (m.partition, m.offset)
        try:
            item = decode(
                m.headers,
                m.value,
                topic=topic,
                partition=m.partition,
                offset=m.offset,
                timestamp_ms=m.timestamp_ms,
                max_result_chars=result_limit,
                stats=stats,
            )
        except Exception as exc:  # decode must never raise: the test names these messages
            out.outcomes[where] = f"raises:{type(exc).__name__}: {exc}"
            continue
        if isinstance(item, Rejected):
            out.outcomes[where] = f"dlq:{item.reason}"
        elif isinstance(item, NewTask):
            if item.id in out.rows:
                out.outcomes[where] = "duplicate"
            else:
                out.rows[item.id] = Row(
                    item.user_email, item.user_query, item.base_url, item.received_at
                )
                out.created.append(item.id)
                out.outcomes[where] = "created"
        else:
            assert isinstance(item, StatusUpdate)
            out.outcomes[where] = _apply(out.rows.get(item.id), item)
    return out


def _apply(row: Row | None, update: StatusUpdate) -> str:
    """tm_apply_status_updates for one update (tm.core.messages.update_outcome)."""
    stored = None if row is None else (TaskStatus(row.status), row.result, row.finished_at)
    outcome = update_outcome(stored, update.status, update.result, update.finished_at)
    if outcome is Outcome.UPDATED:
        assert row is not None
        row.status, row.result, row.finished_at = (
            update.status.value,
            update.result,
            update.finished_at,
        )
    if outcome in (Outcome.TASK_NOT_FOUND, Outcome.INVALID_TRANSITION):
        return f"dlq:{outcome.value}"
    return outcome.value
