"""The only module that knows psycopg and psycopg_pool.

``Database`` owns a connection pool (an async context manager with an explicit lifecycle),
sets each connection's search_path to ``pg_catalog, pg_temp`` (statements name the queue
schema, see ``Database.statement``), registers the binary dumpers used to
ship vectors (pgvector's ``vector[]``; ``real[]`` for the other column types), and
translates driver errors into queue_processor's exception tree:

- connection loss, pool timeouts, deadlocks and serialization failures -> DatabaseUnavailable
- any other error raised by a statement -> StatementFailed (keeps the SQLSTATE)

Statements come from queries.sql by name (``statement``). Identifiers reach SQL only here,
through ``psycopg.sql.Identifier``: callers fill a statement's ``{slots}`` with plain names
(``"docs"``), qualified names (``("app", "docs")``) or fragments built by this module (another
named block, a ``type_modifier``, a ``builtin_type``, a ``joined`` list), never with SQL text.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Literal, cast, get_args

import numpy as np
import numpy.typing as npt
import psycopg
import psycopg.errors
import structlog
from psycopg import conninfo, sql
from psycopg.abc import Buffer
from psycopg.adapt import Dumper
from psycopg.pq import Format
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from queue_processor import queries
from queue_processor.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    StatementFailed,
    first_line,
)

log = structlog.get_logger(__name__)

Row = dict[str, Any]
Connection = psycopg.AsyncConnection[Row]
Params = Mapping[str, Any]
Query = sql.SQL | sql.Composed
"""A statement or a fragment of one, composed here: callers pass it on, never build one."""
Slot = str | tuple[str, ...] | Query
"""What fills a ``{slot}`` of a named statement: a name, a qualified name or a fragment."""
BuiltinType = Literal["smallint", "integer", "bigint", "uuid", "text", "varchar"]
"""The built-in type names a statement may be given (the target keys' types)."""

_FLOAT4_OID = 700
_FLOAT4_ARRAY_OID = 1021
_RETRYABLE_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now
        "53300",  # too_many_connections
    }
)


class Float4ArrayDumper(Dumper):
    """Dump a 1-D numpy array as a binary ``real[]`` (one memcpy-like pass, no Python floats).

    Binary array layout: ndim, has-nulls flag, element type oid, then per dimension its length
    and lower bound; then each element as (length int32, value) in network byte order.
    """

    format = Format.BINARY
    oid = _FLOAT4_ARRAY_OID

    def dump(self, obj: Any) -> Buffer:
        arr = np.asarray(obj, dtype=np.float32).reshape(-1)
        header = struct.pack("!iiIii", 1, 0, _FLOAT4_OID, arr.size, 1)
        body = np.empty(arr.size, dtype=[("len", ">i4"), ("val", ">f4")])
        body["len"] = 4
        body["val"] = arr
        return header + body.tobytes()


class VectorBatch:
    """The vectors of one write, rows of a 2-D float32 matrix, sent as one binary pgvector
    ``vector[]`` parameter (see ``_vector_array_dumper``)."""

    __slots__ = ("rows",)

    def __init__(self, rows: npt.NDArray[np.float32]) -> None:
        if rows.ndim != 2:
            raise ValueError(f"a vector batch is a 2-D matrix, not {rows.ndim}-D")
        self.rows = rows


def _vector_array_dumper(vector_oid: int, array_oid: int) -> type[Dumper]:
    """A dumper of ``VectorBatch`` as a binary ``vector[]`` of this database's pgvector.

    Each element is pgvector's binary form (int16 dimensions, int16 zero, big-endian
    float32s), so PostgreSQL receives the vectors as they are stored: no real[] to slice and
    cast per row, and half the bytes of a real[] (whose every element carries a length).
    """

    class VectorArrayDumper(Dumper):
        format = Format.BINARY
        oid = array_oid

        def dump(self, obj: Any) -> Buffer:
            rows = np.asarray(obj.rows, dtype=np.float32)
            count, dims = rows.shape
            body = np.empty(
                count,
                dtype=[("len", ">i4"), ("dims", ">i2"), ("unused", ">i2"), ("val", ">f4", (dims,))],
            )
            body["len"] = 4 + 4 * dims
            body["dims"] = dims
            body["unused"] = 0
            body["val"] = rows
            return struct.pack("!iiIii", 1, 0, vector_oid, count, 1) + body.tobytes()

    return VectorArrayDumper


