"""The repository: every read and write of the queue and the target registry.

Functions take an open ``Database`` and return model values; the SQL they run lives in
queries.sql. The worker never sees SQL text.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import structlog

from queue_processor import targets
from queue_processor.backoff import retry_database
from queue_processor.db import (
    Connection,
    Database,
    Params,
    Query,
    Row,
    VectorBatch,
    float4_array,
    type_modifier,
)
from queue_processor.errors import ConfigurationError, PermanentError
from queue_processor.models import (
    MAX_CLAIM_BYTES,
    MAX_CONTENT_CHARS,
    Claim,
    ClaimToken,
    ItemFailure,
    QueueId,
    QueueItem,
    Target,
)

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
    mode: Literal["missing", "all", "ids"],
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


# --- the processing cycle: claim, renew, complete, retry, release -------------------------


@dataclass(frozen=True)
class ClaimResult:
    """What one claim statement returned: the live claim plus rows it failed outright."""

    claim: Claim
    reclaimed: int
    exhausted: tuple[QueueItem, ...]
    # Nothing was claimable, but bulk-insert keys remain in the inbox (another worker is
    # expanding them right now): more work is coming.
    inbox_pending: bool = False


@dataclass(frozen=True)
class Write:
    """A vector ready to be written into a target for one claimed item."""

    item: QueueItem
    target: Target
    key: str
    vector: npt.NDArray[np.float32]


@dataclass(frozen=True)
class Usage:
    """Provider usage of one batch, recorded with its acknowledgement."""

    owner: str
    items: int
    tokens: int
    requests: int


@dataclass(frozen=True)
class CompleteResult:
    """Outcome of one completion transaction, by item id."""

    done: tuple[QueueId, ...]
    missing: tuple[QueueId, ...]
    failed: tuple[QueueId, ...]
    lost: tuple[QueueId, ...]


# How many inbox keys a claim expands first: a few batches' worth, so the queue stays ahead of
# the claims, while one expansion (an INSERT of that many queue rows) stays short.
EXPAND_FACTOR = 4
EXPAND_MIN = 1000


async def claim_batch(
    db: Database,
    *,
    owner: str,
    limit: int,
    lease_seconds: float,
    max_attempts: int,
    max_content_chars: int = MAX_CONTENT_CHARS,
    max_claim_bytes: int = MAX_CLAIM_BYTES,
) -> ClaimResult:
    """Claim up to ``limit`` items in one committed statement (see queries.sql).

    Each content arrives cut to ``max_content_chars`` characters (``content_capped`` says so),
    and the claim stops taking rows once their sizes add up to ``max_claim_bytes`` (it always
    takes one), so the worker never loads more than that, whatever was written.

    Keys of bulk inserts waiting in the inbox are turned into queue rows first (a slice of
    ``max(EXPAND_MIN, EXPAND_FACTOR * limit)`` keys, committed on its own), so they become
    claimable. ``inbox_pending`` tells a caller that found nothing whether keys remain.
    """
    token = ClaimToken(uuid.uuid4())
    async with db.connection(autocommit=True) as conn:
        await db.execute(
            conn,
            db.statement("expand_inbox"),
            {"max_rows": max(EXPAND_MIN, EXPAND_FACTOR * limit)},
        )
        rows = await db.fetch_all(
            conn,
            db.statement("claim_batch"),
            {
                "limit": limit,
                "owner": owner,
                "token": token,
                "lease_seconds": lease_seconds,
                "max_attempts": max_attempts,
                "max_content_chars": max_content_chars,
                "max_claim_bytes": max_claim_bytes,
            },
        )
        inbox_pending = False
        if not rows:
            found = await db.fetch_one(conn, db.statement("inbox_pending"))
            inbox_pending = bool(found and found["pending"])
    items: list[QueueItem] = []
    exhausted: list[QueueItem] = []
    reclaimed = 0
    for row in sorted(rows, key=lambda r: int(r["id"])):
        item = QueueItem(
            id=QueueId(int(row["id"])),
            table_name=row["table_name"],
            record_id=row["record_id"],
            embedding_column=row["embedding_column"],
            content=row["content"],
            attempts=int(row["attempts"]),
            generation=int(row["generation"]),
        )
        if row["content_capped"]:
            log.warning(
                "content_capped",
                queue_id=item.id,
                table=item.table_name,
                record_id=item.record_id,
                content_bytes=row["content_bytes"],
                max_content_chars=max_content_chars,
            )
        reclaimed += bool(row["reclaimed"])
        (exhausted if row["status"] == "failed" else items).append(item)
    return ClaimResult(
        Claim(token, owner, tuple(items)), reclaimed, tuple(exhausted), inbox_pending
    )


async def renew_leases(
    db: Database, token: ClaimToken, ids: Sequence[QueueId], lease_seconds: float
) -> int:
    """Extend the lease of ``ids`` still held under ``token``; return how many were renewed."""
    async with db.connection(autocommit=True) as conn:
        return await db.execute(
            conn,
            db.statement("renew_leases"),
            {"ids": list(ids), "token": token, "lease_seconds": lease_seconds},
        )


async def complete(
    db: Database,
    token: ClaimToken,
    writes: Sequence[Write],
    failures: Sequence[ItemFailure],
    *,
    model: str | None,
    usage: Usage | None = None,
) -> CompleteResult:
    """Write vectors, mark them done and record permanent failures, in one transaction.

    Only items still claimed under ``token`` are touched; the others ("lost": requeued,
    re-pended by a content change, or reclaimed after lease expiry) get nothing written.
    """
    by_target: dict[tuple[str, str], list[Write]] = defaultdict(list)
    for w in writes:
        by_target[w.target.key].append(w)
    groups = [by_target[key] for key in sorted(by_target)]
    all_ids = [w.item.id for w in writes] + [f.item.id for f in failures]
    # Sent together (pipeline mode), in this order: source rows are locked first, then the
    # queue rows still claimed under our token (the enqueue triggers' lock order), so nobody
    # can take a claim over between the check and the write. Each write re-checks the claim
    # in SQL, so items that are no longer ours are neither written nor acknowledged.
    steps: list[tuple[Query, Params | None]] = [
        (db.statement("mark_worker_write"), {"search_path": db.user_search_path})
    ]
    steps += [
        (targets.lock_statement(group[0].target), {"ids": [w.key for w in group]})
        for group in groups
    ]
    steps.append((db.statement("lock_valid_claims"), {"ids": all_ids, "token": token}))
    first_write = len(steps)
    steps += [
        (
            db.statement(
                "write_and_ack", write=targets.write_statement(group[0].target, db.schema)
            ),
            _write_params(group, token, model),
        )
        for group in groups
    ]
    if failures:
        steps.append((db.statement("fail_items"), _fail_params(failures, token)))
    if usage is not None:
        steps.append(
            (
                db.statement("record_usage"),
                {
                    "owner": usage.owner,
                    "model": model,
                    "items": usage.items,
                    "tokens": usage.tokens,
                    "requests": usage.requests,
                },
            )
        )
    results = await db.transaction_pipelined(steps)
    valid = {QueueId(int(r["id"])) for r in results[first_write - 1]}
    acked = [r for rows in results[first_write : first_write + len(groups)] for r in rows]
    failed_rows = results[first_write + len(groups)] if failures else []
    return CompleteResult(
        done=tuple(QueueId(int(r["id"])) for r in acked),
        missing=tuple(QueueId(int(r["id"])) for r in acked if r["missing"]),
        failed=tuple(QueueId(int(r["id"])) for r in failed_rows),
        lost=tuple(i for i in all_ids if i not in valid),
    )


def _write_params(group: Sequence[Write], token: ClaimToken, model: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {
        "ids": [w.key for w in group],
        "qids": [w.item.id for w in group],
        "token": token,
        "model": model,
    }
    if group[0].target.column_type == "bytea":
        params["blobs"] = [targets.vector_bytes(w.vector) for w in group]
        return params
    dims = {int(w.vector.shape[0]) for w in group}
    if len(dims) != 1:
        raise ValueError(f"one write batch mixes vector dimensions {sorted(dims)}")
    if group[0].target.column_type in ("vector", "halfvec"):
        params["vectors"] = VectorBatch(np.stack([w.vector for w in group]))
        return params
    params["dims"] = dims.pop()
    params["vectors"] = float4_array(np.concatenate([w.vector for w in group]))
    return params


async def fail(
    db: Database, token: ClaimToken, failures: Sequence[ItemFailure]
) -> tuple[QueueId, ...]:
    """Mark items failed with their messages (only those still held under ``token``)."""
    if not failures:
        return ()
    async with db.connection(autocommit=True) as conn:
        rows = await db.fetch_all(conn, db.statement("fail_items"), _fail_params(failures, token))
    return tuple(QueueId(int(r["id"])) for r in rows)


def _fail_params(failures: Sequence[ItemFailure], token: ClaimToken) -> dict[str, Any]:
    # The message is what embedding_queue.error keeps; the reason lives in logs and code.
    return {
        "ids": [f.item.id for f in failures],
        "messages": [f.message for f in failures],
        "token": token,
    }


async def schedule_retry(
    db: Database,
    token: ClaimToken,
    items: Sequence[QueueItem],
    message: str,
    *,
    max_attempts: int,
    base_seconds: float,
    max_seconds: float,
    retry_after_seconds: float | None = None,
) -> tuple[tuple[QueueId, ...], tuple[QueueId, ...]]:
    """Send items back to pending with backoff; return (retried ids, failed ids).

    Items that have used ``max_attempts`` end failed with ``message``.
    """
    if not items:
        return (), ()
    async with db.connection(autocommit=True) as conn:
        rows = await db.fetch_all(
            conn,
            db.statement("retry_items"),
            {
                "ids": [i.id for i in items],
                "token": token,
                "message": message,
                "max_attempts": max_attempts,
                "base_seconds": base_seconds,
                "max_seconds": max_seconds,
                "retry_after_seconds": retry_after_seconds or 0.0,
            },
        )
    retried = tuple(QueueId(int(r["id"])) for r in rows if r["status"] == "pending")
    failed = tuple(QueueId(int(r["id"])) for r in rows if r["status"] == "failed")
    return retried, failed


async def release(db: Database, token: ClaimToken, ids: Sequence[QueueId]) -> int:
    """Give back claimed items that were never worked on; return how many."""
    if not ids:
        return 0
    async with db.connection(autocommit=True) as conn:
        rows = await db.fetch_all(
            conn, db.statement("release_items"), {"ids": list(ids), "token": token}
        )
    return len(rows)


# --- operations: status, requeue, purge, estimate, search, grants ----------------------------


@dataclass(frozen=True)
class StatusReport:
    """Everything `status` shows."""

    counts: list[Row]
    summary: Row
    usage: list[Row]
    failures: list[Row]
    inbox: list[Row]


async def status(db: Database, *, failures_limit: int = 10) -> StatusReport:
    """Counts by table/column/status, depth and throughput, usage, recent failures, and bulk
    inserts not yet expanded into queue rows."""
    async with db.connection() as conn:
        counts = await db.fetch_all(conn, db.statement("status_counts"))
        summary = await db.fetch_one(conn, db.statement("status_summary"))
        usage = await db.fetch_all(conn, db.statement("usage_summary"))
        failures = await db.fetch_all(
            conn, db.statement("recent_failures"), {"limit": failures_limit}
        )
        inbox = await db.fetch_all(conn, db.statement("inbox_status"))
    assert summary is not None
    return StatusReport(counts, summary, usage, failures, inbox)


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


async def grant_worker(db: Database, role: str) -> int:
    """Grant ``role`` the worker's least privileges; return the number of targets covered."""
    async with db.connection() as conn:
        row = await db.fetch_one(conn, db.statement("grant_worker"), {"role": role})
    assert row is not None
    return int(row["targets"])


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


