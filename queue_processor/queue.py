"""The repository: every read and write of the queue and the target registry.

Functions take an open ``Database`` and return model values; the SQL they run lives in
queries.sql. The worker never sees SQL text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast

import structlog

from queue_processor.db import Database, Row, statement
from queue_processor.models import ColumnType, IdType, Target

log = structlog.get_logger(__name__)

BackfillMode = Literal["none", "missing", "all"]


def _target(row: Row) -> Target:
    return Target(
        table_name=row["table_name"],
        embedding_column=row["embedding_column"],
        schema_name=row["schema_name"],
        relation_name=row["relation_name"],
        id_column=row["id_column"],
        id_type=cast(IdType, row["id_type"]),
        content_columns=tuple(row["content_columns"]),
        content_template=row["content_template"],
        column_type=cast(ColumnType, row["column_type"]),
        dimensions=row["dimensions"],
        model=row["model"],
        model_column=row["model_column"],
        generated_at_column=row["generated_at_column"],
    )


async def list_targets(db: Database) -> list[Target]:
    """Every registered target."""
    async with db.connection() as conn:
        rows = await db.fetch_all(conn, statement("list_targets"))
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
    backfill: BackfillMode = "none",
) -> str:
    """Register ``table.column`` and install its triggers; return the queue's table label.

    ``table`` is parsed by PostgreSQL as a regclass: ``sessions``, ``app.sessions`` or
    ``"My Schema"."My Table"``.
    """
    async with db.connection() as conn:
        row = await db.fetch_one(
            conn,
            statement("register_target"),
            {
                "table": table,
                "column": column,
                "content_columns": list(content_columns) if content_columns else None,
                "template": template,
                "id_column": id_column,
                "model": model,
                "dimensions": dimensions,
                "model_column": model_column,
                "generated_at_column": generated_at_column,
                "backfill": backfill,
            },
        )
        await db.execute(conn, statement("notify_queue"))
    assert row is not None
    label = str(row["table_name"])
    log.info("target_registered", table=label, column=column, backfill=backfill)
    return label


async def unregister_target(db: Database, table_name: str, column: str) -> bool:
    """Remove a target; False if it was not registered."""
    async with db.connection() as conn:
        row = await db.fetch_one(
            conn, statement("unregister_target"), {"table_name": table_name, "column": column}
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
            statement("backfill"),
            {"table_name": table_name, "column": column, "mode": mode, "ids": ids},
        )
        await db.execute(conn, statement("notify_queue"))
    assert row is not None
    return int(row["queued"])
