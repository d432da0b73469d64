"""PostgreSQL through asyncpg: connection settings and the translation of its errors.

Every asyncpg or socket error that leaves this package has been turned into one of tm's errors
(:mod:`tm.errors`) by :func:`translate_error`, by SQLSTATE class and never by message text.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import asyncpg

from tm.config import PostgresSettings
from tm.errors import (
    DatabaseUnavailableError,
    FatalError,
    RowRejectedError,
    TmError,
)

# SQLSTATEs worth a retry: the server went away, is starting or shutting down, is out of
# resources, or the transaction lost a race (serialization failure, deadlock) or timed out.
_TRANSIENT_CLASSES = frozenset({"08", "53", "58"})
_TRANSIENT_CODES = frozenset({"40001", "40P01", "57014", "57P01", "57P02", "57P03", "55P03"})
# SQLSTATEs that blame one row's data: data exceptions, integrity violations, RAISE.
_ROW_CLASSES = frozenset({"22", "23"})
_ROW_CODES = frozenset({"P0001"})


def connect_kwargs(settings: PostgresSettings) -> dict[str, Any]:
    """Keyword arguments for ``asyncpg.connect`` / ``asyncpg.create_pool`` from the settings."""
    kwargs: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "user": settings.user,
        "password": settings.password,
        "database": settings.database,
        "timeout": settings.connection_timeout_ms / 1000,
        "command_timeout": settings.query_timeout_ms / 1000,
        "server_settings": {"application_name": "tm"},
    }
    if settings.ssl:
        kwargs["ssl"] = ssl.create_default_context()
    else:
        kwargs["ssl"] = False
    return kwargs


async def connect(settings: PostgresSettings) -> asyncpg.Connection:
    """Open one connection, translating failures (a wrong password is fatal, not transient)."""
    try:
        return await asyncpg.connect(**connect_kwargs(settings))
    except BaseException as exc:
        raise translate_error(exc) from exc


def translate_error(exc: BaseException) -> BaseException:
    """Map an asyncpg or socket error to tm's tree; anything else is returned unchanged."""
    if isinstance(exc, TmError):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        code = getattr(exc, "sqlstate", None) or ""
        message = f"{type(exc).__name__}: {exc}"
        if code[:2] in _TRANSIENT_CLASSES or code in _TRANSIENT_CODES:
            return DatabaseUnavailableError(message, sqlstate=code)
        if code[:2] in _ROW_CLASSES or code in _ROW_CODES:
            return RowRejectedError(message, sqlstate=code)
        return FatalError(f"{message} (SQLSTATE {code})")
    if isinstance(exc, asyncpg.InterfaceError):
        # Connection closed underneath us, pool closing, and the like.
        return DatabaseUnavailableError(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, (OSError, asyncio.TimeoutError)):
        return DatabaseUnavailableError(f"{type(exc).__name__}: {exc}".rstrip(": "))
    return exc
