"""The target registry: list, register and unregister targets, backfill them, grant a worker
role, and add a target's vector column and HNSW index."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import structlog

from queue_processor.db import Connection, Database, Row, type_modifier
from queue_processor.errors import ConfigurationError
from queue_processor.models import IndexSpec, Target
from queue_processor.queue.indexes import HNSW_MAX_VECTOR_DIMS, hnsw_spec

log = structlog.get_logger(__name__)


def _target(row: Row) -> Target:
    # list_targets selects exactly Target's fields; the CHECK constraints on
    # embedding_targets guarantee id_type and column_type are among the Literal values.
    return Target(**{**row, "content_columns": tuple(row["content_columns"])})


async def list_targets(db: Database) -> list[Target]:
    """Every registered target."""
    async with db.connection() as conn:
        rows = await db.fetch_all(conn, db.statement("list_targets"))
    return [_target(r) for r in rows]


async def register_target(
    db: Database,
    table: str,
    column: str,
    *,
    content_columns: Sequence[str] | None = None,
    template: str | None = None,
    id_column: str | None = None,
    model: str | None = None,
    dimensions: int | None = None,
    model_column: str | None = None,
    generated_at_column: str | None = None,
) -> str:
    """Register ``table.column`` and install its triggers; return the queue's table label.
    Existing rows are queued separately, with ``backfill``.

    ``table`` is an SQL name: ``sessions``, ``app.sessions`` or ``"My Schema"."My Table"``
    (see ``resolve_table``).
    """
    async with db.connection() as conn:
        await db.lock_schema(conn)  # one transaction with the registration, migrate waits
        rel = await _resolve_table(db, conn, table)
        row = await db.fetch_one(
            conn,
            db.statement("register_target"),
            {
                "table_oid": rel["table_oid"],
                "column": column,
                "content_columns": list(content_columns) if content_columns else None,
                "template": template,
                "id_column": id_column,
                "model": model,
                "dimensions": dimensions,
                "model_column": model_column,
                "generated_at_column": generated_at_column,
            },
        )
    assert row is not None
    label = str(row["table_name"])
    log.info("target_registered", table=label, column=column)
    return label


async def register_chunked_target(
    db: Database,
    table: str,
    name: str,
    *,
    dimensions: int,
    chunk_tokens: int,
    chunk_overlap: int,
    max_chunks: int,
    content_columns: Sequence[str] | None = None,
    template: str | None = None,
    id_column: str | None = None,
    model: str | None = None,
) -> str:
    """Register chunked target ``name`` on ``table``: its chunks go to the companion table
    ``<table>_<name>_chunks`` that this creates (see sql/functions/28_chunks.sql) without
    its HNSW index (the caller creates it, ``create_hnsw_index``, or records it as wanted,
    ``want_index``). Returns the queue's table label."""
    async with db.connection() as conn:
        await db.lock_schema(conn)  # one transaction with the registration, migrate waits
        rel = await _resolve_table(db, conn, table)
        row = await db.fetch_one(
            conn,
            db.statement("register_chunked_target"),
            {
                "table_oid": rel["table_oid"],
                "name": name,
                "content_columns": list(content_columns) if content_columns else None,
                "template": template,
                "id_column": id_column,
                "model": model,
                "dimensions": dimensions,
                "chunk_tokens": chunk_tokens,
                "chunk_overlap": chunk_overlap,
                "max_chunks": max_chunks,
            },
        )
    assert row is not None
    label = str(row["table_name"])
    log.info("chunked_target_registered", table=label, name=name, chunk_tokens=chunk_tokens)
    return label


async def set_length_policy(db: Database, table_name: str, column: str, policy: str) -> bool:
    """Set a target's policy for texts over the model's input limit (truncate | fail);
    False if the target is not registered."""
    async with db.connection() as conn:
        row = await db.fetch_one(
            conn,
            db.statement("set_length_policy"),
            {"table_name": table_name, "column": column, "policy": policy},
        )
    return bool(row and row["found"])


