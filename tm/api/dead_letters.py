"""``GET /api/dead-letters``: the latest dead letters, newest first, with their reasons.

They are read from the dead-letter topic itself: a short-lived consumer assigns itself the last
:data:`DEAD_LETTERS_SHOWN` offsets of each partition, reads up to the end, and closes. It joins
no group and commits nothing. The answer is shared between requests for
:data:`DEAD_LETTERS_TTL_S`, so a page open in ten browsers reads the topic as often as one.

A dead letter is the original message, personal data included: the endpoint needs the API token
as ``/api/tasks*`` do, and a value is shown cut to :data:`VALUE_SHOWN_CHARS` characters.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tm.adapters.kafka.tools import Record, TopicReader
from tm.api.context import API_KEY
from tm.api.responses import iso, json_error, json_response, now_iso
from tm.api.shared import Shared
from tm.api.tasks import unauthorized
from tm.connections import KafkaSettings
from tm.core.messages import DLQ_ERROR, DLQ_OFFSET, DLQ_PARTITION, DLQ_REASON, DLQ_TOPIC
from tm.errors import KafkaUnavailableError

log = logging.getLogger("tm.api")

DEAD_LETTERS_SHOWN = 20
DEAD_LETTERS_TTL_S = 3.0  # about the page's refresh
READ_TIMEOUT_S = 3.0  # the whole read; past it, the answer holds what was read
VALUE_SHOWN_CHARS = 300


def _header(headers: dict[str, str | bytes | None], name: str) -> str | None:
    value = headers.get(name)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def dead_letter_json(record: Record) -> dict[str, Any]:
    """A dead letter as the page shows it: why, where it came from, and its start."""
    headers = dict(record.headers)
    value = (record.value or b"").decode(errors="replace")
    return {
        "reason": _header(headers, DLQ_REASON),
        "error": _header(headers, DLQ_ERROR),
        "status": _header(headers, "status"),
        "taskId": _header(headers, "task_id"),
        "source": {
            "topic": _header(headers, DLQ_TOPIC),
            "partition": _int(_header(headers, DLQ_PARTITION)),
            "offset": _int(_header(headers, DLQ_OFFSET)),
        },
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": iso(
            datetime.fromtimestamp(record.timestamp_ms / 1000, UTC), timespec="milliseconds"
        ),
        "value": value[:VALUE_SHOWN_CHARS],
        "valueTruncated": len(value) > VALUE_SHOWN_CHARS,
    }


def newest(records: list[Record], count: int) -> list[Record]:
    """The ``count`` newest records of all partitions, newest first."""
    ordered = sorted(records, key=lambda r: (r.timestamp_ms, r.partition, r.offset), reverse=True)
    return ordered[:count]


class DeadLetters:
    """The latest dead letters, read when asked and shared between requests."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self.shared = Shared(self._read, ttl_s=DEAD_LETTERS_TTL_S)

    async def _read(self) -> dict[str, Any]:
        records = await asyncio.to_thread(self._tail)
        return {
            "topic": self._settings.dlq_topic,
            "deadLetters": [dead_letter_json(r) for r in newest(records, DEAD_LETTERS_SHOWN)],
            "limit": DEAD_LETTERS_SHOWN,
            "timestamp": now_iso(),
        }

    def _tail(self) -> list[Record]:
        group_id = f"{self._settings.group_id}-status-page"
        with TopicReader(self._settings, group_id=group_id) as reader:
            return reader.tail(
                self._settings.dlq_topic, DEAD_LETTERS_SHOWN, timeout_s=READ_TIMEOUT_S
            )


DEAD_LETTERS_KEY = web.AppKey("dead_letters", DeadLetters)


async def get_dead_letters(request: web.Request) -> web.Response:
    denied = unauthorized(request)
    if denied is not None:
        return denied
    try:
        return json_response(await request.app[DEAD_LETTERS_KEY].shared.get())
    except KafkaUnavailableError as exc:
        log.debug("dead letters unavailable", extra={"fields": {"error": str(exc)}})
        return json_error(503, "Kafka unavailable")


def add_routes(app: web.Application) -> None:
    app[DEAD_LETTERS_KEY] = DeadLetters(app[API_KEY].settings.kafka)
    app.router.add_get("/api/dead-letters", get_dead_letters)
