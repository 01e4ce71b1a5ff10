"""Changing a target's model with no downtime: the repository side of ``reembed`` (the steps
are SQL functions, sql/functions/50_reembed.sql; README "Changing the model").

``start`` adds and registers the shadow column and queues its rows; workers of the new model
fill it while the triggers keep both columns current. ``switch`` (once the shadow is
complete) builds the shadow's HNSW index if the column has one, then swaps the columns in one
short transaction; ``rollback`` swaps back; ``finish`` drops the column not in use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio
import structlog

from queue_processor.db import Database, Row
from queue_processor.errors import DatabaseUnavailable
from queue_processor.models import Target

log = structlog.get_logger(__name__)

# The switch waits at most this long for the table's lock (queries queue behind a waiting
# ACCESS EXCLUSIVE request), then retries after a pause, up to SWITCH_ATTEMPTS times.
SWITCH_LOCK_TIMEOUT_MS = 500
SWITCH_ATTEMPTS = 20


@dataclass(frozen=True)
class Progress:
    """Where a re-embedding stands."""

    state: str
    new_model: str
    shadow_column: str
    done: int
    total: int
    remaining_tokens: int
    queued: int

    @property
    def complete(self) -> bool:
        """Every row with content has its new vector and nothing is queued."""
        return self.done >= self.total and self.queued == 0


async def start(
    db: Database, table_name: str, column: str, model: str, dimensions: int | None
) -> tuple[str, int]:
    """Start (or resume) re-embedding ``table_name.column`` with ``model``: return the shadow
    column and the rows queued for it (those still without a new vector)."""
    async with db.connection() as conn:
        row = await db.fetch_one(
            conn,
            db.statement("reembed_start"),
            {"table_name": table_name, "column": column, "model": model, "dimensions": dimensions},
        )
    assert row is not None
    shadow = str(row["shadow"])
    # Queued in a transaction of its own, after the shadow column's lock is gone; 'missing'
    # makes a resumed start queue only what is left.
    async with db.connection() as conn:
        queued = await db.fetch_one(
            conn,
            db.statement("backfill"),
            {"table_name": table_name, "column": shadow, "mode": "missing", "ids": None},
        )
        await db.execute(conn, db.statement("notify_queue"))
    assert queued is not None
    return shadow, int(queued["queued"])


async def progress(db: Database, table_name: str, column: str) -> Progress:
    """The state and progress of the re-embedding of ``table_name.column``."""
    async with db.connection() as conn:
        row = await db.fetch_one(
            conn, db.statement("reembed_progress"), {"table_name": table_name, "column": column}
        )
    assert row is not None
    return Progress(
        state=str(row["state"]),
        new_model=str(row["new_model"]),
        shadow_column=str(row["shadow_column"]),
        done=int(row["done"]),
        total=int(row["total"]),
        remaining_tokens=int(row["remaining_tokens"]),
        queued=int(row["queued"]),
    )


async def in_progress(db: Database) -> list[Row]:
    """Every re-embedding in progress."""
    async with db.connection() as conn:
        return await db.fetch_all(conn, db.statement("reembeds"))


async def build_shadow_index(db: Database, current: Target, shadow: Target) -> str | None:
    """If ``current``'s column has an HNSW index, build the same kind on ``shadow``'s (without
    blocking writes: CREATE INDEX CONCURRENTLY, on the direct address behind a transaction
    pooler: ``Database.direct``) and return its name; else None."""
    async with db.connection() as conn:
        found = await db.fetch_one(
            conn,
            db.statement("hnsw_opclass"),
            {
                "schema": current.schema_name,
                "table": current.relation_name,
                "column": current.embedding_column,
            },
        )
        if found is None:
            return None
        ext = await db.fetch_one(conn, db.statement("vector_extension_schema"))
        assert ext is not None
    name = f"{shadow.relation_name}_{shadow.embedding_column}_hnsw_idx"[:63]
    async with db.direct(max_size=1) as direct, direct.connection(autocommit=True) as conn:
        await direct.execute(
            conn,
            direct.statement(
                "create_hnsw_index_concurrently",
                index=name,
                table=(shadow.schema_name, shadow.relation_name),
                column=shadow.embedding_column,
                opclass=(ext["schema"], found["opclass"]),
            ),
        )
    return name


@dataclass(frozen=True)
class Swap:
    """What a switch or rollback took."""

    rows: int
    swap_ms: float
    """The swap under the table's lock, measured in the server."""
    transaction_ms: float
    """The whole transaction seen from here (the switch's completeness check included,
    which reads the table without blocking anyone)."""


async def switch(db: Database, table_name: str, column: str) -> Swap:
    """Swap the new vectors in, in one transaction. Waits for the table's lock at most
    SWITCH_LOCK_TIMEOUT_MS at a time (queries queue behind a waiting lock request) and
    retries."""
    return await _swap(db, "reembed_switch", table_name, column)


async def rollback(db: Database, table_name: str, column: str) -> Swap:
    """Swap the old vectors back."""
    return await _swap(db, "reembed_rollback", table_name, column)


async def _swap(db: Database, name: str, table_name: str, column: str) -> Swap:
    for attempt in range(1, SWITCH_ATTEMPTS + 1):
        started = time.monotonic()
        try:
            results = await db.transaction_pipelined(
                [
                    (db.statement("lock_timeout"), {"ms": SWITCH_LOCK_TIMEOUT_MS}),
                    (db.statement(name), {"table_name": table_name, "column": column}),
                ]
            )
        except DatabaseUnavailable as exc:
            # The lock timeout (or a deadlock) lands here: nothing was changed; try again.
            if attempt == SWITCH_ATTEMPTS:
                raise
            log.warning("reembed_lock_busy", attempt=attempt, error=str(exc), note="retrying")
            await anyio.sleep(min(2.0, 0.1 * attempt))
            continue
        row = results[1][0]
        return Swap(
            rows=int(row["rows"]),
            swap_ms=float(row["swap_ms"]),
            transaction_ms=1000 * (time.monotonic() - started),
        )
    raise AssertionError("unreachable")


async def finish(db: Database, table_name: str, column: str) -> str:
    """Drop the column not in use (the old one after a switch, the shadow before it)."""
    async with db.connection() as conn:
        row = await db.fetch_one(
            conn, db.statement("reembed_finish"), {"table_name": table_name, "column": column}
        )
    assert row is not None
    return str(row["dropped"])
