"""Message vocabulary: task states, batch outcomes, the inbound body Structs and their decoders,
and the decoded forms the pipeline works with (``NewTask``, ``StatusUpdate``, ``Rejected``).

``TaskStatus`` is the Python side of the PostgreSQL enum ``task_status``; a test reads ``pg_enum``
and fails when the two lists drift apart. Decoders are built once, at import (msgspec perf tips).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated

import msgspec


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


# The moves a status update may make; ``completed`` is final. tm_apply_status_updates
# (tm/sql/0003) decides in the database; this table is the same rule for everything that
# reasons about it in Python (the tests' fake database and oracles), and a contract test runs
# the same cases through both.
TRANSITIONS = frozenset(
    {
        (TaskStatus.NEW, TaskStatus.COMPLETED),
        (TaskStatus.NEW, TaskStatus.ERROR),
        (TaskStatus.ERROR, TaskStatus.COMPLETED),
    }
)


def update_outcome(
    stored: tuple[TaskStatus, str | None, datetime | None] | None,
    status: TaskStatus,
    result: str | None,
    finished_at: datetime,
) -> Outcome:
    """What one update does to a task stored as (status, result, finished_at), or to none: the
    rule of tm_apply_status_updates. Identical state: ``unchanged``; an allowed move:
    ``updated``; a refused move older than the stored state (stale history, such as the error
    of an error -> completed pair delivered again): ``unchanged``; else ``invalid_transition``."""
    if stored is None:
        return Outcome.TASK_NOT_FOUND
    current, stored_result, stored_finished_at = stored
    if (current, stored_result) == (status, result):
        return Outcome.UNCHANGED
    if (current, status) in TRANSITIONS:
        return Outcome.UPDATED
    if stored_finished_at is not None and finished_at < stored_finished_at:
        return Outcome.UNCHANGED
    return Outcome.INVALID_TRANSITION


class Reason(StrEnum):
    """The stable codes of the ``dlq_reason`` header."""

    INVALID_JSON = "invalid_json"
    INVALID_HEADERS = "invalid_headers"
    INVALID_BODY = "invalid_body"
    TASK_NOT_FOUND = "task_not_found"
    INVALID_TRANSITION = "invalid_transition"
    RESULT_TOO_LARGE = "result_too_large"
    ROW_REJECTED = "row_rejected"


TASK_TYPE = "web-crawl"
# Namespace of the UUIDv5 ids given to `new` events without a task_id header; fixed forever,
# because a redelivered event must get the same id.
TASK_ID_NAMESPACE = uuid.UUID("5b7c36f2-9a0e-4c1e-8f57-7d1f0c2f6a10")
MAX_ERROR_CHARS = 1000  # longer error texts are truncated with a marker, not rejected

# Header names of dead letters (DESIGN §2).
DLQ_REASON = "dlq_reason"
DLQ_ERROR = "dlq_error"
DLQ_TOPIC = "dlq_topic"
DLQ_PARTITION = "dlq_partition"
DLQ_OFFSET = "dlq_offset"
DLQ_TIMESTAMP = "dlq_timestamp"
DLQ_VALUE_BYTES = "dlq_value_bytes"  # set when the value was cut to fit: its original length
DLQ_KEY_BYTES = "dlq_key_bytes"  # set when the key was cut to fit: its original length
DLQ_HEADERS_DROPPED = "dlq_headers_dropped"  # set when original headers were left out: how many
DLQ_HEADERS = (
    DLQ_REASON,
    DLQ_ERROR,
    DLQ_TOPIC,
    DLQ_PARTITION,
    DLQ_OFFSET,
    DLQ_TIMESTAMP,
    DLQ_VALUE_BYTES,
    DLQ_KEY_BYTES,
    DLQ_HEADERS_DROPPED,
)


class NewTaskBody(msgspec.Struct):
    user_email: Annotated[str, msgspec.Meta(max_length=255)]
    user_query: Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]
    base_url: Annotated[str, msgspec.Meta(max_length=2048)]


class CompletedBody(msgspec.Struct):
    crawl_result: Annotated[str, msgspec.Meta(min_length=1)]


class ErrorBody(msgspec.Struct):
    error: Annotated[str, msgspec.Meta(min_length=1)]


NEW_TASK_DECODER = msgspec.json.Decoder(NewTaskBody)
COMPLETED_DECODER = msgspec.json.Decoder(CompletedBody)
ERROR_DECODER = msgspec.json.Decoder(ErrorBody)


class NewTask(msgspec.Struct, gc=False):
    """A valid ``new`` event: the row to create and the crawl request to send. ``id`` is the
    canonical (lower-case, hyphenated) text of a UUID; ``timestamp`` is ``received_at`` as
    ISO-8601 in UTC with milliseconds, for the crawl request's header."""

    id: str
    user_email: str
    user_query: str
    base_url: str
    received_at: datetime
    timestamp: str
    traceparent: str | None
    tracestate: str | None


class StatusUpdate(msgspec.Struct, gc=False):
    """A valid ``completed`` or ``error`` event (``id`` as in NewTask). ``finished_text`` is
    the timestamp header as it came when it is already ISO-8601 in UTC with milliseconds (the
    crawlers' form), for the task event; None otherwise."""

    id: str
    status: TaskStatus
    result: str
    finished_at: datetime
    traceparent: str | None
    tracestate: str | None
    finished_text: str | None = None


class Rejected(msgspec.Struct, gc=False):
    """A message that can never succeed, with its dead-letter reason and a readable error, and
    its trace context when it had a valid one (for its span)."""

    reason: Reason
    error: str
    traceparent: str | None = None


Decoded = NewTask | StatusUpdate | Rejected


# One transition a batch applied, for the task-event feed (DESIGN §11): (task_id, status after
# it: new (created), completed or error; at: ISO-8601 UTC, the task's received_at (created) or
# finished_at (updated); trace_id of the message's traceparent, or None). A plain tuple: the
# feed serialises a batch of them with one orjson call.
TaskEvent = tuple[str, str, str, str | None]


class CrawlRequest(msgspec.Struct):
    """The value of an outbound crawl request (wire names of the original service)."""

    user_email: str
    user_query: str
    base_url: str


CRAWL_REQUEST_ENCODER = msgspec.json.Encoder()
