"""Schema migrations: the ordered ``tm/sql/NNNN_name.sql`` files, applied once each, with a ledger.

The files are package data: they are found through the installed package, so a wheel, an
editable install and the image all migrate from the same files.

Each migration runs in its own transaction together with its ledger row, so a failure leaves
the database at the previous migration. A session-level advisory lock makes a second migrator
(another pod starting at the same time) wait instead of racing. A migration that was changed
after it was applied is refused: fix forward with a new file.

A file whose first line is ``-- tm: outside a transaction`` holds statements that PostgreSQL runs
only outside one, the ones that change an index of a live table without locking out its writers
(``CREATE INDEX CONCURRENTLY``, ``DROP INDEX CONCURRENTLY``). Its statements run one at a time,
each on its own, and its ledger row is written after the last; each must therefore be safe to run
again (``IF EXISTS``, ``IF NOT EXISTS``), since a run cut short resumes with the whole file. Such
a file holds plain statements only, one per ``;`` at the end of a line (no function bodies).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import asyncpg

from tm.errors import MigrationError

SQL_DIR = Path(str(resources.files("tm") / "sql"))
LEDGER_TABLE = "tm_schema_migrations"
# Key of the advisory lock held while migrating; an arbitrary constant that is tm's alone.
MIGRATION_LOCK_KEY = 0x746D_6D69_6772  # "tmmigr"
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
OUTSIDE_A_TRANSACTION = "-- tm: outside a transaction"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def outside_a_transaction(self) -> bool:
        return self.sql.startswith(OUTSIDE_A_TRANSACTION + "\n")

    def statements(self) -> list[str]:
        """The statements of a file run outside a transaction: each ends with ``;`` at the end of
        a line; comment lines are left out."""
        statements: list[str] = []
        current: list[str] = []
        for line in self.sql.splitlines():
            if not line.strip() or line.lstrip().startswith("--"):
                continue
            current.append(line)
            if line.rstrip().endswith(";"):
                statements.append("\n".join(current))
                current = []
        if current:
            raise MigrationError(
                f"migration {self.version:04d}_{self.name}: its last statement does not end with ;"
            )
        return statements


@dataclass(frozen=True, slots=True)
class Status:
    """What the ledger says: applied versions and the migrations on disk not yet applied."""

    applied: tuple[int, ...]
    pending: tuple[Migration, ...]


def discover(directory: Path = SQL_DIR) -> list[Migration]:
    """The migrations on disk, in version order; a badly named or duplicated file is refused."""
    migrations: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_RE.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNNN_lower_name.sql")
        version = int(match.group(1))
        if version in migrations:
            raise MigrationError(f"{path.name}: version {version} is used twice")
        migration = Migration(version, match.group(2), path.read_text(encoding="utf-8"))
        if migration.outside_a_transaction:
            migration.statements()  # refuses a file whose last statement is unfinished
        migrations[version] = migration
    if not migrations:
        raise MigrationError(f"no migrations found in {directory}")
    return [migrations[v] for v in sorted(migrations)]


async def _ensure_ledger(conn: asyncpg.Connection) -> None:
    await conn.execute(
        f"""CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} (
                version    integer     PRIMARY KEY,
                name       text        NOT NULL,
                checksum   text        NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )"""
    )


async def status(conn: asyncpg.Connection, directory: Path = SQL_DIR) -> Status:
    """Compare the ledger with the files; raise MigrationError when an applied file changed."""
    on_disk = discover(directory)
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", LEDGER_TABLE)
    rows = (
        await conn.fetch(f"SELECT version, checksum FROM {LEDGER_TABLE} ORDER BY version")  # noqa: S608
        if exists
        else []
    )
    applied = {row["version"]: row["checksum"] for row in rows}
    for migration in on_disk:
        recorded = applied.get(migration.version)
        if recorded is not None and recorded != migration.checksum:
            raise MigrationError(
                f"migration {migration.version:04d}_{migration.name} was changed after it was "
                "applied; add a new migration instead"
            )
    known = {m.version for m in on_disk}
    unknown = sorted(set(applied) - known)
    if unknown:
        raise MigrationError(
            f"the database has migrations this tm does not know: {unknown}; deploy a newer tm"
        )
    pending = tuple(m for m in on_disk if m.version not in applied)
    return Status(applied=tuple(sorted(applied)), pending=pending)


async def migrate(conn: asyncpg.Connection, directory: Path = SQL_DIR) -> list[Migration]:
    """Apply every pending migration, each in its own transaction; return those applied."""
    discover(directory)  # refuse a bad tree before touching the database
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await _ensure_ledger(conn)
        done: list[Migration] = []
        for migration in (await status(conn, directory)).pending:
            if migration.outside_a_transaction:
                for statement in migration.statements():
                    await conn.execute(statement)
            async with conn.transaction():
                if not migration.outside_a_transaction:
                    await conn.execute(migration.sql)
                await conn.execute(
                    f"INSERT INTO {LEDGER_TABLE} (version, name, checksum) VALUES ($1, $2, $3)",  # noqa: S608
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            done.append(migration)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
