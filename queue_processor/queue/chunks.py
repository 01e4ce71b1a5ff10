"""Chunked targets: the statements that replace a batch's chunk sets (within ``complete``'s
transaction), search over chunks, and count them.

A chunked target stores each record's text as chunks in a companion table
(``Target.chunks_table``, created by registration, sql/functions/28_chunks.sql). A batch's
chunk sets are written by ``embedding_chunks_write``: the records' old chunks are deleted
and the new ones inserted, in the transaction that acknowledges their queue rows and only
for the rows still claimed under the batch's token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from queue_processor.db import Database, Params, Query, Row, float4_array, statement
from queue_processor.models import ClaimToken, QueueItem, Target

# How many nearest chunks a search reads from the index per record it returns: records
# with several matching chunks take several of the index's candidates. At most
# MAX_CANDIDATES (pgvector's largest hnsw.ef_search).
CANDIDATES_PER_RESULT = 10
MAX_CANDIDATES = 1000


@dataclass(frozen=True)
class ChunkWrite:
    """The new chunk set of one claimed item of a chunked target: texts and their vectors
    (rows of ``vectors``), in order; ``detail`` is stored with the done item (e.g. that
    ``max_chunks`` cut the text)."""

    item: QueueItem
    target: Target
    key: str
    texts: tuple[str, ...]
    vectors: npt.NDArray[np.float32] = field(repr=False)
    detail: str | None = None
    model: str | None = None


def write_step(
    db: Database, group: Sequence[ChunkWrite], token: ClaimToken, model: str | None
) -> tuple[Query, Params]:
    """The statement (and its parameters) that writes one target's chunk sets and
    acknowledges their items; it returns the acknowledged queue ids."""
    target = group[0].target
    vectors = [w.vectors for w in group if len(w.texts)]
    params: dict[str, Any] = {
        "table_name": target.table_name,
        "column": target.embedding_column,
        "token": token,
        "qids": [w.item.id for w in group],
        "details": [w.item.detail(w.detail) for w in group],
        "chunk_qids": [w.item.id for w in group for _ in w.texts],
        "texts": [t for w in group for t in w.texts],
        "vectors": float4_array(np.concatenate(vectors) if vectors else np.zeros(0)),
        "model": group[0].model or model,
    }
    return db.statement("write_chunks"), params


def search_statement(target: Target, type_schema: str) -> Query:
    """Best chunk per record, nearest first (queries.sql: search_chunks)."""
    assert target.chunks_table is not None
    return statement(
        "search_chunks",
        schema=target.schema_name,
        table=target.chunks_table,
        vtype=(type_schema, target.column_type),
        distance=statement("cosine_distance_operator", schema=type_schema),
    )


async def search_chunks(
    db: Database, target: Target, query: npt.NDArray[np.float32], k: int
) -> list[Row]:
    """The ``k`` records whose best chunk is nearest to ``query``: id, chunk_index,
    chunk_text, distance."""
    async with db.connection() as conn:
        found = await db.fetch_one(conn, db.statement("vector_extension_schema"))
        assert found is not None
        assert found["schema"] is not None
        candidates = max(40, min(MAX_CANDIDATES, k * CANDIDATES_PER_RESULT))
        await db.execute(conn, db.statement("set_ef_search"), {"ef_search": candidates})
        return await db.fetch_all(
            conn,
            search_statement(target, str(found["schema"])),
            {"query": float4_array(query), "k": k, "candidates": candidates},
        )


async def chunk_counts(db: Database, target: Target) -> tuple[int, int]:
    """(chunks, records with chunks) of a chunked target."""
    assert target.chunks_table is not None
    async with db.connection() as conn:
        row = await db.fetch_one(
            conn, statement("chunk_counts", schema=target.schema_name, table=target.chunks_table)
        )
    assert row is not None
    return int(row["chunks"]), int(row["records"])