def float4_array(values: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """A flat float32 array suitable for a ``%(name)b`` real[] parameter."""
    return np.ascontiguousarray(values, dtype=np.float32).reshape(-1)


@contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raise psycopg errors as queue_processor errors, keeping ``__cause__``."""
    try:
        yield
    except PoolTimeout as exc:
        raise DatabaseUnavailable(f"no database connection available: {exc}") from exc
    except psycopg.Error as exc:
        sqlstate = exc.sqlstate
        if (
            isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
            and not isinstance(exc, psycopg.errors.QueryCanceled)
        ) or sqlstate in _RETRYABLE_SQLSTATES:
            raise DatabaseUnavailable(f"database unavailable: {first_line(exc)}") from exc
        raise StatementFailed(first_line(exc), sqlstate=sqlstate) from exc


def _quote_ident(name: str) -> str:
    """``name`` as a double-quoted SQL identifier (what quote_ident does, always quoting)."""
    return '"' + name.replace('"', '""') + '"'


def statement(name: str, /, *, source: str = "queries.sql", **slots: Slot) -> Query:
    """The named statement (or fragment) of ``source`` with its ``{slot}`` placeholders filled.

    A string becomes an identifier, a tuple a qualified identifier (``("app", "docs")`` ->
    ``"app"."docs"``); a ``Query`` (another named block, or a fragment made by the helpers
    below) is inserted as it is.
    """
    text = sql.SQL(queries.get(name, source))
    if not slots:
        return text
    return text.format(**{key: _composable(value) for key, value in slots.items()})


def _composable(value: Slot) -> sql.Composable:
    if isinstance(value, str):
        return sql.Identifier(value)
    if isinstance(value, tuple):
        return sql.Identifier(*value)
    return value


def type_modifier(value: int) -> Query:
    """A type modifier such as the 384 of ``vector(384)`` (it cannot be a bound parameter):
    an integer literal (the type itself checks its range)."""
    # operator.index: any integer type, never a float or a text (TypeError).
    return sql.SQL("{}").format(sql.Literal(operator.index(value)))


_BUILTIN_TYPES: frozenset[str] = frozenset(get_args(BuiltinType))


def builtin_type(name: BuiltinType) -> Query:
    """A built-in type's name, e.g. for a key parameter's cast (``%(ids)s::{id_type}[]``).
    These are SQL keywords or pg_catalog's types; anything else is refused."""
    if name not in _BUILTIN_TYPES:
        raise ValueError(f"not a built-in type this package uses: {name!r}")
    return sql.SQL(name)


def joined(parts: Iterable[Query], separator: Literal[", ", ""] = ", ") -> Query:
    """Fragments in a row: a comma-separated list, or (``separator=""``) one after another."""
    return sql.SQL(separator).join(parts)


def ensure_database(admin_dsn: str, name: str, *, extensions: Sequence[str] = ()) -> str:
    """Create database ``name`` (and extensions in it) if missing; return its DSN."""
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


class Database:
    """A connection pool bound to one queue schema.

    Use as ``async with Database(dsn) as db:``; closing waits for connections to be returned.
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
    ) -> None:
        self.schema = schema
        # Every statement names the queue schema's objects with the schema (queries.sql,
        # {qs}), so sessions need nothing but pg_catalog: no object of any other schema (an
        # overload planted in public, or even in the queue schema) can win a name lookup,
        # and temporary tables come last.
        self.search_path = "pg_catalog, pg_temp"
        # The search_path the database and role give sessions (read when a connection is
        # configured): the write transaction runs with it, for the users' own triggers.
        self.user_search_path = "pg_catalog, pg_temp"
        self._dsn = dsn
        self._application_name = application_name
        self._connect_timeout_seconds = connect_timeout_seconds
        self._pool = AsyncConnectionPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            open=False,
            kwargs={
                "application_name": application_name,
                "connect_timeout": max(1, int(connect_timeout_seconds)),
            },
            configure=self._configure,
            check=AsyncConnectionPool.check_connection,
            # Keep reconnecting in the background (with psycopg_pool's backoff) for up to 5
            # minutes after the database goes away, so waiters are served as soon as it is
            # back; past that the pool tries again on the next request. Our callers retry
            # DatabaseUnavailable with their own backoff, so the worker rides out restarts.
            reconnect_timeout=300.0,
            timeout=connect_timeout_seconds,
        )
        self.closed = True

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        conn.adapters.register_dumper(np.ndarray, Float4ArrayDumper)
        cur = await conn.execute(self.statement("set_search_path"), {"path": self.search_path})
        found_path = await cur.fetchone()
        if found_path is not None:
            self.user_search_path = str(found_path[0])
        # pgvector's type oids differ per database (and it may be absent: then no target
        # can be a vector column).
        cur = await conn.execute(self.statement("vector_type_oids"))
        found = await cur.fetchone()
        if found is not None:
            conn.adapters.register_dumper(VectorBatch, _vector_array_dumper(*found))
        await conn.commit()

    def statement(self, name: str, /, **slots: Slot) -> Query:
        """The named statement of queries.sql, its ``{qs}`` (the queue schema) and other
        ``{slots}`` filled (see ``statement``)."""
        return statement(name, source="queries.sql", qs=self.schema, **slots)

    async def open(self) -> None:
        """Open the pool and wait until one connection works."""
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
        """A pooled connection returning dict rows; commits on success unless autocommit."""
        with translate_errors():
            async with self._pool.connection() as conn:
                conn.row_factory = dict_row
                await conn.set_autocommit(autocommit)
                yield cast(psycopg.AsyncConnection[Row], conn)

    async def listen(self, channel: str, on_notify: Callable[[], None]) -> None:
        """LISTEN on ``channel`` over a dedicated connection, calling ``on_notify`` for each
        notification, until cancelled. Raises DatabaseUnavailable when the connection drops
        (the caller decides how to back off and listen again)."""
        with translate_errors():
            conn = await psycopg.AsyncConnection.connect(
                self._dsn,
                autocommit=True,
                application_name=f"{self._application_name}-listen",
                connect_timeout=max(1, int(self._connect_timeout_seconds)),
            )
            async with conn:
                await conn.execute(statement("listen", channel=channel))
                on_notify()  # anything queued while we were not listening
                async for _ in conn.notifies():
                    on_notify()

    # --- plain statement helpers -------------------------------------------------------

    @staticmethod
    async def fetch_all(
        conn: psycopg.AsyncConnection[Row], query: Query, params: Params | None = None
    ) -> list[Row]:
        """Run ``query`` and return every row as a dict."""
        with translate_errors():
            cur = await conn.execute(query, params)
            return await cur.fetchall() if cur.description else []

    @staticmethod
    async def fetch_one(
        conn: psycopg.AsyncConnection[Row], query: Query, params: Params | None = None
    ) -> Row | None:
        """Run ``query`` and return its first row, or None."""
        with translate_errors():
            cur = await conn.execute(query, params)
            return await cur.fetchone() if cur.description else None

    @staticmethod
    async def execute(
        conn: psycopg.AsyncConnection[Row], query: Query, params: Params | None = None
    ) -> int:
        """Run ``query``; return the affected row count."""
        with translate_errors():
            cur = await conn.execute(query, params)
            return cur.rowcount

    async def transaction_pipelined(
        self, statements: Sequence[tuple[Query, Params | None]]
    ) -> list[list[Row]]:
        """Run ``statements`` in one transaction, sent together in pipeline mode (BEGIN, the
        statements and COMMIT cost one round trip, not one each), and return each statement's
        rows. A failing statement rolls the whole transaction back and raises."""
        async with self.connection(autocommit=True) as conn:
            with translate_errors():
                async with conn.pipeline(), conn.transaction():
                    cursors = [await conn.execute(q, p) for q, p in statements]
                return [await c.fetchall() if c.description else [] for c in cursors]

    @staticmethod
    async def execute_many(
        conn: psycopg.AsyncConnection[Row], query: Query, params_seq: Sequence[Params]
    ) -> None:
        """Run ``query`` once per parameter set, pipelined into one round trip."""
        with translate_errors():
            async with conn.cursor() as cur:
                await cur.executemany(query, params_seq)

    # --- trusted DDL: migrations and function files ----------------------------------

    async def advisory_lock(self, conn: psycopg.AsyncConnection[Row], key: str) -> None:
        """Block until this session holds the advisory lock named ``key``."""
        await self.execute(conn, self.statement("advisory_lock"), {"key": key})

    async def advisory_unlock(self, conn: psycopg.AsyncConnection[Row], key: str) -> None:
        """Release the advisory lock named ``key``."""
        await self.execute(conn, self.statement("advisory_unlock"), {"key": key})

    @asynccontextmanager
    async def ddl_transaction(self, conn: psycopg.AsyncConnection[Row]) -> AsyncIterator[None]:
        """A transaction (on an autocommit connection) whose search_path puts the queue schema
        first, so that the unqualified CREATEs of the migrations land there (``migrate``
        refuses a schema in which any role but its owner may create objects)."""
        with translate_errors():
            async with conn.transaction():
                await conn.execute(
                    self.statement("set_local_search_path"),
                    {"path": f"{_quote_ident(self.schema)}, pg_catalog, pg_temp"},
                )
                yield

    async def run_script(self, conn: psycopg.AsyncConnection[Row], script: str) -> None:
        """Run trusted SQL shipped with the package (a migration or function file; no
        parameters), its ``@qs@`` placeholders replaced by the queue schema's quoted name."""
        if "@qs@" in script:
            if "'" in self.schema:
                # The function files also write @qs@ inside literals ('@qs@.t'::regclass).
                raise ConfigurationError(
                    f"the queue schema's name may not hold a quote: {self.schema!r}"
                )
            script = script.replace("@qs@", _quote_ident(self.schema))
        with translate_errors():
            await conn.execute(script)