async def _resolve_table(db: Database, conn: Connection, table: str) -> Row:
    """The table named ``table`` (a bare name: in the queue schema, else public; never a
    temporary table): its oid, schema_name and relation_name. ConfigurationError if none."""
    rel = await db.fetch_one(
        conn, db.statement("resolve_table"), {"table": table, "schema": db.schema}
    )
    if rel is None:
        where = "" if "." in table else f" (looked in schemas {db.schema!r} and 'public')"
        raise ConfigurationError(f'table "{table}" does not exist{where}')
    return rel


async def unregister_target(db: Database, table_name: str, column: str) -> bool:
    """Remove a target; False if it was not registered."""
    async with db.connection() as conn:
        row = await db.fetch_one(
            conn,
            db.statement("unregister_target"),
            {"table_name": table_name, "column": column},
        )
    return bool(row and row["removed"])


async def backfill(
    db: Database,
    table_name: str,
    column: str,
    mode: Literal["missing", "all", "ids", "stale_model"],
    ids: Sequence[str] | None = None,
) -> int:
    """Queue existing rows of a target; return how many were queued or re-pended."""
    async with db.connection() as conn:
        row = await db.fetch_one(
            conn,
            db.statement("backfill"),
            {"table_name": table_name, "column": column, "mode": mode, "ids": ids},
        )
        await db.execute(conn, db.statement("notify_queue"))
    assert row is not None
    return int(row["queued"])


async def grant_worker(db: Database, role: str) -> int:
    """Grant ``role`` the worker's least privileges; return the number of targets covered."""
    async with db.connection() as conn:
        row = await db.fetch_one(conn, db.statement("grant_worker"), {"role": role})
    assert row is not None
    return int(row["targets"])


async def add_embedding_column(db: Database, table: str, column: str, dimensions: int) -> str:
    """Add a vector(N) column (halfvec(N) above HNSW's vector limit) unless it exists;
    installs pgvector when missing. Returns the column type used."""
    kind = "vector" if dimensions <= HNSW_MAX_VECTOR_DIMS else "halfvec"
    async with db.connection() as conn:
        rel = await _resolve_table(db, conn, table)
        ext = await db.fetch_one(conn, db.statement("vector_extension_schema"))
        if ext is None:
            await db.execute(conn, db.statement("create_vector_extension"))
            ext = await db.fetch_one(conn, db.statement("vector_extension_schema"))
        assert ext is not None
        await db.execute(
            conn,
            db.statement(
                "add_embedding_column",
                table=(rel["schema_name"], rel["relation_name"]),
                column=column,
                vtype=(ext["schema"], kind),
                dimensions=type_modifier(dimensions),
            ),
        )
    return kind


async def create_hnsw_index(db: Database, target: Target, spec: IndexSpec | None = None) -> str:
    """Create the cosine HNSW index on a vector/halfvec target now (on a chunked target's
    chunks table; ``spec``: its name and parameters, by default ``hnsw_spec(target)``);
    return its name."""
    spec = spec or hnsw_spec(target)
    schema, table, column = target.vectors_at
    async with db.connection(autocommit=True) as conn:
        ext = await db.fetch_one(conn, db.statement("vector_extension_schema"))
        assert ext is not None
        await db.execute(
            conn,
            db.statement(
                "create_hnsw_index",
                index=spec.index_name,
                table=(schema, table),
                column=column,
                opclass=(ext["schema"], spec.opclass),
                m=type_modifier(spec.m),
                ef_construction=type_modifier(spec.ef_construction),
            ),
        )
    return spec.index_name


async def hnsw_index_valid(db: Database, target: Target, spec: IndexSpec) -> bool:
    """Whether the index ``spec`` names exists in the target's schema and is valid."""
    async with db.connection() as conn:
        row = await db.fetch_one(
            conn,
            db.statement("index_validity"),
            {"schema": target.schema_name, "index": spec.index_name},
        )
    return bool(row and row["valid"])
