"""Database.apply, the worker's one write, against a real PostgreSQL: what it stores is what
decode read, whatever the header's form."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from tm.adapters.postgres import Database
from tm.core.messages import NewTask, StatusUpdate, TaskStatus

pytestmark = pytest.mark.integration


def new_task(task_id: str, received_at: datetime) -> NewTask:
    return NewTask(
        task_id, "ann@example.com", "cats", "https://example.com/", received_at, "", None, None
    )


@pytest.mark.parametrize(
    "header",
    [
        "2048-07-31T01:53:08.362879-19:25",  # beyond PostgreSQL's ±15:59 offsets
        "1180-08-09T12:50:05.002898+17:32",
        "0550-06-05T21:53:13.039890-22:58",
        "2025-08-10T10:18:59.023Z",
        "2025-08-10T10:18:59.023456+05:30",
    ],
)
async def test_a_timestamp_with_any_offset_python_reads_is_stored_as_the_same_instant(
    database: Database, db: asyncpg.Connection, header: str
) -> None:
    moment = datetime.fromisoformat(header)
    task_id = str(uuid.uuid4())
    assert await database.apply([new_task(task_id, moment)], []) == (["created"], [])
    update = StatusUpdate(task_id, TaskStatus.COMPLETED, "done", moment, None, None)
    assert await database.apply([], [update]) == ([], ["updated"])
    row = await db.fetchrow(
        "SELECT received_at, finished_at FROM web_crawl_tasks WHERE id = $1", uuid.UUID(task_id)
    )
    assert row["received_at"] == moment.astimezone(UTC)
    assert row["finished_at"] == moment.astimezone(UTC)


async def test_text_columns_keep_every_character_json_would_escape(
    database: Database, db: asyncpg.Connection
) -> None:
    text = 'quote " backslash \\ tab \t newline \n control \x1f unicode é 𝄞 \u2028 end'
    task_id = str(uuid.uuid4())
    task = NewTask(
        task_id, "ann@example.com", text, "https://example.com/", datetime.now(UTC), "", None, None
    )
    assert await database.apply([task], []) == (["created"], [])
    update = StatusUpdate(task_id, TaskStatus.ERROR, text, datetime.now(UTC), None, None)
    assert await database.apply([], [update]) == ([], ["updated"])
    row = await db.fetchrow(
        "SELECT user_query, result FROM web_crawl_tasks WHERE id = $1", uuid.UUID(task_id)
    )
    assert row["user_query"] == text
    assert row["result"] == text
