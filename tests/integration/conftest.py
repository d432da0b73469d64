"""Fixtures of the integration tests besides the shared ones (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tm.adapters import postgres
from tm.adapters.postgres import Database
from tm.config import Settings


@pytest.fixture
async def database(
    settings: Settings, schema: str, db: asyncpg.Connection
) -> AsyncIterator[Database]:
    """A worker's Database on the migrated fresh schema (``db`` migrates it)."""
    kwargs = postgres.connect_kwargs(settings.postgres)
    kwargs["server_settings"] = {**kwargs["server_settings"], "search_path": f'"{schema}"'}
    pool = await asyncpg.create_pool(**kwargs, min_size=1, max_size=1)
    yield Database(pool)
    await pool.close()
