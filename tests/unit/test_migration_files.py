"""Every migration can run inside a transaction block: ``migrate`` applies them all in one
transaction under a transaction-level advisory lock (so that it works through a transaction
pooler, and takes turns with other processes). A statement PostgreSQL refuses inside a
transaction block would need a different path: this test says so before a release does."""

from __future__ import annotations

import re

import pytest

from queue_processor.migrations import Migration, load_migrations

NOT_IN_A_TRANSACTION = re.compile(
    r"\b(CONCURRENTLY|VACUUM|ALTER\s+SYSTEM|CREATE\s+DATABASE|DROP\s+DATABASE|"
    r"CREATE\s+TABLESPACE|REINDEX\s+(SYSTEM|DATABASE)|COMMIT|ROLLBACK|BEGIN\s*;)\b",
    re.IGNORECASE,
)


def _code(sql: str) -> str:
    """The SQL without its comments (the files explain themselves at length)."""
    sql = re.sub(r"/\*.*?\*/", " ", sql, flags=re.DOTALL)
    return re.sub(r"--[^\n]*", " ", sql)


@pytest.mark.parametrize("migration", load_migrations(), ids=lambda m: f"{m.version:04d}")
def test_migration_runs_inside_a_transaction_block(migration: Migration) -> None:
    sql = _code(migration.sql)
    found = NOT_IN_A_TRANSACTION.findall(sql)
    assert found == [], f"cannot run inside migrate's transaction: {found}"


def test_the_check_sees_a_concurrent_index() -> None:
    assert NOT_IN_A_TRANSACTION.search(_code("CREATE INDEX CONCURRENTLY i ON t (c);"))
    assert not NOT_IN_A_TRANSACTION.search(
        _code("-- not CONCURRENTLY: in a transaction\nSELECT 1;")
    )
