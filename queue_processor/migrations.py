"""Apply the ordered SQL files in ``sql/migrations``, then ``sql/functions``, under a lock.

Each migration is applied once and recorded in ``queue_processor_migrations``. The files in
``sql/functions`` hold the current definition of every function (CREATE OR REPLACE): whenever
one of them differs from what the database last applied (by SHA-256, recorded in
``queue_processor_functions``), all of them are re-applied, every registered target's triggers
are regenerated and every worker role is re-granted. Re-running is a no-op.

A whole ``migrate`` is one transaction that holds a transaction-level advisory lock
(``Database.schema_transaction``): two processes migrating at once take turns instead of
colliding, a failure leaves the schema as it was, and it works through a transaction-mode
pooler (a session lock would be taken on one server connection and released on another).
So a migration must be able to run inside a transaction block: no ``CREATE INDEX
CONCURRENTLY``, ``VACUUM`` or ``ALTER SYSTEM`` (tests/unit/test_migration_files.py checks).
``register`` takes the same lock. The files ship inside the wheel (``queue_processor/sql``); in
a source checkout they are read from the repository's ``sql/``.

``migrate`` refuses a queue schema in which a role other than its owner may CREATE: the
migrations' DDL runs with that schema first on the search_path (SECURITY.md).

The repository functions below (``applied_migrations``, ``apply_migration``,
``schema_version``, ...) read and record that history through the ``Database`` adapter, by
the names of their statements in queries.sql.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

import structlog

from queue_processor.db import Connection, Database
from queue_processor.errors import ConfigurationError

log = structlog.get_logger(__name__)

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_FUNCTIONS_NAME = re.compile(r"^\d{2}_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    """One migration file: its version number, name and SQL text."""

    version: int
    name: str
    sql: str


@dataclass(frozen=True)
class FunctionFile:
    """One file of ``sql/functions``: its name, SQL text and the SHA-256 of that text."""

    name: str
    sql: str
    sha256: str


def _sql_dir(kind: str) -> Traversable:
    packaged = resources.files("queue_processor") / "sql" / kind
    if packaged.is_dir():
        return packaged
    # Source checkout / editable install: sql/ sits at the repository root.
    return Path(__file__).resolve().parent.parent / "sql" / kind


def load_function_files() -> list[FunctionFile]:
    """The files of ``sql/functions`` in the order they are applied (by name)."""
    files = []
    for entry in _sql_dir("functions").iterdir():
        if _FUNCTIONS_NAME.match(entry.name):
            text = entry.read_text(encoding="utf-8")
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            files.append(FunctionFile(entry.name, text, digest))
    if not files:
        raise ConfigurationError("no function files found: the package is incomplete")
    return sorted(files, key=lambda f: f.name)


def load_migrations() -> list[Migration]:
    """All migrations, ordered by version; raises if the files are misnamed or duplicated."""
    found: dict[int, Migration] = {}
    for entry in _sql_dir("migrations").iterdir():
        match = _NAME.match(entry.name)
        if not match:
            continue
        version = int(match.group(1))
        if version in found:
            raise ConfigurationError(f"two migrations share version {version:04d}")
        found[version] = Migration(version, match.group(2), entry.read_text(encoding="utf-8"))
    if not found:
        raise ConfigurationError("no migrations found: the package is incomplete")
    return [found[v] for v in sorted(found)]


def stale_function_files(applied: Mapping[str, str]) -> list[FunctionFile]:
    """The function files whose text differs from what the database last applied
    (``applied``: SHA-256 by file name, as recorded in queue_processor_functions)."""
    return [f for f in load_function_files() if applied.get(f.name) != f.sha256]


def latest_version() -> int:
    """The schema version this package expects."""
    return load_migrations()[-1].version


async def migrate(db: Database, *, allow_unsafe_schema: bool = False) -> list[int]:
    """Apply pending migrations, then the function files if any changed, in one transaction
    under the schema lock; return the migration versions applied (empty when up to date).

    Raises ConfigurationError when a role other than its owner (PUBLIC included) may CREATE
    in the queue schema, unless ``allow_unsafe_schema`` (then it logs a warning and goes on).
    """
    applied: list[int] = []
    async with db.connection(autocommit=True) as conn, db.schema_transaction(conn):
        await create_version_table(db, conn)
        creators = await schema_creators(db, conn)
        if creators:
            _unsafe_schema(db.schema, creators, allowed=allow_unsafe_schema)
        done = await applied_migrations(db, conn)
        for migration in load_migrations():
            if migration.version in done:
                continue
            await apply_migration(db, conn, migration)
            log.info("migration_applied", version=migration.version, name=migration.name)
            applied.append(migration.version)
        if applied or stale_function_files(await function_hashes(db, conn)):
            files = load_function_files()
            targets, workers = await apply_function_files(db, conn, files)
            log.info("functions_applied", files=len(files), targets=targets, workers=workers)
    return applied


@dataclass(frozen=True)
class MigrationPlan:
    """What ``migrate`` would do now: the pending migrations, the function files it would
    (re)apply (all of them once anything changed), and the roles other than its owner that
    may CREATE in the queue schema (``migrate`` refuses those unless overridden)."""

    migrations: tuple[Migration, ...]
    function_files: tuple[str, ...]
    schema_creators: str

    @property
    def up_to_date(self) -> bool:
        """Nothing to apply."""
        return not self.migrations and not self.function_files


async def plan(db: Database) -> MigrationPlan:
    """What ``migrate`` would apply, without applying or locking anything."""
    async with db.connection(autocommit=True) as conn:
        installed = await schema_version(db, conn)
        done = await applied_migrations(db, conn) if installed is not None else set()
        current = await function_hashes(db, conn) if await has_function_hashes(db, conn) else {}
        creators = await schema_creators(db, conn)
    pending = tuple(m for m in load_migrations() if m.version not in done)
    changed = bool(pending) or bool(stale_function_files(current))
    files = tuple(f.name for f in load_function_files()) if changed else ()
    return MigrationPlan(pending, files, creators)


def _unsafe_schema(schema: str, creators: str, *, allowed: bool) -> None:
    message = (
        f"roles other than its owner may CREATE in schema {schema!r} ({creators}): they could "
        "define objects there that migrations would run as the owner. Run `REVOKE CREATE ON "
        f'SCHEMA "{schema}" FROM {creators}` (PUBLIC lost it on public in PostgreSQL 15), '
        "or install into a dedicated schema (QUEUE_PROCESSOR_SCHEMA)"
    )
    if not allowed:
        raise ConfigurationError(message + "; --allow-unsafe-schema overrides this check")
    log.warning("unsafe_schema", schema=schema, creators=creators, message=message)


async def check_schema(db: Database) -> None:
    """Raise ConfigurationError unless the database holds this package's schema version."""
    expected = latest_version()
    async with db.connection(autocommit=True) as conn:
        current = await schema_version(db, conn)
    if current is None:
        raise ConfigurationError(
            f"the queue schema is not installed in schema {db.schema!r}: "
            "run `queue-processor migrate` first"
        )
    if current < expected:
        raise ConfigurationError(
            f"the queue schema is at version {current}, this queue_processor needs {expected}: "
            "run `queue-processor migrate`"
        )
    if current > expected:
        raise ConfigurationError(
            f"the queue schema is at version {current}, newer than this queue_processor "
            f"({expected}): upgrade queue_processor"
        )
    async with db.connection(autocommit=True) as conn:
        applied = await function_hashes(db, conn)
    stale = [f.name for f in stale_function_files(applied)]
    if stale:
        raise ConfigurationError(
            f"the queue's functions differ from this queue_processor's ({', '.join(stale)}): "
            "run `queue-processor migrate`"
        )


