"""``Database``: the connection pool bound to one queue schema, and every way a statement runs.

All statements go through the helpers below (``fetch_all``, ``fetch_one``, ``execute``,
``execute_many``, ``transaction_pipelined``, ``schema_transaction``, ``run_script``), which
apply the session policy (session.py: direct, or behind a transaction-mode pooler) and
translate driver errors (failures.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import anyio
import psycopg
from psycopg import conninfo, pq
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from queue_processor.db.compose import Query, Slot, quote_ident, statement
from queue_processor.db.failures import connect_failure, out_of_step, translate_errors
from queue_processor.db.session import Params, SessionPolicy
from queue_processor.errors import ConfigurationError, DatabaseUnavailable

Row = dict[str, Any]
Connection = psycopg.AsyncConnection[Row]

SCHEMA_LOCK = "queue_processor.migrate"
"""The advisory lock that serialises changes to the queue schema (migrate, register)."""


class Database:
    """A connection pool bound to one queue schema.

    Use as ``async with Database(dsn) as db:``; closing waits for connections to be returned.
    ``pooled``: ``dsn`` is a transaction-mode pooler (see session.py). ``direct_dsn``: the
    database's direct address, bypassing the pooler (default ``dsn`` unless pooled), for
    LISTEN and for what cannot run through a pooler (``direct``: CREATE INDEX
    CONCURRENTLY); pooled without one, the worker polls and builds no index.
    The timeouts (seconds, 0 = the server's setting) apply to every session or, pooled, to
    every transaction: the worker sets them, operator commands do not.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "public",
        min_size: int = 1,
        max_size: int = 8,
        application_name: str = "queue_processor",
        connect_timeout_seconds: float = 10.0,
        pooled: bool = False,
        direct_dsn: str | None = None,
        statement_timeout_seconds: float = 0.0,
        idle_in_transaction_timeout_seconds: float = 0.0,
    ) -> None:
        self.schema = schema
        # Every statement names the queue schema's objects with the schema (queries.sql,
        # {qs}), so sessions need nothing but pg_catalog: no object of any other schema (an
        # overload planted in public, or even in the queue schema) can win a name lookup,
        # and temporary tables come last.
        self.search_path = "pg_catalog, pg_temp"
        # The search_path the database and role give sessions (read when a connection is
        # configured): the write transaction runs with it, for the users' own triggers.
        self.user_search_path = self.search_path
        self.policy = SessionPolicy(
            pooled=pooled,
            search_path=self.search_path,
            statement_timeout_seconds=statement_timeout_seconds,
            idle_in_transaction_timeout_seconds=idle_in_transaction_timeout_seconds,
        )
        self._dsn = dsn
        self._direct_dsn = direct_dsn if direct_dsn is not None or pooled else dsn
        self._application_name = application_name
        self._connect_timeout_seconds = connect_timeout_seconds
        self._pool = AsyncConnectionPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            open=False,
            kwargs=self._connect_kwargs(application_name),
            configure=self._configure,
            check=self._check,
            # Keep reconnecting in the background (with psycopg_pool's backoff) for up to 5
            # minutes after the database goes away, so waiters are served as soon as it is
            # back; past that the pool tries again on the next request. Our callers retry
            # DatabaseUnavailable with their own backoff, so the worker rides out restarts.
            reconnect_timeout=300.0,
            timeout=connect_timeout_seconds,
        )
        self.closed = True

    @property
    def pooled(self) -> bool:
        """Whether the DSN is a transaction-mode pooler's."""
        return self.policy.pooled

    @property
    def listens(self) -> bool:
        """Whether ``listen`` can receive notifications: there is a direct address for it."""
        return self._direct_dsn is not None

    @asynccontextmanager
    async def direct(self, *, max_size: int = 2) -> AsyncIterator[Database]:
        """A Database for work that cannot go through a transaction pooler: a statement that
        may not run inside a transaction block (CREATE INDEX CONCURRENTLY) beside session
        settings that must hold for it (maintenance_work_mem). This one when connected
        directly; behind a pooler one on the direct address, opened here and closed after
        (``max_size`` connections at most); ConfigurationError when there is none."""
        if not self.pooled:
            yield self
            return
        if self._direct_dsn is None:
            raise ConfigurationError(
                "this needs a direct connection to the database (CREATE INDEX CONCURRENTLY "
                "cannot run through a transaction pooler): set QUEUE_PROCESSOR_DIRECT_URL to "
                "the database's direct address (on Supabase: db.PROJECT.supabase.co:5432)"
            )
        direct = Database(
            self._direct_dsn,
            schema=self.schema,
            min_size=1,
            max_size=max_size,
            application_name=f"{self._application_name}-direct",
            connect_timeout_seconds=self._connect_timeout_seconds,
            pooled=False,
            statement_timeout_seconds=self.policy.statement_timeout_seconds,
            idle_in_transaction_timeout_seconds=self.policy.idle_in_transaction_timeout_seconds,
        )
        async with direct:
            yield direct

    def _connect_kwargs(self, application_name: str) -> dict[str, Any]:
        return {
            "application_name": application_name,
            "connect_timeout": max(1, int(self._connect_timeout_seconds)),
            **self.policy.connect_kwargs(),
        }

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.user_search_path = await self.policy.configure(conn)

    @staticmethod
    async def _check(conn: psycopg.AsyncConnection[Any]) -> None:
        """The pool's check before it hands a connection out (a failure: it takes another).
        A connection still in pipeline mode was left half-way through one (a cancellation
        while a pipeline was being entered): its next statement would read stale results."""
        if conn.pgconn.pipeline_status != pq.PipelineStatus.OFF:
            await conn.close()  # closed: the pool replaces it (an open one it would keep)
            raise psycopg.OperationalError("connection left in pipeline mode")
        await AsyncConnectionPool.check_connection(conn)

    def statement(self, name: str, /, **slots: Slot) -> Query:
        """The named statement of queries.sql, its ``{qs}`` (the queue schema) and other
        ``{slots}`` filled (see ``statement``)."""
        return statement(name, source="queries.sql", qs=self.schema, **slots)

    # --- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Connect once, then open the pool and wait until one connection works.

        The first connection is made here rather than by the pool, which would retry a
        certificate the CA file does not vouch for (or a wrong password) until its timeout
        and then report only that it timed out: a configuration error (ConfigurationError)
        ends the wait at once, naming the cause; an unreachable server is tried again for up
        to the connect timeout (then DatabaseUnavailable, naming the last cause)."""
        deadline = time.monotonic() + self._connect_timeout_seconds
        wait_s = 0.1
        while True:
            try:
                first = await psycopg.AsyncConnection.connect(
                    self._dsn, **self._connect_kwargs(self._application_name)
                )
            except psycopg.Error as exc:
                failure = connect_failure(exc)
                if isinstance(failure, ConfigurationError) or time.monotonic() >= deadline:
                    raise failure from exc
                await anyio.sleep(min(wait_s, max(0.0, deadline - time.monotonic())))
                wait_s = min(wait_s * 2, 1.0)
            else:
                await first.close()
                break
        with translate_errors():
            await self._pool.open(wait=True, timeout=self._pool.timeout)
        self.closed = False

    async def close(self) -> None:
        """Close every connection of the pool."""
        await self._pool.close()
        self.closed = True

    async def __aenter__(self) -> Database:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @asynccontextmanager
    async def connection(
        self, *, autocommit: bool = False
    ) -> AsyncIterator[psycopg.AsyncConnection[Row]]:
        """A pooled connection returning dict rows; commits on success unless autocommit.
        Run statements on it only through the helpers below."""
        with translate_errors():
            async with self._pool.connection() as conn:
                conn.row_factory = dict_row
                async with self._guard(conn):
                    await conn.set_autocommit(autocommit)
                yield cast(psycopg.AsyncConnection[Row], conn)
                if not autocommit and not conn.closed:  # here, guarded (see _guard)
                    async with self._guard(conn):
                        await conn.commit()

    async def listen(self, channel: str, on_notify: Callable[[], None]) -> None:
        """LISTEN on ``channel`` over a dedicated direct connection, calling ``on_notify`` for
        each notification, until cancelled. Raises DatabaseUnavailable when the connection
        drops or cannot be made (the caller backs off and listens again), ConfigurationError
        when connecting says our settings are wrong, or when there is no direct address
        (``listens`` is False: a LISTEN through a transaction pooler never hears a NOTIFY)."""
        if self._direct_dsn is None:
            raise ConfigurationError("no direct address to LISTEN on behind a transaction pooler")
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._direct_dsn,
                autocommit=True,
                **self._connect_kwargs(f"{self._application_name}-listen"),
            )
        except psycopg.Error as exc:
            raise connect_failure(exc, target="the database for LISTEN") from exc
        with translate_errors():
            async with conn:
                await conn.execute(statement("listen", channel=channel))
                on_notify()  # anything queued while we were not listening
                async for _ in conn.notifies():
                    on_notify()

    # --- statement helpers -------------------------------------------------------------

    @asynccontextmanager
    async def _guard(self, conn: psycopg.AsyncConnection[Any]) -> AsyncIterator[None]:
        """Around every statement: driver errors translated (failures.py). A connection out
        of step with the server (see ``out_of_step``; psycopg's pipeline bookkeeping then
        fails with an IndexError or an assertion) is closed, so that the pool replaces it
        instead of handing it out again, and reported as DatabaseUnavailable."""
        try:
            with translate_errors():
                yield
        except DatabaseUnavailable as exc:
            if out_of_step(exc.__cause__):
                await self._discard(conn)
            raise
        except (IndexError, AssertionError) as exc:
            await self._discard(conn)
            raise DatabaseUnavailable(f"database connection out of step: {exc!r}") from exc

    @staticmethod
    async def _discard(conn: psycopg.AsyncConnection[Any]) -> None:
        with contextlib.suppress(Exception):
            await conn.close()

    async def fetch_all(
        self, conn: psycopg.AsyncConnection[Row], query: Query, params: Params | None = None
    ) -> list[Row]:
        """Run ``query`` and return every row as a dict."""
        async with self._guard(conn):
            async with self.policy.statement_scope(conn):
                cur = await conn.execute(query, params)
            return await cur.fetchall() if cur.description else []

    async def fetch_one(
        self, conn: psycopg.AsyncConnection[Row], query: Query, params: Params | None = None
    ) -> Row | None:
        """Run ``query`` and return its first row, or None."""
        async with self._guard(conn):
            async with self.policy.statement_scope(conn):
                cur = await conn.execute(query, params)
            return await cur.fetchone() if cur.description else None

    async def execute(
        self, conn: psycopg.AsyncConnection[Row], query: Query, params: Params | None = None
    ) -> int:
        """Run ``query``; return the affected row count."""
        async with self._guard(conn):
            async with self.policy.statement_scope(conn):
                cur = await conn.execute(query, params)
            return cur.rowcount

    async def execute_many(
        self, conn: psycopg.AsyncConnection[Row], query: Query, params_seq: Sequence[Params]
    ) -> None:
        """Run ``query`` once per parameter set, pipelined into one round trip."""
        async with self._guard(conn), self.policy.statement_scope(conn), conn.cursor() as cur:
            await cur.executemany(query, params_seq)

    async def transaction_pipelined(
        self, statements: Sequence[tuple[Query, Params | None]]
    ) -> list[list[Row]]:
        """Run ``statements`` in one transaction, sent together in pipeline mode (BEGIN, the
        statements and COMMIT cost one round trip, not one each), and return each statement's
        rows. A failing statement rolls the whole transaction back and raises."""
        pinned = [self.policy.pin()] if self.pooled else []
        async with self.connection(autocommit=True) as conn, self._guard(conn):
            async with conn.pipeline(), conn.transaction():
                cursors = [await conn.execute(q, p) for q, p in [*pinned, *statements]]
            cursors = cursors[len(pinned) :]
            return [await c.fetchall() if c.description else [] for c in cursors]

    # --- trusted DDL: migrations, function files, registration -------------------------

    @asynccontextmanager
    async def schema_transaction(self, conn: psycopg.AsyncConnection[Row]) -> AsyncIterator[None]:
        """One transaction (on an autocommit connection) that holds the queue schema's
        advisory lock until it ends: migrate runs whole inside it, so two processes take
        turns, and behind a transaction pooler the lock, the DDL and the unlock (the commit)
        share one server connection. Its search_path is ours (see ``ddl_search_path``)."""
        pin, params = self.policy.pin()
        with translate_errors():
            async with conn.transaction():
                await conn.execute(pin, params)
                await conn.execute(self.statement("advisory_xact_lock"), {"key": SCHEMA_LOCK})
                yield

    async def lock_schema(self, conn: psycopg.AsyncConnection[Row]) -> None:
        """Take the queue schema's advisory lock until the current transaction ends (or,
        outside one, begin it): register waits for a migrate in progress and vice versa."""
        await self.execute(conn, self.statement("advisory_xact_lock"), {"key": SCHEMA_LOCK})

    @asynccontextmanager
    async def ddl_search_path(self, conn: psycopg.AsyncConnection[Row]) -> AsyncIterator[None]:
        """The queue schema first on the search_path while the block runs, so that the
        unqualified CREATEs of the migrations land there (``migrate`` refuses a schema in
        which any role but its owner may create objects); our own path again afterwards.
        A transaction of its own on an autocommit connection, a savepoint inside
        ``schema_transaction``."""
        set_path = self.statement("set_local_search_path")
        ddl_path = f"{quote_ident(self.schema)}, {self.search_path}"
        with translate_errors():
            async with conn.transaction():
                await conn.execute(set_path, {"path": ddl_path})
                yield
                await conn.execute(set_path, {"path": self.search_path})

    async def run_script(self, conn: psycopg.AsyncConnection[Row], script: str) -> None:
        """Run trusted SQL shipped with the package (a migration or function file; no
        parameters), its ``@qs@`` placeholders replaced by the queue schema's quoted name."""
        if "@qs@" in script:
            if "'" in self.schema:
                # The function files also write @qs@ inside literals ('@qs@.t'::regclass).
                raise ConfigurationError(
                    f"the queue schema's name may not hold a quote: {self.schema!r}"
                )
            script = script.replace("@qs@", quote_ident(self.schema))
        with translate_errors():
            await conn.execute(script)


def ensure_database(admin_dsn: str, name: str, *, extensions: Sequence[str] = ()) -> str:
    """Create database ``name`` (and extensions in it) if missing; return its DSN (the
    embedded server's setup: a direct connection of its own)."""
    with translate_errors():
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            found = conn.execute(statement("database_exists"), {"name": name}).fetchone()
            if not found:
                conn.execute(statement("create_database", database=name))
        dsn = conninfo.make_conninfo(admin_dsn, dbname=name)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for ext in extensions:
                conn.execute(statement("create_extension", extension=ext))
    return dsn
