"""Bad input at volume: a few thousand hypothesis-generated messages (headers and bodies, valid
and invalid, some near Kafka's 1 MB limit) through a real `tm run`, the good ones interleaved
with them. No worker may die; every message must be accounted for exactly once, as the oracle
of tests/e2e/bad_input.py says: a row created or updated (or left unchanged, or a duplicate)
or one dead letter with its reason; the table must hold exactly the rows it predicts, in the
states it predicts; one crawl request per created task.

Hypothesis caps the entropy of one example at 8 KiB, a few small messages, so the thousands come
from a few hundred examples of a few items each: a ``@given`` collector keeps what each
example draws (generation only, no shrinking: tm runs once, on everything). The seed is
random and printed on failure; ``TM_BAD_INPUT_SEED=<seed>`` replays the same messages.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from harness.kafka import KafkaHeaders
from harness.stack import Stack
from harness.tm import TmRun
from tests.e2e import bad_input
from tests.e2e.bad_input import RESULT_LIMIT, Item, Sent, expect, lay_out
from tm.adapters import kafka

pytestmark = pytest.mark.e2e

SEED = int(os.environ.get("TM_BAD_INPUT_SEED") or random.SystemRandom().randrange(2**32))
PER_EXAMPLE = 5
GOOD_EXAMPLES = 120  # x 5 items: gateway `new` events and tasks with their updates
BAD_EXAMPLES = 300  # x 5 items: broken headers, JSON, bodies, unknown tasks, anything at all
BIG_EXAMPLES = 12  # one item each, up to ~900 kB
COMMIT_TIMEOUT_S = 120.0
APPLIED = {"created", "duplicate", "updated", "unchanged"}


def collect(strategy: st.SearchStrategy[Item], examples: int, per_example: int) -> list[Item]:
    """What ``examples`` hypothesis examples of ``per_example`` items each drew."""
    items: list[Item] = []

    @seed(SEED)
    @settings(
        max_examples=examples,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(strategy, min_size=per_example, max_size=per_example))
    def keep(drawn: list[Item]) -> None:
        items.extend(drawn)

    keep()
    return items


def produce(stack: Stack, messages: list[Sent]) -> None:
    """Produce in order, each to its partition; record where Kafka put it."""
    failures: list[str] = []
    producer = Producer(
        {**kafka.client_config(stack.settings.kafka), "enable.idempotence": True, "acks": "all"}
    )
    for sent in messages:

        def delivered(error: Any, message: Any, sent: Sent = sent) -> None:
            if error is not None:
                failures.append(f"{error}: {sent.describe()}")
            else:
                sent.offset = message.offset()
                sent.timestamp_ms = message.timestamp()[1]

        # A copy typed as produce()'s stubs want it (str | bytes | None values; list is invariant).
        headers: KafkaHeaders = list(sent.headers)
        while True:
            try:
                producer.produce(
                    stack.topic,
                    key=sent.key,
                    value=sent.value,
                    headers=headers,
                    partition=sent.partition,
                    on_delivery=delivered,
                )
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    assert producer.flush(60) == 0
    assert failures == [], failures[:5]


def wait_committed(stack: Stack, tm: TmRun) -> None:
    deadline = time.monotonic() + COMMIT_TIMEOUT_S
    while not stack.all_committed():
        output = tm.output()
        died = [line for line in output.splitlines() if "worker died" in line]
        if died or time.monotonic() > deadline:
            tail = "\n".join(output.splitlines()[-20:])
            pytest.fail(f"seed {SEED}: not all committed ({len(died)} worker deaths):\n{tail}")
        time.sleep(0.5)


def test_thousands_of_generated_messages_are_each_applied_or_dead_lettered_once(
    stack: Stack, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    items = (
        collect(bad_input.GOOD, GOOD_EXAMPLES, PER_EXAMPLE)
        + collect(bad_input.BAD, BAD_EXAMPLES, PER_EXAMPLE)
        + collect(bad_input.oversized(), BIG_EXAMPLES, 1)
    )
    messages = lay_out(items, partitions=stack.partitions, rng=rng)
    tm = TmRun(stack, tmp_path, TM_MAX_RESULT_CHARS=str(RESULT_LIMIT))
    try:
        tm.wait_assigned(stack.partitions)
        produce(stack, messages)
        wait_committed(stack, tm)
    finally:
        code = tm.stop()
    output = tm.output()
    where = f"seed {SEED} (TM_BAD_INPUT_SEED={SEED} replays it)"

    assert "worker died" not in output, f"{where}\n{output[-3000:]}"
    assert code == 0, f"{where}\n{output[-3000:]}"

    expected = expect(messages, topic=stack.topic, result_limit=RESULT_LIMIT)
    by_place = {(m.partition, m.offset): m for m in messages}
    raised = [
        f"{outcome}: {by_place[place].describe()}"
        for place, outcome in expected.outcomes.items()
        if outcome.startswith("raises:")
    ]
    assert raised == [], f"{where}: decode raised for {len(raised)} messages: {raised[:5]}"

    # The generator made what it meant to: good items applied, known-bad ones refused as meant.
    def meant(m: Sent, outcome: str) -> bool:
        if m.intent == "good":
            return outcome in APPLIED
        if m.intent.startswith("bad:"):
            return outcome == f"dlq:{m.intent[4:]}"
        return True

    unmeant = [
        f"{outcome}: {m.describe()}"
        for m in messages
        if not meant(m, outcome := expected.outcomes[(m.partition, m.offset)])
    ]
    assert unmeant == [], f"{where}: {len(unmeant)} messages are not what they meant: {unmeant[:5]}"

    letters = stack.read_topic(stack.dlq_topic, timeout_s=60)
    dead: Counter[tuple[int, int]] = Counter()
    reasons: dict[tuple[int, int], str] = {}
    for letter in letters:
        headers = dict(letter.headers() or [])
        place = (int(headers["dlq_partition"]), int(headers["dlq_offset"]))
        dead[place] += 1
        reasons[place] = headers["dlq_reason"].decode()
        assert headers["dlq_error"].strip(), place
        assert letter.key() == by_place[place].key, place
    rows = {
        str(r["id"]): r
        for r in stack.query(
            "SELECT id, status::text, result, user_email, user_query, original_url,"
            " received_at, finished_at FROM web_crawl_tasks"
        )
    }
    requests = Counter(
        m.key().decode() for m in stack.read_topic(stack.requests_topic, timeout_s=60)
    )

    # Each message exactly once: one dead letter with the predicted reason, or none.
    wrong = []
    for place, outcome in sorted(expected.outcomes.items()):
        got = f"dlq:{reasons[place]}" if place in reasons else "applied"
        want = outcome if outcome.startswith("dlq:") else "applied"
        if got != want or dead[place] > 1:
            wrong.append(f"want {outcome}, got {got} x{dead[place]}: {by_place[place].describe()}")
    stray = [place for place in dead if place not in expected.outcomes]
    summary = (
        f"{where}: {len(messages)} messages ({Counter(m.intent for m in messages)}),"
        f" expected {Counter(expected.outcomes.values())}; {len(letters)} dead letters"
        f" ({Counter(reasons.values())}), {len(rows)} rows"
    )
    print(summary)
    assert wrong == [] and stray == [], f"{summary}\n{len(wrong)} wrong: {wrong[:8]}; stray {stray}"

    # The table: exactly the predicted rows, each in its predicted state.
    assert set(rows) == set(expected.rows), summary
    for task_id, want_row in expected.rows.items():
        row = rows[task_id]
        got_row = (
            row["status"],
            row["result"],
            row["user_email"],
            row["user_query"],
            row["original_url"],
            row["received_at"],
            row["finished_at"],
        )
        want_tuple = (
            want_row.status,
            want_row.result,
            want_row.email,
            want_row.query,
            want_row.url,
            want_row.received_at,
            want_row.finished_at,
        )
        assert got_row == want_tuple, f"{summary}\n{task_id}: got {got_row}, want {want_tuple}"
    # One crawl request per created task, none for anything else.
    assert requests == Counter(expected.created), summary
    assert all(uuid.UUID(task_id) for task_id in requests)
