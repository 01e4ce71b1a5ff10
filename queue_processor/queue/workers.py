"""Running workers and the models they serve (issue 13: a target's model is law).

A worker records itself in ``embedding_workers`` at start and with each lease renewal, and
removes itself when it stops; ``status`` reads that list to tell which targets wait for a
worker with their model. Binding a target to a model lives here too.
"""

from __future__ import annotations

from collections.abc import Sequence

from queue_processor.db import Database


async def worker_seen(db: Database, owner: str, models: Sequence[str], ttl_seconds: float) -> None:
    """Record ``owner`` as running with ``models`` for the next ``ttl_seconds``."""
    async with db.connection(autocommit=True) as conn:
        await db.execute(
            conn,
            db.statement("worker_seen"),
            {"owner": owner, "models": list(models), "ttl_seconds": ttl_seconds},
        )


async def worker_gone(db: Database, owner: str) -> None:
    """Remove ``owner`` from the running workers."""
    async with db.connection(autocommit=True) as conn:
        await db.execute(conn, db.statement("worker_gone"), {"owner": owner})


async def bind_target(
    db: Database, table_name: str, column: str, model: str, dimensions: int | None = None
) -> str | None:
    """Bind a target to ``model`` (and ``dimensions``); return the model it had before."""
    async with db.connection() as conn:
        row = await db.fetch_one(
            conn,
            db.statement("bind_target"),
            {"table_name": table_name, "column": column, "model": model, "dimensions": dimensions},
        )
    assert row is not None
    previous = row["previous"]
    return None if previous is None else str(previous)
