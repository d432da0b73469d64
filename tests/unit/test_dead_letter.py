"""A dead letter always fits its budget: tm's headers first, then the key, the original headers
while they fit, the value in what is left; and headers say what was cut."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from tm.core import dead_letter
from tm.core.dead_letter import CUT_MARK, RECORD_OVERHEAD_BYTES, header_bytes

OURS = [("dlq_reason", "invalid_json"), ("dlq_error", "bad"), ("dlq_offset", "7")]


def record_bytes(
    key: bytes | str | None, value: bytes | None, headers: Sequence[dead_letter.Header]
) -> int:
    raw_key = key.encode() if isinstance(key, str) else key or b""
    size = RECORD_OVERHEAD_BYTES + len(raw_key) + len(value or b"")
    return size + sum(header_bytes(n, v) for n, v in headers)


def test_a_dead_letter_that_fits_is_unchanged() -> None:
    original = [("status", b"new")]
    key, value, headers = dead_letter.fit(
        max_bytes=10_000, key=b"k", value=b"v" * 100, headers=original, dlq_headers=OURS
    )
    assert (key, value, headers) == (b"k", b"v" * 100, [*original, *OURS])


def test_the_value_gets_what_the_headers_leave_and_its_length_is_recorded() -> None:
    original = [(f"h{i}", b"x" * 1000) for i in range(30)]
    key, value, headers = dead_letter.fit(
        max_bytes=20_000, key=None, value=b"v" * 100_000, headers=original, dlq_headers=OURS
    )
    marks = dict(h for h in headers if h[0] in ("dlq_value_bytes", "dlq_headers_dropped"))
    kept = [h for h in headers if h[0].startswith("h")]
    assert kept == original[: len(kept)]
    assert marks == {"dlq_value_bytes": "100000", "dlq_headers_dropped": str(30 - len(kept))}
    assert value == b"v" * len(value or b"")
    assert record_bytes(key, value, headers) <= 20_000


def test_a_huge_error_and_key_are_cut() -> None:
    ours = [("dlq_reason", "row_rejected"), ("dlq_error", "é" * 50_000)]
    key, value, headers = dead_letter.fit(
        max_bytes=8_000, key=b"k" * 50_000, value=b"v", headers=[], dlq_headers=ours
    )
    error = dict(headers)["dlq_error"]
    assert isinstance(error, str) and error.endswith(CUT_MARK) and error.startswith("éé")
    assert dict(headers)["dlq_key_bytes"] == "50000"
    assert record_bytes(key, value, headers) <= 8_000


@pytest.mark.parametrize("max_bytes", [4096, 5000, 20_000, 1_000_000])
@pytest.mark.parametrize("scale", [1, 100, 10_000])
def test_a_dead_letter_always_fits_and_keeps_every_dlq_header_in_order(
    max_bytes: int, scale: int
) -> None:
    original = [(f"header-{i}", b"x" * scale) for i in range(20)]
    ours = [*OURS, ("dlq_topic", "t" * 249), ("dlq_error", "e" * scale * 10)]
    key, value, headers = dead_letter.fit(
        max_bytes=max_bytes,
        key=b"k" * scale,
        value=b"v" * scale * 100,
        headers=original,
        dlq_headers=ours,
    )
    assert record_bytes(key, value, headers) <= max_bytes
    assert [n for n, _ in headers if n.startswith("dlq_")][: len(ours)] == [n for n, _ in ours]
