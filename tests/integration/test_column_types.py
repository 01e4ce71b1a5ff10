"""Every target column type and key type round-trips the provider's vector exactly.

The fake server's vectors are float32; each column type must give them back bit for bit
(halfvec: after float16 rounding), companions (model, generated-at) must be filled, and keys
of every supported type, as well as quoted schema-qualified names, must find their rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import numpy as np
import pytest
from psycopg import sql

from queue_processor.db import Database
from queue_processor.testing import FakeOpenAIServer, fake_vector
from queue_processor.worker import RunSummary, Worker
from tests.support.helpers import (
    DIMS,
    MODEL,
    as_float32,
    body,
    create_table,
    execute,
    insert_rows,
    make_provider,
    queue_rows,
    register,
    status_counts,
    worker_config,
)

pytestmark = pytest.mark.anyio

COLUMN_TYPES = {
    "vector": f"vector({DIMS})",
    "halfvec": f"halfvec({DIMS})",
    "real[]": "real[]",
    "double precision[]": "double precision[]",
    "jsonb": "jsonb",
    "bytea": "bytea",
}


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=DIMS) as srv:
        yield srv


async def drain(db: Database, server: FakeOpenAIServer) -> RunSummary:
    async with make_provider(server) as provider:
        with anyio.fail_after(60):
            return await Worker(db, provider, worker_config(batch_size=100)).run("drain")


def expected_for(column_type: str, content: str) -> Any:
    """What the column must hold for ``content``, as float32."""
    vector = fake_vector(content, DIMS)
    if column_type == "halfvec":
        return vector.astype(np.float16).astype(np.float32)
    return vector


def fetch(dsn: str, column_type: str, *, table: sql.Composable, column: str) -> dict[Any, Any]:
    """{id: (stored value, model, embedded_at)}; vector/halfvec read as real[]."""
    cast = sql.SQL("::real[]") if column_type in ("vector", "halfvec") else sql.SQL("")
    rows = execute(
        dsn,
        sql.SQL("SELECT id, {col}{cast} AS v, model, embedded_at FROM {table}").format(
            col=sql.Identifier(column), cast=cast, table=table
        ),
    )
    return {r["id"]: (r["v"], r["model"], r["embedded_at"]) for r in rows}


@pytest.mark.parametrize("column_type", list(COLUMN_TYPES))
async def test_column_type_round_trips_exactly(
    dsn: str, db: Database, server: FakeOpenAIServer, column_type: str
) -> None:
    create_table(dsn, embedding_type=COLUMN_TYPES[column_type])
    register(dsn)
    assert execute(dsn, "SELECT column_type FROM embedding_targets")[0] == {
        "column_type": column_type
    }
    contents = {i: body(i) for i in range(1, 21)}
    insert_rows(dsn, contents.items())

    summary = await drain(db, server)

    assert summary.processed == 20
    assert status_counts(dsn) == {"done": 20}
    stored = fetch(dsn, column_type, table=sql.Identifier("docs"), column="embedding")
    for i, content in contents.items():
        value, model, embedded_at = stored[i]
        got = as_float32(value, column_type)
        np.testing.assert_array_equal(got, expected_for(column_type, content))
        assert model == MODEL
        assert embedded_at is not None
        if column_type == "double precision[]":
            # real -> double precision widens exactly: no decimal round trip on the way.
            np.testing.assert_array_equal(
                np.array(value, dtype=np.float64), fake_vector(content, DIMS).astype(np.float64)
            )
        if column_type == "bytea":
            assert len(bytes(value)) == 4 * DIMS
        if column_type == "jsonb":
            assert isinstance(value, list)
            assert len(value) == DIMS


async def test_one_batch_writes_six_targets_of_one_table(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    columns = {f"emb_{n}": kind for n, kind in enumerate(COLUMN_TYPES)}
    execute(
        dsn,
        sql.SQL("CREATE TABLE docs (id bigint PRIMARY KEY, body text, {})").format(
            sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(COLUMN_TYPES[kind]))
                for name, kind in columns.items()
            )
        ),
    )
    for name in columns:
        register(dsn, "docs", name, companions=False)
    contents = {i: body(i) for i in range(1, 11)}
    insert_rows(dsn, contents.items())

    summary = await drain(db, server)

    assert summary.processed == 60
    assert summary.batches == 1  # 60 items, six targets, one batch
    assert status_counts(dsn) == {"done": 60}
    assert sum(server.input_counts.values()) == 10  # the same text is embedded once
    for name, kind in columns.items():
        cast = sql.SQL("::real[]") if kind in ("vector", "halfvec") else sql.SQL("")
        rows = execute(
            dsn,
            sql.SQL("SELECT id, {}{} AS v FROM docs").format(sql.Identifier(name), cast),
        )
        for row in rows:
            np.testing.assert_array_equal(
                as_float32(row["v"], kind), expected_for(kind, contents[row["id"]])
            )


KEYS: dict[str, list[Any]] = {
    "integer": [1, 42, 2_147_483_647, -7],
    "bigint": [1, 2**40, 2**62 + 3, -(2**40)],
    "uuid": [uuid.UUID(int=n * 0x1234_5678_9ABC_DEF0 + 1) for n in range(4)],
    "text": ["plain", "with space", 'it\'s "quoted"; --', "ünïcödé ✓", "007"],
}


@pytest.mark.parametrize("key_type", list(KEYS))
async def test_key_types_find_their_rows(
    dsn: str, db: Database, server: FakeOpenAIServer, key_type: str
) -> None:
    create_table(dsn, key_type=key_type)
    register(dsn)
    keys = KEYS[key_type]
    contents = {key: f"{key_type} row {n}" for n, key in enumerate(keys)}
    insert_rows(dsn, contents.items(), key_type=key_type)

    summary = await drain(db, server)

    assert summary.processed == len(keys)
    assert status_counts(dsn) == {"done": len(keys)}
    assert set(queue_rows(dsn)) == {str(key) for key in keys}
    stored = fetch(dsn, "vector", table=sql.Identifier("docs"), column="embedding")
    assert set(stored) == set(keys)
    for key, content in contents.items():
        np.testing.assert_array_equal(
            np.array(stored[key][0], dtype=np.float32), fake_vector(content, DIMS)
        )


async def test_schema_qualified_quoted_identifiers(
    dsn: str, db: Database, server: FakeOpenAIServer
) -> None:
    create_table(
        dsn,
        schema="My Schema",
        table="My Table",
        key_type="integer",
        body_column="Body Text",
        embedding_column="Embedding Col",
    )
    label = register(dsn, '"My Schema"."My Table"', "Embedding Col", content_columns=["Body Text"])
    assert label == "My Schema.My Table"
    table = sql.Identifier("My Schema", "My Table")
    contents = {i: f"quoted table row {i}" for i in range(1, 6)}
    execute(
        dsn,
        sql.SQL(
            'INSERT INTO {} (id, "Body Text") SELECT * FROM unnest(%s::int[], %s::text[])'
        ).format(table),
        (list(contents), list(contents.values())),
    )

    summary = await drain(db, server)

    assert summary.processed == 5
    rows = queue_rows(dsn)
    assert {r["table_name"] for r in rows.values()} == {"My Schema.My Table"}
    assert {r["embedding_column"] for r in rows.values()} == {"Embedding Col"}
    assert status_counts(dsn) == {"done": 5}
    stored = fetch(dsn, "vector", table=table, column="Embedding Col")
    for i, content in contents.items():
        value, model, embedded_at = stored[i]
        np.testing.assert_array_equal(np.array(value, dtype=np.float32), fake_vector(content, DIMS))
        assert model == MODEL
        assert embedded_at is not None
