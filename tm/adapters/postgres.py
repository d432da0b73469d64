"""PostgreSQL through asyncpg: connection settings and the translation of its errors.

Every asyncpg or socket error that leaves this package has been turned into one of tm's errors
(:mod:`tm.errors`) by :func:`translate_error`, by SQLSTATE class and never by message text.
"""

from __future__ import annotations

import asyncio
import ssl
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import asyncpg
import orjson

from tm.connections import PostgresSettings
from tm.core.messages import NewTask, StatusUpdate
from tm.errors import (
    ConfigError,
    DatabaseUnavailableError,
    FatalError,
    RowRejectedError,
    TmError,
)

# SQLSTATEs worth a retry: the server went away, is starting or shutting down, is out of
# resources, or the transaction lost a race (serialization failure, deadlock) or timed out;
# 25006 (read-only transaction) is a standby during a failover, before it is promoted.
_TRANSIENT_CLASSES = frozenset({"08", "53", "58"})
_TRANSIENT_CODES = frozenset(
    {"40001", "40P01", "57014", "57P01", "57P02", "57P03", "55P03", "25006"}
)
# SQLSTATEs that blame one row's data: data exceptions, integrity violations, RAISE.
_ROW_CLASSES = frozenset({"22", "23"})
_ROW_CODES = frozenset({"P0001"})


# TCP keepalives the server sends on tm's connections: a client gone without a FIN (NAT entry
# dropped, host lost) is noticed after IDLE + INTERVAL * COUNT = 25 s, not the kernel's ~2 h 11 min,
# and its session, and whatever it holds, ends. Client-side keepalives would need asyncpg's
# private transport (no public option: MagicStack/asyncpg#606); the command timeout covers that
# side.
TCP_KEEPALIVES_IDLE_S = 10
TCP_KEEPALIVES_INTERVAL_S = 5
TCP_KEEPALIVES_COUNT = 3
# The server's statement deadline is the client's plus this: the client's timer starts first
# and its timeout (which cancels the statement and reports it) fires first; the server's ends
# the statement when the client can no longer reach it.
STATEMENT_TIMEOUT_GRACE_MS = 1000


def server_timeouts(query_timeout_ms: int) -> dict[str, str]:
    """The server-side deadlines of tm's sessions, derived from POSTGRES_QUERY_TIMEOUT, so that
    a dead connection cannot hold rows hostage (DESIGN §3)."""
    statement_timeout_ms = query_timeout_ms + STATEMENT_TIMEOUT_GRACE_MS
    # A wait on row locks this long is a wait behind an orphaned transaction (tm's own lock
    # waits, two redelivered batches overlapping, last milliseconds): fail it with 55P03, a
    # transient error, and retry the batch with backoff rather than spend the whole budget.
    lock_timeout_ms = max(query_timeout_ms // 2, 1)
    # tm sends the statements of a transaction back to back (creates, updates, COMMIT): a
    # session idle inside a transaction for a whole query timeout belongs to a client that has
    # given up on it or vanished. The server ends it and releases its row locks.
    idle_in_transaction_ms = query_timeout_ms
    return {
        "statement_timeout": str(statement_timeout_ms),
        "lock_timeout": str(lock_timeout_ms),
        "idle_in_transaction_session_timeout": str(idle_in_transaction_ms),
    }


def connect_kwargs(settings: PostgresSettings, *, migrating: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``asyncpg.connect`` / ``asyncpg.create_pool`` from the settings.

    ``migrating``: for ``tm db migrate``, without the statement, lock and command timeouts (a
    migration of a big table may rightly take long, and a second migrator waits for the first
    one's advisory lock); keepalives and the idle-in-transaction deadline stay."""
    server_settings = {
        "application_name": "tm",
        "tcp_keepalives_idle": str(TCP_KEEPALIVES_IDLE_S),
        "tcp_keepalives_interval": str(TCP_KEEPALIVES_INTERVAL_S),
        "tcp_keepalives_count": str(TCP_KEEPALIVES_COUNT),
        **server_timeouts(settings.query_timeout_ms),
    }
    if migrating:
        server_settings["statement_timeout"] = server_settings["lock_timeout"] = "0"
    kwargs: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "user": settings.user,
        "password": settings.password,
        "database": settings.database,
        "timeout": settings.connection_timeout_ms / 1000,
        "command_timeout": None if migrating else settings.query_timeout_ms / 1000,
        "server_settings": server_settings,
    }
    kwargs["ssl"] = ssl_option(settings)
    return kwargs


def ssl_option(settings: PostgresSettings) -> ssl.SSLContext | str | bool:
    """asyncpg's ``ssl`` for POSTGRES_SSLMODE, with libpq's meanings: ``disable`` never TLS;
    ``allow`` and ``prefer`` TLS when the server offers it, nothing verified (asyncpg's own
    handling, which falls back to plaintext); ``require`` TLS, nothing verified; ``verify-ca``
    the server's chain to POSTGRES_SSL_ROOT_CERT (the system's CAs when unset); ``verify-full``
    that and the host name. A client certificate goes with the last three."""
    mode = settings.sslmode
    if mode == "disable":
        return False
    if mode in ("allow", "prefer"):
        return mode
    if mode == "require":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        try:
            context = ssl.create_default_context(cafile=settings.ssl_root_cert)
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                "POSTGRES_SSL_ROOT_CERT", settings.ssl_root_cert or "", f"PEM certificates ({exc})"
            ) from None
        context.check_hostname = mode == "verify-full"
    if settings.ssl_cert and settings.ssl_key:
        try:
            context.load_cert_chain(settings.ssl_cert, settings.ssl_key)
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                "POSTGRES_SSL_KEY", settings.ssl_key, f"the PEM key of POSTGRES_SSL_CERT ({exc})"
            ) from None
    return context


