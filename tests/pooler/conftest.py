"""Fixtures of the pooler tests: a real PgBouncer in transaction mode in front of the session's
PostgreSQL, the fake OpenAI server, and the launcher of worker processes.

The PgBouncer process lives for the session; its ``* =`` fallback entry reaches every
per-test database by name, so ``pooled_dsn`` is just the test's database through the pooler.
When the ``pgbouncer`` binary is missing these tests fail with how to install it (database
tests never skip; ``.ci/run`` installs it).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pooler.pooled import FakeOpenAIServer, start_pgbouncer
from tests.support.helpers import DIMS
from tests.support.pgbouncer import PgBouncer, PrivatePostgres


@pytest.fixture(scope="session")
def pgbouncer(pg_admin_dsn: str) -> Iterator[PgBouncer]:
    """PgBouncer (pool_mode = transaction) in front of the session's server."""
    bouncer = start_pgbouncer(pg_admin_dsn)
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def pooled_dsn(dsn: str, pgbouncer: PgBouncer) -> str:
    """This test's fresh, migrated database through the pooler (a postgresql:// URL)."""
    return pgbouncer.url(dsn)


@pytest.fixture
def fake() -> Iterator[FakeOpenAIServer]:
    """An in-process fake OpenAI server (8-dim vectors) that the subprocesses call."""
    with FakeOpenAIServer(dims=DIMS) as server:
        yield server


@pytest.fixture
def private_backend() -> Iterator[tuple[PrivatePostgres, PgBouncer]]:
    """A PostgreSQL of this test's own that it may restart, and a PgBouncer (transaction
    mode) in front of it."""
    with PrivatePostgres() as server:
        bouncer = start_pgbouncer(server.admin_dsn)
        try:
            yield server, bouncer
        finally:
            bouncer.stop()