# pgvector's HNSW index handles at most 2,000 dimensions for vector and 4,000 for halfvec.
HNSW_MAX_VECTOR_DIMS = 2000
HNSW_MAX_HALFVEC_DIMS = 4000


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


async def create_hnsw_index(db: Database, target: Target) -> str:
    """Create the cosine HNSW index on a vector/halfvec target; return its name."""
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
    name = f"{target.relation_name}_{target.embedding_column}_hnsw_idx"[:63]
    opclass = "vector_cosine_ops" if target.column_type == "vector" else "halfvec_cosine_ops"
    async with db.connection(autocommit=True) as conn:
        ext = await db.fetch_one(conn, db.statement("vector_extension_schema"))
        assert ext is not None
        await db.execute(
            conn,
            db.statement(
                "create_hnsw_index",
                index=name,
                table=(target.schema_name, target.relation_name),
                column=target.embedding_column,
                opclass=(ext["schema"], opclass),
            ),
        )
    return name


# --- the opt-in embedding cache -----------------------------------------------------------


class EmbeddingCacheStore:
    """``embedding_cache`` as the store of a ``CachedProvider``: the vectors of one model
    (``model_key``, e.g. "openai/text-embedding-3-small") at one requested dimension count
    (None = the model's default), by content hash.

    Each lookup and store retries through a database outage for up to ``retry_seconds`` (the
    worker passes its lease: past that the batch's claim is lost anyway), then raises
    DatabaseUnavailable."""

    def __init__(
        self, db: Database, model_key: str, dimensions: int | None, *, retry_seconds: float
    ) -> None:
        self._db = db
        self._model_key = model_key
        self._dimensions = dimensions
        self._retry_seconds = retry_seconds

    async def lookup(self, hashes: Sequence[bytes]) -> dict[bytes, npt.NDArray[np.float32]]:
        """Cached vectors by content hash (only the hits)."""
        return await retry_database(
            partial(cache_lookup, self._db, self._model_key, self._dimensions, hashes),
            within_seconds=self._retry_seconds,
        )

    async def store(self, pairs: Sequence[tuple[bytes, npt.NDArray[np.float32]]]) -> None:
        """Remember vectors by content hash."""
        await retry_database(
            partial(cache_store, self._db, self._model_key, self._dimensions, pairs),
            within_seconds=self._retry_seconds,
        )


