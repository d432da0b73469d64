"""The consumer's set-based functions, called with asyncpg array arguments exactly as the
consumer calls them: one call per batch, one outcome per input row, in input order."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import pytest

from tests.conftest import until_waiting_for_a_lock
from tm.adapters.postgres import translate_error
from tm.core.messages import Outcome
from tm.errors import RowRejectedError

pytestmark = pytest.mark.integration

CREATE_TASKS = (
    "SELECT ord, id, outcome FROM tm_create_tasks("
    "$1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])"
)
APPLY_UPDATES = (
    "SELECT ord, outcome FROM tm_apply_status_updates("
    "$1::uuid[], $2::task_status[], $3::text[], $4::timestamptz[])"
)
RECEIVED_AT = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
FINISHED_AT = dt.datetime(2024, 5, 1, 12, 5, tzinfo=dt.UTC)


@dataclass(frozen=True)
class NewTask:
    id: uuid.UUID
    user_email: str = "ann@example.com"
    user_query: str = "cats"
    original_url: str = "https://example.com"
    received_at: dt.datetime = RECEIVED_AT


@dataclass(frozen=True)
class Update:
    id: uuid.UUID
    status: str
    result: str
    finished_at: dt.datetime = FINISHED_AT


async def create_tasks(
    db: asyncpg.Connection, tasks: Sequence[NewTask]
) -> list[tuple[int, uuid.UUID, str]]:
    rows = await db.fetch(
        CREATE_TASKS,
        [t.id for t in tasks],
        [t.user_email for t in tasks],
        [t.user_query for t in tasks],
        [t.original_url for t in tasks],
        [t.received_at for t in tasks],
    )
    return [(row["ord"], row["id"], row["outcome"]) for row in rows]


async def apply_updates(db: asyncpg.Connection, updates: Sequence[Update]) -> list[tuple[int, str]]:
    """Statuses go as a list of str for the task_status[] parameter, as the consumer sends them."""
    rows = await db.fetch(
        APPLY_UPDATES,
        [u.id for u in updates],
        [u.status for u in updates],
        [u.result for u in updates],
        [u.finished_at for u in updates],
    )
    return [(row["ord"], row["outcome"]) for row in rows]


async def _row(db: asyncpg.Connection, task_id: uuid.UUID) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM web_crawl_tasks WHERE id = $1", task_id)
    assert row is not None
    return row


async def _count(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM web_crawl_tasks")
    return count


async def _task_in(db: asyncpg.Connection, status: str, result: str | None) -> uuid.UUID:
    """A task brought to `status` through the functions themselves."""
    task_id = uuid.uuid4()
    assert await create_tasks(db, [NewTask(task_id)]) == [(1, task_id, Outcome.CREATED)]
    if status != "new":
        assert result is not None
        outcome = await apply_updates(db, [Update(task_id, status, result, RECEIVED_AT)])
        assert outcome == [(1, Outcome.UPDATED)]
    return task_id


async def test_repeated_new_task_in_one_batch_is_created_once(db: asyncpg.Connection) -> None:
    task_id = uuid.uuid4()
    first = NewTask(task_id, user_email="first@example.com")
    repeat = NewTask(
        task_id, user_email="repeat@example.com", received_at=RECEIVED_AT + dt.timedelta(hours=1)
    )

    outcomes = await create_tasks(db, [first, repeat])

    assert outcomes == [(1, task_id, Outcome.CREATED), (2, task_id, Outcome.DUPLICATE)]
    assert await _count(db) == 1
    row = await _row(db, task_id)
    assert (row["user_email"], row["received_at"], row["status"]) == (
        "first@example.com",
        RECEIVED_AT,
        "new",
    )


async def test_redelivered_new_task_is_a_duplicate_and_changes_nothing(
    db: asyncpg.Connection,
) -> None:
    task_id = uuid.uuid4()
    await create_tasks(db, [NewTask(task_id, user_email="first@example.com")])
    before = await _row(db, task_id)
    redelivered = NewTask(
        task_id,
        user_email="second@example.com",
        user_query="dogs",
        received_at=RECEIVED_AT + dt.timedelta(days=1),
    )

    outcomes = await create_tasks(db, [redelivered])

    assert outcomes == [(1, task_id, Outcome.DUPLICATE)]
    assert await _count(db) == 1
    assert await _row(db, task_id) == before


@pytest.mark.parametrize(("status", "result"), [("completed", "page"), ("error", "timeout")])
async def test_redelivered_new_of_a_finished_task_is_unchanged(
    db: asyncpg.Connection, status: str, result: str
) -> None:
    """Not `duplicate`: the consumer republishes a duplicate's crawl request, and a finished
    task must not be crawled again."""
    task_id = await _task_in(db, status, result)
    before = await _row(db, task_id)

    outcomes = await create_tasks(db, [NewTask(task_id, user_email="second@example.com")])

    assert outcomes == [(1, task_id, Outcome.UNCHANGED)]
    assert await _row(db, task_id) == before


async def test_overlapping_create_batches_in_opposite_orders_never_deadlock(
    db: asyncpg.Connection, other_conn: asyncpg.Connection
) -> None:
    """Two workers with overlapping redelivered batches (a rebalance): the rows are inserted in
    id order whatever the input order, so neither waits for a row the other waits behind."""
    ids_per_round = 5000
    for round_ in range(1, 6):
        tasks = [NewTask(uuid.uuid4()) for _ in range(ids_per_round)]

        results = await asyncio.gather(
            create_tasks(db, tasks), create_tasks(other_conn, tasks[::-1]), return_exceptions=True
        )

        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors == [], f"round {round_}"
        outcomes: Counter[tuple[uuid.UUID, str]] = Counter()
        for rows in results:
            assert not isinstance(rows, BaseException)
            assert [ord_ for ord_, _, _ in rows] == list(range(1, ids_per_round + 1))
            outcomes.update((task_id, outcome) for _, task_id, outcome in rows)
        for task in tasks:
            assert outcomes[(task.id, Outcome.CREATED)] == 1
            assert outcomes[(task.id, Outcome.DUPLICATE)] == 1
        assert await _count(db) == round_ * ids_per_round


@pytest.mark.parametrize(
    ("start", "start_result", "to", "result", "expected"),
    [
        ("new", None, "completed", "page", Outcome.UPDATED),
        ("new", None, "error", "timeout", Outcome.UPDATED),
        ("error", "timeout", "completed", "page", Outcome.UPDATED),
        ("error", "timeout", "completed", "timeout", Outcome.UPDATED),
        ("error", "timeout", "error", "timeout", Outcome.UNCHANGED),
        ("error", "timeout", "error", "dns failure", Outcome.INVALID_TRANSITION),
        ("completed", "page", "completed", "page", Outcome.UNCHANGED),
        ("completed", "page", "completed", "other page", Outcome.INVALID_TRANSITION),
        ("completed", "page", "error", "timeout", Outcome.INVALID_TRANSITION),
        ("completed", "page", "error", "page", Outcome.INVALID_TRANSITION),
    ],
    ids=[
        "new-completed",
        "new-error",
        "error-completed",
        "error-completed-same-text",
        "error-error-same-text",
        "error-error-other-text",
        "completed-completed-same-result",
        "completed-completed-other-result",
        "completed-error",
        "completed-error-same-text",
    ],
)
async def test_each_transition_has_its_outcome_and_only_an_updated_one_changes_the_row(
    db: asyncpg.Connection,
    start: str,
    start_result: str | None,
    to: str,
    result: str,
    expected: Outcome,
) -> None:
    """An `updated` row takes the update and the trigger's updated_at; any other outcome leaves
    the row, updated_at included, exactly as it was."""
    task_id = await _task_in(db, start, start_result)
    before = await _row(db, task_id)

    async with db.transaction():
        outcomes = await apply_updates(db, [Update(task_id, to, result, FINISHED_AT)])
        call_time = await db.fetchval("SELECT now()")

    assert outcomes == [(1, expected)]
    after = await _row(db, task_id)
    if expected == Outcome.UPDATED:
        assert (after["status"], after["result"], after["finished_at"]) == (
            to,
            result,
            FINISHED_AT,
        )
        assert after["updated_at"] == call_time
        assert after["updated_at"] != before["updated_at"]
    else:
        assert after == before


async def test_update_of_an_unknown_id_is_task_not_found_and_creates_nothing(
    db: asyncpg.Connection,
) -> None:
    unknown = uuid.uuid4()

    outcomes = await apply_updates(db, [Update(unknown, "completed", "page")])

    assert outcomes == [(1, Outcome.TASK_NOT_FOUND)]
    assert await _count(db) == 0


async def test_updates_for_one_id_apply_in_input_order_error_then_completed(
    db: asyncpg.Connection,
) -> None:
    task_id = await _task_in(db, "new", None)
    completed_at = FINISHED_AT + dt.timedelta(minutes=1)

    outcomes = await apply_updates(
        db,
        [
            Update(task_id, "error", "timeout", FINISHED_AT),
            Update(task_id, "completed", "page", completed_at),
        ],
    )

    assert outcomes == [(1, Outcome.UPDATED), (2, Outcome.UPDATED)]
    row = await _row(db, task_id)
    assert (row["status"], row["result"], row["finished_at"]) == ("completed", "page", completed_at)


async def test_updates_for_one_id_apply_in_input_order_completed_then_error(
    db: asyncpg.Connection,
) -> None:
    task_id = await _task_in(db, "new", None)

    outcomes = await apply_updates(
        db,
        [
            Update(task_id, "completed", "page", FINISHED_AT),
            Update(task_id, "error", "timeout", FINISHED_AT + dt.timedelta(minutes=1)),
        ],
    )

    assert outcomes == [(1, Outcome.UPDATED), (2, Outcome.INVALID_TRANSITION)]
    row = await _row(db, task_id)
    assert (row["status"], row["result"], row["finished_at"]) == ("completed", "page", FINISHED_AT)


async def test_repeated_update_in_one_batch_is_unchanged_the_second_time(
    db: asyncpg.Connection,
) -> None:
    task_id = await _task_in(db, "new", None)
    update = Update(task_id, "error", "timeout")

    outcomes = await apply_updates(db, [update, update])

    assert outcomes == [(1, Outcome.UPDATED), (2, Outcome.UNCHANGED)]
    row = await _row(db, task_id)
    assert (row["status"], row["result"]) == ("error", "timeout")


async def test_mixed_create_batch_returns_outcomes_in_input_order(
    db: asyncpg.Connection,
) -> None:
    existing = await _task_in(db, "new", None)
    done = await _task_in(db, "completed", "page")
    a, b = uuid.uuid4(), uuid.uuid4()

    outcomes = await create_tasks(
        db,
        [
            NewTask(a),
            NewTask(existing),
            NewTask(done),
            NewTask(b),
            NewTask(a),
            NewTask(existing),
            NewTask(done),
        ],
    )

    assert outcomes == [
        (1, a, Outcome.CREATED),
        (2, existing, Outcome.DUPLICATE),
        (3, done, Outcome.UNCHANGED),
        (4, b, Outcome.CREATED),
        (5, a, Outcome.DUPLICATE),
        (6, existing, Outcome.DUPLICATE),
        (7, done, Outcome.UNCHANGED),
    ]
    assert await _count(db) == 4


async def test_mixed_update_batch_returns_outcomes_in_input_order(
    db: asyncpg.Connection,
) -> None:
    new_task = await _task_in(db, "new", None)
    failed = await _task_in(db, "error", "timeout")
    done = await _task_in(db, "completed", "page")
    unknown = uuid.uuid4()

    outcomes = await apply_updates(
        db,
        [
            Update(unknown, "completed", "page"),
            Update(new_task, "completed", "page"),
            Update(done, "completed", "page"),
            Update(done, "error", "late"),
            Update(failed, "completed", "retried page"),
            Update(failed, "error", "timeout"),
            Update(new_task, "completed", "page"),
        ],
    )

    assert outcomes == [
        (1, Outcome.TASK_NOT_FOUND),
        (2, Outcome.UPDATED),
        (3, Outcome.UNCHANGED),
        (4, Outcome.INVALID_TRANSITION),
        (5, Outcome.UPDATED),
        (6, Outcome.INVALID_TRANSITION),
        (7, Outcome.UNCHANGED),
    ]
    stored = {
        row["id"]: (row["status"], row["result"])
        for row in await db.fetch("SELECT id, status, result FROM web_crawl_tasks")
    }
    assert stored == {
        new_task: ("completed", "page"),
        failed: ("completed", "retried page"),
        done: ("completed", "page"),
    }


async def test_update_batch_of_distinct_tasks_returns_every_outcome_in_input_order(
    db: asyncpg.Connection,
) -> None:
    """No task twice: the valid transitions are written by one statement, the others decided
    one by one after it; the outcomes still come back in input order."""
    first, second = await _task_in(db, "new", None), await _task_in(db, "new", None)
    failed = await _task_in(db, "error", "timeout")
    done = await _task_in(db, "completed", "page")
    unknown = uuid.uuid4()

    outcomes = await apply_updates(
        db,
        [
            Update(done, "error", "late"),
            Update(first, "completed", "page 1"),
            Update(unknown, "completed", "page"),
            Update(failed, "error", "timeout"),
            Update(second, "error", "dns failure"),
        ],
    )

    assert outcomes == [
        (1, Outcome.INVALID_TRANSITION),
        (2, Outcome.UPDATED),
        (3, Outcome.TASK_NOT_FOUND),
        (4, Outcome.UNCHANGED),
        (5, Outcome.UPDATED),
    ]
    stored = {
        row["id"]: (row["status"], row["result"])
        for row in await db.fetch("SELECT id, status, result FROM web_crawl_tasks")
    }
    assert stored == {
        first: ("completed", "page 1"),
        second: ("error", "dns failure"),
        failed: ("error", "timeout"),
        done: ("completed", "page"),
    }


async def test_an_update_waiting_for_a_concurrent_change_decides_on_the_changed_row(
    db: asyncpg.Connection, other_conn: asyncpg.Connection
) -> None:
    """Another transaction finishes the task while the batch waits for it: the batch's
    `error` is then a transition from `completed`, refused, and the other's result stays."""
    task_id = await _task_in(db, "new", None)
    bystander = await _task_in(db, "new", None)
    later = FINISHED_AT + dt.timedelta(minutes=1)

    async with other_conn.transaction():
        await other_conn.execute(
            "UPDATE web_crawl_tasks SET status = 'completed', result = 'their page',"
            " finished_at = $2 WHERE id = $1",
            task_id,
            FINISHED_AT,
        )
        call = asyncio.create_task(
            apply_updates(
                db,
                [
                    Update(bystander, "completed", "page", later),
                    Update(task_id, "error", "x", later),
                ],
            )
        )
        await until_waiting_for_a_lock(other_conn, db.get_server_pid(), call)

    assert await call == [(1, Outcome.UPDATED), (2, Outcome.INVALID_TRANSITION)]
    row = await _row(db, task_id)
    assert (row["status"], row["result"]) == ("completed", "their page")
    assert (await _row(db, bystander))["status"] == "completed"