# --- the repository: what the database records of migrations and function files -----------


async def create_version_table(db: Database, conn: Connection) -> None:
    """Create the queue schema (unless it exists) and queue_processor_migrations in it
    (unless it exists), inside ``migrate``'s transaction."""
    # CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema exists;
    # ask first so a role that owns only its schema can migrate.
    found = await db.fetch_one(conn, db.statement("schema_exists"), {"schema": db.schema})
    if not (found or {}).get("found"):
        await db.execute(conn, db.statement("create_schema"))
    async with db.ddl_search_path(conn):
        await db.run_script(conn, _VERSION_TABLE)


async def applied_migrations(db: Database, conn: Connection) -> set[int]:
    """Versions recorded in queue_processor_migrations."""
    rows = await db.fetch_all(conn, db.statement("applied_migrations"))
    return {int(r["version"]) for r in rows}


async def apply_migration(db: Database, conn: Connection, migration: Migration) -> None:
    """Apply one migration file and record it (inside ``migrate``'s transaction)."""
    async with db.ddl_search_path(conn):
        await db.run_script(conn, migration.sql)
        await db.execute(
            conn,
            db.statement("record_migration"),
            {"version": migration.version, "name": migration.name},
        )


async def schema_creators(db: Database, conn: Connection) -> str:
    """The roles other than its owner that may CREATE in the queue schema, comma separated
    (``PUBLIC`` for every role); empty when there are none."""
    row = await db.fetch_one(conn, db.statement("schema_creators"), {"schema": db.schema})
    return str(row["roles"]) if row else ""


async def has_function_hashes(db: Database, conn: Connection) -> bool:
    """Whether the queue schema records applied function files (migration 0006 on)."""
    return await _installed(db, conn, "queue_processor_functions")


async def _installed(db: Database, conn: Connection, relation: str) -> bool:
    row = await db.fetch_one(
        conn, db.statement("relation_installed"), {"schema": db.schema, "relation": relation}
    )
    return bool(row and row["installed"])


async def function_hashes(db: Database, conn: Connection) -> dict[str, str]:
    """SHA-256 of each function file as last applied, by file name (empty before 0006)."""
    rows = await db.fetch_all(conn, db.statement("function_hashes"))
    return {str(r["file"]): str(r["sha256"]) for r in rows}


async def apply_function_files(
    db: Database, conn: Connection, files: Sequence[FunctionFile]
) -> tuple[int, int]:
    """Apply function files, record them, and regenerate targets and worker grants (inside
    ``migrate``'s transaction); return (targets, worker roles) refreshed."""
    async with db.ddl_search_path(conn):
        for file in files:
            # The files name every object of ours as @qs@.name (see 10_queue.sql).
            await db.run_script(conn, file.sql)
            await db.execute(
                conn,
                db.statement("record_function_file"),
                {"file": file.name, "sha256": file.sha256},
            )
        row = await db.fetch_one(conn, db.statement("refresh_installed"))
    assert row is not None
    return int(row["targets"]), int(row["workers"])


async def schema_version(db: Database, conn: Connection) -> int | None:
    """The newest applied migration, or None when the schema is not installed."""
    if not await _installed(db, conn, "queue_processor_migrations"):
        return None
    row = await db.fetch_one(conn, db.statement("schema_version"))
    if row is None or row["version"] is None:
        return None
    return int(row["version"])


_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS queue_processor_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
