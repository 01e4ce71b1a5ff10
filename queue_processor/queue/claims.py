"""The processing cycle: claim a batch, renew its leases, complete, fail, retry or release it.

Every function runs one named statement of queries.sql (``complete`` pipelines several in one
transaction) and only touches items still held under the caller's claim token.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from queue_processor import targets
from queue_processor.db import Database, Params, Query, Row, VectorBatch, float4_array
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
from queue_processor.queue.chunks import ChunkWrite, write_step

log = structlog.get_logger(__name__)


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
    # Stored with the done item, e.g. "truncated to 8,191 of 23,125 tokens".
    detail: str | None = None
    # The model that made the vector, for the target's model column (None: the ``model``
    # passed to ``complete``). Set when one worker embeds with several models.
    model: str | None = None


@dataclass(frozen=True)
class Usage:
    """Provider usage of one batch, recorded with its acknowledgement."""

    owner: str
    items: int
    tokens: int
    requests: int
    # The model these were spent on (None: the ``model`` passed to ``complete``).
    model: str | None = None


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
    models: Sequence[str] | None = None,
) -> ClaimResult:
    """Claim up to ``limit`` items in one committed statement (see queries.sql).

    Each content arrives cut to ``max_content_chars`` characters (``content_capped`` says so),
    and the claim stops taking rows once their sizes add up to ``max_claim_bytes`` (it always
    takes one), so the worker never loads more than that, whatever was written.

    Keys of bulk inserts waiting in the inbox are turned into queue rows first (a slice of
    ``max(EXPAND_MIN, EXPAND_FACTOR * limit)`` keys, committed on its own), so they become
    claimable. ``inbox_pending`` tells a caller that found nothing whether keys remain.

    ``models`` are the models the caller embeds with: only items of targets bound to one of
    them, or to none, are claimed (None claims items of every target).
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
                "models": None if models is None else list(models),
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
        item = _claimed_item(row, max_content_chars)
        reclaimed += bool(row["reclaimed"])
        (exhausted if row["status"] == "failed" else items).append(item)
    return ClaimResult(
        Claim(token, owner, tuple(items)), reclaimed, tuple(exhausted), inbox_pending
    )


def _claimed_item(row: Row, max_content_chars: int) -> QueueItem:
    """One row of the claim statement as a ``QueueItem``; logs content cut to the cap."""
    item = QueueItem(
        id=QueueId(int(row["id"])),
        table_name=row["table_name"],
        record_id=row["record_id"],
        embedding_column=row["embedding_column"],
        content=row["content"],
        attempts=int(row["attempts"]),
        generation=int(row["generation"]),
        capped=(
            f"content cut to its first {max_content_chars:,} characters at claim "
            f"(QUEUE_PROCESSOR_MAX_CONTENT_CHARS: {int(row['content_bytes']):,} bytes stored)"
            if row["content_capped"]
            else None
        ),
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
    return item


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
    usage: Usage | Sequence[Usage] | None = None,
    chunk_writes: Sequence[ChunkWrite] = (),
) -> CompleteResult:
    """Write vectors (and chunk sets), mark them done and record permanent failures, in one
    transaction.

    Only items still claimed under ``token`` are touched; the others ("lost": requeued,
    re-pended by a content change, or reclaimed after lease expiry) get nothing written.
    A chunked target's records get their whole new chunk set or nothing (``chunk_writes``,
    see queue/chunks.py).
    """
    by_target: dict[tuple[str, str], list[Write]] = defaultdict(list)
    for w in writes:
        by_target[w.target.key].append(w)
    groups = [by_target[key] for key in sorted(by_target)]
    chunks_by_target: dict[tuple[str, str], list[ChunkWrite]] = defaultdict(list)
    for c in chunk_writes:
        chunks_by_target[c.target.key].append(c)
    chunk_groups = [chunks_by_target[key] for key in sorted(chunks_by_target)]
    all_ids = (
        [w.item.id for w in writes]
        + [c.item.id for c in chunk_writes]
        + [f.item.id for f in failures]
    )
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
    # A chunked target's records: old chunks deleted, new ones inserted, items acknowledged
    # (under the claim check of embedding_chunks_write), after the locks above.
    steps += [write_step(db, group, token, model) for group in chunk_groups]
    written = len(groups) + len(chunk_groups)
    if failures:
        steps.append((db.statement("fail_items"), _fail_params(failures, token)))
    usages = [usage] if isinstance(usage, Usage) else list(usage or ())
    steps += [
        (
            db.statement("record_usage"),
            {
                "owner": u.owner,
                "model": u.model or model,
                "items": u.items,
                "tokens": u.tokens,
                "requests": u.requests,
            },
        )
        for u in usages
    ]
    results = await db.transaction_pipelined(steps)
    valid = {QueueId(int(r["id"])) for r in results[first_write - 1]}
    acked = [r for rows in results[first_write : first_write + len(groups)] for r in rows]
    chunked = [
        QueueId(int(r["id"]))
        for rows in results[first_write + len(groups) : first_write + written]
        for r in rows
    ]
    failed_rows = results[first_write + written] if failures else []
    return CompleteResult(
        done=tuple(QueueId(int(r["id"])) for r in acked) + tuple(chunked),
        missing=tuple(QueueId(int(r["id"])) for r in acked if r["missing"]),
        failed=tuple(QueueId(int(r["id"])) for r in failed_rows),
        lost=tuple(i for i in all_ids if i not in valid),
    )


def _write_params(group: Sequence[Write], token: ClaimToken, model: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {
        "ids": [w.key for w in group],
        "qids": [w.item.id for w in group],
        "token": token,
        "model": group[0].model or model,
        "details": [w.item.detail(w.detail) for w in group],
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
