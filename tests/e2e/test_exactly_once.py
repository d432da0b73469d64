"""Exactly-once mode (TM_DELIVERY=exactly-once), end to end: a crawler reading with
``isolation.level=read_committed`` sees every crawl request and every dead letter once; a
transaction aborted after its crawl requests were written leaves none of them visible and its
batch is published once afterwards; of two tm with the same identity one stops, and nothing is
lost or doubled.
"""

from __future__ import annotations

import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient
from prometheus_client.parser import text_string_to_metric_families

from harness import wait_for
from harness.kafka import KafkaHeaders
from harness.outcomes import FAST, SHORT_SESSION, produce_new, wait_all_applied
from harness.stack import Stack
from harness.tm import TmRun
from tm.adapters import kafka
from tm.traffic import new_task_message

pytestmark = pytest.mark.e2e

EXACTLY_ONCE = {"TM_DELIVERY": "exactly-once"}


def keys(stack: Stack, topic: str, *, uncommitted: bool = False) -> Counter[bytes | None]:
    """How many times each key was written to ``topic``, as a read_committed reader sees it
    (or every record written, ``uncommitted``)."""
    return Counter(m.key() for m in stack.read_topic(topic, timeout_s=30, uncommitted=uncommitted))


def metric(tm: TmRun, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{tm.port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def new(n: int) -> tuple[None, KafkaHeaders, bytes]:
    headers, value = new_task_message(n)
    return None, headers, value


def bad_message(n: int) -> tuple[None, KafkaHeaders, bytes]:
    """A `new` event whose body is not JSON: a dead letter."""
    headers, _ = new_task_message(n)
    return None, headers, b"{"


def test_each_crawl_request_and_dead_letter_is_read_committed_once(
    stack: Stack, tmp_path: Path
) -> None:
    tm = TmRun(stack, tmp_path, TM_WORKERS="2", **EXACTLY_ONCE)
    try:
        tm.wait_assigned(stack.partitions)
        expected = produce_new(stack, range(300))
        stack.produce([bad_message(n) for n in range(300, 305)])
        wait_all_applied(stack, expected)  # the offsets, committed by the transactions
        wait_for(lambda: metric(tm, "tm_transactions_total", outcome="committed") > 0)
        assert metric(tm, "tm_stage_duration_seconds_count", stage="transaction") > 0
        assert metric(tm, "tm_stage_duration_seconds_count", stage="commit") == 0
    finally:
        code = tm.stop()
    assert code == 0, tm.output()
    requests = keys(stack, stack.requests_topic)
    assert len(requests) == 300 and set(requests.values()) == {1}
    assert sum(keys(stack, stack.dlq_topic).values()) == 5


def test_an_aborted_transaction_shows_nothing_and_its_batch_is_published_once_after(
    stack: Stack, tmp_path: Path
) -> None:
    """The dead-letter topic is deleted: each transaction holding a dead letter fails, after
    its crawl requests were written, and is aborted; the batch is retried until the topic is
    back, then committed once."""
    admin = AdminClient(stack.kafka_config)
    tm = TmRun(
        stack,
        tmp_path,
        TM_WORKERS="1",
        KAFKA_REQUEST_TIMEOUT="5000",  # a message to the missing topic fails within 5 s
        **FAST,
        **EXACTLY_ONCE,
    )
    try:
        tm.wait_assigned(stack.partitions)
        for future in admin.delete_topics([stack.dlq_topic], operation_timeout=30).values():
            future.result(30)
        # One produce request, one batch of tm's: a dead letter and 20 crawl requests.
        stack.produce([bad_message(20), *(new(n) for n in range(20))], partition=0)
        expected = {f"user{n}@example.com" for n in range(20)}
        wait_for(
            lambda: metric(tm, "tm_transactions_total", outcome="aborted") >= 2,
            timeout_s=60,
            what="transactions aborted while the dead-letter topic is missing",
        )
        assert stack.count() == 20  # applied in the database, idempotently, on every retry
        assert keys(stack, stack.requests_topic) == Counter()  # nothing visible yet
        kafka.create_topics(stack.settings.kafka, [stack.dlq_topic], partitions=stack.partitions)
        wait_all_applied(stack, expected, timeout_s=90)
    finally:
        code = tm.stop()
    assert code == 0, tm.output()
    assert "transaction aborted" in tm.output()
    requests = keys(stack, stack.requests_topic)
    assert len(requests) == 20 and set(requests.values()) == {1}
    # The aborted transactions did write their crawl requests: only the aborts hide them.
    assert sum(keys(stack, stack.requests_topic, uncommitted=True).values()) > 20
    assert sum(keys(stack, stack.dlq_topic).values()) == 1


@pytest.mark.parametrize("delivery", ["exactly-once", "at-least-once"])
def test_two_tm_with_the_same_identity_one_stops_and_nothing_is_lost_or_doubled(
    stack: Stack, tmp_path: Path, delivery: str
) -> None:
    """A second tm started with the first's static instance id (a misconfiguration, or a pod
    that came back while its replacement runs): they fence each other (exactly-once: their
    producers too) until one is fenced as a group member and halts (exit 1) instead of fencing
    back; the other applies everything once (exactly-once: and publishes it once). Before, the
    fenced consumer's fatal error was logged as a warning and its worker lived on, consuming
    nothing."""
    same = {
        "KAFKA_GROUP_INSTANCE_ID": "tm-0",
        "TM_WORKERS": "1",
        "TM_DELIVERY": delivery,
        **SHORT_SESSION,
        **FAST,
    }
    first = TmRun(stack, tmp_path, **same)
    second: TmRun | None = None
    feeder = None
    try:
        first.wait_assigned(stack.partitions)
        feeder = stack.feed(count=4000, rate=400)
        wait_for(lambda: stack.count() > 500, what="the first tm busy")
        second = TmRun(stack, tmp_path, **same)
        runs = (first, second)
        halted = wait_for(
            lambda: [r for r in runs if r.process.poll() is not None],
            timeout_s=90,
            what="one of the two halted",
        )
        (stopped,) = halted
        assert stopped.process.returncode == 1, stopped.output()
        assert "was fenced" in stopped.output(), stopped.output()
        feeder.join()
        wait_all_applied(stack, feeder.expected, timeout_s=90)
        (survivor,) = [r for r in runs if r is not stopped]
        assert survivor.process.poll() is None, survivor.output()
    finally:
        if feeder is not None:
            feeder.stop()
        first.close()
        if second is not None:
            second.close()
    requests = keys(stack, stack.requests_topic)
    assert len(requests) == 4000
    if delivery == "exactly-once":
        assert set(requests.values()) == {1}
