"""Message vocabulary shared by the consumer and the database: task states and batch outcomes.

``TaskStatus`` is the Python side of the PostgreSQL enum ``task_status``; a test reads ``pg_enum``
and fails when the two lists drift apart. ``Outcome`` names what the set-based functions return
for each input row.
"""

from __future__ import annotations

from enum import StrEnum


class TaskStatus(StrEnum):
    """A crawl task's lifecycle: ``new -> completed``, ``new -> error``, ``error -> completed``."""

    NEW = "new"
    COMPLETED = "completed"
    ERROR = "error"


class Outcome(StrEnum):
    """One row's fate in ``tm_create_tasks`` / ``tm_apply_status_updates``."""

    CREATED = "created"
    DUPLICATE = "duplicate"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    TASK_NOT_FOUND = "task_not_found"
    INVALID_TRANSITION = "invalid_transition"