async def connect(settings: PostgresSettings, *, migrating: bool = False) -> asyncpg.Connection:
    """Open one connection, translating failures (a wrong password is fatal, not transient)."""
    async with translated():
        return await asyncpg.connect(**connect_kwargs(settings, migrating=migrating))


class translated:  # lower case: used as a function, ``async with translated(pool):``
    """The one place where asyncpg's and the socket's errors leave as tm's
    (:func:`translate_error`). With ``pool``: a lost connection expires the pool's others too,
    since they most likely died with it, and the retry starts afresh."""

    def __init__(self, pool: asyncpg.Pool | None = None) -> None:
        self._pool = pool

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not isinstance(exc, Exception):
            return  # nothing raised, or a cancellation or an exit: on its way unchanged
        error = translate_error(exc)
        if self._pool is not None and isinstance(error, DatabaseUnavailableError):
            await self._pool.expire_connections()
        if error is not exc:
            raise error from exc


# Refusals that no retry cures, with the settings that decide them: the line an operator reads
# names what to change.
_SETTINGS_OF_SQLSTATE = {
    "28P01": "POSTGRES_USER, POSTGRES_PASSWORD",  # invalid_password
    "28000": "POSTGRES_SSLMODE, POSTGRES_USER",  # invalid_authorization_specification: pg_hba
}


