"""Operations on the queue as a whole: status, requeue, purge, estimates, search, depth."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from queue_processor import targets
from queue_processor.db import Database, Row, float4_array
from queue_processor.errors import PermanentError, StatementFailed
from queue_processor.models import Target
from queue_processor.queue.chunks import chunk_counts
from queue_processor.queue.registry import list_targets


@dataclass(frozen=True)
class StatusReport:
    """Everything `status` shows."""

    counts: list[Row]
    summary: Row
    usage: list[Row]
    failures: list[Row]
    inbox: list[Row]
    # Wanted vector indexes and their build state (queue.index_builds).
    indexes: list[Row] = field(default_factory=list)
    # Done items whose text was cut to the model's input limit, per target.
    truncated: list[Row] = field(default_factory=list)
    # Per target: model, dimensions, pending, served (by a running worker), stale_model.
    targets: list[Row] = field(default_factory=list)
    # Re-embeddings in progress, with their progress (reembed.progress's fields).
    reembeds: list[Row] = field(default_factory=list)
    # Chunked targets: chunks_table, chunks and records (with chunks) of each.
    chunks: list[Row] = field(default_factory=list)


async def status(db: Database, *, failures_limit: int = 10) -> StatusReport:
    """Counts by table/column/status, depth and throughput, usage, recent failures, bulk
    inserts not yet expanded into queue rows, wanted indexes, and each target's model
    binding."""
    async with db.connection() as conn:
        counts = await db.fetch_all(conn, db.statement("status_counts"))
        summary = await db.fetch_one(conn, db.statement("status_summary"))
        usage = await db.fetch_all(conn, db.statement("usage_summary"))
        failures = await db.fetch_all(
            conn, db.statement("recent_failures"), {"limit": failures_limit}
        )
        inbox = await db.fetch_all(conn, db.statement("inbox_status"))
        indexes = await db.fetch_all(
            conn, db.statement("index_builds"), {"table_name": None, "column": None}
        )
        truncated = await db.fetch_all(conn, db.statement("truncated_counts"))
        models = await db.fetch_all(conn, db.statement("target_models"))
        reembeds = await db.fetch_all(conn, db.statement("reembeds"))
    assert summary is not None
    bound = [dict(row, stale_model=await stale_model_count(db, row)) for row in models]
    progress = [dict(row, **await reembed_progress(db, row)) for row in reembeds]
    chunks = [await _chunk_status(db, t) for t in await list_targets(db) if t.chunked]
    return StatusReport(
        counts, summary, usage, failures, inbox, indexes, truncated, bound, progress, chunks
    )


async def _chunk_status(db: Database, target: Target) -> Row:
    """A chunked target's chunk and record counts (one scan of its chunks table)."""
    chunks, records = await chunk_counts(db, target)
    return {
        "table_name": target.table_name,
        "embedding_column": target.embedding_column,
        "chunks_table": target.chunks_table,
        "chunks": chunks,
        "records": records,
    }


async def reembed_progress(db: Database, reembed: Row) -> Row:
    """Rows done, total and queued of a re-embedding; empty when this role may not read
    the source table's columns (the worker role)."""
    try:
        async with db.connection(autocommit=True) as conn:
            row = await db.fetch_one(
                conn,
                db.statement("reembed_progress"),
                {"table_name": reembed["table_name"], "column": reembed["embedding_column"]},
            )
    except StatementFailed:
        return {}
    assert row is not None
    return {k: row[k] for k in ("done", "total", "queued", "remaining_tokens")}


async def stale_model_count(db: Database, target: Row) -> int | None:
    """Rows of ``target`` whose model column names another model than the target's; None
    when that cannot be told (no model column or no model) or not by this role (reading the
    model column needs more than the worker role's grants)."""
    if target["model"] is None or target["model_column"] is None:
        return None
    try:
        async with db.connection(autocommit=True) as conn:
            row = await db.fetch_one(
                conn,
                db.statement("stale_model_count"),
                {"table_name": target["table_name"], "column": target["embedding_column"]},
            )
    except StatementFailed:
        return None
    return None if row is None or row["stale"] is None else int(row["stale"])


async def requeue_failed(
    db: Database,
    *,
    table_name: str | None = None,
    column: str | None = None,
    record_ids: Sequence[str] | None = None,
    error_contains: str | None = None,
    dry_run: bool = False,
) -> list[Row]:
    """Move matching failed items back to pending (or only list them, with dry_run)."""
    error_like = None
    if error_contains is not None:
        escaped = error_contains.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        error_like = f"%{escaped}%"
    async with db.connection() as conn:
        rows = await db.fetch_all(
            conn,
            db.statement("requeue_failed"),
            {
                "table_name": table_name,
                "column": column,
                "record_ids": list(record_ids) if record_ids else None,
                "error_like": error_like,
                "dry_run": dry_run,
            },
        )
        if rows and not dry_run:
            await db.execute(conn, db.statement("notify_queue"))
    return rows


async def purge(db: Database, older_than_seconds: float) -> int:
    """Delete done items (and usage records) older than the given age; return items deleted."""
    async with db.connection() as conn:
        deleted = await db.execute(
            conn, db.statement("purge_done"), {"older_than_seconds": older_than_seconds}
        )
        await db.execute(
            conn, db.statement("purge_usage"), {"older_than_seconds": older_than_seconds}
        )
    return deleted


async def estimate_pending(db: Database) -> list[Row]:
    """Queued (pending or in-flight) items and estimated tokens per target."""
    async with db.connection() as conn:
        return await db.fetch_all(conn, db.statement("estimate_pending"))


async def estimate_target(
    db: Database, table_name: str, column: str, mode: Literal["missing", "all"]
) -> tuple[int, int]:
    """(rows, estimated tokens) a backfill of one target would send."""
    async with db.connection() as conn:
        row = await db.fetch_one(
            conn,
            db.statement("estimate_target"),
            {"table_name": table_name, "column": column, "mode": mode},
        )
    assert row is not None
    return int(row["items"]), int(row["tokens"])


async def search(db: Database, target: Target, query: npt.NDArray[np.float32], k: int) -> list[Row]:
    """The ``k`` rows nearest to ``query`` by cosine distance (vector/halfvec targets)."""
    if target.column_type not in ("vector", "halfvec"):
        raise PermanentError(
            f"search needs a vector or halfvec column; {target.table_name}."
            f"{target.embedding_column} is {target.column_type}"
        )
    async with db.connection() as conn:
        vtype = await db.fetch_one(
            conn,
            db.statement("vector_type"),
            {
                "schema": target.schema_name,
                "table": target.relation_name,
                "column": target.embedding_column,
            },
        )
        assert vtype is not None
        return await db.fetch_all(
            conn,
            targets.search_statement(target, vtype["type_schema"], vtype["type_name"]),
            {"query": float4_array(query), "k": k},
        )


async def queue_depth(db: Database) -> dict[str, int]:
    """Queue rows by status (statuses without rows are absent)."""
    async with db.connection(autocommit=True) as conn:
        rows = await db.fetch_all(conn, db.statement("queue_depth"))
    return {str(row["status"]): int(row["count"]) for row in rows}