@pytest.mark.parametrize("other_commits", [True, False], ids=["other-commits", "other-aborts"])
async def test_a_create_batch_meeting_an_uncommitted_insert_of_one_of_its_tasks(
    db: asyncpg.Connection, other_conn: asyncpg.Connection, other_commits: bool
) -> None:
    """Another worker is inserting one of the batch's tasks: the batch waits for it, and the
    task is created once, by whichever transaction commits it; the counts follow the rows."""
    shared, a, b = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()

    transaction = other_conn.transaction()
    await transaction.start()
    try:
        assert await create_tasks(
            other_conn, [NewTask(shared, user_email="other@example.com")]
        ) == [(1, shared, Outcome.CREATED)]
        call = asyncio.create_task(create_tasks(db, [NewTask(a), NewTask(shared), NewTask(b)]))
        await until_waiting_for_a_lock(other_conn, db.get_server_pid(), call)
    finally:
        if other_commits:
            await transaction.commit()
        else:
            await transaction.rollback()

    expected = Outcome.DUPLICATE if other_commits else Outcome.CREATED
    assert await call == [(1, a, Outcome.CREATED), (2, shared, expected), (3, b, Outcome.CREATED)]
    assert await _count(db) == 3
    owner = (await _row(db, shared))["user_email"]
    assert owner == ("other@example.com" if other_commits else "ann@example.com")
    counted = await db.fetchval("SELECT sum(tasks) FROM web_crawl_task_hourly_counts")
    assert counted == 3


