"""`tm db migrate` against a real PostgreSQL: what it creates, its ledger, its lock, its refusals,
and the adoption of a database built by the original service."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import shutil
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import connect_to_schema, until_waiting_for_a_lock
from tm.adapters import migrations
from tm.config import Settings
from tm.core.messages import TaskStatus
from tm.errors import MigrationError

pytestmark = pytest.mark.integration

EXPECTED_FUNCTIONS = {
    "update_updated_at_column",
    "create_web_crawl_task",
    "update_web_crawl_task",
    "find_web_crawl_task_by_id",
    "find_web_crawl_tasks_by_status",
    "count_web_crawl_tasks_by_status",
    "get_tasks_count_by_status",
    "get_new_tasks_count",
    "get_completed_tasks_count",
    "get_error_tasks_count",
    "get_total_tasks_count_by_creation_time",
    "get_web_crawl_metrics",
    "tm_create_tasks",
    "tm_apply_status_updates",
    "tm_count_tasks",
    "tm_list_tasks_by_status",
    "tm_web_crawl_metrics_since",
    "tm_status_outcome",
    "tm_touch_updated_at",
}
EXPECTED_VIEWS = {
    "completed_web_crawl_tasks",
    "pending_web_crawl_tasks",
    "web_crawl_task_statistics",
}
EXPECTED_INDEXES = {
    "web_crawl_tasks_pkey",
    "idx_web_crawl_tasks_created_at_id",
}

# The original service's HEAD schema (reference/original-service.md §2.1-§2.3): the `data`
# column that its migration 001 never got to rename, its five indexes, the redundant one its
# migration 002 added, and its trigger.
ORIGINAL_HEAD_SCHEMA = """
CREATE TYPE task_status AS ENUM ('new', 'completed', 'error');
CREATE TABLE web_crawl_tasks (
    id           UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_email   VARCHAR(255) NOT NULL,
    user_query   TEXT NOT NULL,
    original_url VARCHAR(2048) NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL,
    status       task_status NOT NULL DEFAULT 'new',
    data         TEXT,
    finished_at  TIMESTAMPTZ,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE INDEX idx_web_crawl_tasks_status ON web_crawl_tasks (status);
CREATE INDEX idx_web_crawl_tasks_user_email ON web_crawl_tasks (user_email);
CREATE INDEX idx_web_crawl_tasks_created_at ON web_crawl_tasks (created_at);
CREATE INDEX idx_web_crawl_tasks_received_at ON web_crawl_tasks (received_at);
CREATE INDEX idx_web_crawl_tasks_user_email_status ON web_crawl_tasks (user_email, status);
CREATE INDEX idx_web_crawl_tasks_id ON web_crawl_tasks (id);
CREATE FUNCTION update_updated_at_column() RETURNS TRIGGER LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at = NOW();
    RETURN NEW;
END
$$;
CREATE TRIGGER update_web_crawl_tasks_updated_at BEFORE UPDATE ON web_crawl_tasks
    FOR EACH ROW EXECUTE FUNCTION update_updated_at_column();
"""

# The original HEAD functions whose shape tm changes: the find functions return `data`, and its
# migration 001 left a `timestamp` overload of update beside the `timestamptz` one.
ORIGINAL_HEAD_FUNCTIONS = """
CREATE FUNCTION find_web_crawl_task_by_id(p_id UUID)
RETURNS TABLE (id UUID, user_email VARCHAR(255), user_query TEXT, original_url VARCHAR(2048),
               received_at TIMESTAMPTZ, status task_status, data TEXT, finished_at TIMESTAMPTZ,
               created_at TIMESTAMPTZ, updated_at TIMESTAMPTZ)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY SELECT t.id, t.user_email, t.user_query, t.original_url, t.received_at,
                        t.status, t.data, t.finished_at, t.created_at, t.updated_at
                 FROM web_crawl_tasks t WHERE t.id = p_id;
END
$$;
CREATE FUNCTION find_web_crawl_tasks_by_status(p_status task_status)
RETURNS TABLE (id UUID, user_email VARCHAR(255), user_query TEXT, original_url VARCHAR(2048),
               received_at TIMESTAMPTZ, status task_status, data TEXT, finished_at TIMESTAMPTZ,
               created_at TIMESTAMPTZ, updated_at TIMESTAMPTZ)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY SELECT t.id, t.user_email, t.user_query, t.original_url, t.received_at,
                        t.status, t.data, t.finished_at, t.created_at, t.updated_at
                 FROM web_crawl_tasks t WHERE t.status = p_status ORDER BY t.created_at DESC;
END
$$;
CREATE FUNCTION update_web_crawl_task(p_id UUID, p_status task_status, p_result TEXT,
                                      p_finished_at TIMESTAMPTZ, p_updated_at TIMESTAMPTZ)
RETURNS VOID LANGUAGE plpgsql AS $$
BEGIN
    UPDATE web_crawl_tasks SET status = p_status, data = p_result, finished_at = p_finished_at,
                               updated_at = p_updated_at
    WHERE id = p_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Task with id % not found', p_id;
    END IF;
END
$$;
CREATE FUNCTION update_web_crawl_task(p_id UUID, p_status task_status, p_result TEXT,
                                      p_finished_at TIMESTAMP, p_updated_at TIMESTAMP)
RETURNS VOID LANGUAGE plpgsql AS $$
BEGIN
    UPDATE web_crawl_tasks SET status = p_status, data = p_result WHERE id = p_id;
END
$$;
"""

# Older shapes of the original functions that CREATE OR REPLACE cannot turn into tm's: before
# its commit 816988b (HEAD) update took `p_data`, not `p_result`; before e517c49 the metrics
# function returned three counts, without total_tasks_count.
ORIGINAL_OLDER_FUNCTIONS = {
    "update-p_data-before-816988b": """
CREATE FUNCTION update_web_crawl_task(p_id UUID, p_status task_status, p_data TEXT,
                                      p_finished_at TIMESTAMPTZ, p_updated_at TIMESTAMPTZ)
RETURNS VOID LANGUAGE plpgsql AS $$
BEGIN
    UPDATE web_crawl_tasks SET status = p_status, data = p_data, finished_at = p_finished_at,
                               updated_at = p_updated_at
    WHERE id = p_id;
END
$$;
""",
    "metrics-without-total-before-e517c49": """
CREATE FUNCTION get_web_crawl_metrics(hours INTEGER)
RETURNS TABLE (new_tasks_count INTEGER, completed_tasks_count INTEGER,
               error_tasks_count INTEGER)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY SELECT 0, 0, 0;
END
$$;
""",
}


def _file_name(migration: migrations.Migration) -> str:
    return f"{migration.version:04d}_{migration.name}.sql"


def _migrations_before(version: int, directory: Path) -> Path:
    """``directory`` holding the migrations older than ``version``: a database migrated from it
    was last migrated before that one."""
    directory.mkdir()
    for migration in migrations.discover():
        if migration.version < version:
            (directory / _file_name(migration)).write_text(migration.sql, encoding="utf-8")
    return directory


@pytest.fixture
def sql_copy(tmp_path: Path) -> Path:
    """A private copy of sql/ that a test may edit."""
    directory = tmp_path / "sql"
    shutil.copytree(migrations.SQL_DIR, directory)
    return directory


async def _relation_exists(conn: asyncpg.Connection, name: str) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name))


async def _ledger(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"SELECT version, name, checksum, applied_at FROM {migrations.LEDGER_TABLE} "
        "ORDER BY version"
    )
    return rows


async def _holds_migration_lock(conn: asyncpg.Connection) -> bool:
    """Whether this session still holds the migrator's advisory lock."""
    key = migrations.MIGRATION_LOCK_KEY
    return bool(
        await conn.fetchval(
            """SELECT EXISTS (
                   SELECT 1 FROM pg_locks
                   WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
                     AND classid::bigint = ($1::bigint >> 32)
                     AND objid::bigint = ($1::bigint & 4294967295))""",
            key,
        )
    )


async def _names(conn: asyncpg.Connection, query: str, schema: str) -> set[str]:
    return {row[0] for row in await conn.fetch(query, schema)}


async def _functions(conn: asyncpg.Connection, schema: str) -> set[str]:
    """tm's functions in the schema; pgcrypto's are left out, because `CREATE EXTENSION` puts
    them in whichever schema is first on the search_path when the database has none yet."""
    return await _names(
        conn,
        """SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname = $1 AND NOT EXISTS (
               SELECT 1 FROM pg_depend d
               WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')""",
        schema,
    )


async def _views(conn: asyncpg.Connection, schema: str) -> set[str]:
    return await _names(conn, "SELECT viewname FROM pg_views WHERE schemaname = $1", schema)


async def _indexes(conn: asyncpg.Connection, schema: str) -> set[str]:
    return await _names(
        conn,
        "SELECT indexname FROM pg_indexes WHERE schemaname = $1 AND tablename = 'web_crawl_tasks'",
        schema,
    )


async def _columns(conn: asyncpg.Connection, schema: str) -> list[str]:
    rows = await conn.fetch(
        """SELECT column_name FROM information_schema.columns
           WHERE table_schema = $1 AND table_name = 'web_crawl_tasks' ORDER BY ordinal_position""",
        schema,
    )
    return [row["column_name"] for row in rows]


async def _fingerprint(conn: asyncpg.Connection, schema: str) -> dict[str, Any]:
    """Everything a migration could change in the schema, object ids included (a drop and
    re-create of an identical object changes its oid)."""
    queries = {
        "functions": """
            SELECT p.oid, p.proname, pg_get_function_identity_arguments(p.oid),
                   pg_get_functiondef(p.oid)
            FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname = $1 ORDER BY 2, 3""",
        "tables": """
            SELECT c.oid, c.relname, c.relkind FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') ORDER BY 2""",
        "columns": """
            SELECT table_name, column_name, ordinal_position, data_type, udt_name, is_nullable,
                   column_default, character_maximum_length
            FROM information_schema.columns WHERE table_schema = $1 ORDER BY 1, 3""",
        "compression": """
            SELECT c.relname, a.attname, a.attcompression FROM pg_attribute a
            JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = $1 AND c.relkind = 'r' AND a.attnum > 0 ORDER BY 1, 2""",
        "indexes": """
            SELECT c.oid, c.relname, pg_get_indexdef(c.oid) FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = $1 AND c.relkind = 'i' ORDER BY 2""",
        "views": """
            SELECT c.oid, c.relname, pg_get_viewdef(c.oid) FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = $1 AND c.relkind = 'v' ORDER BY 2""",
        "triggers": """
            SELECT t.oid, t.tgname, pg_get_triggerdef(t.oid) FROM pg_trigger t
            JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = $1 AND NOT t.tgisinternal ORDER BY 2""",
        "enums": """
            SELECT t.oid, t.typname, e.enumlabel, e.enumsortorder FROM pg_enum e
            JOIN pg_type t ON t.oid = e.enumtypid JOIN pg_namespace n ON n.oid = t.typnamespace
            WHERE n.nspname = $1 ORDER BY 2, 4""",
    }
    fingerprint: dict[str, Any] = {}
    for key, query in queries.items():
        fingerprint[key] = [tuple(row) for row in await conn.fetch(query, schema)]
    fingerprint["ledger"] = [tuple(row) for row in await _ledger(conn)]
    return fingerprint


async def test_migrate_applies_every_file_of_sql_in_order(conn: asyncpg.Connection) -> None:
    on_disk = migrations.discover()
    assert [_file_name(m) for m in on_disk] == sorted(
        path.name for path in migrations.SQL_DIR.glob("*.sql")
    )

    applied = await migrations.migrate(conn)

    assert applied == on_disk
    assert [row["version"] for row in await _ledger(conn)] == [m.version for m in on_disk]


async def test_migrate_creates_the_table_enum_trigger_functions_and_views(
    conn: asyncpg.Connection, schema: str
) -> None:
    await migrations.migrate(conn)

    table_type = await conn.fetchval(
        """SELECT table_type FROM information_schema.tables
           WHERE table_schema = $1 AND table_name = 'web_crawl_tasks'""",
        schema,
    )
    assert table_type == "BASE TABLE"
    assert await _columns(conn, schema) == [
        "id",
        "user_email",
        "user_query",
        "original_url",
        "received_at",
        "status",
        "result",
        "finished_at",
        "created_at",
        "updated_at",
    ]
    enum_type = await conn.fetchval(
        """SELECT t.typtype FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
           WHERE n.nspname = $1 AND t.typname = 'task_status'""",
        schema,
    )
    assert enum_type == b"e"
    trigger = await conn.fetchrow(
        """SELECT t.tgname, t.tgfoid::regproc::text AS function, pg_get_triggerdef(t.oid) AS def
           FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = $1 AND c.relname = 'web_crawl_tasks' AND NOT t.tgisinternal
             AND t.tgname = 'update_web_crawl_tasks_updated_at'""",
        schema,
    )
    assert trigger is not None
    # The original's name; a statement trigger since (a row trigger locks every updated row).
    assert trigger["function"] == "tm_touch_updated_at"
    assert "AFTER UPDATE" in trigger["def"]
    assert "FOR EACH STATEMENT" in trigger["def"]
    assert await _functions(conn, schema) == EXPECTED_FUNCTIONS
    assert await _views(conn, schema) == EXPECTED_VIEWS
    assert await _indexes(conn, schema) == EXPECTED_INDEXES


async def test_second_migrate_applies_nothing_and_changes_nothing(
    conn: asyncpg.Connection, schema: str
) -> None:
    await migrations.migrate(conn)
    before = await _fingerprint(conn, schema)

    applied = await migrations.migrate(conn)

    assert applied == []
    assert await _fingerprint(conn, schema) == before


async def test_ledger_holds_one_row_per_file_with_its_checksum(
    conn: asyncpg.Connection,
) -> None:
    await migrations.migrate(conn)
    db_now = await conn.fetchval("SELECT now()")

    rows = await _ledger(conn)

    expected = []
    for path in sorted(migrations.SQL_DIR.glob("*.sql")):
        version, _, name = path.stem.partition("_")
        expected.append((int(version), name, hashlib.sha256(path.read_bytes()).hexdigest()))
    assert [(row["version"], row["name"], row["checksum"]) for row in rows] == expected
    for row in rows:
        assert isinstance(row["applied_at"], dt.datetime)
        assert row["applied_at"] <= db_now


async def test_two_migrators_at_once_apply_each_migration_exactly_once(
    conn: asyncpg.Connection, other_conn: asyncpg.Connection, schema: str
) -> None:
    """Two pods starting together: the advisory lock makes one wait, and it then finds nothing
    left to do."""
    first, second = await asyncio.gather(migrations.migrate(conn), migrations.migrate(other_conn))

    on_disk = migrations.discover()
    assert sorted([first, second], key=len) == [[], on_disk]
    assert [row["version"] for row in await _ledger(conn)] == [m.version for m in on_disk]
    assert await _functions(conn, schema) == EXPECTED_FUNCTIONS
    assert not await _holds_migration_lock(conn)
    assert not await _holds_migration_lock(other_conn)


async def test_migration_changed_after_it_was_applied_is_refused(
    conn: asyncpg.Connection, sql_copy: Path
) -> None:
    await migrations.migrate(conn, sql_copy)
    ledger_before = await _ledger(conn)
    edited = sql_copy / "0002_original_functions.sql"
    edited.write_text(edited.read_text() + "\n-- an edit after deployment\n")
    (sql_copy / "0999_later.sql").write_text("CREATE TABLE applied_anyway (x int);\n")

    with pytest.raises(MigrationError, match="0002_original_functions"):
        await migrations.migrate(conn, sql_copy)

    assert await _ledger(conn) == ledger_before
    assert not await _relation_exists(conn, "applied_anyway")
    assert not await _holds_migration_lock(conn)


@pytest.mark.parametrize(
    "bad_name", ["4_later.sql", "0999_Later.sql", "0999-later.sql", "0999_later .sql"]
)
async def test_badly_named_migration_file_is_refused(
    conn: asyncpg.Connection, sql_copy: Path, bad_name: str
) -> None:
    (sql_copy / bad_name).write_text("CREATE TABLE applied_anyway (x int);\n")

    with pytest.raises(MigrationError, match="NNNN_lower_name"):
        await migrations.migrate(conn, sql_copy)

    assert not await _relation_exists(conn, "web_crawl_tasks")
    assert not await _relation_exists(conn, "applied_anyway")
    assert not await _holds_migration_lock(conn)


async def test_two_files_with_one_version_are_refused(
    conn: asyncpg.Connection, sql_copy: Path
) -> None:
    (sql_copy / "0003_other.sql").write_text("CREATE TABLE applied_anyway (x int);\n")

    with pytest.raises(MigrationError, match="used twice"):
        await migrations.migrate(conn, sql_copy)

    assert not await _relation_exists(conn, "web_crawl_tasks")


async def test_database_ahead_of_the_files_is_refused(
    conn: asyncpg.Connection, sql_copy: Path
) -> None:
    """An older tm must not run against a database that a newer tm migrated."""
    await migrations.migrate(conn)
    (sql_copy / "0003_batch_functions.sql").unlink()

    with pytest.raises(MigrationError, match=r"\[3\]"):
        await migrations.migrate(conn, sql_copy)


async def test_migrate_adopts_a_database_built_by_the_original_service(
    conn: asyncpg.Connection, schema: str
) -> None:
    """The original HEAD table keeps its rows; `data` becomes `result`; its indexes give way to
    the ones the real queries use."""
    await conn.execute(ORIGINAL_HEAD_SCHEMA)
    task_id = uuid.uuid4()
    received_at = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
    await conn.execute(
        """INSERT INTO web_crawl_tasks (id, user_email, user_query, original_url, received_at,
                                        status, data)
           VALUES ($1, 'ann@example.com', 'cats', 'https://example.com', $2, 'completed', 'x')""",
        task_id,
        received_at,
    )

    applied = await migrations.migrate(conn)

    assert applied == migrations.discover()
    row = await conn.fetchrow("SELECT * FROM web_crawl_tasks")
    assert row is not None
    assert (row["id"], row["status"], row["result"], row["received_at"]) == (
        task_id,
        "completed",
        "x",
        received_at,
    )
    assert "data" not in await _columns(conn, schema)
    assert await _indexes(conn, schema) == EXPECTED_INDEXES
    found = await conn.fetchrow("SELECT * FROM find_web_crawl_task_by_id($1)", task_id)
    assert found is not None
    assert found["result"] == "x"


async def test_migrate_replaces_the_original_functions_it_changes(
    conn: asyncpg.Connection, schema: str
) -> None:
    """The original find functions returned `data`, and its migration 001 left a `timestamp`
    overload of update: after migrate, one update exists and untyped calls are not ambiguous."""
    await conn.execute(ORIGINAL_HEAD_SCHEMA)
    await conn.execute(ORIGINAL_HEAD_FUNCTIONS)

    await migrations.migrate(conn)

    overloads = await conn.fetch(
        """SELECT pg_get_function_identity_arguments(p.oid) FROM pg_proc p
           JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname = $1 AND p.proname = 'update_web_crawl_task'""",
        schema,
    )
    assert len(overloads) == 1
    task_id = await conn.fetchval(
        "SELECT create_web_crawl_task('ann@example.com', 'cats', 'https://example.com', "
        "now(), 'new', now(), now())"
    )
    await conn.execute(
        f"SELECT update_web_crawl_task('{task_id}', 'completed', 'page', now(), now())"
    )
    found = await conn.fetchrow("SELECT * FROM find_web_crawl_task_by_id($1)", task_id)
    assert found is not None
    assert (found["status"], found["result"]) == ("completed", "page")


@pytest.mark.parametrize(
    "older_sql", ORIGINAL_OLDER_FUNCTIONS.values(), ids=ORIGINAL_OLDER_FUNCTIONS
)
async def test_migrate_adopts_older_shapes_of_the_original_functions(
    conn: asyncpg.Connection, older_sql: str
) -> None:
    """A database built by an earlier commit of the original service migrates too, and the
    functions then work as tm defines them."""
    await conn.execute(ORIGINAL_HEAD_SCHEMA)
    await conn.execute(older_sql)

    await migrations.migrate(conn)

    task_id = await conn.fetchval(
        "SELECT create_web_crawl_task('ann@example.com', 'cats', 'https://example.com', "
        "now(), 'new', now(), now())"
    )
    await conn.execute(
        f"SELECT update_web_crawl_task('{task_id}', 'error', 'timeout', now(), now())"
    )
    assert await conn.fetchval("SELECT result FROM web_crawl_tasks") == "timeout"
    metrics = await conn.fetch("SELECT * FROM get_web_crawl_metrics(1)")
    assert [tuple(row) for row in metrics] == [(0, 0, 1, 1)]


async def test_result_column_uses_lz4_compression(db: asyncpg.Connection) -> None:
    compression = await db.fetchval(
        """SELECT attcompression FROM pg_attribute
           WHERE attrelid = 'web_crawl_tasks'::regclass AND attname = 'result'"""
    )
    assert compression == b"l"


async def test_python_task_status_equals_the_database_enum(
    db: asyncpg.Connection, schema: str
) -> None:
    rows = await db.fetch(
        """SELECT e.enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid
           JOIN pg_namespace n ON n.oid = t.typnamespace
           WHERE n.nspname = $1 AND t.typname = 'task_status' ORDER BY e.enumsortorder""",
        schema,
    )
    assert [row["enumlabel"] for row in rows] == [status.value for status in TaskStatus]


LARGE_TABLE_ROWS = 2_000_000


async def test_the_status_index_goes_without_stopping_writers_on_a_large_live_table(
    settings: Settings, schema: str, tmp_path: Path
) -> None:
    """A table of millions of tasks and a long transaction reading it (a report, a backup): the
    migration that drops the status index waits for that reader, and meanwhile the consumer's
    writes go through. A plain DROP INDEX would queue every writer behind its own wait."""
    migrator = await connect_to_schema(settings, schema, migrating=True)
    reader = await connect_to_schema(settings, schema)
    writer = await connect_to_schema(settings, schema)
    try:
        await migrations.migrate(migrator, _migrations_before(9, tmp_path / "before"))
        await migrator.execute(
            "INSERT INTO web_crawl_tasks (user_email, user_query, original_url, received_at,"
            " status, created_at) SELECT 'a@example.com', 'q', 'https://example.com', now(),"
            " (ARRAY['new', 'completed', 'error'])[1 + g % 3]::task_status,"
            " now() - g * interval '100 milliseconds' FROM generate_series(1, $1) g",
            LARGE_TABLE_ROWS,
        )
        async with reader.transaction():
            await reader.fetchval("SELECT count(*) FROM web_crawl_tasks WHERE status = 'new'")
            migrating = asyncio.create_task(migrations.migrate(migrator))
            # the migration waits for the reader's open transaction
            await until_waiting_for_a_lock(writer, migrator.get_server_pid(), migrating)
            await writer.execute("SET lock_timeout = '5s'")
            task_id = await writer.fetchval(
                "SELECT create_web_crawl_task('b@example.com', 'q', 'https://example.com',"
                " now(), 'new', now(), now())"
            )
            outcome = await writer.fetchval(
                "SELECT outcome FROM tm_apply_status_updates(ARRAY[$1::uuid],"
                " ARRAY['completed'::task_status], ARRAY['done'], ARRAY[now()])",
                task_id,
            )
            assert outcome == "updated"
            assert not migrating.done()
        applied = await migrating
        assert [m.version for m in applied][:1] == [9]
        assert "idx_web_crawl_tasks_status_created_at" not in await _indexes(migrator, schema)
        count = await migrator.fetchval("SELECT count(*) FROM web_crawl_tasks")
        assert count == LARGE_TABLE_ROWS + 1
    finally:
        for connection in (migrator, reader, writer):
            await connection.close()


async def test_replacing_the_updated_at_trigger_gives_up_behind_a_long_transaction(
    settings: Settings, schema: str, tmp_path: Path
) -> None:
    """The migration that replaces the trigger needs the table's exclusive lock, and writers
    queue behind its wait: behind a long reader it fails after its lock timeout, nothing of it
    applied and the writers free again, and applies once the reader is gone."""
    migrator = await connect_to_schema(settings, schema, migrating=True)
    reader = await connect_to_schema(settings, schema)
    try:
        await migrations.migrate(migrator, _migrations_before(10, tmp_path / "before"))
        async with reader.transaction():
            await reader.fetchval("SELECT count(*) FROM web_crawl_tasks")
            with pytest.raises(asyncpg.LockNotAvailableError):  # not a wait as long as the reader's
                await asyncio.wait_for(migrations.migrate(migrator), 60)
        assert 10 not in [row["version"] for row in await _ledger(migrator)]
        assert "tm_touch_updated_at" not in await _functions(migrator, schema)
        task_id = await migrator.fetchval(
            "SELECT create_web_crawl_task('b@example.com', 'q', 'https://example.com',"
            " now(), 'new', now(), now())"
        )
        assert task_id is not None

        assert [m.version for m in await migrations.migrate(migrator)] == [10]
        assert "tm_touch_updated_at" in await _functions(migrator, schema)
    finally:
        for connection in (migrator, reader):
            await connection.close()


async def test_a_migration_outside_a_transaction_runs_its_statements_alone_and_resumes(
    conn: asyncpg.Connection, sql_copy: Path
) -> None:
    """CREATE INDEX CONCURRENTLY cannot run in a transaction; such a file runs statement by
    statement, and its ledger row comes after the last, so a run that fails part-way is resumed
    by the next one."""
    await migrations.migrate(conn, sql_copy)
    later = sql_copy / "0099_concurrent_index.sql"
    statements = (
        "-- tm: outside a transaction\n"
        "-- an index built without locking writers out\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS web_crawl_tasks_finished_at\n"
        "    ON web_crawl_tasks (finished_at);\n"
    )
    later.write_text(statements + "SELECT 1 / 0;\n", encoding="utf-8")

    with pytest.raises(asyncpg.DivisionByZeroError):
        await migrations.migrate(conn, sql_copy)
    assert 99 not in [row["version"] for row in await _ledger(conn)]
    assert await _relation_exists(conn, "web_crawl_tasks_finished_at")

    later.write_text(statements, encoding="utf-8")
    assert [m.version for m in await migrations.migrate(conn, sql_copy)] == [99]
    assert 99 in [row["version"] for row in await _ledger(conn)]
    assert not await _holds_migration_lock(conn)


async def test_a_migration_outside_a_transaction_must_end_its_statements(
    conn: asyncpg.Connection, sql_copy: Path
) -> None:
    (sql_copy / "0099_unfinished.sql").write_text(
        "-- tm: outside a transaction\nDROP INDEX CONCURRENTLY IF EXISTS nothing\n",
        encoding="utf-8",
    )
    with pytest.raises(MigrationError, match="0099_unfinished: its last statement"):
        await migrations.migrate(conn, sql_copy)
    assert not await _relation_exists(conn, "web_crawl_tasks")
