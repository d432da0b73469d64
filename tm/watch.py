"""``tm watch [TASK_ID]``: follow the task-event feed (REDIS_URL) and print each transition as it
happens, one line each: ``<at> <task_id> <status> [trace_id=<id>]``. Without a task id it reads
the stream from now on (``XREAD BLOCK``); with one, it subscribes to that task's channel: what a
gateway's WebSocket handler would do for its users. It runs until interrupted, or until ``limit``
events were printed.
"""

from __future__ import annotations

import sys
from typing import TextIO, cast

import orjson
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from tm.adapters.redis import CHANNEL_PREFIX, tls_options
from tm.config import Settings
from tm.errors import ConfigError, TmError

BLOCK_MS = 1000  # one XREAD waits this long, so that an interrupt is served soon


def _line(fields: dict[str, str]) -> str:
    line = f"{fields.get('at', '-')} {fields.get('task_id', '-')} {fields.get('status', '-')}"
    if fields.get("trace_id"):
        line += f" trace_id={fields['trace_id']}"
    return line


def watch(
    settings: Settings, task_id: str | None, *, limit: int | None = None, out: TextIO = sys.stdout
) -> int:
    """Print transitions until interrupted (or ``limit`` of them); returns the exit status."""
    if settings.redis.url is None:
        raise ConfigError("REDIS_URL", "", "a redis:// URL: tm watch reads the task-event feed")
    client = redis.Redis.from_url(
        settings.redis.url, decode_responses=True, **tls_options(settings.redis)
    )
    printed = 0
    try:
        if task_id is not None:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(CHANNEL_PREFIX + task_id.lower())
            while limit is None or printed < limit:
                message = pubsub.get_message(timeout=BLOCK_MS / 1000)
                if message is not None:
                    print(_line(orjson.loads(message["data"])), file=out, flush=True)
                    printed += 1
            return 0
        last = "$"  # from now on
        while limit is None or printed < limit:
            reply = cast(
                list[tuple[str, list[tuple[str, dict[str, str]]]]],
                client.xread({settings.redis.stream: last}, block=BLOCK_MS),
            )
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    print(_line(fields), file=out, flush=True)
                    printed += 1
        return 0
    except RedisConnectionError as exc:
        raise TmError(f"Redis at {settings.redis.url.split('@')[-1]}: {exc}") from exc
    except RedisError as exc:
        raise TmError(f"Redis: {exc}") from exc
    finally:
        client.close()
