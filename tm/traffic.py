"""``tm send``: sample traffic in the exact wire format of the real producers, for demos, tests
and load. ``new`` events look like the gateway's (key null; headers traceparent, task_type,
status, timestamp; snake_case body); updates look like a crawler's (key and header task_id).
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
import uuid
from datetime import UTC, datetime

import orjson

from tm.adapters import postgres
from tm.adapters.kafka.tools import Headers, Publisher
from tm.config import Settings
from tm.errors import KafkaUnavailableError

LINGER_MS = 5  # sample traffic is sent as fast as it goes: batch it a little
FLUSH_TIMEOUT_S = 60.0

QUERIES = (
    "Find product information",
    "Find the opening hours",
    "List the prices of every plan",
    "Who wrote the latest blog post?",
)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def new_task_message(n: int) -> tuple[Headers, bytes]:
    """Headers and value of the n-th sample `new` event, as the gateway sends them."""
    headers: Headers = [
        ("traceparent", traceparent().encode()),
        ("task_type", b"web-crawl"),
        ("status", b"new"),
        ("timestamp", _now_iso().encode()),
    ]
    value = orjson.dumps(
        {
            "user_email": f"user{n}@example.com",
            "user_query": QUERIES[n % len(QUERIES)],
            "base_url": f"https://example.com/page/{n}",
        }
    )
    return headers, value


def update_message(task_id: uuid.UUID, *, failed: bool) -> tuple[Headers, bytes]:
    status = "error" if failed else "completed"
    headers: Headers = [
        ("task_type", b"web-crawl"),
        ("status", status.encode()),
        ("task_id", str(task_id).encode()),
        ("timestamp", _now_iso().encode()),
    ]
    body = (
        {"error": "Task failed: Network timeout occurred while crawling the website."}
        if failed
        else {"crawl_result": "Task completed successfully! Found 5 products matching."}
    )
    return headers, orjson.dumps(body)


def _send(
    settings: Settings,
    messages: list[tuple[bytes | None, Headers, bytes]],
    rate: float | None,
) -> int:
    publisher = Publisher(settings.kafka, linger_ms=LINGER_MS)
    topic = settings.kafka.task_status_topic
    started = time.monotonic()
    for i, (key, headers, value) in enumerate(messages):
        if rate:
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        publisher.produce(topic, key=key, value=value, headers=headers)
    delivery = publisher.flush(FLUSH_TIMEOUT_S)
    if not delivery.is_complete:
        failures = delivery.failures
        raise KafkaUnavailableError(
            f"{delivery.unacknowledged} message(s) unacknowledged, {len(failures)} failed"
            + (f": {failures[0]}" if failures else "")
        )
    return len(messages)


def send_new(settings: Settings, count: int, rate: float | None) -> int:
    messages: list[tuple[bytes | None, Headers, bytes]] = []
    for n in range(count):
        headers, value = new_task_message(n)
        messages.append((None, headers, value))
    return _send(settings, messages, rate)


def send_updates(settings: Settings, count: int, error_ratio: float, rate: float | None) -> int:
    """completed/error updates for up to ``count`` tasks that are still `new` in the table."""

    async def new_ids() -> list[uuid.UUID]:
        conn = await postgres.connect(settings.postgres)
        try:
            rows = await conn.fetch(
                "SELECT id FROM web_crawl_tasks WHERE status = 'new' ORDER BY created_at LIMIT $1",
                count,
            )
        finally:
            await conn.close()
        return [row["id"] for row in rows]

    chooser = random.Random(0)  # noqa: S311 (sample data, not security)
    messages: list[tuple[bytes | None, Headers, bytes]] = []
    for task_id in asyncio.run(new_ids()):
        headers, value = update_message(task_id, failed=chooser.random() < error_ratio)
        messages.append((str(task_id).encode(), headers, value))
    return _send(settings, messages, rate)
