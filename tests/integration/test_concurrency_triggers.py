"""Concurrent writers on one registered table: the queue converges on the latest content.

Eight sessions (threads, each with its own connection) insert, update, blank and delete the
same 100 rows many times, with single-row upserts and sorted multi-row updates. At the end
there is exactly one queue row per (table, record, column) for every row with content, holding
that row's final content, and none for blank or deleted rows. A lost update, a duplicate, a
stale content or a deadlock fails the test.
"""

from __future__ import annotations

import random
import threading
from typing import Any

import psycopg
from psycopg.rows import dict_row

SESSIONS = 8
ROWS = 100
ROUNDS = 8


def writer(dsn: str, seed: int, errors: list[BaseException], start: threading.Barrier) -> None:
    rng = random.Random(seed)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            start.wait()
            for round_no in range(ROUNDS):
                ids = list(range(1, ROWS + 1))
                rng.shuffle(ids)
                for record in ids:
                    roll = rng.random()
                    text = f"s{seed} r{round_no} row {record} {rng.random():.6f}"
                    if roll < 0.55:
                        conn.execute(
                            """INSERT INTO docs (id, body) VALUES (%s, %s)
                               ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body""",
                            (record, text),
                        )
                    elif roll < 0.75:
                        conn.execute("UPDATE docs SET body = %s WHERE id = %s", (text, record))
                    elif roll < 0.82:
                        conn.execute("UPDATE docs SET views = views + 1 WHERE id = %s", (record,))
                    elif roll < 0.88:
                        conn.execute(
                            "UPDATE docs SET body = %s WHERE id = %s",
                            (rng.choice([None, "", "   "]), record),
                        )
                    elif roll < 0.93:
                        conn.execute("DELETE FROM docs WHERE id = %s", (record,))
                    else:
                        # A multi-row statement: lock the rows in key order first, as an
                        # application must to avoid deadlocking with its own writes, and
                        # update only the rows it locked (a row inserted meanwhile would be
                        # locked out of order by the UPDATE).
                        batch = sorted(rng.sample(range(1, ROWS + 1), 10))
                        with conn.transaction():
                            locked = [
                                row[0]
                                for row in conn.execute(
                                    """SELECT id FROM docs WHERE id = ANY(%s)
                                        ORDER BY id FOR UPDATE""",
                                    (batch,),
                                )
                            ]
                            conn.execute(
                                """UPDATE docs SET body = %s || ' batch ' || id
                                    WHERE id = ANY(%s)""",
                                (text, locked),
                            )
    except BaseException as exc:
        errors.append(exc)


def test_concurrent_writers_leave_one_queue_row_with_the_latest_content(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        conn.execute(
            """CREATE TABLE docs (
                   id integer PRIMARY KEY, body text, views integer NOT NULL DEFAULT 0,
                   embedding vector(3)
               )"""
        )
        conn.execute("SELECT embedding_register_target('docs', 'embedding', ARRAY['body'])")

        errors: list[BaseException] = []
        start = threading.Barrier(SESSIONS)
        threads = [
            threading.Thread(target=writer, args=(dsn, seed, errors, start))
            for seed in range(SESSIONS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "writers did not finish"
        assert errors == []

        source: dict[str, Any] = {
            str(r["id"]): r["body"] for r in conn.execute("SELECT id, body FROM docs")
        }
        expected = {k: v for k, v in source.items() if v is not None and v.strip() != ""}
        rows = conn.execute(
            """SELECT table_name, record_id, embedding_column, content, status
                 FROM embedding_queue"""
        ).fetchall()
        keys = [(r["table_name"], r["record_id"], r["embedding_column"]) for r in rows]
        assert len(keys) == len(set(keys))
        assert {r["table_name"] for r in rows} <= {"docs"}
        assert {r["embedding_column"] for r in rows} <= {"embedding"}
        assert {r["record_id"]: r["content"] for r in rows} == expected
        assert {r["status"] for r in rows} <= {"pending"}
        # The run exercised every path: some rows ended blank or deleted, most with content.
        assert 0 < len(expected) < ROWS
