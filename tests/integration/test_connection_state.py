"""A connection whose protocol state cannot be trusted is never used again.

Behind a transaction pooler that drops its server connection in the middle of a transaction,
psycopg may read the pooler's error as one result too many ("received 2 results from command
'COMMIT'", an IndexError in its pipeline's bookkeeping); a cancellation at the wrong moment
can leave a connection in pipeline mode. Such a connection must be dropped (the pool opens
another) and the failure reported as DatabaseUnavailable, which the worker retries; never a
StatementFailed (which would fail items, or stop a command with exit 2) or a crash.
"""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from queue_processor.db import Database, translate_errors
from queue_processor.errors import DatabaseUnavailable

pytestmark = pytest.mark.anyio

PID = sql.SQL("SELECT pg_backend_pid() AS pid")


async def test_a_connection_left_in_pipeline_mode_is_not_handed_out_again(dsn: str) -> None:
    async with Database(dsn, max_size=1) as db:
        async with db.connection(autocommit=True) as conn:
            first = await db.fetch_one(conn, PID)
            conn.pgconn.enter_pipeline_mode()  # as a cancelled pipeline entry leaves it
        async with db.connection(autocommit=True) as conn:
            second = await db.fetch_one(conn, PID)
            assert conn.pgconn.pipeline_status == psycopg.pq.PipelineStatus.OFF
    assert first is not None
    assert second is not None
    assert second["pid"] != first["pid"]


async def test_a_connection_out_of_step_is_dropped_and_reported_unavailable(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Database(dsn, max_size=1) as db:
        async with db.connection(autocommit=True) as conn:
            first = await db.fetch_one(conn, PID)

            async def out_of_step(*args: object, **kwargs: object) -> None:
                raise IndexError("pop from an empty deque")  # psycopg's pipeline bookkeeping

            with monkeypatch.context() as patch:
                patch.setattr(conn, "execute", out_of_step)
                with pytest.raises(DatabaseUnavailable, match="out of step"):
                    await db.fetch_one(conn, PID)
            assert conn.closed
        async with db.connection(autocommit=True) as conn:
            second = await db.fetch_one(conn, PID)
    assert first is not None
    assert second is not None
    assert second["pid"] != first["pid"]


def test_more_results_than_statements_is_database_unavailable() -> None:
    with (
        pytest.raises(DatabaseUnavailable, match="received 2 results"),
        translate_errors(),
    ):
        raise psycopg.InternalError("received 2 results from command 'COMMIT'")
