"""Binary dumpers that ship vectors: a numpy array as ``real[]``, a ``VectorBatch`` as
pgvector's ``vector[]`` (its type oids differ per database: registered per connection)."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg.abc import Buffer
from psycopg.adapt import Dumper
from psycopg.pq import Format

_FLOAT4_OID = 700
_FLOAT4_ARRAY_OID = 1021


class Float4ArrayDumper(Dumper):
    """Dump a 1-D numpy array as a binary ``real[]`` (one memcpy-like pass, no Python floats).

    Binary array layout: ndim, has-nulls flag, element type oid, then per dimension its length
    and lower bound; then each element as (length int32, value) in network byte order.
    """

    format = Format.BINARY
    oid = _FLOAT4_ARRAY_OID

    def dump(self, obj: Any) -> Buffer:
        arr = np.asarray(obj, dtype=np.float32).reshape(-1)
        header = struct.pack("!iiIii", 1, 0, _FLOAT4_OID, arr.size, 1)
        body = np.empty(arr.size, dtype=[("len", ">i4"), ("val", ">f4")])
        body["len"] = 4
        body["val"] = arr
        return header + body.tobytes()


class VectorBatch:
    """The vectors of one write, rows of a 2-D float32 matrix, sent as one binary pgvector
    ``vector[]`` parameter (see ``_vector_array_dumper``)."""

    __slots__ = ("rows",)

    def __init__(self, rows: npt.NDArray[np.float32]) -> None:
        if rows.ndim != 2:
            raise ValueError(f"a vector batch is a 2-D matrix, not {rows.ndim}-D")
        self.rows = rows


def _vector_array_dumper(vector_oid: int, array_oid: int) -> type[Dumper]:
    """A dumper of ``VectorBatch`` as a binary ``vector[]`` of this database's pgvector.

    Each element is pgvector's binary form (int16 dimensions, int16 zero, big-endian
    float32s), so PostgreSQL receives the vectors as they are stored: no real[] to slice and
    cast per row, and half the bytes of a real[] (whose every element carries a length).
    """

    class VectorArrayDumper(Dumper):
        format = Format.BINARY
        oid = array_oid

        def dump(self, obj: Any) -> Buffer:
            rows = np.asarray(obj.rows, dtype=np.float32)
            count, dims = rows.shape
            body = np.empty(
                count,
                dtype=[("len", ">i4"), ("dims", ">i2"), ("unused", ">i2"), ("val", ">f4", (dims,))],
            )
            body["len"] = 4 + 4 * dims
            body["dims"] = dims
            body["unused"] = 0
            body["val"] = rows
            return struct.pack("!iiIii", 1, 0, vector_oid, count, 1) + body.tobytes()

    return VectorArrayDumper


def register_dumpers(
    conn: psycopg.AsyncConnection[Any], vector_oids: tuple[int, int] | None
) -> None:
    """Register the real[] dumper on ``conn``, and the vector[] one when ``vector_oids``
    (pgvector's type oid and array oid, a row of ``vector_type_oids``) is not None: without
    pgvector no target can be a vector column."""
    conn.adapters.register_dumper(np.ndarray, Float4ArrayDumper)
    if vector_oids is not None:
        conn.adapters.register_dumper(VectorBatch, _vector_array_dumper(*vector_oids))


def float4_array(values: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """A flat float32 array suitable for a ``%(name)b`` real[] parameter."""
    return np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
