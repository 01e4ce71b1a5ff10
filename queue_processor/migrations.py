"""Apply the ordered SQL files in ``sql/migrations`` under an advisory lock.

Each file is one migration, applied in its own transaction and recorded in
``queue_processor_migrations``; re-running is a no-op. A session-level advisory lock makes two
processes migrating at once take turns instead of colliding. The files ship inside the wheel
(``queue_processor/sql``); in a source checkout they are read from the repository's ``sql/``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

import structlog

from queue_processor.db import Database
from queue_processor.errors import ConfigurationError

log = structlog.get_logger(__name__)

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    """One migration file: its version number, name and SQL text."""

    version: int
    name: str
    sql: str


def _migrations_dir() -> Traversable:
    packaged = resources.files("queue_processor") / "sql" / "migrations"
    if packaged.is_dir():
        return packaged
    # Source checkout / editable install: sql/ sits at the repository root.
    return Path(__file__).resolve().parent.parent / "sql" / "migrations"


def load_migrations() -> list[Migration]:
    """All migrations, ordered by version; raises if the files are misnamed or duplicated."""
    found: dict[int, Migration] = {}
    for entry in _migrations_dir().iterdir():
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


def latest_version() -> int:
    """The schema version this package expects."""
    return load_migrations()[-1].version


async def migrate(db: Database) -> list[int]:
    """Apply pending migrations; return the versions applied (empty when up to date)."""
    applied: list[int] = []
    async with db.connection(autocommit=True) as conn:
        await db.advisory_lock(conn, "queue_processor.migrate")
        try:
            await db.execute_script(conn, _VERSION_TABLE)
            done = await db.applied_migrations(conn)
            for migration in load_migrations():
                if migration.version in done:
                    continue
                await db.apply_migration(conn, migration.version, migration.name, migration.sql)
                log.info("migration_applied", version=migration.version, name=migration.name)
                applied.append(migration.version)
        finally:
            await db.advisory_unlock(conn, "queue_processor.migrate")
    return applied


async def check_schema(db: Database) -> None:
    """Raise ConfigurationError unless the database holds this package's schema version."""
    expected = latest_version()
    async with db.connection(autocommit=True) as conn:
        current = await db.schema_version(conn)
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


_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS queue_processor_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
