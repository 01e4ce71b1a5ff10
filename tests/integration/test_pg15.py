"""The schema, migrations and triggers on the machine's PostgreSQL 15, which has no pgvector.

Runs only where QUEUE_PROCESSOR_TEST_DSN_NOVECTOR names that server (CI sets it; elsewhere the
module is deselected). Targets use the column types that need no extension: ``real[]``,
``double precision[]``, ``jsonb`` and ``bytea``. Covers: migrating a fresh database twice,
the seed statements verbatim, and for every column type: register, multi-row insert, content
update re-pending a done row, unrelated updates queueing nothing, blank content (dequeued and
the stored embedding cleared), delete, truncate, backfill, notify, and a bulk insert through
the inbox.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import conninfo, sql
from psycopg.rows import dict_row

from queue_processor.db import Database
from queue_processor.migrations import check_schema, load_migrations, migrate

pytestmark = [pytest.mark.pg15]

Conn = psycopg.Connection[dict[str, Any]]

SEED_INSERT = (
    "INSERT INTO embedding_queue (table_name, record_id, content, embedding_column, user_id)\n"
    "SELECT 'sessions', id, title, 'title_embedding', user_id FROM sessions"
    " WHERE id = 'your_session_id'\n"
    "ON CONFLICT (table_name, record_id, embedding_column) DO UPDATE SET status = 'pending';"
)

# A stored value of each column type, as SQL, to stand in for a written embedding.
STORED = {
    "real[]": "'{0.1,0.2,0.3}'::real[]",
    "double precision[]": "'{0.1,0.2,0.3}'::double precision[]",
    "jsonb": "'[0.1, 0.2, 0.3]'::jsonb",
    "bytea": "'\\xcdcccc3dcdcc4c3e9a99993e'::bytea",
}


@pytest.fixture
def conn(novector_dsn: str) -> Iterator[Conn]:
    with psycopg.connect(novector_dsn, autocommit=True, row_factory=dict_row) as connection:
        yield connection


def queue(conn: Conn, table: str = "docs") -> dict[str, dict[str, Any]]:
    rows = conn.execute("SELECT * FROM embedding_queue WHERE table_name = %s", (table,))
    return {r["record_id"]: r for r in rows}


def test_server_is_postgresql_without_pgvector(conn: Conn) -> None:
    row = conn.execute(
        """SELECT current_setting('server_version_num')::int AS version,
                  EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector') AS vector"""
    ).fetchone()
    assert row is not None
    assert 140000 <= row["version"] < 190000
    assert row["vector"] is False


