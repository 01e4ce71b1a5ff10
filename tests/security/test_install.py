"""Installing and upgrading keep the database surface locked (issue 11).

- ``migrate`` refuses a queue schema in which PUBLIC may CREATE (PostgreSQL 14 and older
  grant that on ``public`` by default), unless explicitly overridden, and then warns;
- a database installed by 0.1.0 (migrations 0001-0005 are its SQL, frozen: migrations are
  never edited; a target registered and a worker role granted by the old ``grant-worker``,
  rows queued) upgrades in place: ``migrate --dry-run``'s plan lists what will run, its
  generated trigger functions lose PUBLIC's EXECUTE, the old worker role is narrowed to the
  lease columns (no ``content``) and keeps working under row-level security, a bulk insert
  takes the current (inbox) path, and everything drains;
- ``register`` never resolves a bare table name to a temporary table.
Run on PostgreSQL 18 (embedded) and 15 (the machine's), with real roles and logins.
"""

from __future__ import annotations

import anyio
import numpy as np
import psycopg
import pytest
from psycopg import errors, sql
from psycopg.rows import dict_row
from structlog.testing import capture_logs

from queue_processor import queue
from queue_processor.db import Database
from queue_processor.errors import ConfigurationError
from queue_processor.migrations import (
    apply_migration,
    check_schema,
    create_version_table,
    load_function_files,
    load_migrations,
    migrate,
    plan,
)
from queue_processor.testing import FakeOpenAIServer, fake_vector
from queue_processor.worker import Worker
from tests.security.conftest import Roles, Server
from tests.support.helpers import make_provider, worker_config

pytestmark = pytest.mark.anyio

DIMS = 4


def sql_exec(dsn: str, query: str, params: object = None) -> list[dict[str, object]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(query, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


async def test_migrate_refuses_a_schema_every_role_may_create_in(
    server: Server, empty_db: str
) -> None:
    sql_exec(empty_db, "GRANT CREATE ON SCHEMA public TO PUBLIC")
    async with Database(empty_db) as db:
        with pytest.raises(ConfigurationError, match=r"may CREATE in schema 'public' \(PUBLIC\)"):
            await migrate(db)
    assert sql_exec(empty_db, "SELECT to_regclass('embedding_queue') AS q") == [{"q": None}]

    async with Database(empty_db) as db:
        with capture_logs() as logs:
            await migrate(db, allow_unsafe_schema=True)
        await check_schema(db)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["unsafe_schema"]


async def _install_previous_version(dsn: str) -> None:
    """Migrations 0001-0005 exactly as the previous version applied them."""
    async with Database(dsn) as db, db.connection(autocommit=True) as conn:
        await create_version_table(db, conn)
        for m in load_migrations():
            if m.version <= 5:
                await apply_migration(db, conn, m)


async def test_a_database_of_the_previous_version_upgrades_locked_down(
    server: Server, empty_db: str, roles: Roles
) -> None:
    await _install_previous_version(empty_db)
    worker = roles.create("oldworker")
    sql_exec(
        empty_db,
        "CREATE TABLE docs (id int PRIMARY KEY, body text, embedding real[]);"
        "INSERT INTO docs SELECT i, 'old text ' || i FROM generate_series(1, 5) AS i",
    )
    sql_exec(
        empty_db,
        "SELECT embedding_register_target('docs', 'embedding', ARRAY['body'], "
        "p_backfill => 'missing')",
    )
    sql_exec(empty_db, "SELECT embedding_grant_worker(%s)", (worker,))
    ins = sql_exec(
        empty_db,
        "SELECT p.oid::regprocedure::text AS fn FROM pg_proc p "
        "WHERE p.proname LIKE 'embedding\\_queue\\_t%%\\_ins'",
    )[0]["fn"]
    before = sql_exec(
        empty_db,
        "SELECT has_function_privilege('public', %s, 'EXECUTE') AS public_exec,"
        " has_column_privilege(%s, 'embedding_queue', 'content', 'UPDATE') AS content",
        (ins, worker),
    )
    # The holes of the previous version, as installed.
    assert before == [{"public_exec": True, "content": True}]

    async with Database(empty_db) as db:
        todo = await plan(db)
        assert [m.version for m in todo.migrations] == [
            m.version for m in load_migrations() if m.version > 5
        ]
        assert todo.function_files == tuple(f.name for f in load_function_files())
        assert await migrate(db) == [m.version for m in load_migrations() if m.version > 5]
        await check_schema(db)
        assert (await plan(db)).up_to_date

    after = sql_exec(
        empty_db,
        "SELECT has_function_privilege('public', %s, 'EXECUTE') AS public_exec,"
        " has_column_privilege(%s, 'embedding_queue', 'content', 'UPDATE') AS content,"
        " has_column_privilege(%s, 'embedding_queue', 'status', 'UPDATE') AS status",
        (ins, worker, worker),
    )
    assert after == [{"public_exec": False, "content": False, "status": True}]
    with roles.login(empty_db, worker) as conn:
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("UPDATE embedding_queue SET content = 'forged'")
        # Row-level security is on, and the upgrade gave the old worker its policy.
        assert conn.execute("SELECT count(*) AS n FROM embedding_queue").fetchone() == {"n": 5}

    # A bulk insert now takes the current path (one inbox row, not 1,000 queue rows), and the
    # old worker role drains everything: the rows queued before the upgrade and the new ones.
    sql_exec(
        empty_db,
        "INSERT INTO docs (id, body) SELECT i, 'new text ' || i FROM generate_series(6, 1005) i",
    )
    assert sql_exec(empty_db, "SELECT count(*) AS n FROM embedding_queue_inbox") == [{"n": 1}]
    with FakeOpenAIServer(dims=DIMS) as fake:
        async with Database(roles.dsn(empty_db, worker)) as db, make_provider(fake) as provider:
            with anyio.fail_after(60):
                summary = await Worker(db, provider, worker_config()).run("drain")
    assert summary.processed == 1005
    assert sql_exec(empty_db, "SELECT status, count(*) AS n FROM embedding_queue GROUP BY 1") == [
        {"status": "done", "n": 1005}
    ]
    rows = sql_exec(empty_db, "SELECT id, body, embedding FROM docs ORDER BY id")
    for row in rows:
        np.testing.assert_allclose(
            np.asarray(row["embedding"], dtype=np.float32), fake_vector(str(row["body"]), DIMS)
        )


async def test_register_never_takes_a_temporary_table_for_the_users_table(
    server: Server,
) -> None:
    sql_exec(server.dsn, "CREATE TABLE docs (id int PRIMARY KEY, body text, embedding real[])")
    async with Database(server.dsn, max_size=1) as db:
        async with db.connection(autocommit=True) as conn:
            # A temporary table of the same name in the very session that registers.
            await conn.execute(
                sql.SQL("CREATE TEMP TABLE docs (id int PRIMARY KEY, body text, embedding real[])")
            )
        label = await queue.register_target(db, "docs", "embedding", content_columns=["body"])
    assert label == "docs"
    assert sql_exec(
        server.dsn, "SELECT schema_name FROM embedding_targets WHERE table_name = 'docs'"
    ) == [{"schema_name": "public"}]
    sql_exec(server.dsn, "INSERT INTO docs VALUES (1, 'real row')")
    assert sql_exec(server.dsn, "SELECT record_id FROM embedding_queue") == [{"record_id": "1"}]
