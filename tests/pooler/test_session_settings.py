"""The worker's session settings, directly connected and through a transaction pooler.

Worker sessions run with ``statement_timeout`` and ``idle_in_transaction_session_timeout``
(QUEUE_PROCESSOR_STATEMENT_TIMEOUT_SECONDS / _IDLE_IN_TRANSACTION_TIMEOUT_SECONDS) and the
search_path ``pg_catalog, pg_temp``: set for the session when direct, pinned by the first
statement of every transaction when pooled (PgBouncer refuses the startup ``options`` that
would carry them, and a session SET would leak into other clients' transactions). So a stuck
statement is cancelled, an abandoned transaction ends its session, and no row lock is held
for long. Statements go through the ``Database`` adapter, as the repository's do.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import sql

from queue_processor.db import Database
from queue_processor.errors import DatabaseUnavailable
from tests.support.pgbouncer import PgBouncer

pytestmark = [pytest.mark.pooler, pytest.mark.anyio]

SETTINGS = sql.SQL(
    "SELECT current_setting('statement_timeout') AS statement_timeout,"
    " current_setting('idle_in_transaction_session_timeout') AS idle_timeout,"
    " current_setting('search_path') AS search_path"
)
SLEEP = sql.SQL("SELECT pg_sleep(%(s)s::float8)")


@pytest.fixture(params=["direct", "pooled"])
def route(request: pytest.FixtureRequest, dsn: str, pgbouncer: PgBouncer) -> tuple[str, bool]:
    """(the test database's URL, whether it is the pooler's)."""
    pooled = request.param == "pooled"
    return (pgbouncer.url(dsn) if pooled else dsn), pooled


def server_defaults(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(SETTINGS).fetchone()
    assert row is not None
    return {"statement_timeout": row[0], "idle_timeout": row[1]}


async def test_worker_statements_run_with_the_timeouts_and_our_search_path(
    route: tuple[str, bool], dsn: str
) -> None:
    url, pooled = route
    expected = {
        "statement_timeout": "5min",
        "idle_timeout": "1min",
        "search_path": "pg_catalog, pg_temp",
    }
    async with Database(
        url,
        pooled=pooled,
        max_size=2,
        statement_timeout_seconds=300,
        idle_in_transaction_timeout_seconds=60,
    ) as db:
        async with db.connection(autocommit=True) as conn:
            assert await db.fetch_one(conn, SETTINGS) == expected
        async with db.connection() as conn:  # a transaction of several statements
            assert await db.fetch_one(conn, SETTINGS) == expected
            assert await db.fetch_all(conn, SETTINGS) == [expected]
        pipelined = await db.transaction_pipelined([(SETTINGS, None), (SETTINGS, None)])
        assert pipelined == [[expected], [expected]]
    # An operator command's Database sets no timeout: the server's apply.
    async with (
        Database(url, pooled=pooled, max_size=1) as db,
        db.connection(autocommit=True) as conn,
    ):
        found = await db.fetch_one(conn, SETTINGS)
    assert found == {**server_defaults(dsn), "search_path": "pg_catalog, pg_temp"}


async def test_a_statement_longer_than_the_statement_timeout_is_cancelled(
    route: tuple[str, bool],
) -> None:
    url, pooled = route
    async with Database(url, pooled=pooled, max_size=2, statement_timeout_seconds=0.2) as db:
        async with db.connection(autocommit=True) as conn:
            assert await db.fetch_one(conn, SLEEP, {"s": 0.01}) is not None  # within it
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable, match="statement timeout"):
                await db.fetch_one(conn, SLEEP, {"s": 5})
            assert time.monotonic() - started < 3
        with pytest.raises(DatabaseUnavailable, match="statement timeout"):
            await db.transaction_pipelined([(SLEEP, {"s": 0.01}), (SLEEP, {"s": 5})])
        async with db.connection(autocommit=True) as conn:  # the connection is still good
            assert await db.fetch_one(conn, SLEEP, {"s": 0.01}) is not None


async def test_an_abandoned_transaction_ends_with_the_idle_timeout(
    route: tuple[str, bool],
) -> None:
    url, pooled = route
    async with Database(
        url, pooled=pooled, max_size=2, idle_in_transaction_timeout_seconds=0.3
    ) as db:
        async with db.connection() as conn:
            await db.fetch_one(conn, SETTINGS)  # opens the transaction
            await anyio.sleep(1.5)  # idle inside it, longer than the timeout
            with pytest.raises(DatabaseUnavailable):
                await db.fetch_one(conn, SETTINGS)
        async with db.connection(autocommit=True) as conn:  # the pool replaced it
            found = await db.fetch_one(conn, SETTINGS)
    assert found is not None
    assert found["idle_timeout"] == "300ms"


async def test_pooled_timeouts_stay_in_our_transactions(dsn: str, pgbouncer: PgBouncer) -> None:
    """Set per transaction, the timeouts never reach the next client of a server
    connection (a session SET would: an application's statements would be cancelled)."""
    url = pgbouncer.url(dsn)
    async with (
        Database(url, pooled=True, max_size=4, statement_timeout_seconds=0.5) as db,
        anyio.create_task_group() as tg,  # several server connections at once
    ):
        for _ in range(4):
            tg.start_soon(db.transaction_pipelined, [(SLEEP, {"s": 0.05})])
    defaults = server_defaults(dsn)
    conns = [
        psycopg.connect(url, prepare_threshold=None) for _ in range(pgbouncer.default_pool_size)
    ]
    try:
        seen = [conn.execute(SETTINGS).fetchone() for conn in conns]
    finally:
        for conn in conns:
            conn.close()
    assert {row[0] for row in seen if row} == {defaults["statement_timeout"]}


async def test_prepared_statements_only_when_directly_connected(
    route: tuple[str, bool],
) -> None:
    """psycopg prepares a statement it has run five times on a connection: kept when direct
    (it saves a parse and plan per claim and write), never through a pooler (the next
    transaction may run on a server connection where it does not exist, or is another's)."""
    url, pooled = route
    prepared = sql.SQL("SELECT count(*) AS n FROM pg_prepared_statements")
    async with (
        Database(url, pooled=pooled, max_size=1) as db,
        db.connection(autocommit=True) as conn,
    ):
        for _ in range(6):
            found = await db.fetch_one(conn, prepared)
    assert found is not None
    assert (found["n"] > 0) is not pooled
