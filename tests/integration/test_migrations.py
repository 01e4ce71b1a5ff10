"""Migrations: ordered, recorded, idempotent, safe from two processes at once.

Covers: migrating a fresh database twice (the second run applies nothing), two
``queue-processor migrate`` processes started together (both succeed, each version is applied
once), the schema check refusing a missing or outdated schema with a message naming
``queue-processor migrate``, and a custom queue schema (QUEUE_PROCESSOR_SCHEMA / ``schema=``):
every object lands there and the generated trigger functions still find the queue from
sessions whose search_path does not include it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from queue_processor.db import Database
from queue_processor.errors import ConfigurationError
from queue_processor.migrations import check_schema, latest_version, load_migrations, migrate

pytestmark = pytest.mark.anyio

CLI = Path(sys.executable).with_name("queue-processor")
LOCK_KEY = "queue_processor.migrate"


def cli_env(dsn: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUEUE_PROCESSOR_")}
    env.update(DATABASE_URL=dsn, QUEUE_PROCESSOR_LOG_FORMAT="json", **extra)
    return env


def applied_versions(dsn: str, schema: str = "public") -> list[int]:
    query = sql.SQL("SELECT version FROM {}.queue_processor_migrations ORDER BY version")
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(query.format(sql.Identifier(schema))).fetchall()
    return [int(r[0]) for r in rows]


async def test_migrate_applies_all_then_nothing(empty_dsn: str) -> None:
    async with Database(empty_dsn) as db:
        with pytest.raises(ConfigurationError, match="queue-processor migrate"):
            await check_schema(db)
        first = await migrate(db)
        assert first == list(range(1, latest_version() + 1))
        assert await migrate(db) == []
        await check_schema(db)
    assert applied_versions(empty_dsn) == [m.version for m in load_migrations()]


def test_migrations_are_numbered_without_gaps() -> None:
    versions = [m.version for m in load_migrations()]
    assert versions == list(range(1, len(versions) + 1))


async def test_check_schema_refuses_an_outdated_schema(empty_dsn: str) -> None:
    async with Database(empty_dsn) as db:
        await migrate(db)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(
            "DELETE FROM queue_processor_migrations"
            " WHERE version = (SELECT max(version) FROM queue_processor_migrations)"
        )
    async with Database(empty_dsn) as db:
        with pytest.raises(ConfigurationError, match="run `queue-processor migrate`") as info:
            await check_schema(db)
        assert f"needs {latest_version()}" in str(info.value)


def test_two_processes_migrating_at_once(empty_dsn: str) -> None:
    """Both processes queue on the advisory lock, then race for it the moment it frees."""
    with psycopg.connect(empty_dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (LOCK_KEY,))
        procs = [
            subprocess.Popen(
                [str(CLI), "migrate"],
                env=cli_env(empty_dsn),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        try:
            deadline = time.monotonic() + 60
            while True:
                row = holder.execute(
                    """SELECT count(*) FROM pg_locks
                        WHERE locktype = 'advisory' AND NOT granted
                          AND database = (SELECT oid FROM pg_database
                                           WHERE datname = current_database())"""
                ).fetchone()
                if row is not None and row[0] == 2:
                    break
                assert all(p.poll() is None for p in procs), "a migrate process exited early"
                assert time.monotonic() < deadline, "the migrate processes never waited"
                time.sleep(0.05)
        finally:
            holder.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (LOCK_KEY,))
        outputs = [p.communicate(timeout=120) for p in procs]

    assert [p.returncode for p in procs] == [0, 0], outputs
    stdouts = sorted(out for out, _ in outputs)
    applied = [out for out in stdouts if "applied" in out]
    assert len(applied) == 1, stdouts  # the other found nothing left to do
    assert applied_versions(empty_dsn) == [m.version for m in load_migrations()]


async def test_custom_queue_schema(empty_dsn: str) -> None:
    async with Database(empty_dsn, schema="embq") as db:
        assert await migrate(db) == list(range(1, latest_version() + 1))
        await check_schema(db)
    async with Database(empty_dsn) as db:  # the default schema has nothing installed
        with pytest.raises(ConfigurationError, match="queue-processor migrate"):
            await check_schema(db)

    with psycopg.connect(empty_dsn, autocommit=True, row_factory=dict_row) as conn:
        placed = conn.execute(
            """SELECT to_regclass('embq.embedding_queue') IS NOT NULL AS queue,
                      to_regclass('embq.embedding_targets') IS NOT NULL AS targets,
                      to_regclass('embq.queue_processor_migrations') IS NOT NULL AS versions,
                      to_regclass('public.embedding_queue') IS NULL AS none_in_public,
                      to_regprocedure('embq.embedding_queue_is_blank(text)') IS NOT NULL
                          AS functions"""
        ).fetchone()
        assert placed == {
            "queue": True,
            "targets": True,
            "versions": True,
            "none_in_public": True,
            "functions": True,
        }

        # A user's table in public, registered through the qualified function from a session
        # whose search_path is the default: the triggers must still find embq's queue.
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, emb real[])")
        label = conn.execute(
            "SELECT embq.embedding_register_target('docs', 'emb', ARRAY['body']) AS label"
        ).fetchone()
        assert label == {"label": "docs"}
        conn.execute("INSERT INTO docs VALUES (1, 'one'), (2, 'two')")
        conn.execute("UPDATE docs SET body = 'one, edited' WHERE id = 1")
        conn.execute("DELETE FROM docs WHERE id = 2")
        rows = conn.execute(
            "SELECT record_id, content, status FROM embq.embedding_queue"
        ).fetchall()
        assert rows == [{"record_id": "1", "content": "one, edited", "status": "pending"}]
        functions = conn.execute(
            """SELECT DISTINCT n.nspname FROM pg_proc p
                 JOIN pg_namespace n ON n.oid = p.pronamespace
                WHERE p.proname LIKE 'embedding\\_queue\\_t%%'"""
        ).fetchall()
        assert functions == [{"nspname": "embq"}]
        backfilled = conn.execute(
            "SELECT embq.embedding_queue_backfill('docs', 'emb', 'all') AS n"
        ).fetchone()
        assert backfilled == {"n": 1}
        assert conn.execute(
            "SELECT embq.embedding_unregister_target('docs', 'emb') AS removed"
        ).fetchone() == {"removed": True}
        assert conn.execute("SELECT count(*) AS n FROM embq.embedding_queue").fetchone() == {"n": 0}


def test_cli_migrate_honours_queue_processor_schema(empty_dsn: str) -> None:
    for _ in range(2):
        result = subprocess.run(
            [str(CLI), "migrate"],
            env=cli_env(empty_dsn, QUEUE_PROCESSOR_SCHEMA="embq"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
    assert applied_versions(empty_dsn, "embq") == [m.version for m in load_migrations()]
    with psycopg.connect(empty_dsn) as conn:
        row = conn.execute(
            "SELECT to_regclass('public.queue_processor_migrations'),"
            " to_regclass('public.embedding_queue')"
        ).fetchone()
    assert row == (None, None)


def test_cli_dry_run_lists_what_migrate_would_apply_and_changes_nothing(empty_dsn: str) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CLI), "migrate", *args],
            env=cli_env(empty_dsn),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    dry = cli("--dry-run")
    assert dry.returncode == 0, dry.stderr
    for m in load_migrations():
        assert f"would apply migration {m.version:04d}_{m.name}" in dry.stdout
    assert "would apply function files 10_queue.sql" in dry.stdout
    with psycopg.connect(empty_dsn) as conn:  # nothing was applied
        assert conn.execute("SELECT to_regclass('embedding_queue')").fetchone() == (None,)

    assert cli().returncode == 0
    again = cli("--dry-run")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "schema is up to date"


def test_cli_version_is_the_package_version() -> None:
    from importlib.metadata import version

    shown = subprocess.run(
        [str(CLI), "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    assert shown.stdout.strip() == f"queue-processor {version('queue_processor')}"