async def cache_lookup(
    db: Database, model: str, dimensions: int | None, hashes: Sequence[bytes]
) -> dict[bytes, npt.NDArray[np.float32]]:
    """Cached vectors by content hash (only the hits)."""
    if not hashes:
        return {}
    async with db.connection(autocommit=True) as conn:
        rows = await db.fetch_all(
            conn,
            db.statement("cache_lookup"),
            {"model": model, "dimensions": dimensions or 0, "hashes": list(hashes)},
        )
    return {bytes(r["content_hash"]): np.frombuffer(r["embedding"], dtype="<f4") for r in rows}


async def cache_store(
    db: Database,
    model: str,
    dimensions: int | None,
    entries: Sequence[tuple[bytes, npt.NDArray[np.float32]]],
) -> None:
    """Remember vectors by content hash."""
    if not entries:
        return
    async with db.connection(autocommit=True) as conn:
        await db.execute(
            conn,
            db.statement("cache_store"),
            {
                "model": model,
                "dimensions": dimensions or 0,
                "hashes": [h for h, _ in entries],
                "embeddings": [targets.vector_bytes(v) for _, v in entries],
            },
        )


async def queue_depth(db: Database) -> dict[str, int]:
    """Queue rows by status (statuses without rows are absent)."""
    async with db.connection(autocommit=True) as conn:
        rows = await db.fetch_all(conn, db.statement("queue_depth"))
    return {str(row["status"]): int(row["count"]) for row in rows}
