"""get_web_crawl_metrics answers shared between requests: one query for concurrent requests,
reused for a few seconds, never a failure kept."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

from tm.api import counts as counts_module
from tm.api import shared as shared_module
from tm.api.counts import SharedCounts
from tm.errors import DatabaseUnavailableError


class FakeDatabase:
    def __init__(self) -> None:
        self.calls: list[int] = []
        self.release = asyncio.Event()
        self.fail = False

    async def web_crawl_metrics(self, hours: int) -> tuple[int, int, int, int]:
        self.calls.append(hours)
        await self.release.wait()
        if self.fail:
            raise DatabaseUnavailableError("down")
        return hours, 0, 0, hours

    async def last_prune_run(self) -> None:
        self.calls.append(-1)
        await self.release.wait()


async def test_concurrent_requests_share_one_query() -> None:
    database = FakeDatabase()
    shared = SharedCounts(database)  # type: ignore[arg-type]
    waiting = [asyncio.create_task(shared.get(24)) for _ in range(5)]
    other = asyncio.create_task(shared.get(6))
    await asyncio.sleep(0)
    database.release.set()
    answers = await asyncio.gather(*waiting)
    assert {a[1] for a in answers} == {(24, 0, 0, 24)}
    assert (await other)[1] == (6, 0, 0, 6)
    assert sorted(database.calls) == [6, 24]
    assert (await shared.get(24))[1] == (24, 0, 0, 24)
    assert len(database.calls) == 2  # reused


async def test_answers_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    database = FakeDatabase()
    database.release.set()
    shared = SharedCounts(database)  # type: ignore[arg-type]
    await shared.get(1)
    later = time.monotonic() + counts_module.COUNTS_TTL_S + 1
    monkeypatch.setattr(shared_module, "time", SimpleNamespace(monotonic=lambda: later))
    await shared.get(1)
    assert database.calls == [1, 1]


async def test_failures_are_not_kept() -> None:
    database = FakeDatabase()
    database.release.set()
    database.fail = True
    shared = SharedCounts(database)  # type: ignore[arg-type]
    with pytest.raises(DatabaseUnavailableError):
        await shared.get(24)
    database.fail = False
    assert (await shared.get(24))[1] == (24, 0, 0, 24)


async def test_a_client_going_away_does_not_cancel_the_query() -> None:
    database = FakeDatabase()
    shared = SharedCounts(database)  # type: ignore[arg-type]
    first = asyncio.create_task(shared.get(24))
    second = asyncio.create_task(shared.get(24))
    await asyncio.sleep(0)
    first.cancel()
    database.release.set()
    answer: Any = await second
    assert answer[1] == (24, 0, 0, 24)
    assert database.calls == [24]


async def test_the_last_prune_run_is_shared_too() -> None:
    database = FakeDatabase()
    shared = SharedCounts(database)  # type: ignore[arg-type]
    waiting = [asyncio.create_task(shared.last_prune_run()) for _ in range(3)]
    await asyncio.sleep(0)
    database.release.set()
    assert await asyncio.gather(*waiting) == [None, None, None]
    assert await shared.last_prune_run() is None
    assert database.calls == [-1]
