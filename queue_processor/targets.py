"""Registered targets: key parsing and the statements that write a vector into a target column.

The statements are named blocks of queries.sql, composed by queue_processor.db: the
identifiers passed here come only from the target registry (``embedding_targets``) and
queue_processor.db turns them into quoted identifiers; the key type and the value expression
are chosen from fixed tables here, never taken from a queue row. A queue row naming a pair
that is not registered never reaches SQL: the worker fails it with "unregistered target".
"""

from __future__ import annotations

import uuid
from typing import assert_never

import numpy as np

from queue_processor.db import BuiltinType, Query, builtin_type, joined, statement
from queue_processor.errors import InvalidRecordId
from queue_processor.models import IdType, Target

# SQL type names for the key parameter cast, by registry id_type.
_ID_SQL: dict[IdType, BuiltinType] = {
    "smallint": "smallint",
    "integer": "integer",
    "bigint": "bigint",
    "uuid": "uuid",
    "text": "text",
    "character varying": "varchar",
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


def _companions(target: Target) -> Query:
    """The SET items of the target's companion columns (queries.sql: write_set_*)."""
    parts: list[Query] = []
    if target.model_column:
        parts.append(statement("write_set_model", column=target.model_column))
    if target.generated_at_column:
        parts.append(statement("write_set_generated_at", column=target.generated_at_column))
    return joined(parts, separator="")


def lock_statement(target: Target) -> Query:
    """Lock the batch's source rows in key order (see queries.sql: lock_source_rows)."""
    return statement(
        "lock_source_rows",
        schema=target.schema_name,
        table=target.relation_name,
        id_column=target.id_column,
        id_type=builtin_type(_ID_SQL[target.id_type]),
    )


def write_statement(target: Target, queue_schema: str) -> Query:
    """The UPDATE that writes one batch of vectors into this target (its claim check reads
    the queue in ``queue_schema``)."""
    slots = {
        "qs": queue_schema,
        "schema": target.schema_name,
        "table": target.relation_name,
        "column": target.embedding_column,
        "id_column": target.id_column,
    }
    id_type = builtin_type(_ID_SQL[target.id_type])
    companions = _companions(target)
    match target.column_type:
        case "vector" | "halfvec":
            return statement("write_pgvector", id_type=id_type, companions=companions, **slots)
        case "bytea":
            return statement("write_vectors_bytea", id_type=id_type, companions=companions, **slots)
        case "real[]" | "double precision[]":
            value = statement("write_value_vec")
        case "jsonb":
            value = statement("write_value_jsonb")
        case _:
            assert_never(target.column_type)
    return statement("write_vectors", id_type=id_type, companions=companions, value=value, **slots)


def vector_bytes(vec: np.ndarray) -> bytes:
    """A vector as little-endian float32 bytes (the bytea target format)."""
    return np.asarray(vec, dtype="<f4").tobytes()


def search_statement(target: Target, type_schema: str, type_name: str) -> Query:
    """Nearest rows by cosine distance; the content preview joins the content columns.
    ``type_schema``/``type_name``: the column's type (pgvector may live in any schema)."""
    return statement(
        "search_nearest",
        schema=target.schema_name,
        table=target.relation_name,
        column=target.embedding_column,
        id_column=target.id_column,
        content_columns=joined(
            statement("search_content_column", column=c) for c in target.content_columns
        ),
        vtype=(type_schema, type_name),
        # pgvector's operator by its schema: the session's search_path holds only pg_catalog.
        distance=statement("cosine_distance_operator", schema=type_schema),
    )
