"""Reading the task-event feed back from Redis (redis-py): what ``tm watch`` prints and what the
API's health check looks at. The feed's writer is :mod:`tm.adapters.redis`; like it, this module
is imported only when ``REDIS_URL`` is set, and redis-py's errors leave it as tm's.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator
from typing import cast

import orjson
import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from tm.adapters.redis import CHANNEL_PREFIX, tls_options
from tm.connections import RedisSettings
from tm.errors import TmError

BLOCK_MS = 1000  # one blocking read waits this long, so that an interrupt is served soon


def shown_url(url: str) -> str:
    """The URL without its password, for display."""
    return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)


def follow(settings: RedisSettings, task_id: str | None) -> Iterator[dict[str, str]]:
    """The transitions from now on, as their fields (``task_id``, ``status``, ``at``, maybe
    ``trace_id``): every task's from the stream, or one task's from its channel. Raises
    TmError when Redis cannot be reached or refuses."""
    assert settings.url is not None  # noqa: S101 (callers check REDIS_URL first)
    client = redis.Redis.from_url(settings.url, decode_responses=True, **tls_options(settings))
    try:
        if task_id is not None:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(CHANNEL_PREFIX + task_id.lower())
            while True:
                message = pubsub.get_message(timeout=BLOCK_MS / 1000)
                if message is not None:
                    yield cast(dict[str, str], orjson.loads(message["data"]))
        last = "$"  # from now on
        while True:
            reply = cast(
                list[tuple[str, list[tuple[str, dict[str, str]]]]],
                client.xread({settings.stream: last}, block=BLOCK_MS),
            )
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    yield fields
    except RedisConnectionError as exc:
        raise TmError(f"Redis at {shown_url(settings.url).split('@')[-1]}: {exc}") from exc
    except RedisError as exc:
        raise TmError(f"Redis: {exc}") from exc
    finally:
        client.close()


class StreamProbe:
    """A PING and the stream's length, within ``timeout_s``: the API's look at the feed."""

    def __init__(self, settings: RedisSettings, *, timeout_s: float) -> None:
        assert settings.url is not None  # noqa: S101 (built only when REDIS_URL is set)
        self._stream = settings.stream
        self._timeout_s = timeout_s
        self._client = aioredis.Redis.from_url(
            settings.url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            **tls_options(settings),
        )

    async def stream_length(self) -> int:
        """Raises TimeoutError, or TmError with Redis's own words."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._client.ping()
                return int(await self._client.xlen(self._stream))
        except (RedisError, OSError) as exc:
            raise TmError(str(exc) or type(exc).__name__) from exc

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()
