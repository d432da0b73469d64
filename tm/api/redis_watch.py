"""The API process's view of Redis (the task-event feed, REDIS_URL): a PING every few seconds in
the background, shown by ``/api/health/detailed``. It never counts towards readiness: the feed is
best effort and consumption does not depend on it. Imported only when REDIS_URL is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from tm.adapters.redis_readers import StreamProbe, shown_url
from tm.api.check import Check
from tm.connections import RedisSettings
from tm.errors import TmError

log = logging.getLogger("tm.api.redis")

PING_INTERVAL_S = 5.0
PING_TIMEOUT_S = 2.0


class RedisWatch:
    def __init__(self, settings: RedisSettings) -> None:
        assert settings.url is not None  # noqa: S101 (built only when REDIS_URL is set)
        self._settings = settings
        self._probe = StreamProbe(settings, timeout_s=PING_TIMEOUT_S)
        self._task: asyncio.Task[None] | None = None
        self.check = Check.pending()
        self.shown_url = shown_url(settings.url)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="tm-api-redis-check")

    async def _loop(self) -> None:
        while True:
            previous = self.check
            self.check = await self._ping()
            if previous.is_up and not self.check.is_up:
                log.warning("redis check failed", extra={"fields": {"error": self.check.error}})
            elif not previous.is_up and self.check.is_up and previous.error != "not checked yet":
                log.info("redis check passes again")
            await asyncio.sleep(PING_INTERVAL_S)

    async def _ping(self) -> Check:
        started = time.monotonic()
        details = {"url": self.shown_url, "stream": self._settings.stream}
        try:
            length = await self._probe.stream_length()
        except TimeoutError:
            return Check.now(is_up=False, started=started, error="timed out", details=details)
        except TmError as exc:
            return Check.now(is_up=False, started=started, error=str(exc), details=details)
        return Check.now(is_up=True, started=started, details={**details, "streamLength": length})

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._probe.close()
