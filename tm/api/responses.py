"""JSON answers and the error middleware: every error the API returns is JSON with a message.

Unknown paths answer like the original service (``{"error": "Endpoint not found", "timestamp",
"path"}``), other HTTP errors with their reason, and an unexpected exception with a 500 that
says nothing of the internals (the traceback goes to the log).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

log = logging.getLogger("tm.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def now_iso() -> str:
    """Now, as the original service wrote it: ISO-8601 UTC with milliseconds and ``Z``."""
    return iso(datetime.now(UTC), timespec="milliseconds")


def iso(moment: datetime, *, timespec: str = "microseconds") -> str:
    return moment.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def uptime_ms(started_at: float) -> int:
    """Milliseconds since ``started_at`` (wall-clock seconds), as the original reported."""
    return max(0, int((time.time() - started_at) * 1000))


def json_response(body: Any, *, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", charset="utf-8"
    )


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    """``{"error": message, "timestamp": now, **extra}`` with ``status``."""
    return json_response({"error": message, "timestamp": now_iso(), **extra}, status=status)


def prometheus_response(body: bytes) -> web.Response:
    response = web.Response(body=body)
    response.headers["Content-Type"] = PROMETHEUS_CONTENT_TYPE
    return response


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's HTML errors and unexpected exceptions into JSON."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return json_error(404, "Endpoint not found", path=request.path)
    except web.HTTPMethodNotAllowed as exc:
        allowed = sorted(exc.allowed_methods)
        response = json_error(
            405, f"Method {request.method} not allowed", path=request.path, allowed=allowed
        )
        response.headers["Allow"] = ", ".join(allowed)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_error(exc.status, exc.reason, path=request.path)
    except Exception:
        log.exception("unexpected error in the API", extra={"fields": {"path": request.path}})
        return json_error(500, "Internal server error")
