"""Registered targets: key parsing and the SQL that writes a vector into a target column.

Identifiers come only from the target registry (``embedding_targets``) and always go through
``psycopg.sql.Identifier``; the key type and the value expression are chosen from fixed
tables here, never taken from a queue row. A queue row naming a pair that is not registered
never reaches SQL: the worker fails it with "unregistered target".
"""

from __future__ import annotations

import uuid
from typing import assert_never

import numpy as np
from psycopg import sql

from queue_processor.db import statement
from queue_processor.errors import InvalidRecordId
from queue_processor.models import ColumnType, IdType, Target

# SQL type names for the key parameter cast, by registry id_type.
_ID_SQL: dict[IdType, sql.SQL] = {
    "smallint": sql.SQL("smallint"),
    "integer": sql.SQL("integer"),
    "bigint": sql.SQL("bigint"),
    "uuid": sql.SQL("uuid"),
    "text": sql.SQL("text"),
    "character varying": sql.SQL("varchar"),
}
_INT_RANGES: dict[IdType, tuple[int, int]] = {
    "smallint": (-(2**15), 2**15 - 1),
    "integer": (-(2**31), 2**31 - 1),
    "bigint": (-(2**63), 2**63 - 1),
}


def parse_record_id(target: Target, record_id: str) -> str:
    """Check that ``record_id`` is a valid key value; return it in canonical text form.

    Rejecting bad ids here keeps one malformed queue row from aborting a whole batch's
    transaction with a cast error.
    """
    kind = target.id_type
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        try:
            value = int(record_id.strip())
        except ValueError:
            raise InvalidRecordId(
                f"record_id {record_id[:80]!r} is not a valid {kind} key of {target.table_name}"
            ) from None
        if not low <= value <= high:
            raise InvalidRecordId(f"record_id {value} is out of range for a {kind} key")
        return str(value)
    if kind == "uuid":
        try:
            return str(uuid.UUID(record_id.strip()))
        except ValueError:
            raise InvalidRecordId(
                f"record_id {record_id[:80]!r} is not a valid uuid key of {target.table_name}"
            ) from None
    if "\x00" in record_id:
        raise InvalidRecordId("record_id contains a NUL character")
    return record_id


def _value_expr(column_type: ColumnType) -> sql.SQL:
    match column_type:
        case "vector" | "halfvec" | "real[]" | "double precision[]":
            return sql.SQL("v.vec")
        case "jsonb":
            return sql.SQL("pg_catalog.to_jsonb(v.vec)")
        case "bytea":
            return sql.SQL("v.blob")
        case _:
            assert_never(column_type)


def _companions(target: Target) -> sql.Composable:
    parts: list[sql.Composable] = []
    if target.model_column:
        parts.append(sql.SQL(", {} = %(model)s").format(sql.Identifier(target.model_column)))
    if target.generated_at_column:
        parts.append(
            sql.SQL(", {} = pg_catalog.now()").format(sql.Identifier(target.generated_at_column))
        )
    return sql.Composed(parts)


def lock_statement(target: Target) -> sql.Composed | sql.SQL:
    """Lock the batch's source rows in key order (see queries.sql: lock_source_rows)."""
    return statement(
        "lock_source_rows",
        schema=target.schema_name,
        table=target.relation_name,
        id_column=target.id_column,
        id_type=_ID_SQL[target.id_type],
    )


def write_statement(target: Target, queue_schema: str) -> sql.Composed | sql.SQL:
    """The UPDATE that writes one batch of vectors into this target (its claim check reads
    the queue in ``queue_schema``)."""
    match target.column_type:
        case "vector" | "halfvec":
            name = "write_pgvector"
        case "bytea":
            name = "write_vectors_bytea"
        case _:
            name = "write_vectors"
    return statement(
        name,
        qs=queue_schema,
        schema=target.schema_name,
        table=target.relation_name,
        column=target.embedding_column,
        id_column=target.id_column,
        id_type=_ID_SQL[target.id_type],
        value=_value_expr(target.column_type),
        companions=_companions(target),
    )


def vector_bytes(vec: np.ndarray) -> bytes:
    """A vector as little-endian float32 bytes (the bytea target format)."""
    return np.asarray(vec, dtype="<f4").tobytes()


def search_statement(target: Target, type_schema: str, type_name: str) -> sql.Composed | sql.SQL:
    """Nearest rows by cosine distance; the content preview joins the content columns."""
    content = sql.SQL("pg_catalog.concat_ws(' | ', {})").format(
        sql.SQL(", ").join(
            sql.SQL("t.{}::text").format(sql.Identifier(c)) for c in target.content_columns
        )
    )
    return statement(
        "search_nearest",
        schema=target.schema_name,
        table=target.relation_name,
        column=target.embedding_column,
        id_column=target.id_column,
        content=content,
        vtype=sql.Identifier(type_schema, type_name),
        # pgvector's operator by its schema: the session's search_path holds only pg_catalog.
        distance=sql.SQL("OPERATOR({}.<=>)").format(sql.Identifier(type_schema)),
    )
