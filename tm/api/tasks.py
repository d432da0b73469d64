"""``/api/tasks/{id}`` and ``/api/tasks?status=&limit=&after=``: task lookups for operators.

Tasks hold personal data (the user's e-mail and query), so when ``API_TOKEN`` is set both need
``Authorization: Bearer <token>`` (compared in constant time); without it they answer 401.

The listing is newest first and paged by keyset on ``(created_at, id)``: ``next`` is an opaque
cursor naming the last task of the page, passed back as ``after``. A walk sees each task that
existed when it began exactly once, whatever is inserted meanwhile, and every page is an index
range scan however deep it goes (an OFFSET would read and throw away every earlier row).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from tm.adapters.api_database import LIST_RESULT_CHARS, Row
from tm.api.context import api_of
from tm.api.responses import iso, json_error, json_response
from tm.core.messages import TaskStatus
from tm.errors import DatabaseUnavailableError

log = logging.getLogger("tm.api")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
STATUSES = tuple(status.value for status in TaskStatus)
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_UUID_RE = re.compile(_UUID)
_LIMIT_RE = re.compile(r"[1-9][0-9]{0,3}")
_CURSOR_RE = re.compile(r"(-?[0-9]{1,19}):(" + _UUID + ")")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class BadRequestError(Exception):
    """A query parameter is invalid; the message says which and what is expected."""


# -- pure helpers (unit-tested) ------------------------------------------------------------------


def parse_task_id(raw: str) -> str | None:
    """A UUID in its canonical 8-4-4-4-12 form (any case), lower-cased; None otherwise."""
    return raw.lower() if _UUID_RE.fullmatch(raw) else None


def encode_cursor(created_at: datetime, task_id: str) -> str:
    """The position of a task: its created_at to the microsecond, and its id."""
    micros = (created_at - _EPOCH) // timedelta(microseconds=1)
    return base64.urlsafe_b64encode(f"{micros}:{task_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str] | None:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    match = _CURSOR_RE.fullmatch(raw)
    if match is None:
        return None
    try:
        created_at = _EPOCH + timedelta(microseconds=int(match.group(1)))
    except OverflowError:
        return None
    return created_at, match.group(2).lower()


def _one(query: Any, name: str) -> str | None:
    values = query.getall(name, [])
    if len(values) > 1:
        raise BadRequestError(f"Parameter {name} must be given at most once.")
    return values[0] if values else None


def parse_list_query(query: Any) -> tuple[str | None, int, tuple[datetime, str] | None]:
    """(status, limit, after) from the query string; raises BadRequestError."""
    status = _one(query, "status")
    if status is not None and status not in STATUSES:
        raise BadRequestError(f"Invalid status parameter. Must be one of: {', '.join(STATUSES)}.")
    raw_limit = _one(query, "limit")
    limit = DEFAULT_LIMIT
    if raw_limit is not None:
        if not _LIMIT_RE.fullmatch(raw_limit) or int(raw_limit) > MAX_LIMIT:
            raise BadRequestError(f"Invalid limit parameter. Must be an integer in 1..{MAX_LIMIT}.")
        limit = int(raw_limit)
    raw_after = _one(query, "after")
    after = None
    if raw_after is not None:
        after = decode_cursor(raw_after)
        if after is None:
            raise BadRequestError(
                "Invalid after parameter. Pass the `next` value of the previous page."
            )
    return status, limit, after


def is_authorized(header: str | None, token: str | None) -> bool:
    """True when no token is configured, or ``header`` is ``Bearer <token>``."""
    if token is None:
        return True
    if header is None:
        return False
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), token.encode())


def task_json(row: Row, *, cut: bool = False) -> dict[str, Any]:
    """A task as the API shows it (``original_url`` is the message's ``base_url``)."""
    result = row["result"]
    body: dict[str, Any] = {
        "id": str(row["id"]),
        "user_email": row["user_email"],
        "user_query": row["user_query"],
        "base_url": row["original_url"],
        "received_at": _iso(row["received_at"]),
        "status": row["status"],
        "result": result,
        "finished_at": _iso(row["finished_at"]),
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
    }
    if cut:
        truncated = result is not None and len(result) > LIST_RESULT_CHARS
        body["result"] = result[:LIST_RESULT_CHARS] if truncated else result
        body["result_truncated"] = truncated
    return body


def _iso(moment: datetime | None) -> str | None:
    return iso(moment) if moment is not None else None


# -- handlers ------------------------------------------------------------------------------------


def unauthorized(request: web.Request) -> web.Response | None:
    """The 401 answer when the request lacks the token (also for the dead letters); else None."""
    if is_authorized(request.headers.get("Authorization"), api_of(request).settings.http.api_token):
        return None
    response = json_error(401, "Missing or invalid bearer token (Authorization: Bearer <token>)")
    response.headers["WWW-Authenticate"] = 'Bearer realm="tm"'
    return response


def _unavailable(exc: DatabaseUnavailableError) -> web.Response:
    log.debug("task lookup failed", extra={"fields": {"error": str(exc)}})
    return json_error(503, "Database unavailable")


async def get_task(request: web.Request) -> web.Response:
    denied = unauthorized(request)
    if denied is not None:
        return denied
    task_id = parse_task_id(request.match_info["id"])
    if task_id is None:
        return json_error(400, "Invalid task id. Must be a UUID.")
    try:
        row = await api_of(request).database.task(task_id)
    except DatabaseUnavailableError as exc:
        return _unavailable(exc)
    if row is None:
        return json_error(404, "Task not found", id=task_id)
    return json_response(task_json(row))


async def list_tasks(request: web.Request) -> web.Response:
    denied = unauthorized(request)
    if denied is not None:
        return denied
    try:
        status, limit, after = parse_list_query(request.query)
    except BadRequestError as exc:
        return json_error(400, str(exc))
    try:
        # One row more than asked for says whether there is a next page.
        rows = await api_of(request).database.tasks(status=status, after=after, limit=limit + 1)
    except DatabaseUnavailableError as exc:
        return _unavailable(exc)
    page = rows[:limit]
    last = page[-1] if len(rows) > limit else None
    return json_response(
        {
            "tasks": [task_json(row, cut=True) for row in page],
            "next": encode_cursor(last["created_at"], str(last["id"])) if last else None,
            "limit": limit,
            "status": status,
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/tasks", list_tasks)
    app.router.add_get("/api/tasks/{id}", get_task)
