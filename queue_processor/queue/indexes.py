"""Wanted vector indexes and their builds (``embedding_index_builds``, migration 0007).

A target's HNSW index is either created at once (small backlog, as ``register --index``
always did) or recorded as wanted and built after the backlog drained: an index present
during a backfill turns every vector write into an HNSW insert. The build is claimed like a
queue row (a lease, SKIP LOCKED, no session advisory lock: workers may connect through a
transaction pooler), then runs on one autocommit connection with its own settings:

- ``maintenance_work_mem`` sized to the data (``build_memory_mb``), capped by
  QUEUE_PROCESSOR_INDEX_BUILD_MEMORY_MB: pgvector builds the graph in memory while it fits
  and falls back to far slower on-disk inserts when it does not;
- no ``statement_timeout`` or ``lock_timeout`` (a build of millions of rows takes minutes);
- ``client_connection_check_interval`` 1 s (PostgreSQL 14+): when the builder dies (kill -9),
  its backend notices within a second and stops, instead of building on for nobody.

CREATE INDEX CONCURRENTLY keeps the table writable. A build that did not finish leaves an
INVALID index (``pg_index.indisvalid`` false): the next builder, once the dead builder's
lease lapsed and its backend is gone, drops it (concurrently) and builds again. The settings
are restored afterwards, so the pooled connection goes back as it came.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import anyio
import structlog

from queue_processor.db import Connection, Database, Row, type_modifier
from queue_processor.errors import DatabaseUnavailable, PermanentError, StatementFailed
from queue_processor.models import (
    HNSW_DEFAULT_EF_CONSTRUCTION,
    HNSW_DEFAULT_M,
    IndexBuild,
    IndexBuildResult,
    IndexSpec,
    IndexState,
    Target,
)

log = structlog.get_logger(__name__)

# pgvector's HNSW index handles at most 2,000 dimensions for vector and 4,000 for halfvec.
HNSW_MAX_VECTOR_DIMS = 2000
HNSW_MAX_HALFVEC_DIMS = 4000

# The least memory a build is given (PostgreSQL's own default maintenance_work_mem) unless
# the cap is lower.
MIN_BUILD_MEMORY_MB = 64
# What one row costs pgvector's in-memory HNSW graph besides its vector: the element and its
# neighbour lists (2 * m candidates on layer 0, ~16 bytes each), rounded up; the total gets
# a quarter on top. Sizing a little high costs nothing (memory is only taken as it is used).
_ELEMENT_OVERHEAD_BYTES = 160
_CANDIDATE_BYTES = 16
_MARGIN = 1.25

# The build connection's settings while it builds (see the module docstring).
_BUILD_SETTINGS = (
    "maintenance_work_mem",
    "statement_timeout",
    "lock_timeout",
    "client_connection_check_interval",
)


def hnsw_spec(
    target: Target, *, m: int = HNSW_DEFAULT_M, ef_construction: int = HNSW_DEFAULT_EF_CONSTRUCTION
) -> IndexSpec:
    """The cosine HNSW index ``target`` can have; PermanentError when it cannot have one
    (not a vector/halfvec column, no fixed dimensions, too many dimensions, bad m or
    ef_construction)."""
    if target.column_type not in ("vector", "halfvec"):
        raise PermanentError(
            f"an HNSW index needs a vector or halfvec column, not {target.column_type}"
        )
    limit = HNSW_MAX_VECTOR_DIMS if target.column_type == "vector" else HNSW_MAX_HALFVEC_DIMS
    if target.dimensions is None:
        raise PermanentError("an HNSW index needs a column with fixed dimensions, e.g. vector(384)")
    if target.dimensions > limit:
        raise PermanentError(
            f"HNSW indexes {target.column_type} up to {limit} dimensions; "
            f"{target.embedding_column} has {target.dimensions} (use halfvec)"
        )
    if not 2 <= m <= 100 or not 4 <= ef_construction <= 1000 or ef_construction < 2 * m:
        raise PermanentError(
            f"HNSW needs 2 <= m <= 100 and 2 * m <= ef_construction <= 1000 "
            f"(got m={m}, ef_construction={ef_construction})"
        )
    # A chunks table's index keeps the name its registration always gave it (28_chunks.sql).
    name = (
        f"{target.chunks_table[:58]}_hnsw"
        if target.chunks_table is not None
        else f"{target.relation_name}_{target.embedding_column}_hnsw_idx"[:63]
    )
    return IndexSpec(
        index_name=name,
        opclass="vector_cosine_ops" if target.column_type == "vector" else "halfvec_cosine_ops",
        m=m,
        ef_construction=ef_construction,
    )


def build_memory_mb(rows: float, dimensions: int, column_type: str, m: int, *, cap_mb: int) -> int:
    """``maintenance_work_mem`` in MB for an HNSW build over ``rows`` vectors: enough for the
    whole graph (vectors, elements, neighbour lists, a margin), at least 64 MB, at most
    ``cap_mb``."""
    vector_bytes = 8 + dimensions * (2 if column_type == "halfvec" else 4)
    per_row = vector_bytes + _ELEMENT_OVERHEAD_BYTES + 2 * m * _CANDIDATE_BYTES
    wanted = math.ceil(max(rows, 0.0) * per_row * _MARGIN / (1024 * 1024))
    return max(1, min(cap_mb, max(wanted, MIN_BUILD_MEMORY_MB)))


async def want_index(db: Database, target: Target, spec: IndexSpec, state: IndexState) -> None:
    """Record the index ``target`` wants: 'pending' (a worker builds it once the backlog
    drained) or 'ready' (it was just created)."""
    async with db.connection() as conn:
        await db.execute(
            conn,
            db.statement("want_index"),
            {
                "table_name": target.table_name,
                "column": target.embedding_column,
                "index_name": spec.index_name,
                "opclass": spec.opclass,
                "m": spec.m,
                "ef_construction": spec.ef_construction,
                "state": state,
            },
        )


async def index_build_wanted(db: Database) -> bool:
    """Whether any wanted index waits for a build (one cheap query of the registry)."""
    async with db.connection() as conn:
        row = await db.fetch_one(conn, db.statement("index_build_wanted"))
    return bool(row and row["wanted"])


async def index_builds(
    db: Database, table_name: str | None = None, column: str | None = None
) -> list[Row]:
    """Every wanted index (or one target's) with its state, whether the catalog holds it
    valid (``valid``: None when absent) and how long a build has been running."""
    async with db.connection() as conn:
        return await db.fetch_all(
            conn, db.statement("index_builds"), {"table_name": table_name, "column": column}
        )


async def retry_index_build(db: Database, table_name: str, column: str, *, valid: bool) -> bool:
    """Want a failed build again, or a 'ready' one whose index is not ``valid``; True if the
    build went back to pending."""
    async with db.connection() as conn:
        moved = await db.execute(
            conn,
            db.statement("retry_index_build"),
            {"table_name": table_name, "column": column, "valid": valid},
        )
    return moved > 0


async def index_usable(db: Database, target: Target) -> bool:
    """Whether a valid HNSW or IVFFlat index covers the target's vectors (else a search
    reads every row)."""
    schema, table, column = target.vectors_at
    async with db.connection() as conn:
        row = await db.fetch_one(
            conn,
            db.statement("column_index_usable"),
            {"schema": schema, "table": table, "column": column},
        )
    return bool(row and row["usable"])


async def build_next_index(
    db: Database,
    *,
    owner: str,
    lease_seconds: float,
    memory_cap_mb: int,
    table_name: str | None = None,
    column: str | None = None,
) -> IndexBuildResult | None:
    """Claim one due build (or, with ``table_name`` and ``column``, that target's) and run
    it; None if none is due. Needs two pooled connections: one builds, the other renews the
    lease. StatementFailed (e.g. the role does not own the table) ends it 'failed'; a
    cancellation (the worker stops) cancels the build in the server and gives it back
    ('pending'); DatabaseUnavailable propagates (the lease lapses, another builder takes it
    over)."""
    async with db.connection(autocommit=True) as conn:
        row = await db.fetch_one(
            conn,
            db.statement("claim_index_build"),
            {
                "owner": owner,
                "lease_seconds": lease_seconds,
                "table_name": table_name,
                "column": column,
            },
        )
        if row is None:
            return None
        build = IndexBuild(**row)
        log.info("index_build_started", table=build.table_name, index=build.index_name)
        return await _run_build(db, conn, build, owner, lease_seconds, memory_cap_mb)


async def _run_build(
    db: Database,
    conn: Connection,
    build: IndexBuild,
    owner: str,
    lease_seconds: float,
    memory_cap_mb: int,
) -> IndexBuildResult:
    """Build ``build`` on ``conn`` (renewing its lease meanwhile) and record the outcome."""
    started = time.monotonic()
    memory_mb = 0
    state: IndexState = "pending"
    error: str | None = None
    dropped = False
    try:
        await _check_ownership(db, conn, build)
        memory_mb = await _build_memory(db, conn, build, memory_cap_mb)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_renew_lease, db, build, owner, lease_seconds)
            try:
                dropped = await _create_index(db, conn, build, memory_mb)
            finally:
                tg.cancel_scope.cancel()
        state = "ready"
    except StatementFailed as exc:
        state, error = "failed", str(exc)
    finally:
        # Shielded: it also runs while the build is being cancelled (state stays 'pending').
        with anyio.CancelScope(shield=True):
            await _finish(db, build, owner, state, error, memory_mb)
    seconds = time.monotonic() - started
    if state == "ready":
        log.info(
            "index_built",
            table=build.table_name,
            index=build.index_name,
            memory_mb=memory_mb,
            seconds=round(seconds, 2),
            dropped_invalid=dropped,
        )
    else:
        log.error("index_build_failed", table=build.table_name, index=build.index_name, error=error)
    return IndexBuildResult(build, state, error, memory_mb, seconds, dropped)


async def _check_ownership(db: Database, conn: Connection, build: IndexBuild) -> None:
    """StatementFailed (42501) unless this role may create an index on the table: a worker
    role made by grant-worker may not (only the table's owner may), and says so in status."""
    row = await db.fetch_one(
        conn,
        db.statement("may_create_index"),
        {"schema": build.schema_name, "table": build.relation_name},
    )
    if row is None or row["allowed"]:
        return
    raise StatementFailed(
        f"role {row['role']} may not create index {build.index_name}: must be owner of table "
        f"{build.relation_name} (owned by {row['owner']})",
        sqlstate="42501",
    )


async def _build_memory(
    db: Database, conn: Connection, build: IndexBuild, memory_cap_mb: int
) -> int:
    """The build's maintenance_work_mem: sized to the table's rows (the planner's estimate,
    else a count) and the column's dimensions."""
    found = await db.fetch_one(
        conn,
        db.statement("index_build_rows"),
        {"schema": build.schema_name, "table": build.relation_name},
    )
    rows = float(found["rows"]) if found is not None else -1.0
    if rows < 0:
        counted = await db.fetch_one(
            conn,
            db.statement("count_table_rows", table=(build.schema_name, build.relation_name)),
        )
        rows = float(counted["rows"]) if counted is not None else 0.0
    return build_memory_mb(
        rows, build.dimensions or 0, build.column_type, build.m, cap_mb=memory_cap_mb
    )


async def _create_index(db: Database, conn: Connection, build: IndexBuild, memory_mb: int) -> bool:
    """Drop an invalid leftover, build the index under the build settings, restore them;
    True if a leftover was dropped. StatementFailed if the index is not valid afterwards."""
    index = (build.schema_name, build.index_name)
    params = {"schema": build.schema_name, "index": build.index_name}
    saved = await _settings(db, conn, _BUILD_SETTINGS)
    wanted = {
        "maintenance_work_mem": f"{memory_mb}MB",
        "statement_timeout": "0",
        "lock_timeout": "0",
        "client_connection_check_interval": "1s",
    }
    await _set(db, conn, {k: v for k, v in wanted.items() if k in saved})
    try:
        before = await db.fetch_one(conn, db.statement("index_validity"), params)
        dropped = before is not None and not before["valid"]
        if dropped:
            log.warning("index_invalid_dropped", table=build.table_name, index=build.index_name)
            await db.execute(conn, db.statement("drop_index_concurrently", index=index))
        await db.execute(
            conn,
            db.statement(
                "build_hnsw_index",
                index=build.index_name,
                table=(build.schema_name, build.relation_name),
                column=build.index_column,
                opclass=(await _vector_schema(db, conn), build.opclass),
                m=type_modifier(build.m),
                ef_construction=type_modifier(build.ef_construction),
            ),
        )
        after = await db.fetch_one(conn, db.statement("index_validity"), params)
    finally:
        with anyio.CancelScope(shield=True):
            try:
                await _set(db, conn, saved)
            except (StatementFailed, DatabaseUnavailable) as exc:
                log.warning("index_build_settings_not_restored", error=str(exc))
    if after is None or not after["valid"]:
        raise StatementFailed(
            f"index {build.index_name} is not valid after its build", sqlstate=None
        )
    return dropped


async def _vector_schema(db: Database, conn: Connection) -> str:
    ext = await db.fetch_one(conn, db.statement("vector_extension_schema"))
    if ext is None:
        raise StatementFailed("pgvector is not installed in this database", sqlstate=None)
    return str(ext["schema"])


async def _settings(db: Database, conn: Connection, names: Sequence[str]) -> dict[str, str]:
    """The current values of ``names`` that this server knows."""
    rows = await db.fetch_all(conn, db.statement("session_settings"), {"names": list(names)})
    return {str(r["name"]): str(r["value"]) for r in rows if r["value"] is not None}


async def _set(db: Database, conn: Connection, values: dict[str, str]) -> None:
    if values:
        await db.execute(
            conn,
            db.statement("set_session_settings"),
            {"names": list(values), "values": list(values.values())},
        )


async def _renew_lease(db: Database, build: IndexBuild, owner: str, lease_seconds: float) -> None:
    """Keep the build's lease while it runs (a third of the lease apart)."""
    while True:
        await anyio.sleep(max(0.05, lease_seconds / 3))
        try:
            async with db.connection() as conn:
                await db.execute(
                    conn,
                    db.statement("renew_index_build"),
                    {
                        "table_name": build.table_name,
                        "column": build.embedding_column,
                        "owner": owner,
                        "lease_seconds": lease_seconds,
                    },
                )
        except DatabaseUnavailable as exc:
            log.warning("index_lease_renewal_failed", index=build.index_name, error=str(exc))


async def _finish(
    db: Database,
    build: IndexBuild,
    owner: str,
    state: IndexState,
    error: str | None,
    memory_mb: int,
) -> None:
    async with db.connection() as conn:
        await db.execute(
            conn,
            db.statement("finish_index_build"),
            {
                "table_name": build.table_name,
                "column": build.embedding_column,
                "owner": owner,
                "state": state,
                "error": error,
                "memory_mb": memory_mb or None,
            },
        )
