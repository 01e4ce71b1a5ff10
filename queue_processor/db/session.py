"""What a session of ours assumes, directly connected or behind a transaction-mode pooler.

Direct (``pooled=False``): each connection is a session of our own. The search_path
(``pg_catalog, pg_temp``) and the worker's timeouts are set once per session when it
connects, and psycopg prepares the statements it runs often (server-side prepared statements
save the parse and plan of every claim and write).

Pooled (PgBouncer in transaction mode, Supabase's pooler on port 6543, RDS Proxy): each
transaction may run on a different server connection, shared with other clients. Nothing may
rest on the session: no server-side prepared statement (``prepare_threshold=None``: the next
transaction may meet a connection where ``_pg3_0`` does not exist, or is another client's),
no session setting (it would leak into other clients' transactions; theirs may leak into
ours). Instead every transaction starts with ``pin_transaction``, which sets the search_path
and the timeouts for that transaction alone; a statement run on an autocommit connection
becomes a transaction of its own (BEGIN, pin, statement, COMMIT, pipelined: still one round
trip), so per-statement commit semantics stay. No LISTEN goes through a pooler (a NOTIFY
never reaches it): the worker listens on a direct address if it has one, else it polls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import conninfo
from psycopg.pq import TransactionStatus

from queue_processor.db.adapters import register_dumpers
from queue_processor.db.compose import Query, statement

SUPABASE_POOLER_PORT = 6543
"""The port of Supabase's transaction-mode pooler (Supavisor)."""

Params = Mapping[str, Any]


def looks_pooled(dsn: str) -> bool:
    """Whether ``dsn`` looks like a transaction-mode pooler's address: port 6543 (Supabase's
    pooler) or a host name containing "pooler" (``aws-0-eu-central-1.pooler.supabase.com``).
    Used when QUEUE_PROCESSOR_POOLED is ``auto``; an unparsable DSN is not pooled (connecting
    will say what is wrong with it)."""
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return False
    ports = str(params.get("port") or "").split(",")
    hosts = str(params.get("host") or "").split(",")
    return str(SUPABASE_POOLER_PORT) in ports or any("pooler" in h.lower() for h in hosts)


def _milliseconds(seconds: float) -> int:
    """A timeout in whole milliseconds; 0 (off) stays 0, anything positive is at least 1."""
    return 0 if seconds <= 0 else max(1, round(seconds * 1000))


@dataclass(frozen=True)
class SessionPolicy:
    """How connections are set up and how each transaction starts (see the module doc).

    ``statement_timeout_seconds`` / ``idle_in_transaction_timeout_seconds``: 0 leaves the
    server's setting alone (operator commands); the worker passes its own."""

    pooled: bool = False
    search_path: str = "pg_catalog, pg_temp"
    statement_timeout_seconds: float = 0.0
    idle_in_transaction_timeout_seconds: float = 0.0

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of every connection made under this policy."""
        # None: psycopg never prepares. Its default (prepare after 5 runs) stays when direct.
        return {"prepare_threshold": None} if self.pooled else {}

    @property
    def _timeouts(self) -> dict[str, str | None]:
        """The timeouts as set_config values in milliseconds; None leaves one alone."""
        values = {
            "statement_timeout": _milliseconds(self.statement_timeout_seconds),
            "idle_timeout": _milliseconds(self.idle_in_transaction_timeout_seconds),
        }
        return {name: str(ms) if ms else None for name, ms in values.items()}

    def pin(self) -> tuple[Query, Params]:
        """The first statement of a pooled transaction: our search_path and the timeouts,
        for this transaction only."""
        return statement("pin_transaction"), {"path": self.search_path, **self._timeouts}

    async def configure(self, conn: psycopg.AsyncConnection[Any]) -> str:
        """Set up a new connection (the pool's ``configure``): the vector dumpers, and, when
        direct, the session's search_path and timeouts. Returns the search_path the database
        and role give sessions (the write transaction runs with it, for the users' own
        triggers). Leaves the connection idle, outside a transaction."""
        if self.pooled:
            # Read-only, in a pinned transaction of its own: the server connection may carry
            # another client's settings. reset_val is the database's and role's default
            # whatever a previous client SET for the session.
            pin, params = self.pin()
            async with conn.pipeline(), conn.transaction():
                await conn.execute(pin, params)
                path_cur = await conn.execute(statement("default_search_path"))
                oids_cur = await conn.execute(statement("vector_type_oids"))
            path_row, oids = await path_cur.fetchone(), await oids_cur.fetchone()
            user_path = str(path_row[0]) if path_row is not None else self.search_path
        else:
            cur = await conn.execute(statement("set_search_path"), {"path": self.search_path})
            path_row = await cur.fetchone()
            user_path = str(path_row[0]) if path_row is not None else self.search_path
            if any(self._timeouts.values()):
                await conn.execute(statement("set_session_timeouts"), self._timeouts)
            # pgvector's type oids differ per database (and it may be absent).
            oids = await (await conn.execute(statement("vector_type_oids"))).fetchone()
            await conn.commit()
        register_dumpers(conn, (int(oids[0]), int(oids[1])) if oids is not None else None)
        return user_path

    @asynccontextmanager
    async def statement_scope(self, conn: psycopg.AsyncConnection[Any]) -> AsyncIterator[None]:
        """Around one statement (or one ``executemany``) run on ``conn``.

        Direct, or inside a transaction (ours pin themselves as they begin): nothing. Pooled
        and outside a transaction, the pin goes first. On an autocommit connection the pin
        and the statement are a transaction of their own (so the statement still commits on
        its own), sent in one pipeline: one round trip, results there once the block ends.
        On a connection in transaction mode they open the caller's transaction, the pin in a
        round trip of its own: a pipeline leaves that transaction open, and PostgreSQL does
        not arm idle_in_transaction_session_timeout after one (psycopg's flush request that
        follows the pipeline's Sync disarms it until the next Sync)."""
        if not (self.pooled and conn.info.transaction_status == TransactionStatus.IDLE):
            yield
            return
        pin, pin_params = self.pin()
        if not conn.autocommit:
            await conn.execute(pin, pin_params)
            yield
            return
        async with conn.pipeline(), conn.transaction():
            await conn.execute(pin, pin_params)
            yield