@pytest.mark.parametrize(
    ("bad_task", "sqlstate"),
    [
        (NewTask(uuid.UUID(int=1), user_email="a" * 250 + "@x.com"), "22001"),
        (NewTask(uuid.UUID(int=1), user_query="cats\x00dogs"), "22021"),
    ],
    ids=["email-longer-than-255", "nul-character"],
)
async def test_create_batch_with_a_row_postgres_refuses_raises_and_writes_nothing(
    db: asyncpg.Connection, bad_task: NewTask, sqlstate: str
) -> None:
    good = [NewTask(uuid.uuid4()), NewTask(uuid.uuid4())]

    with pytest.raises(asyncpg.PostgresError) as raised:
        await create_tasks(db, [good[0], bad_task, good[1]])

    assert raised.value.sqlstate == sqlstate
    assert raised.value.sqlstate.startswith("22")
    translated = translate_error(raised.value)
    assert isinstance(translated, RowRejectedError)
    assert (translated.sqlstate, translated.reason) == (sqlstate, "row_rejected")
    assert await _count(db) == 0


async def test_update_batch_with_a_row_postgres_refuses_raises_and_writes_nothing(
    db: asyncpg.Connection,
) -> None:
    first = await _task_in(db, "new", None)
    second = await _task_in(db, "new", None)
    before = [await _row(db, first), await _row(db, second)]

    with pytest.raises(asyncpg.PostgresError) as raised:
        await apply_updates(
            db,
            [Update(first, "completed", "page"), Update(second, "error", "bad\x00byte")],
        )

    assert raised.value.sqlstate.startswith("22")
    assert isinstance(translate_error(raised.value), RowRejectedError)
    assert [await _row(db, first), await _row(db, second)] == before


async def test_large_batch_round_trips_in_order(db: asyncpg.Connection) -> None:
    tasks = [
        NewTask(uuid.uuid4(), user_email=f"user{i}@example.com", user_query=f"query {i}")
        for i in range(2000)
    ]

    outcomes = await create_tasks(db, tasks)

    assert outcomes == [(i, t.id, Outcome.CREATED) for i, t in enumerate(tasks, start=1)]
    assert await _count(db) == 2000
    updates = [Update(t.id, "completed", f"page {i}") for i, t in enumerate(tasks)]
    assert await apply_updates(db, updates) == [
        (i, Outcome.UPDATED) for i in range(1, len(updates) + 1)
    ]
    stored = dict(await db.fetch("SELECT user_query, result FROM web_crawl_tasks"))
    assert stored == {f"query {i}": f"page {i}" for i in range(2000)}
