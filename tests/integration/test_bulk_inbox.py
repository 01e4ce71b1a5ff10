"""Bulk inserts: one inbox row per statement, expanded into queue rows before claims.

Covers the threshold (queue_processor.bulk_rows: default 1000, lowered, 0 = off, garbage =
default), what the inbox row holds, expansion in slices (content read at expansion, blank and
deleted rows skipped, a row changed since the insert keeps its newer queue row, due time kept),
two expanders on one inbox row (SKIP LOCKED), rollback, TRUNCATE and unregister, the blank
content check of the bulk path, NOTIFY, and the operator views: status, estimate, metrics'
queue depth. The worker drains a bulk insert end to end, each row embedded exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import numpy as np
import psycopg
import pytest
from psycopg.rows import dict_row

from queue_processor import queue
from queue_processor.db import Database
from queue_processor.testing import FakeOpenAIServer, fake_vector
from queue_processor.worker import Worker
from tests.support.helpers import (
    DIMS,
    create_table,
    execute,
    make_provider,
    register,
    status_counts,
    vector_rows,
    worker_config,
)

Conn = psycopg.Connection[dict[str, Any]]


@pytest.fixture
def conn(dsn: str) -> Iterator[Conn]:
    create_table(dsn)
    register(dsn)
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as connection:
        yield connection


def bulk_insert(conn: Conn, first: int, last: int, body: str = "'text ' || g") -> None:
    conn.execute(
        f"INSERT INTO docs (id, body) SELECT g, {body} FROM generate_series(%s::int, %s::int) AS g",
        (first, last),
    )


def inbox(conn: Conn) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT table_name, embedding_column, cardinality(record_ids) AS n, total, expanded"
        " FROM embedding_queue_inbox ORDER BY id"
    ).fetchall()


def expand(conn: Conn, max_rows: int = 100_000) -> int:
    row = conn.execute("SELECT embedding_queue_expand(%s) AS taken", (max_rows,)).fetchone()
    assert row is not None
    return int(row["taken"])


def queued(conn: Conn) -> dict[str, str]:
    rows = conn.execute("SELECT record_id, content FROM embedding_queue").fetchall()
    return {r["record_id"]: r["content"] for r in rows}


def test_a_bulk_insert_writes_one_inbox_row_and_expands_to_one_queue_row_per_record(
    conn: Conn, dsn: str
) -> None:
    bulk_insert(conn, 1, 1500)
    assert queued(conn) == {}
    assert inbox(conn) == [
        {"table_name": "docs", "embedding_column": "embedding", "n": 1500, "total": 1500,
         "expanded": 0}
    ]  # fmt: skip
    assert expand(conn) == 1500
    assert expand(conn) == 0
    assert inbox(conn) == []
    rows = queued(conn)
    assert len(rows) == 1500
    assert rows["1234"] == "text 1234"
    assert status_counts(dsn) == {"pending": 1500}


def test_statements_below_the_threshold_queue_rows_directly(conn: Conn) -> None:
    bulk_insert(conn, 1, 999)
    assert inbox(conn) == []
    assert len(queued(conn)) == 999


@pytest.mark.parametrize(
    ("setting", "rows", "inboxed"),
    [("5", 5, True), ("5", 4, False), ("0", 5000, False), ("lots", 1000, True), ("-1", 999, False)],
)
def test_the_threshold_setting(conn: Conn, setting: str, rows: int, inboxed: bool) -> None:
    conn.execute("SELECT set_config('queue_processor.bulk_rows', %s, false)", (setting,))
    bulk_insert(conn, 1, rows)
    assert bool(inbox(conn)) is inboxed
    assert len(queued(conn)) == (0 if inboxed else rows)


def test_expansion_in_slices_reads_content_then_and_skips_blank_and_deleted_rows(
    conn: Conn,
) -> None:
    bulk_insert(conn, 1, 1000)
    created = conn.execute("SELECT created_at FROM embedding_queue_inbox").fetchone()
    assert created is not None
    conn.execute("SET queue_processor.bulk_rows = 0")  # the edits below queue directly
    conn.execute("DELETE FROM docs WHERE id BETWEEN 1 AND 10")
    conn.execute("UPDATE docs SET body = '  ' WHERE id BETWEEN 11 AND 20")
    # Changed after the insert: the update trigger queues the new content at once.
    conn.execute("UPDATE docs SET body = 'edited ' || id WHERE id BETWEEN 21 AND 30")
    assert len(queued(conn)) == 10
    conn.execute("UPDATE embedding_queue SET status = 'done' WHERE record_id = '21'")

    assert expand(conn, 300) == 300
    assert inbox(conn)[0]["expanded"] == 300
    assert expand(conn, 300) == 300
    assert expand(conn, 300) == 300
    assert expand(conn, 300) == 100
    assert inbox(conn) == []
    assert expand(conn, 300) == 0

    rows = conn.execute(
        "SELECT record_id, content, status, generation, next_attempt_at, created_at"
        " FROM embedding_queue"
    ).fetchall()
    by_id = {r["record_id"]: r for r in rows}
    assert set(by_id) == {str(i) for i in range(21, 1001)}
    assert by_id["22"]["content"] == "edited 22"
    # Left alone by the expansion: not re-pended, not re-embedded.
    assert (by_id["21"]["status"], by_id["21"]["generation"]) == ("done", 1)
    assert by_id["500"]["content"] == "text 500"
    # Expanded rows keep the bulk insert's place in line.
    assert by_id["500"]["next_attempt_at"] == created["created_at"]
    assert by_id["500"]["created_at"] == created["created_at"]


def test_two_expanders_never_take_the_same_inbox_row(conn: Conn, dsn: str) -> None:
    bulk_insert(conn, 1, 1000)
    with psycopg.connect(dsn, row_factory=dict_row) as other:
        taken = other.execute("SELECT embedding_queue_expand(100) AS n").fetchone()
        assert taken == {"n": 100}  # inside other's open transaction: the inbox row is locked
        assert expand(conn) == 0
        other.commit()
    assert expand(conn) == 900
    assert len(queued(conn)) == 1000


def test_a_rolled_back_bulk_insert_leaves_no_inbox_row(conn: Conn) -> None:
    with conn.transaction() as tx:
        bulk_insert(conn, 1, 2000)
        assert len(inbox(conn)) == 1
        raise psycopg.Rollback(tx)
    assert inbox(conn) == []


def test_truncate_and_unregister_drop_the_targets_inbox_rows(conn: Conn, dsn: str) -> None:
    create_table(dsn, table="other")
    register(dsn, "other")
    bulk_insert(conn, 1, 1000)
    conn.execute("INSERT INTO other (id, body) SELECT g, 'o' FROM generate_series(1, 1000) g")
    conn.execute("TRUNCATE docs")
    assert [r["table_name"] for r in inbox(conn)] == ["other"]
    bulk_insert(conn, 1, 1000)
    conn.execute("SELECT embedding_unregister_target('other', 'embedding')")
    assert [r["table_name"] for r in inbox(conn)] == ["docs"]
    conn.execute("DROP TABLE other")
    assert expand(conn) == 1000


def test_an_inbox_row_of_a_target_unregistered_meanwhile_is_dropped(conn: Conn) -> None:
    bulk_insert(conn, 1, 1000)
    conn.execute("DELETE FROM embedding_targets")  # as if unregistered by hand
    assert expand(conn, 10) == 10
    assert inbox(conn) == []
    assert queued(conn) == {}


def test_a_bulk_insert_clears_embeddings_supplied_with_blank_content(conn: Conn) -> None:
    vector = "[" + ",".join(["0.5"] * DIMS) + "]"
    conn.execute(
        "INSERT INTO docs (id, body, embedding, model) SELECT g,"
        " CASE WHEN g <= 3 THEN '' ELSE 'text' END, %s::vector, 'm'"
        " FROM generate_series(1, 1000) AS g",
        (vector,),
    )
    cleared = conn.execute(
        "SELECT count(*) AS n FROM docs WHERE embedding IS NULL AND model IS NULL"
    ).fetchone()
    assert cleared == {"n": 3}
    assert inbox(conn)[0]["total"] == 1000
    assert expand(conn) == 1000
    assert len(queued(conn)) == 997


def test_a_bulk_insert_notifies_waiting_workers(conn: Conn, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN embedding_queue")
        bulk_insert(conn, 1, 1000)
        got = list(listener.notifies(timeout=5, stop_after=1))
    assert [n.channel for n in got] == ["embedding_queue"]


@pytest.mark.anyio
async def test_status_estimate_and_queue_depth_count_the_inbox(conn: Conn, db: Database) -> None:
    bulk_insert(conn, 1, 1200, "repeat('x', 40)")
    report = await queue.status(db)
    assert [(r["table_name"], r["statements"], r["rows"]) for r in report.inbox] == [
        ("docs", 1, 1200)
    ]
    assert await queue.queue_depth(db) == {"inbox": 1200}
    estimate = await queue.estimate_pending(db)
    assert [(r["table_name"], r["items"], r["tokens"]) for r in estimate] == [
        ("docs", 1200, 1200 * 10)
    ]
    expand(conn, 200)
    estimate = await queue.estimate_pending(db)
    assert [(r["items"], r["tokens"]) for r in estimate] == [(1200, 1200 * 10)]
    assert await queue.queue_depth(db) == {"inbox": 1000, "pending": 200}


@pytest.mark.anyio
async def test_the_worker_drains_a_bulk_insert_embedding_each_row_once(
    conn: Conn, dsn: str, db: Database
) -> None:
    bulk_insert(conn, 1, 2500)
    with FakeOpenAIServer(dims=DIMS) as server:
        async with make_provider(server) as provider:
            worker = Worker(db, provider, worker_config(batch_size=200))
            with anyio.fail_after(60):
                summary = await worker.run("drain")
        assert set(server.input_counts.values()) == {1}
        assert len(server.input_counts) == 2500
    assert summary.processed == 2500
    assert status_counts(dsn) == {"done": 2500}
    assert inbox(conn) == []
    stored = vector_rows(dsn)
    for i in (1, 1250, 2500):
        got = stored[i]
        assert got is not None
        np.testing.assert_array_equal(got, fake_vector(f"text {i}", DIMS))
    assert execute(dsn, "SELECT count(*) AS n FROM docs WHERE embedding IS NULL")[0]["n"] == 0


@pytest.mark.anyio
async def test_a_draining_worker_waits_while_another_expands_the_inbox(
    conn: Conn, dsn: str, db: Database
) -> None:
    bulk_insert(conn, 1, 1000)
    finished = anyio.Event()
    with FakeOpenAIServer(dims=DIMS) as server, psycopg.connect(dsn) as expander:
        # Another worker in the middle of expanding: the inbox row is locked, the queue empty.
        expander.execute("SELECT id FROM embedding_queue_inbox FOR UPDATE")
        async with make_provider(server) as provider, anyio.create_task_group() as tg:
            worker = Worker(db, provider, worker_config(batch_size=300))
            summaries = []

            async def drain() -> None:
                summaries.append(await worker.run("drain"))
                finished.set()

            tg.start_soon(drain)
            with anyio.move_on_after(1.0):
                await finished.wait()
            assert not finished.is_set(), "the worker stopped while keys were still coming"
            expander.commit()
            with anyio.fail_after(60):
                await finished.wait()
    assert summaries[0].processed == 1000
    assert status_counts(dsn) == {"done": 1000}


def test_a_bulk_insert_of_rows_without_keys_queues_and_notifies_nothing(
    conn: Conn, dsn: str
) -> None:
    conn.execute("CREATE TABLE films (id serial PRIMARY KEY, code text UNIQUE, title text)")
    conn.execute("ALTER TABLE films ADD COLUMN emb vector(3)")
    conn.execute(
        "SELECT embedding_register_target('films', 'emb', ARRAY['title'], p_id_column => 'code')"
    )
    conn.execute("SET queue_processor.bulk_rows = 5")
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN embedding_queue")
        conn.execute("INSERT INTO films (title) SELECT 'untitled' FROM generate_series(1, 10)")
        assert list(listener.notifies(timeout=1, stop_after=1)) == []
        conn.execute("INSERT INTO films (code, title) SELECT g, 't' FROM generate_series(1, 5) g")
        assert len(list(listener.notifies(timeout=5, stop_after=1))) == 1
    assert [r["table_name"] for r in inbox(conn)] == ["films"]
