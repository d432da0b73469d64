"""Redis through redis-py (asyncio): the task-event feed of a worker (DESIGN §11).

Imported only when ``REDIS_URL`` is set. :class:`TaskEvents` takes a batch's transitions
(``publish``, never blocks: a full queue drops and counts them) and one task of its own sends
each batch in one round trip: a Lua script that does, per event, an ``XADD`` to the stream and
a ``PUBLISH`` on ``tm:task:<task_id>``, then trims the stream (``XTRIM MAXLEN ~``). Redis slow
or down costs events, never time: the round trip has a short timeout, a failure drops the
batch (counted) and the next attempt waits a little, and the client reconnects by itself when
Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tm.connections import RedisSettings
from tm.core.messages import TaskEvent
from tm.observability import metrics

log = logging.getLogger("tm.redis")

QUEUE_MAX_EVENTS = 100_000  # events waiting to be sent; beyond, new ones are dropped
SEND_TIMEOUT_S = 1.0  # one pipelined round trip (connect included): Redis slower is Redis down
# Events per script call when batches are joined: Redis runs a script alone, about 5.5 us per
# event, so a call blocks it for 30 ms at most (a single larger batch still goes whole).
SEND_MAX_EVENTS = 5_000
RETRY_AFTER_S = 1.0  # after a failure, events are dropped for this long before the next try
CHANNEL_PREFIX = "tm:task:"
# KEYS[1] the stream; ARGV[1] the batch's events as a JSON array of [task_id, status, at,
# trace_id|null]; ARGV[2] the stream's MAXLEN (~). Per event: XADD, then PUBLISH on its task's
# channel of the same fields as a JSON object; then one XTRIM for the whole call. Returns the
# number of events written. Redis's own CPU shares the cores with tm, so the script does little:
# the JSON object is joined from its parts, not cjson.encode'd, which is exact because every
# part is JSON-safe by construction (a canonical UUID, a status, an ISO-8601 time of the form
# 2026-01-02T03:04:05.678Z, 32 hex digits: tm.core.decode checks each), and one XTRIM costs
# less than a MAXLEN on every XADD: 5.6 us of Redis CPU per event instead of 6.8 (EVALSHA's
# usec in INFO commandstats, a stream at its MAXLEN, batches of 2000, half of them traced).
_SEND_SCRIPT = (
    """
local stream, events = KEYS[1], cjson.decode(ARGV[1])
for _, e in ipairs(events) do
  local id, status, at, trace = e[1], e[2], e[3], e[4]
  local message
  if trace ~= cjson.null then
    redis.call('XADD', stream, '*', 'task_id', id, 'status', status, 'at', at, 'trace_id', trace)
    message = '{"task_id":"' .. id .. '","status":"' .. status .. '","at":"' .. at
      .. '","trace_id":"' .. trace .. '"}'
  else
    redis.call('XADD', stream, '*', 'task_id', id, 'status', status, 'at', at)
    message = '{"task_id":"' .. id .. '","status":"' .. status .. '","at":"' .. at .. '"}'
  end
  redis.call('PUBLISH', '"""
    + CHANNEL_PREFIX
    + """' .. id, message)
end
redis.call('XTRIM', stream, 'MAXLEN', '~', ARGV[2])
return #events
"""
)


def tls_options(settings: RedisSettings) -> dict[str, Any]:
    """redis-py's options for a rediss:// URL: the CA of REDIS_SSL_CA_FILE (the server's
    certificate and host name are verified, redis-py's defaults). Every Redis client of tm takes
    them: the feed, the API's health check, tm watch. Nothing for redis://, whose connections
    take no TLS option."""
    return {"ssl_ca_certs": settings.ssl_ca_file} if settings.ssl_ca_file else {}


class TaskEvents:
    """The feed of one worker: a bounded queue and the task that empties it."""

    def __init__(self, settings: RedisSettings) -> None:
        assert settings.url is not None  # noqa: S101 (built only when REDIS_URL is set)
        self._stream = settings.stream
        self._maxlen = settings.stream_maxlen
        self._client = aioredis.Redis.from_url(
            settings.url,
            socket_timeout=SEND_TIMEOUT_S,
            socket_connect_timeout=SEND_TIMEOUT_S,
            retry_on_timeout=False,
            **tls_options(settings),
        )
        self._script = self._client.register_script(_SEND_SCRIPT)
        self._queue: deque[list[TaskEvent]] = deque()
        self._queued = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.is_up = False
        self.last_error: str | None = None
        for outcome in ("sent", "dropped"):  # zero series, only where the feed exists
            metrics.task_events.labels(outcome)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tm-redis-events")
        self._task.add_done_callback(_report_death)

    def publish(self, events: list[TaskEvent]) -> None:
        """Queue a batch's events; drop (and count) them when the queue is full."""
        if not events:
            return
        if self._queued + len(events) > QUEUE_MAX_EVENTS:
            metrics.task_events.labels("dropped").inc(len(events))
            return
        self._queue.append(events)
        self._queued += len(events)
        self._wakeup.set()

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            events = self._take()
            if await self._send(events):
                continue
            # Down: what waits now would be late anyway; count it and pause a little.
            for waiting in self._queue:
                metrics.task_events.labels("dropped").inc(len(waiting))
            self._queue.clear()
            self._queued = 0
            if not self._closing:
                await asyncio.sleep(RETRY_AFTER_S)

    def _take(self) -> list[TaskEvent]:
        """The oldest queued batch, joined by the next ones while the total stays within
        SEND_MAX_EVENTS: batches committed while a call was under way go together in the
        next, so a slow Redis costs fewer round trips, not more."""
        events = self._queue.popleft()
        while self._queue and len(events) + len(self._queue[0]) <= SEND_MAX_EVENTS:
            events = events + self._queue.popleft()
        self._queued -= len(events)
        return events

    async def _send(self, events: list[TaskEvent]) -> bool:
        # One script call for one or more batches: the events go as one JSON argument, and
        # Redis does the XADD and PUBLISH of each. A command per event would cost tm tens of
        # microseconds of redis-py per message; this costs one orjson.dumps.
        payload = orjson.dumps(events)
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S * 2):  # no task per call, as wait_for's
                await self._script(keys=[self._stream], args=[payload, self._maxlen])
        except (RedisError, OSError, TimeoutError) as exc:
            metrics.task_events.labels("dropped").inc(len(events))
            error = str(exc) or type(exc).__name__
            if self.is_up or self.last_error is None:
                log.warning(
                    "task events: redis unavailable; dropping events",
                    extra={"fields": {"error": error}},
                )
            self.is_up, self.last_error = False, error
            return False
        metrics.task_events.labels("sent").inc(len(events))
        if not self.is_up and self.last_error is not None:
            log.info("task events: redis answers again")
        self.is_up, self.last_error = True, None
        return True

    async def close(self, timeout_s: float) -> None:
        """Send what is queued (within ``timeout_s``), then close the connection."""
        if self._task is not None:
            self._closing = True
            self._wakeup.set()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._task, timeout_s)  # cancelled at the deadline
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()


def _report_death(task: asyncio.Task[None]) -> None:
    """The feed's task ends only when closed; anything else is a bug, and must be loud."""
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "task events: the feed stopped; no more events from this worker",
            exc_info=task.exception(),
        )
