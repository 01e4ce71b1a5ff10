"""Fixtures of the database attack tests: both servers, and throwaway cluster-wide roles.

``server`` is parametrized over the embedded PostgreSQL 18 (with pgvector) and the machine's
PostgreSQL 15 (no pgvector; the param is marked ``pg15``, so it is deselected unless
``QUEUE_PROCESSOR_TEST_DSN_NOVECTOR`` is set). Each yields the server's superuser DSN and a
fresh migrated database on it.

Roles are cluster-wide and the PostgreSQL 15 service is shared with other runs: ``roles``
creates each role under a unique name and, afterwards, ends its sessions, drops what it owns
and every privilege granted to it in each database it touched, and drops the role.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any, NamedTuple

import psycopg
import pytest
from psycopg import conninfo, sql
from psycopg.rows import dict_row

from queue_processor.testing import FakeOpenAIServer
from tests.support.helpers import DIMS

PASSWORD = "qp-security-test-password"


class Server(NamedTuple):
    """One PostgreSQL server under test: its superuser DSN and this test's migrated database."""

    name: str
    admin_dsn: str
    dsn: str


@pytest.fixture(
    params=[pytest.param("pg18", id="pg18"), pytest.param("pg15", marks=pytest.mark.pg15)]
)
def server(request: pytest.FixtureRequest) -> Server:
    """A fresh migrated database on PostgreSQL 18 (embedded) or 15 (the machine's)."""
    if request.param == "pg18":
        admin, dsn = "pg_admin_dsn", "dsn"
    else:
        admin, dsn = "novector_admin_dsn", "novector_dsn"
    return Server(request.param, request.getfixturevalue(admin), request.getfixturevalue(dsn))


class Roles:
    """Creates LOGIN roles with unique names; ``cleanup`` removes every trace of them."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.names: list[str] = []
        self.databases: list[str] = []

    def create(self, kind: str) -> str:
        """A new LOGIN role (no superuser, no attributes, no grants) named ``qpsec_KIND_*``."""
        name = f"qpsec_{kind}_{uuid.uuid4().hex[:10]}"
        self.names.append(name)
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL(
                    "CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS "
                    "PASSWORD {}"
                ).format(sql.Identifier(name), sql.Literal(PASSWORD))
            )
        return name

    def touch(self, db_dsn: str) -> None:
        """Remember a database (superuser DSN) where the roles may own or be granted things."""
        if db_dsn not in self.databases:
            self.databases.append(db_dsn)

    def dsn(self, db_dsn: str, role: str) -> str:
        """``db_dsn`` logged in as ``role`` (trust or password authentication both work)."""
        self.touch(db_dsn)
        return conninfo.make_conninfo(db_dsn, user=role, password=PASSWORD)

    def login(self, db_dsn: str, role: str) -> psycopg.Connection[dict[str, Any]]:
        """A separate autocommit session of ``role`` on ``db_dsn``."""
        return psycopg.connect(self.dsn(db_dsn, role), autocommit=True, row_factory=dict_row)

    def cleanup(self) -> None:
        """End the roles' sessions, DROP OWNED BY them in every database touched, drop them.

        Every step is attempted even if an earlier one failed; the first failure is raised
        at the end (a role left behind on a shared server must not go unnoticed)."""
        if not self.names:
            return
        failures: list[Exception] = []
        idents = sql.SQL(", ").join(sql.Identifier(n) for n in self.names)
        try:
            with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE usename = ANY(%s) AND pid <> pg_backend_pid()",
                    (self.names,),
                )
        except psycopg.Error as exc:
            failures.append(exc)
        for db_dsn in self.databases:
            try:
                conn = psycopg.connect(db_dsn, autocommit=True)
            except psycopg.OperationalError:
                continue  # dropped already (a test's own database): nothing of the roles left
            try:
                with conn:
                    conn.execute(sql.SQL("DROP OWNED BY {}").format(idents))
            except psycopg.Error as exc:
                failures.append(exc)
        for name in self.names:
            try:
                with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
                    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
            except psycopg.Error as exc:
                failures.append(exc)
        if failures:
            raise failures[0]


@pytest.fixture
def roles(server: Server) -> Iterator[Roles]:
    """Throwaway roles on ``server``; dropped (with all they own or were granted) afterwards."""
    made = Roles(server.admin_dsn)
    made.touch(server.dsn)
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def vector_roles(pg_admin_dsn: str, dsn: str) -> Iterator[Roles]:
    """Throwaway roles on the session's PostgreSQL 18 (pgvector), touching this test's
    database; dropped afterwards."""
    made = Roles(pg_admin_dsn)
    made.touch(dsn)
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def fake_api() -> Iterator[FakeOpenAIServer]:
    """An in-process fake OpenAI server (8-dim vectors) that CLI subprocesses call."""
    with FakeOpenAIServer(dims=DIMS) as srv:
        yield srv


@pytest.fixture
def empty_db(server: Server, roles: Roles) -> Iterator[str]:
    """A database on ``server`` with nothing installed (superuser DSN); dropped afterwards,
    before ``roles`` cleans up."""
    name = f"qp_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = conninfo.make_conninfo(server.admin_dsn, dbname=name)
    roles.touch(dsn)
    try:
        yield dsn
    finally:
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
