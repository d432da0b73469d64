"""What a run of tasks must leave behind, checked from outside tm: every task in the table
once, offsets committed only past applied messages; and the settings that make faults and
their recovery fit in a few seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from harness import wait_for
from harness.stack import Stack
from tm.traffic import new_task_message

# Fast retries and short timeouts so that a fault and its recovery fit in a few seconds.
FAST = {
    "TM_RETRY_BACKOFF_INITIAL_MS": "100",
    "TM_RETRY_BACKOFF_MAX_MS": "1000",
    "POSTGRES_QUERY_TIMEOUT": "2000",
    "POSTGRES_CONNECTION_TIMEOUT": "2000",
}
# What a worker logs when a batch failed and will be tried again.
RETRYING = "batch failed; nothing committed, retrying"
# A killed worker's group membership expires after the session timeout; keep it short.
SHORT_SESSION = {"KAFKA_SESSION_TIMEOUT": "6000", "KAFKA_HEARTBEAT_INTERVAL": "1000"}


def produce_new(stack: Stack, numbers: range, *, partition: int | None = None) -> set[str]:
    """Gateway `new` events for task n in ``numbers``; returns their users' emails."""
    stack.produce([(None, *new_task_message(n)) for n in numbers], partition=partition)
    return {f"user{n}@example.com" for n in numbers}


def emails(stack: Stack) -> set[str]:
    return {row[0] for row in stack.query("SELECT user_email FROM web_crawl_tasks")}


def assert_exactly_once(stack: Stack, expected: set[str]) -> None:
    total, distinct = stack.query(
        "SELECT count(*), count(DISTINCT user_email) FROM web_crawl_tasks"
    )[0]
    applied = emails(stack)
    assert not expected - applied, f"{len(expected - applied)} task(s) missing"
    assert not applied - expected, f"{len(applied - expected)} unexpected task(s)"
    assert (total, distinct) == (len(expected), len(expected)), "a task was applied twice"


def wait_all_applied(stack: Stack, expected: set[str], timeout_s: float = 30.0) -> None:
    wait_for(lambda: stack.count() >= len(expected), timeout_s=timeout_s, what="every task")
    wait_for(stack.all_committed, timeout_s=timeout_s, what="offsets committed to the end")
    assert_exactly_once(stack, expected)


@dataclass
class Snapshot:
    """The group's committed offsets, and the tasks in the table read right after them."""

    committed: dict[int, int]
    applied: set[str]


def snapshot(stack: Stack) -> Snapshot:
    committed = stack.committed()
    return Snapshot(committed, emails(stack))  # rows are never deleted: read after the offsets


def assert_committed_prefixes_applied(stack: Stack, snapshots: list[Snapshot]) -> None:
    """Every message below a committed offset was in the table when that offset was seen."""
    where = {}  # (partition, offset) -> user_email
    for message in stack.read_topic(stack.topic, timeout_s=30):
        email = orjson.loads(message.value())["user_email"]
        where[(message.partition(), message.offset())] = email
    for i, shot in enumerate(snapshots):
        unapplied = sorted(
            (p, o)
            for (p, o), email in where.items()
            if o < shot.committed.get(p, -1) and email not in shot.applied
        )
        assert not unapplied, (
            f"snapshot {i}: committed {shot.committed} passes {len(unapplied)} message(s) not"
            f" in the table, first {unapplied[:5]}"
        )


def terminate_backends(stack: Stack) -> int:
    """pg_terminate_backend every connection tm holds to the stack's database."""
    rows = stack.query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'tm' AND datname = $1 AND pid <> pg_backend_pid()",
        stack.database,
    )
    return sum(1 for row in rows if row[0])
