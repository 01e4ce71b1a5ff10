"""How commands name things: a registered target by table (and column), ids by ranges."""

from __future__ import annotations

from queue_processor import queue
from queue_processor.db import Database
from queue_processor.errors import UsageError
from queue_processor.models import Target

MAX_RANGE_IDS = 10_000_000
"""The most ids one range of ``--ids`` may expand to."""


async def find_target(db: Database, table: str, column: str | None) -> Target:
    """The registered target for TABLE (label, or schema-qualified) and optional --column;
    a UsageError naming the way out when there is none or several."""
    wanted = table.removeprefix("public.")
    candidates = [
        t
        for t in await queue.list_targets(db)
        if wanted in (t.table_name, f"{t.schema_name}.{t.relation_name}")
        and (column is None or t.embedding_column == column)
    ]
    if not candidates:
        suffix = f" column {column!r}" if column else ""
        raise UsageError(
            f"no registered target for table {table!r}{suffix}: see `queue-processor status` "
            "or register it with `queue-processor register`"
        )
    if len(candidates) > 1:
        columns = ", ".join(sorted(t.embedding_column for t in candidates))
        raise UsageError(f"{table} has several targets ({columns}): pass --column")
    return candidates[0]


def parse_id_spec(spec: str, target: Target) -> list[str]:
    """Expand the seeds' id syntax '1,5,10-20,100-200' (ranges only for integer keys)."""
    ids: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        low, sep, high = part.partition("-")
        if sep and low.strip().lstrip("-").isdigit() and high.strip().isdigit():
            if target.id_type not in ("smallint", "integer", "bigint"):
                raise UsageError(
                    f"ranges need an integer key; {target.table_name} has {target.id_type}"
                )
            start, end = int(low), int(high)
            if end < start:
                raise UsageError(f"empty range {part!r}")
            if end - start > MAX_RANGE_IDS:
                raise UsageError(f"range {part!r} is too large")
            ids.extend(str(i) for i in range(start, end + 1))
        else:
            ids.append(part)
    if not ids:
        raise UsageError("--ids names no ids")
    return ids
