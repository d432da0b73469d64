"""One contract, two implementations: the same batches of creates and updates through the tests'
FakeDatabase (``tm.core.messages.update_outcome``) and through the real set-based functions
(tm_create_tasks, tm_apply_status_updates) give the same outcome for every row."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tests.fakes import FakeDatabase
from tm.adapters.postgres import Database
from tm.core.messages import NewTask, StatusUpdate, TaskStatus

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
NEW, DONE, ERR = TaskStatus.NEW, TaskStatus.COMPLETED, TaskStatus.ERROR

# Each case: batches, each a list of steps; ("create", task) or (status, task, result, minutes).
Step = tuple[object, ...]
CASES: dict[str, list[list[Step]]] = {
    "new to completed, then the same again": [
        [("create", "a")], [(DONE, "a", "ok", 1)], [(DONE, "a", "ok", 1)]
    ],
    "new to error to completed": [[("create", "a")], [(ERR, "a", "x", 1)], [(DONE, "a", "ok", 2)]],
    "completed is final": [[("create", "a")], [(DONE, "a", "ok", 1)], [(ERR, "a", "x", 2)]],
    "completed to another result": [
        [("create", "a")], [(DONE, "a", "ok", 1)], [(DONE, "a", "no", 2)]
    ],
    "a stale error after completed": [
        [("create", "a")], [(ERR, "a", "x", 1)], [(DONE, "a", "ok", 2)], [(ERR, "a", "x", 1)]
    ],
    "back to new": [[("create", "a")], [(ERR, "a", "x", 1)], [(NEW, "a", "", 2)]],
    "error to error with another text": [
        [("create", "a")], [(ERR, "a", "x", 1)], [(ERR, "a", "y", 2)]
    ],
    "an unknown task": [[(DONE, "b", "ok", 1)]],
    "a duplicate create, then one of a finished task": [
        [("create", "a")], [("create", "a")], [(DONE, "a", "ok", 1)], [("create", "a")]
    ],
    "several updates of one task in one call, in order": [
        [("create", "a")], [(ERR, "a", "x", 1), (DONE, "a", "ok", 2), (ERR, "a", "z", 3)]
    ],
    "created and updated in one call": [[("create", "a"), (DONE, "a", "ok", 1)]],
}  # fmt: skip


async def run(database: Database | FakeDatabase, batches: list[list[Step]]) -> list[str]:
    ids = {name: str(uuid.uuid5(uuid.NAMESPACE_URL, f"{name}-{id(batches)}")) for name in "ab"}
    outcomes: list[str] = []
    for batch in batches:
        creates = [
            NewTask(
                ids[str(s[1])], "ann@example.com", "q", "https://example.com/", T0, "", None, None
            )
            for s in batch
            if s[0] == "create"
        ]
        updates = [
            StatusUpdate(
                ids[str(s[1])],
                TaskStatus(str(s[0])),
                str(s[2]),
                T0 + timedelta(minutes=int(str(s[3]))),
                None,
                None,
            )
            for s in batch
            if s[0] != "create"
        ]
        created, updated = await database.apply(creates, updates)
        outcomes += created + updated
    return outcomes


@pytest.mark.parametrize("case", list(CASES))
async def test_the_fake_and_the_database_agree_on_every_outcome(
    database: Database, case: str
) -> None:
    batches = CASES[case]
    assert await run(FakeDatabase(), batches) == await run(database, batches)
