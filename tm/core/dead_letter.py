"""Dead letters that fit: a dead letter cut to the largest record the producer may send.

Kafka refuses a record larger than its topic's ``max.message.bytes``, and a refused dead letter
would fail its batch at every retry. So :func:`fit` cuts a dead letter to a byte budget, in
this order of importance: tm's own ``dlq_*`` headers (``dlq_error`` cut if it must), the key,
the original headers in order while they fit, and the value in what is left. Headers say what
was cut: ``dlq_key_bytes`` and ``dlq_value_bytes`` (the original lengths) and
``dlq_headers_dropped`` (how many original headers were left out).
"""

from __future__ import annotations

from collections.abc import Sequence

from tm.core.messages import DLQ_ERROR, DLQ_HEADERS_DROPPED, DLQ_KEY_BYTES, DLQ_VALUE_BYTES

# Bytes a record adds to its key, value and headers, as librdkafka counts them against
# message.max.bytes (length, attributes, timestamp and offset deltas, varint lengths: 36).
RECORD_OVERHEAD_BYTES = 64
HEADER_OVERHEAD_BYTES = 10  # per header: the varint lengths of its name and value, 5 at most each
# What a cut dlq_error ends with, so that a reader knows the text goes on.
CUT_MARK = " [cut]"
# Room kept for each header saying what was cut (its name, up to 12 digits, its overhead).
_MARKER_BYTES = {
    name: len(name) + 12 + HEADER_OVERHEAD_BYTES
    for name in (DLQ_VALUE_BYTES, DLQ_KEY_BYTES, DLQ_HEADERS_DROPPED)
}

Header = tuple[str, bytes | str | None]


def header_bytes(name: str, value: bytes | str | None) -> int:
    """What a header costs in a record."""
    size = 0 if value is None else len(value.encode() if isinstance(value, str) else value)
    return len(name.encode()) + size + HEADER_OVERHEAD_BYTES


def fit(
    *,
    max_bytes: int,
    key: bytes | str | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]],
    dlq_headers: Sequence[tuple[str, str]],
) -> tuple[bytes | str | None, bytes | None, list[Header]]:
    """The key, value and headers (original headers first, then ``dlq_headers`` and the marks
    of what was cut) of a dead letter of at most ``max_bytes`` as librdkafka counts them."""
    left = max_bytes - RECORD_OVERHEAD_BYTES - sum(_MARKER_BYTES.values())
    left -= sum(header_bytes(n, v) for n, v in dlq_headers if n != DLQ_ERROR)
    ours: list[Header] = []
    for name, text in dlq_headers:
        if name == DLQ_ERROR:
            # At most half of what is left: the rest is for the original message.
            text = _cut_text(text, max(left // 2 - HEADER_OVERHEAD_BYTES - len(name), 0))
            left -= header_bytes(name, text)
        ours.append((name, text))
    marks: list[Header] = []
    if key is not None:
        raw_key = key.encode() if isinstance(key, str) else key
        if len(raw_key) > max(left, 0):
            marks.append((DLQ_KEY_BYTES, str(len(raw_key))))
            key = raw_key[: max(left, 0)]
            raw_key = key
        left -= len(raw_key)
    kept: list[Header] = []
    for name, header_value in headers:
        size = header_bytes(name, header_value)
        if size > left:
            break
        kept.append((name, header_value))
        left -= size
    if len(kept) < len(headers):
        marks.append((DLQ_HEADERS_DROPPED, str(len(headers) - len(kept))))
    if value is not None and len(value) > max(left, 0):
        marks.append((DLQ_VALUE_BYTES, str(len(value))))
        value = value[: max(left, 0)]
    return key, value, [*kept, *ours, *marks]


def _cut_text(text: str, limit_bytes: int) -> str:
    """``text`` in at most ``limit_bytes`` of UTF-8, ending with CUT_MARK when it was cut."""
    raw = text.encode()
    if len(raw) <= limit_bytes:
        return text
    if limit_bytes < len(CUT_MARK):
        return ""
    return raw[: limit_bytes - len(CUT_MARK)].decode(errors="ignore") + CUT_MARK