def test_migrate_twice_on_a_fresh_database(novector_admin_dsn: str) -> None:
    name = f"qp_test_pg15_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(novector_admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        dsn = conninfo.make_conninfo(novector_admin_dsn, dbname=name)

        async def run() -> tuple[list[int], list[int]]:
            async with Database(dsn, max_size=1) as db:
                first = await migrate(db)
                second = await migrate(db)
                await check_schema(db)
                return first, second

        first, second = anyio.run(run)
        assert first == [m.version for m in load_migrations()]
        assert second == []
    finally:
        with psycopg.connect(novector_admin_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def test_seed_statements_verbatim(conn: Conn) -> None:
    conn.execute(
        """CREATE TABLE sessions (
               id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id uuid NOT NULL,
               title text, title_embedding real[]
           )"""
    )
    user_id = uuid.uuid4()
    first, second = (
        conn.execute(
            "INSERT INTO sessions (user_id, title) VALUES (%s, %s) RETURNING id", (user_id, title)
        ).fetchall()[0]["id"]
        for title in ("Jazz night", "Poetry slam")
    )
    conn.execute(
        "SELECT embedding_register_target('sessions', 'title_embedding', ARRAY['title'],"
        " p_dimensions => 3)"
    )
    # New row, queued by hand (registration did not backfill).
    conn.execute(SEED_INSERT.replace("your_session_id", str(first)))
    conn.execute(
        "UPDATE sessions SET title = 'Poetry slam!' WHERE id = %s", (second,)
    )  # queued by the trigger
    conn.execute(
        """UPDATE embedding_queue SET status = 'failed', error_message = 'boom', attempts = 3,
                  claim_token = gen_random_uuid() WHERE record_id = %s""",
        (str(first),),
    )
    status = conn.execute(
        "SELECT table_name, status, COUNT(*) as count FROM embedding_queue "
        "GROUP BY table_name, status ORDER BY table_name, status;"
    ).fetchall()
    assert status == [
        {"table_name": "sessions", "status": "failed", "count": 1},
        {"table_name": "sessions", "status": "pending", "count": 1},
    ]
    failed = conn.execute("SELECT * FROM embedding_queue WHERE status = 'failed';").fetchall()
    assert [(r["record_id"], r["user_id"]) for r in failed] == [(str(first), str(user_id))]
    conn.execute(
        "UPDATE embedding_queue SET status = 'pending', error_message = NULL"
        " WHERE status = 'failed';"
    )
    row = queue(conn, "sessions")[str(first)]
    assert (row["status"], row["attempts"], row["claim_token"], row["error_message"]) == (
        "pending",
        0,
        None,
        None,
    )
    assert row["content"] == "Jazz night"


@pytest.fixture(params=list(STORED))
def docs(conn: Conn, request: pytest.FixtureRequest) -> tuple[Conn, str]:
    column_type: str = request.param
    conn.execute(
        sql.SQL(
            """CREATE TABLE docs (
                   id bigint PRIMARY KEY, title text, body text, views int NOT NULL DEFAULT 0,
                   embedding {}, embedding_model text
               )"""
        ).format(sql.SQL(column_type))
    )
    conn.execute("INSERT INTO docs (id, title, body) VALUES (100, 'Before', 'registration')")
    label = conn.execute(
        """SELECT embedding_register_target('docs', 'embedding',
                  p_template => E'Title: {title}\\nBody: {body}', p_dimensions => 3,
                  p_model_column => 'embedding_model', p_backfill => 'missing') AS label"""
    ).fetchone()
    assert label == {"label": "docs"}
    return conn, column_type


def test_registry_row(docs: tuple[Conn, str]) -> None:
    conn, column_type = docs
    row = conn.execute(
        "SELECT column_type, dimensions, id_type, content_columns FROM embedding_targets"
    ).fetchone()
    assert row == {
        "column_type": column_type,
        "dimensions": 3,
        "id_type": "bigint",
        "content_columns": ["title", "body"],
    }


def test_trigger_lifecycle(docs: tuple[Conn, str], novector_dsn: str) -> None:
    conn, column_type = docs
    stored = sql.SQL(STORED[column_type])
    assert {k: v["content"] for k, v in queue(conn).items()} == {
        "100": "Title: Before\nBody: registration"
    }

    with psycopg.connect(novector_dsn, autocommit=True) as listener:
        listener.execute("LISTEN embedding_queue")
        conn.execute(
            """INSERT INTO docs (id, title, body) VALUES
                   (1, 'One', 'first'), (2, 'Two', NULL), (3, NULL, ' '), (4, 'Four', 'x')"""
        )
        got = [n.channel for n in listener.notifies(timeout=5, stop_after=1)]
        assert got == ["embedding_queue"]
    assert {k: v["content"] for k, v in queue(conn).items()} == {
        "100": "Title: Before\nBody: registration",
        "1": "Title: One\nBody: first",
        "2": "Title: Two\nBody: ",
        "4": "Title: Four\nBody: x",
    }

    # The worker wrote embeddings and finished; unrelated updates change nothing.
    conn.execute(sql.SQL("UPDATE docs SET embedding = {}, embedding_model = 'm'").format(stored))
    conn.execute("UPDATE embedding_queue SET status = 'done', processed_at = now()")
    conn.execute("UPDATE docs SET views = views + 1")
    assert {v["status"] for v in queue(conn).values()} == {"done"}

    # A content change re-pends.
    conn.execute("UPDATE docs SET body = 'first, edited' WHERE id = 1")
    row = queue(conn)["1"]
    assert (row["status"], row["content"], row["generation"]) == (
        "pending",
        "Title: One\nBody: first, edited",
        2,
    )

    # Blank content: dequeued, embedding and model cleared; other rows keep theirs.
    conn.execute("UPDATE docs SET title = NULL, body = E'\\t' WHERE id = 2")
    assert "2" not in queue(conn)
    cleared = conn.execute(
        "SELECT id, embedding IS NULL AS no_embedding, embedding_model FROM docs"
        " WHERE id IN (2, 4) ORDER BY id"
    ).fetchall()
    assert cleared == [
        {"id": 2, "no_embedding": True, "embedding_model": None},
        {"id": 4, "no_embedding": False, "embedding_model": "m"},
    ]

    conn.execute("DELETE FROM docs WHERE id = 4")
    assert set(queue(conn)) == {"100", "1"}

    backfilled = conn.execute(
        "SELECT embedding_queue_backfill('docs', 'embedding', 'all') AS n"
    ).fetchone()
    assert backfilled == {"n": 2}

    conn.execute("TRUNCATE docs")
    assert queue(conn) == {}


def test_bulk_insert_through_the_inbox(docs: tuple[Conn, str]) -> None:
    conn, column_type = docs
    conn.execute("SET queue_processor.bulk_rows = 50")
    conn.execute(
        sql.SQL(
            "INSERT INTO docs (id, title, body, embedding, embedding_model)"
            " SELECT g, CASE WHEN g > 2 THEN 'T' || g END, CASE WHEN g > 2 THEN 'b' END,"
            " {}, 'm' FROM generate_series(1, 60) AS g"
        ).format(sql.SQL(STORED[column_type]))
    )
    assert set(queue(conn)) == {"100"}
    inbox = conn.execute("SELECT total, expanded FROM embedding_queue_inbox").fetchall()
    assert inbox == [{"total": 60, "expanded": 0}]
    # Rows 1 and 2 have blank content: the stored values supplied with them are cleared.
    cleared = conn.execute(
        "SELECT array_agg(id ORDER BY id) AS ids FROM docs WHERE embedding IS NULL"
    ).fetchone()
    assert cleared == {"ids": [1, 2, 100]}
    assert conn.execute("SELECT embedding_queue_expand(40) AS n").fetchone() == {"n": 40}
    assert conn.execute("SELECT embedding_queue_expand(40) AS n").fetchone() == {"n": 20}
    rows = queue(conn)
    assert len(rows) == 1 + 58
    assert rows["60"]["content"] == "Title: T60\nBody: b"


def test_unregister(docs: tuple[Conn, str]) -> None:
    conn, _ = docs
    removed = conn.execute(
        "SELECT embedding_unregister_target('docs', 'embedding') AS removed"
    ).fetchone()
    assert removed == {"removed": True}
    conn.execute("INSERT INTO docs (id, title, body) VALUES (1, 'One', 'first')")
    assert queue(conn) == {}
    triggers = conn.execute(
        "SELECT count(*) AS n FROM pg_trigger WHERE tgrelid = 'docs'::regclass"
    ).fetchone()
    assert triggers == {"n": 0}


def test_a_chunked_target_needs_pgvector_and_leaves_nothing_behind(conn: Conn) -> None:
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="needs the pgvector extension"):
        conn.execute(
            "SELECT embedding_register_chunked_target('notes', 'body', ARRAY['body'],"
            " p_dimensions => 3)"
        )
    assert conn.execute("SELECT count(*) AS n FROM embedding_targets").fetchone() == {"n": 0}
    assert conn.execute("SELECT to_regclass('notes_body_chunks') AS t").fetchone() == {"t": None}
    triggers = conn.execute(
        "SELECT count(*) AS n FROM pg_trigger"
        " WHERE tgrelid = 'notes'::regclass AND NOT tgisinternal"
    ).fetchone()
    assert triggers == {"n": 0}
