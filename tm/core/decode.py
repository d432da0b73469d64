"""Raw Kafka message parts -> ``NewTask | StatusUpdate | Rejected`` (``decode``), and a poll's
messages -> the ``Batch`` of their results (``decode_poll``).

Pure and cheap (a few microseconds per message): no I/O, no clock. The Kafka coordinates are
passed in because a ``new`` event without a ``task_id`` header gets a UUIDv5 of them, so a
redelivery finds the same row.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import msgspec

from tm.core.batch import Batch
from tm.core.messages import (
    COMPLETED_DECODER,
    ERROR_DECODER,
    MAX_ERROR_CHARS,
    NEW_TASK_DECODER,
    TASK_ID_NAMESPACE,
    TASK_TYPE,
    Decoded,
    NewTask,
    Reason,
    Rejected,
    StatusUpdate,
    TaskStatus,
)

# Used with fullmatch: `$` alone would accept a trailing newline.
_EMAIL_RE = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_ISO_UTC_MS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")  # the gateway's form
# W3C trace context; version ff, an all-zero trace id and an all-zero span id are invalid.
_TRACEPARENT_RE = re.compile(
    r"^(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$"
)
# The usual shape of a base_url, which _valid_url accepts without urlsplit.
_COMMON_URL_RE = re.compile(r"https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:[/?#]\S*)?")
_STATUSES = {s.value: s for s in TaskStatus}
_NEW, _COMPLETED = TaskStatus.NEW, TaskStatus.COMPLETED  # a third of the cost of TaskStatus.NEW
_WANTED = frozenset({"task_type", "status", "timestamp", "task_id", "traceparent", "tracestate"})
_MAX_TRACESTATE = 512
_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
_NOT_UTF8 = "\ufffd"  # stands for a trace header that is not UTF-8; no check accepts it
# Epoch milliseconds accepted in the timestamp header: years 1970..9999.
_MAX_EPOCH_MS = 253_402_300_799_999
# asyncpg stores the first and last instants Python has as PostgreSQL's -infinity/infinity.
# A tuple, not a set: hashing an aware datetime costs more than parsing one.
_INFINITIES = (datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC))
# PostgreSQL text cannot hold U+0000 (SQLSTATE 22021), and crawled binary pages often
# contain it: such a body is refused here, one `in` per field, before a database round trip.
_NUL = "\x00"

Headers = Sequence[tuple[str, bytes | None]] | None


class RawMessage(Protocol):
    """What tm reads of a consumed message (tm.adapters.kafka returns confluent_kafka's): the
    decoder, the dead letters (key, value, headers, where it came from) and the traces."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def timestamp(self) -> tuple[int, int]: ...  # (timestamp type, milliseconds)
    # Headers, for a consumed message (the stubs also allow a dict, for produce()); Any, as a
    # cast() per message would be a function call.
    def headers(self) -> Any: ...
    def value(self) -> bytes | None: ...
    def key(self) -> bytes | None: ...


class DecodeStats:
    """Counts the pipeline reports as metrics: trace contexts dropped as invalid."""

    __slots__ = ("invalid_trace_context",)

    def __init__(self) -> None:
        self.invalid_trace_context = 0


def parse_timestamp(raw: str) -> datetime | None:
    """ISO-8601 (a missing zone means UTC) or epoch-milliseconds digits; None if neither."""
    if _NUL in raw:  # datetime.fromisoformat accepts a trailing NUL
        return None
    if raw.isdigit():
        if not raw.isascii():  # "²" is a digit to str.isdigit, and int() refuses it
            return None
        millis = int(raw)
        if millis > _MAX_EPOCH_MS:
            return None
        return datetime.fromtimestamp(millis / 1000, UTC)
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        utc = parsed.astimezone(UTC)  # 0001-01-01T00:00+05:00 is before year 1 in UTC
    except OverflowError:
        return None
    if utc in _INFINITIES:
        return None
    return parsed


def _parse_iso_utc_ms(raw: str) -> datetime | None:
    """parse_timestamp of a timestamp that _ISO_UTC_MS_RE matches, without the checks it cannot
    fail: no NUL, not all digits, in UTC (so no overflow), and never the last instant."""
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:  # 2025-02-30
        return None
    return None if parsed == _INFINITIES[0] else parsed


def valid_traceparent(raw: str) -> bool:
    return _TRACEPARENT_RE.fullmatch(raw) is not None


# sha1(namespace + "<topic>/") per topic, copied per message: uuid.uuid5 costs 3x more.
_ID_PREFIXES: dict[str, hashlib._Hash] = {}
# The digest's hex digit -> the UUID's variant digit: RFC 4122 sets its top two bits to 10.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def new_task_id(topic: str, partition: int, offset: int, timestamp_ms: int) -> str:
    """The id of a ``new`` event without a task_id header: the UUIDv5 (namespace
    TASK_ID_NAMESPACE, name ``topic/partition/offset/timestamp_ms``), stable across
    redeliveries; the same value as ``str(uuid.uuid5(...))``."""
    prefix = _ID_PREFIXES.get(topic)
    if prefix is None:
        prefix = _ID_PREFIXES[topic] = hashlib.sha1(  # noqa: S324 (UUIDv5 is defined on SHA-1)
            TASK_ID_NAMESPACE.bytes + f"{topic}/".encode()
        )
    digest = prefix.copy()
    digest.update(f"{partition}/{offset}/{timestamp_ms}".encode())
    h = digest.hexdigest()  # its first 32 digits, with the version (5) and variant set
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


def iso_utc(moment: datetime) -> str:
    """ISO-8601 in UTC with milliseconds and a Z, as the gateway writes it."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def truncate_error(text: str) -> str:
    if len(text) <= MAX_ERROR_CHARS:
        return text
    return f"{text[:MAX_ERROR_CHARS]}… [truncated: {len(text)} chars in all]"


def _valid_url(url: str) -> bool:
    # urlsplit costs ten times the regex, and accepts whatever the regex matches: it starts
    # with a letter (nothing to strip), has no tab or newline (nothing to remove), no space,
    # and urlsplit reads its scheme as http(s) and its netloc, up to the first / ? or #, as a
    # non-empty ASCII host with no userinfo or brackets (nothing to raise on).
    # tests/unit/test_decode_fast_paths.py checks this with hypothesis.
    return _COMMON_URL_RE.fullmatch(url) is not None or _valid_url_split(url)


def _valid_url_split(url: str) -> bool:
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and " " not in url
    except ValueError:
        return False


def _rejected(found: dict[str, str], reason: Reason, error: str) -> Rejected:
    """A rejection, with the message's trace context when it had a valid one (for its span)."""
    traceparent = found.get("traceparent")
    if traceparent is not None and not valid_traceparent(traceparent):
        traceparent = None
    return Rejected(reason, error, traceparent)


def _nul_in(found: dict[str, str], field: str) -> Rejected:
    return _rejected(
        found,
        Reason.INVALID_BODY,
        f"Contains a NUL character (\\u0000), which PostgreSQL text cannot hold - at `$.{field}`",
    )


def decode(
    headers: Headers,
    value: bytes | None,
    *,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int,
    max_result_chars: int,
    stats: DecodeStats,
) -> Decoded:
    """Validate one message; never raises for bad input (the result says why)."""
    found: dict[str, str] = {}
    if headers:
        for key, raw in headers:
            if key in _WANTED and key not in found and raw is not None:
                try:
                    found[key] = raw.decode()
                except UnicodeDecodeError:
                    if key not in _TRACE_HEADERS:
                        return Rejected(Reason.INVALID_HEADERS, f"header {key}: not valid UTF-8")
                    found[key] = _NOT_UTF8  # an invalid trace context: dropped, not the message

    task_type = found.get("task_type")
    if task_type != TASK_TYPE:
        got = "missing" if task_type is None else f"got {task_type!r}"
        return _rejected(
            found, Reason.INVALID_HEADERS, f"header task_type: expected 'web-crawl', {got}"
        )
    status = _STATUSES.get(found.get("status", ""))
    if status is None:
        got = "missing" if "status" not in found else f"got {found['status']!r}"
        return _rejected(
            found, Reason.INVALID_HEADERS, f"header status: expected new, completed or error, {got}"
        )
    raw_ts = found.get("timestamp")
    if raw_ts is None:
        return _rejected(found, Reason.INVALID_HEADERS, "header timestamp: missing")
    if _ISO_UTC_MS_RE.fullmatch(raw_ts):
        # The gateway's (and crawlers') form: fromisoformat alone reads it, and the crawl
        # request and the task event keep it as it came.
        timestamp_text: str | None = raw_ts
        timestamp = _parse_iso_utc_ms(raw_ts)
    else:
        timestamp_text = None
        timestamp = parse_timestamp(raw_ts)
    if timestamp is None:
        return _rejected(
            found,
            Reason.INVALID_HEADERS,
            f"header timestamp: expected ISO-8601 or epoch milliseconds, got {raw_ts!r}",
        )
    raw_id = found.get("task_id")
    task_id: str | None = None
    if raw_id is not None:
        if not _UUID_RE.fullmatch(raw_id):
            return _rejected(
                found, Reason.INVALID_HEADERS, f"header task_id: not a UUID: {raw_id!r}"
            )
        task_id = raw_id.lower()
    elif status is not _NEW:
        return _rejected(
            found, Reason.INVALID_HEADERS, f"header task_id: required for status {status}"
        )

    traceparent = found.get("traceparent")
    tracestate = found.get("tracestate")
    if traceparent is not None and not _TRACEPARENT_RE.fullmatch(traceparent):
        stats.invalid_trace_context += 1
        traceparent = tracestate = None
    elif tracestate is not None and (
        traceparent is None or len(tracestate) > _MAX_TRACESTATE or tracestate is _NOT_UTF8
    ):
        tracestate = None

    body = value if value is not None else b"{}"
    try:
        if status is _NEW:
            new = NEW_TASK_DECODER.decode(body)
            if _NUL in new.user_email:
                return _nul_in(found, "user_email")
            if _NUL in new.user_query:
                return _nul_in(found, "user_query")
            if _NUL in new.base_url:
                return _nul_in(found, "base_url")
            if not _EMAIL_RE.fullmatch(new.user_email):
                return _rejected(
                    found, Reason.INVALID_BODY, "Expected an e-mail address - at `$.user_email`"
                )
            if not _valid_url(new.base_url):
                return _rejected(
                    found,
                    Reason.INVALID_BODY,
                    "Expected an http(s) URL with a host - at `$.base_url`",
                )
            return NewTask(
                task_id or new_task_id(topic, partition, offset, timestamp_ms),
                new.user_email,
                new.user_query,
                new.base_url,
                timestamp,
                timestamp_text if timestamp_text is not None else iso_utc(timestamp),
                traceparent,
                tracestate,
            )
        if status is _COMPLETED:
            result = COMPLETED_DECODER.decode(body).crawl_result
            if len(result) > max_result_chars:
                return _rejected(
                    found,
                    Reason.RESULT_TOO_LARGE,
                    f"crawl_result has {len(result)} chars; the limit is {max_result_chars}"
                    " - at `$.crawl_result`",
                )
            if _NUL in result:
                return _nul_in(found, "crawl_result")
        else:
            text = ERROR_DECODER.decode(body).error
            if _NUL in text:
                return _nul_in(found, "error")
            result = truncate_error(text)
    except msgspec.ValidationError as exc:
        return _rejected(found, Reason.INVALID_BODY, str(exc))
    except msgspec.DecodeError as exc:
        return _rejected(found, Reason.INVALID_JSON, str(exc))
    except UnicodeDecodeError as exc:  # msgspec's, for a string field that is not UTF-8
        return _rejected(found, Reason.INVALID_JSON, f"JSON text is not valid UTF-8: {exc}")
    except RecursionError:  # msgspec's, skipping an unknown field nested thousands deep
        return _rejected(found, Reason.INVALID_JSON, "JSON nested too deeply")
    assert task_id is not None  # checked above for completed/error  # noqa: S101
    return StatusUpdate(task_id, status, result, timestamp, traceparent, tracestate, timestamp_text)


def decode_poll(
    messages: Sequence[RawMessage], *, topic: str, max_result_chars: int, stats: DecodeStats
) -> Batch:
    """Decode a poll's messages into a Batch, in poll order (a few microseconds per message)."""
    batch = Batch()
    for ref, message in enumerate(messages):
        partition = message.partition()
        offset = message.offset()
        if partition is None or offset is None:  # pragma: no cover (errors are filtered)
            continue
        timestamp_ms = message.timestamp()[1]
        item = decode(
            message.headers(),
            message.value(),
            topic=topic,
            partition=partition,
            offset=offset,
            timestamp_ms=timestamp_ms,
            max_result_chars=max_result_chars,
            stats=stats,
        )
        batch.add(ref, partition, offset, item, timestamp_ms)
    return batch
