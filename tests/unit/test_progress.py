"""A worker's progress line (tm.worker.progress): the interval's counts from real batch records
(the pipeline on fakes), the rate, and the p99 from the latency buckets."""

from __future__ import annotations

import asyncio

import orjson

from tests.fakes import FakeDatabase, FakeMessage, FakeSink, run_stages
from tm import config
from tm.observability.metrics import LATENCY_BUCKETS_S
from tm.pipeline import BatchRecord, Pipeline
from tm.worker.progress import Progress, log_progress, quantile_ms

TS = b"2025-08-10T10:18:59.023Z"


def new(n: int, *, body: bytes | None = None) -> FakeMessage:
    headers = [("task_type", b"web-crawl"), ("status", b"new"), ("timestamp", TS)]
    value = body or orjson.dumps(
        {"user_email": f"u{n}@example.com", "user_query": "q", "base_url": "https://x.io"}
    )
    return FakeMessage(headers, value, 0, n)


def batch(messages: list[FakeMessage], database: FakeDatabase) -> BatchRecord:
    pipeline = Pipeline(
        settings=config.load({}), database=database, sink=FakeSink(), run_io=asyncio.to_thread
    )
    return asyncio.run(run_stages(pipeline, messages))


def buckets(**at_bound_ms: int) -> list[int]:
    """Bucket counts: ``b25=3`` puts 3 values in the bucket whose upper bound is 25 ms."""
    counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
    for name, count in at_bound_ms.items():
        counts[[round(b * 1000) for b in LATENCY_BUCKETS_S].index(int(name[1:]))] = count
    return counts


def test_a_line_sums_the_interval_by_outcome_and_reason_with_rate_lag_and_p99() -> None:
    database = FakeDatabase()
    progress = Progress(30.0, now=100.0, slot=1)
    progress.add(batch([new(1), new(2), new(3)], database), buckets(b10=3))
    again = batch([new(1), new(4), new(5, body=b"{not json")], database)
    progress.add(again, buckets(b10=1, b25=1))
    fields = progress.take(130.0, lag=42)
    assert fields == {
        "slot": 1,
        "applied": 6,
        "created": 4,
        "duplicate": 1,
        "dlq_invalid_json": 1,
        "rate_per_s": 0.2,
        "lag": 42,
        "e2e_p99_ms": 24.3,
    }


def test_an_interval_without_messages_has_no_line_and_each_line_starts_afresh() -> None:
    progress = Progress(30.0, now=0.0)
    assert progress.take(30.0, lag=0) is None
    progress.add(batch([new(1)], FakeDatabase()), buckets(b5=1))
    assert progress.take(60.0, lag=0) is not None
    assert progress.take(90.0, lag=0) is None


def test_no_lines_at_interval_zero() -> None:
    async def lag() -> int:
        raise AssertionError("no line, so no lag to read")

    asyncio.run(log_progress(Progress(0.0, now=0.0), lag))  # returns at once


def test_the_quantile_interpolates_within_its_bucket_and_stops_at_the_last_bound() -> None:
    assert quantile_ms(buckets(), 0.99) is None
    assert quantile_ms(buckets(b5=100), 0.5) == 2.5
    assert quantile_ms(buckets(b5=50, b10=50), 0.99) == 9.9
    above = [0] * len(LATENCY_BUCKETS_S) + [10]
    assert quantile_ms(above, 0.99) == LATENCY_BUCKETS_S[-1] * 1000