def translate_error(exc: BaseException) -> BaseException:
    """Map an asyncpg or socket error to tm's tree; anything else is returned unchanged."""
    if isinstance(exc, TmError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        # The server's certificate is not signed by the CA given, or names another host.
        return FatalError(
            f"POSTGRES_SSL_ROOT_CERT, POSTGRES_HOST, POSTGRES_SSLMODE: {type(exc).__name__}: "
            f"{exc.verify_message or exc}"
        )
    if isinstance(exc, ssl.SSLError):
        return FatalError(f"POSTGRES_SSLMODE, POSTGRES_SSL_*: {type(exc).__name__}: {exc}")
    if isinstance(exc, asyncpg.exceptions.InvalidCachedStatementError):
        # 0A000 "cached plan must not change result type": the schema changed under a
        # prepared statement (a migration while tm runs). Fresh connections, fresh caches: the
        # pool is expired on this error (Database.apply), so the retry succeeds.
        return DatabaseUnavailableError(f"{type(exc).__name__}: {exc}", sqlstate=exc.sqlstate)
    if isinstance(exc, asyncpg.PostgresError):
        code = getattr(exc, "sqlstate", None) or ""
        message = f"{type(exc).__name__}: {exc}"
        if code[:2] in _TRANSIENT_CLASSES or code in _TRANSIENT_CODES:
            return DatabaseUnavailableError(message, sqlstate=code)
        if code[:2] in _ROW_CLASSES or code in _ROW_CODES:
            return RowRejectedError(message, sqlstate=code)
        if code in _SETTINGS_OF_SQLSTATE:
            message = f"{_SETTINGS_OF_SQLSTATE[code]}: {message}"
        return FatalError(f"{message} (SQLSTATE {code})")
    if isinstance(exc, (asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError)):
        # Connection closed underneath us, pool closing, a protocol left in a bad state by a
        # backend terminated while idle, and the like: a fresh connection will do.
        return DatabaseUnavailableError(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, (OSError, asyncio.TimeoutError)):
        return DatabaseUnavailableError(f"{type(exc).__name__}: {exc}".rstrip(": "))
    return exc


# The columns of a batch travel as text, one parameter each, unpacked into the set-based
# functions' array arguments by the server. asyncpg's own array encoding costs the client about
# 6 µs per row (per element it checks, through Python-level ABC isinstance calls, whether the
# element is itself an array). Free text (e-mails, queries, URLs, results) goes as a JSON array,
# which orjson writes in about 0.5 µs a row; ids, statuses and instants, which never hold a
# comma, go as comma-separated values, which the server splits in about half the time it parses
# the same values as JSON (0.3 µs a value less). A subquery over one set-returning function
# yields its rows in the function's order, which ARRAY() keeps.
_CREATE_SQL = """
SELECT outcome FROM tm_create_tasks(
    string_to_array($1, ',')::uuid[],
    ARRAY(SELECT json_array_elements_text($2::json)),
    ARRAY(SELECT json_array_elements_text($3::json)),
    ARRAY(SELECT json_array_elements_text($4::json)),
    string_to_array($5, ',')::timestamptz[]
) ORDER BY ord
"""
_UPDATE_SQL = """
SELECT outcome FROM tm_apply_status_updates(
    string_to_array($1, ',')::uuid[],
    string_to_array($2, ',')::task_status[],
    ARRAY(SELECT json_array_elements_text($3::json)),
    string_to_array($4, ',')::timestamptz[]
) ORDER BY ord
"""


def _json(values: list[Any]) -> str:
    """One column as JSON text."""
    return orjson.dumps(values).decode()


def _instants(moments: list[datetime]) -> str:
    """A timestamptz column as comma-separated RFC 3339 in UTC, which the server reads back
    exactly. In UTC because a header's offset may be anything Python accepts (-19:25, say) and
    PostgreSQL's timestamptz input refuses offsets beyond ±15:59. orjson writes them (the JSON
    array's brackets and quotes are cut) several times faster than datetime.isoformat()."""
    quoted = orjson.dumps([m if m.tzinfo is UTC else m.astimezone(UTC) for m in moments])
    return quoted[2:-2].replace(b'","', b",").decode()


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """What a connection released to the pool runs, besides asyncpg's rollback of a
    transaction left open: nothing. asyncpg's default is a round trip of four statements
    (advisory unlocks, CLOSE ALL, UNLISTEN *, RESET ALL) per batch, for session state that
    tm's statements never change."""


class Database:
    """The worker's pool and its one write: a batch through the set-based functions."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, settings: PostgresSettings, *, max_size: int | None = None) -> Database:
        size = max_size or settings.max_connections
        async with translated():
            pool = await asyncpg.create_pool(
                **connect_kwargs(settings),
                min_size=1,
                max_size=size,
                max_inactive_connection_lifetime=settings.idle_timeout_ms / 1000 or 0,
                reset=_keep_session,
            )
        return cls(pool)

    async def apply(
        self, creates: list[NewTask], updates: list[StatusUpdate]
    ) -> tuple[list[str], list[str]]:
        """Apply new tasks, then status updates, in one transaction; one outcome per row, in
        order. Raises RowRejectedError (a row's data), DatabaseUnavailableError, FatalError."""
        async with translated(self._pool), self._pool.acquire() as conn:
            if creates and updates:
                async with conn.transaction():
                    created = await _create(conn, creates)
                    updated = await _update(conn, updates)
                return created, updated
            if creates:
                return await _create(conn, creates), []
            if updates:
                return [], await _update(conn, updates)
            return [], []

    def pool_usage(self) -> tuple[int, int]:
        """(connections in use, idle connections) of the pool."""
        size = self._pool.get_size()
        idle = self._pool.get_idle_size()
        return size - idle, idle

    async def ping(self) -> None:
        async with translated():
            await self._pool.fetchval("SELECT 1")

    async def close(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), timeout_s)
        except TimeoutError:
            self._pool.terminate()


async def _create(conn: asyncpg.Connection, creates: list[NewTask]) -> list[str]:
    rows = await conn.fetch(
        _CREATE_SQL,
        ",".join([t.id for t in creates]),
        _json([t.user_email for t in creates]),
        _json([t.user_query for t in creates]),
        _json([t.base_url for t in creates]),
        _instants([t.received_at for t in creates]),
    )
    return [row[0] for row in rows]


async def _update(conn: asyncpg.Connection, updates: list[StatusUpdate]) -> list[str]:
    rows = await conn.fetch(
        _UPDATE_SQL,
        ",".join([u.id for u in updates]),
        ",".join([u.status.value for u in updates]),
        _json([u.result for u in updates]),
        _instants([u.finished_at for u in updates]),
    )
    return [row[0] for row in rows]
