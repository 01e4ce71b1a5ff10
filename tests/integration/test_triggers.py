"""The enqueue triggers installed by embedding_register_target, on PostgreSQL with pgvector.

Covers: INSERT (one row per record for a multi-row insert), UPDATE of unrelated columns
(nothing queued, done rows untouched), content UPDATE (re-pends done/failed rows with a clean
slate and a new generation; makes a processing row's claim stale), NULL/blank content (nothing
queued, queue row removed, embedding and companion columns cleared), DELETE, TRUNCATE,
primary-key changes, upserts on the source table, LISTEN/NOTIFY wake-ups (and no wake-up when
nothing was queued), backfill modes (missing/all/ids, at registration and later), integer /
bigint / uuid / text / smallint / varchar keys, a table in another schema, identifiers that
need quoting, and application roles that have no privilege on the queue.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

Conn = psycopg.Connection[dict[str, Any]]
CHANNEL = "embedding_queue"


@pytest.fixture
def conn(dsn: str) -> Iterator[Conn]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as connection:
        yield connection


@pytest.fixture
def docs(conn: Conn) -> Conn:
    """A registered table ``docs`` (bigint key) with model and generated-at companions."""
    conn.execute(
        """CREATE TABLE docs (
               id bigint PRIMARY KEY,
               body text,
               views integer NOT NULL DEFAULT 0,
               embedding vector(3),
               embedding_model text,
               embedded_at timestamptz
           )"""
    )
    conn.execute(
        """SELECT embedding_register_target('docs', 'embedding', ARRAY['body'],
                  p_model_column => 'embedding_model', p_generated_at_column => 'embedded_at')"""
    )
    return conn


def queue(conn: Conn, table: str = "docs") -> dict[str, dict[str, Any]]:
    """The queue rows of one table label, by record_id."""
    rows = conn.execute("SELECT * FROM embedding_queue WHERE table_name = %s", (table,))
    return {r["record_id"]: r for r in rows}


def contents(conn: Conn, table: str = "docs") -> dict[str, str]:
    return {k: v["content"] for k, v in queue(conn, table).items()}


def mark(conn: Conn, status: str, record_id: str, **extra: Any) -> None:
    """Put one queue row in a state a worker would have left it in."""
    sets = sql.SQL(", ").join(
        sql.SQL("{} = {}").format(sql.Identifier(k), sql.Literal(v)) for k, v in extra.items()
    )
    query = sql.SQL(
        "UPDATE embedding_queue SET status = {status}{comma}{sets} WHERE record_id = {rid}"
    ).format(
        status=sql.Literal(status),
        comma=sql.SQL(", " if extra else ""),
        sets=sets,
        rid=sql.Literal(record_id),
    )
    conn.execute(query)


# --- insert / update / delete ---------------------------------------------------------------


def test_multi_row_insert_enqueues_one_row_per_record(docs: Conn) -> None:
    docs.execute(
        "INSERT INTO docs (id, body) SELECT g, 'text ' || g FROM generate_series(1, 250) AS g"
    )
    rows = queue(docs)
    assert len(rows) == 250
    assert rows["17"]["content"] == "text 17"
    assert {r["status"] for r in rows.values()} == {"pending"}
    assert {r["embedding_column"] for r in rows.values()} == {"embedding"}
    assert {(r["attempts"], r["generation"]) for r in rows.values()} == {(0, 1)}


def test_insert_in_a_rolled_back_transaction_enqueues_nothing(docs: Conn) -> None:
    with docs.transaction() as tx:
        docs.execute("INSERT INTO docs (id, body) VALUES (1, 'gone')")
        assert set(queue(docs)) == {"1"}  # visible inside the transaction
        raise psycopg.Rollback(tx)
    assert queue(docs) == {}


def test_update_of_unrelated_columns_enqueues_nothing(docs: Conn) -> None:
    docs.execute("INSERT INTO docs (id, body) VALUES (1, 'hello'), (2, 'world')")
    mark(docs, "done", "1", processed_at="2024-01-01T00:00:00Z")
    before = queue(docs)["1"]

    docs.execute("UPDATE docs SET views = views + 1")
    docs.execute("UPDATE docs SET body = body")  # same content: not a change either
    docs.execute("UPDATE docs SET embedding = '[1,2,3]', embedding_model = 'm' WHERE id = 1")

    after = queue(docs)
    assert after["1"] == before  # done row untouched, byte for byte (updated_at included)
    assert after["2"]["status"] == "pending"
    assert after["2"]["generation"] == 1
    assert len(after) == 2


@pytest.mark.parametrize("status", ["done", "failed"])
def test_content_update_repends_a_finished_row(docs: Conn, status: str) -> None:
    docs.execute("INSERT INTO docs (id, body) VALUES (1, 'old text')")
    mark(
        docs,
        status,
        "1",
        attempts=3,
        error_message="boom" if status == "failed" else None,
        detail="source row not found; nothing written",
        claimed_by="worker-1",
        processed_at="2024-01-01T00:00:00Z",
        next_attempt_at="2999-01-01T00:00:00Z",
    )
    docs.execute("UPDATE docs SET body = 'new text' WHERE id = 1")
    row = docs.execute(
        "SELECT *, next_attempt_at <= now() AS due FROM embedding_queue WHERE record_id = '1'"
    ).fetchone()
    assert row is not None
    assert row["status"] == "pending"
    assert row["content"] == "new text"
    assert row["attempts"] == 0
    assert row["error_message"] is None
    assert row["detail"] is None
    assert row["claimed_by"] is None
    assert row["claim_token"] is None
    assert row["lease_expires_at"] is None
    assert row["processed_at"] is None
    assert row["generation"] == 2
    assert row["due"]


def test_content_update_makes_an_in_flight_claim_stale(docs: Conn) -> None:
    docs.execute("INSERT INTO docs (id, body) VALUES (1, 'old text')")
    token = uuid.uuid4()
    docs.execute(
        """UPDATE embedding_queue
              SET status = 'processing', attempts = 1, claimed_by = 'worker-1',
                  claim_token = %s, lease_expires_at = now() + interval '5 minutes'""",
        (token,),
    )
    docs.execute("UPDATE docs SET body = 'new text' WHERE id = 1")
    row = queue(docs)["1"]
    assert row["status"] == "pending"
    assert row["claim_token"] is None
    assert row["claimed_by"] is None
    assert row["lease_expires_at"] is None
    assert row["content"] == "new text"
    assert row["generation"] == 2
    # What the worker's completion checks: its claim no longer matches anything.
    stale = docs.execute(
        "SELECT count(*) AS n FROM embedding_queue WHERE status = 'processing'"
        " AND claim_token = %s",
        (token,),
    ).fetchone()
    assert stale == {"n": 0}


@pytest.mark.parametrize("blank", [None, "", "   ", " \t\n\r "])
def test_blank_content_enqueues_nothing(docs: Conn, blank: str | None) -> None:
    docs.execute("INSERT INTO docs (id, body) VALUES (1, %s), (2, 'real text')", (blank,))
    assert set(queue(docs)) == {"2"}


@pytest.mark.parametrize("blank", [None, "", "  \n\t"])
def test_content_becoming_blank_removes_the_queue_row_and_clears_the_embedding(
    docs: Conn, blank: str | None
) -> None:
    docs.execute("INSERT INTO docs (id, body) VALUES (1, 'hello'), (2, 'kept')")
    docs.execute(
        """UPDATE docs SET embedding = '[1,2,3]', embedding_model = 'm', embedded_at = now()"""
    )
    mark(docs, "done", "1")

    docs.execute("UPDATE docs SET body = %s WHERE id = 1", (blank,))
    assert set(queue(docs)) == {"2"}
    rows = {
        r["id"]: r
        for r in docs.execute(
            "SELECT id, embedding::text AS e, embedding_model, embedded_at FROM docs"
        )
    }
    assert (rows[1]["e"], rows[1]["embedding_model"], rows[1]["embedded_at"]) == (None, None, None)
    assert rows[2]["e"] == "[1,2,3]"
    assert rows[2]["embedding_model"] == "m"

    # Content coming back queues the row again.
    docs.execute("UPDATE docs SET body = 'back' WHERE id = 1")
    assert contents(docs) == {"1": "back", "2": "kept"}


def test_blank_content_clears_companion_columns_even_without_an_embedding(docs: Conn) -> None:
    docs.execute("INSERT INTO docs (id, body) VALUES (1, 'hello')")
    docs.execute("UPDATE docs SET embedding_model = 'm', embedded_at = now()")
    docs.execute("UPDATE docs SET body = '' WHERE id = 1")
    row = docs.execute("SELECT embedding_model, embedded_at FROM docs").fetchone()
    assert row == {"embedding_model": None, "embedded_at": None}


def test_insert_with_blank_content_drops_a_supplied_embedding(docs: Conn) -> None:
    docs.execute("INSERT INTO docs (id, body, embedding) VALUES (1, ' ', '[1,2,3]')")
    row = docs.execute("SELECT embedding FROM docs").fetchone()
    assert row == {"embedding": None}
    assert queue(docs) == {}


def test_delete_removes_the_queue_row(docs: Conn) -> None:
    docs.execute("INSERT INTO docs (id, body) SELECT g, 'b' || g FROM generate_series(1, 5) g")
    mark(docs, "processing", "2", claim_token=str(uuid.uuid4()))
    docs.execute("DELETE FROM docs WHERE id IN (2, 3)")
    assert set(queue(docs)) == {"1", "4", "5"}


def test_truncate_removes_only_that_targets_rows(docs: Conn) -> None:
    docs.execute("CREATE TABLE notes (id int PRIMARY KEY, body text, emb vector(3))")
    docs.execute("SELECT embedding_register_target('notes', 'emb', ARRAY['body'])")
    docs.execute("INSERT INTO docs (id, body) SELECT g, 'b' || g FROM generate_series(1, 5) g")
    docs.execute("INSERT INTO notes (id, body) VALUES (1, 'note')")
    docs.execute("TRUNCATE docs")
    assert queue(docs) == {}
    assert contents(docs, "notes") == {"1": "note"}


def test_primary_key_change_moves_the_entry(docs: Conn) -> None:
    docs.execute("INSERT INTO docs (id, body) VALUES (1, 'one'), (2, 'two'), (3, 'three')")
    mark(docs, "done", "1")
    docs.execute("UPDATE docs SET id = 10 WHERE id = 1")
    docs.execute("UPDATE docs SET id = 20, body = 'two, renumbered' WHERE id = 2")
    assert contents(docs) == {"10": "one", "20": "two, renumbered", "3": "three"}
    assert queue(docs)["10"]["status"] == "pending"


def test_key_swap_in_one_statement_requeues_both(conn: Conn) -> None:
    conn.execute(
        """CREATE TABLE slots (id int PRIMARY KEY DEFERRABLE INITIALLY IMMEDIATE,
                               body text, emb vector(3))"""
    )
    conn.execute("SELECT embedding_register_target('slots', 'emb', ARRAY['body'])")
    conn.execute("INSERT INTO slots VALUES (1, 'one'), (2, 'two'), (3, 'three')")
    conn.execute("UPDATE slots SET id = CASE id WHEN 1 THEN 2 ELSE 1 END WHERE id IN (1, 2)")
    assert contents(conn, "slots") == {"1": "two", "2": "one", "3": "three"}
    assert {r["generation"] for r in queue(conn, "slots").values()} == {1, 2}


def test_upsert_on_the_source_table_enqueues_changed_content(docs: Conn) -> None:
    docs.execute("INSERT INTO docs (id, body) VALUES (1, 'first'), (2, 'second')")
    mark(docs, "done", "1")
    mark(docs, "done", "2")
    docs.execute(
        """INSERT INTO docs (id, body) VALUES (1, 'first, edited'), (2, 'second'), (3, 'third')
           ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body"""
    )
    rows = queue(docs)
    assert {k: (v["content"], v["status"]) for k, v in rows.items()} == {
        "1": ("first, edited", "pending"),
        "2": ("second", "done"),  # unchanged content: not re-queued
        "3": ("third", "pending"),
    }
    assert rows["1"]["generation"] == 2
    assert rows["2"]["generation"] == 1


# --- LISTEN / NOTIFY ----------------------------------------------------------------------


def notifications(
    listener: psycopg.Connection[Any], wait_seconds: float, expect: int | None = None
) -> list[str]:
    """Channels notified within ``wait_seconds``; returns early once ``expect`` arrived, after
    a short extra wait that would catch a duplicate."""
    got = [n.channel for n in listener.notifies(timeout=wait_seconds, stop_after=expect)]
    if expect is not None:
        got += [n.channel for n in listener.notifies(timeout=0.1)]
    return got


def test_insert_notifies_listeners_after_commit(docs: Conn, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        with docs.transaction():
            docs.execute("INSERT INTO docs (id, body) VALUES (1, 'wake up')")
            assert notifications(listener, 0.2) == []  # not before commit
        assert notifications(listener, 5, expect=1) == [CHANNEL]

        # One notification per transaction, however many rows.
        docs.execute("INSERT INTO docs (id, body) SELECT g, 'x' FROM generate_series(2, 50) g")
        assert notifications(listener, 5, expect=1) == [CHANNEL]

        docs.execute("UPDATE docs SET body = 'changed' WHERE id = 1")
        assert notifications(listener, 5, expect=1) == [CHANNEL]


def test_statements_that_queue_nothing_do_not_notify(docs: Conn, dsn: str) -> None:
    docs.execute("INSERT INTO docs (id, body) VALUES (1, 'hello')")
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        docs.execute("UPDATE docs SET views = 1")  # unrelated column
        docs.execute("UPDATE docs SET embedding = '[1,2,3]' WHERE id = 1")  # the worker's write
        docs.execute("INSERT INTO docs (id, body) VALUES (2, '  ')")  # blank
        docs.execute("DELETE FROM docs WHERE id = 2")
        assert notifications(listener, 0.5) == []


def test_manual_queue_insert_and_requeue_notify(docs: Conn, dsn: str) -> None:
    docs.execute("INSERT INTO docs (id, body) VALUES (1, 'hello')")
    mark(docs, "failed", "1", error_message="boom")
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        docs.execute(
            "UPDATE embedding_queue SET status = 'pending', error_message = NULL"
            " WHERE status = 'failed'"
        )
        assert notifications(listener, 5, expect=1) == [CHANNEL]
        docs.execute(
            """INSERT INTO embedding_queue (table_name, record_id, content, embedding_column)
               VALUES ('docs', '99', 'by hand', 'embedding')"""
        )
        assert notifications(listener, 5, expect=1) == [CHANNEL]


# --- backfill -------------------------------------------------------------------------------


@pytest.fixture
def unregistered(conn: Conn) -> Conn:
    conn.execute(
        """CREATE TABLE posts (
               id integer PRIMARY KEY, body text, embedding vector(3)
           )"""
    )
    conn.execute(
        """INSERT INTO posts (id, body, embedding) VALUES
               (1, 'has embedding', '[1,1,1]'),
               (2, 'missing one', NULL),
               (3, 'also missing', NULL),
               (4, '   ', NULL),
               (5, 'embedded too', '[2,2,2]')"""
    )
    return conn


def register_posts(conn: Conn, backfill: str) -> None:
    conn.execute(
        "SELECT embedding_register_target('posts', 'embedding', ARRAY['body'], p_backfill => %s)",
        (backfill,),
    )


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("none", {}),
        ("missing", {"2": "missing one", "3": "also missing"}),
        (
            "all",
            {"1": "has embedding", "2": "missing one", "3": "also missing", "5": "embedded too"},
        ),
    ],
)
def test_backfill_at_registration(unregistered: Conn, mode: str, expected: dict[str, str]) -> None:
    register_posts(unregistered, mode)
    assert contents(unregistered, "posts") == expected


def test_backfill_function_modes(unregistered: Conn) -> None:
    register_posts(unregistered, "none")

    def backfill(mode: str, ids: list[str] | None = None) -> int:
        row = unregistered.execute(
            "SELECT embedding_queue_backfill('posts', 'embedding', %s, %s) AS n", (mode, ids)
        ).fetchone()
        assert row is not None
        return int(row["n"])

    assert backfill("ids", ["5", "4"]) == 1  # 4 is blank
    assert contents(unregistered, "posts") == {"5": "embedded too"}
    assert backfill("missing") == 2
    assert set(contents(unregistered, "posts")) == {"2", "3", "5"}

    # Re-running re-pends existing rows (a failed one gets a fresh start).
    mark(unregistered, "failed", "2", attempts=3, error_message="boom")
    assert backfill("all") == 4
    row = queue(unregistered, "posts")["2"]
    assert (row["status"], row["attempts"], row["error_message"]) == ("pending", 0, None)
    assert row["generation"] == 2

    with pytest.raises(psycopg.errors.InvalidParameterValue, match="missing, all or ids"):
        backfill("some")
    with pytest.raises(psycopg.errors.UndefinedObject, match="no registered target"):
        unregistered.execute("SELECT embedding_queue_backfill('nope', 'embedding')")


# --- key types and identifiers ----------------------------------------------------------------

KEYS = {
    "smallint": ("smallint", [3, 2, 1], "1"),
    "integer": ("integer", [30, 200, 1], "30"),
    "bigint": ("bigint", [9_000_000_000, 2, 1], "9000000000"),
    "uuid": (
        "uuid",
        [uuid.UUID(int=3), uuid.UUID(int=2), uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")],
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    ),
    "text": ("text", ["key with spaces", "Ünïcødé", "it's"], "it's"),
    "varchar": ("varchar(40)", ["a", "b", "c"], "c"),
}


@pytest.mark.parametrize("key", list(KEYS))
def test_key_types(conn: Conn, key: str) -> None:
    type_sql, ids, probe = KEYS[key]
    conn.execute(f"CREATE TABLE items (id {type_sql} PRIMARY KEY, body text, emb vector(3))")
    conn.execute("SELECT embedding_register_target('items', 'emb', ARRAY['body'])")
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO items (id, body) VALUES (%s, %s)", [(i, f"body {i}") for i in ids]
        )
    expected = {str(i): f"body {i}" for i in ids}
    assert contents(conn, "items") == expected

    conn.execute("UPDATE items SET body = 'changed' WHERE id::text = %s", (probe,))
    assert contents(conn, "items")[probe] == "changed"
    conn.execute("SELECT embedding_queue_backfill('items', 'emb', 'ids', %s)", ([probe],))
    assert queue(conn, "items")[probe]["generation"] == 3
    conn.execute("DELETE FROM items WHERE id::text = %s", (probe,))
    assert probe not in contents(conn, "items")
    assert len(contents(conn, "items")) == 2
    target = conn.execute("SELECT id_type FROM embedding_targets").fetchone()
    assert target is not None
    assert target["id_type"] == {"varchar": "character varying"}.get(key, key)


def test_schema_qualified_table(conn: Conn) -> None:
    conn.execute("CREATE SCHEMA app")
    conn.execute("CREATE TABLE app.docs (id int PRIMARY KEY, body text, emb vector(3))")
    # A public table of the same name is a different target.
    conn.execute("CREATE TABLE public.docs (id int PRIMARY KEY, body text, emb vector(3))")
    label = conn.execute(
        "SELECT embedding_register_target('app.docs', 'emb', ARRAY['body'], p_backfill => 'all')"
        " AS label"
    ).fetchone()
    assert label == {"label": "app.docs"}
    conn.execute("SELECT embedding_register_target('docs', 'emb', ARRAY['body'])")
    conn.execute("INSERT INTO app.docs VALUES (1, 'in app'), (2, 'also app')")
    conn.execute("INSERT INTO public.docs VALUES (1, 'in public')")
    conn.execute("UPDATE app.docs SET body = 'in app, edited' WHERE id = 1")
    conn.execute("DELETE FROM app.docs WHERE id = 2")
    assert contents(conn, "app.docs") == {"1": "in app, edited"}
    assert contents(conn, "docs") == {"1": "in public"}
    target = conn.execute(
        "SELECT schema_name, relation_name FROM embedding_targets WHERE table_name = 'app.docs'"
    ).fetchone()
    assert target == {"schema_name": "app", "relation_name": "docs"}


def test_identifiers_that_need_quoting(conn: Conn) -> None:
    conn.execute('CREATE SCHEMA "My Schema"')
    conn.execute(
        """CREATE TABLE "My Schema"."My Table" (
               "Doc ID" integer PRIMARY KEY,
               "Body Text" text,
               "Title" text,
               "Embedding Col" vector(3),
               "Model Name" text
           )"""
    )
    conn.execute(
        """INSERT INTO "My Schema"."My Table" ("Doc ID", "Body Text", "Title")
           VALUES (1, 'existing row', 'T1')"""
    )
    label = conn.execute(
        """SELECT embedding_register_target('"My Schema"."My Table"', 'Embedding Col',
                  p_template => E'Title: {Title}\\nBody: {Body Text}',
                  p_model_column => 'Model Name', p_backfill => 'missing') AS label"""
    ).fetchone()
    assert label == {"label": "My Schema.My Table"}
    conn.execute(
        """INSERT INTO "My Schema"."My Table" ("Doc ID", "Body Text", "Title")
           VALUES (%s, %s, %s)""",
        (2, "second row", "T2"),
    )
    conn.execute(
        """UPDATE "My Schema"."My Table" SET "Body Text" = 'edited', "Embedding Col" = NULL
            WHERE "Doc ID" = 2"""
    )
    assert contents(conn, "My Schema.My Table") == {
        "1": "Title: T1\nBody: existing row",
        "2": "Title: T2\nBody: edited",
    }
    assert {r["embedding_column"] for r in queue(conn, "My Schema.My Table").values()} == {
        "Embedding Col"
    }

    conn.execute(
        """UPDATE "My Schema"."My Table" SET "Embedding Col" = '[1,2,3]', "Model Name" = 'm'"""
    )
    conn.execute(
        """UPDATE "My Schema"."My Table" SET "Body Text" = NULL, "Title" = ' '
            WHERE "Doc ID" = 1"""
    )
    row = conn.execute(
        """SELECT "Embedding Col" AS e, "Model Name" AS m FROM "My Schema"."My Table"
            WHERE "Doc ID" = 1"""
    ).fetchone()
    assert row == {"e": None, "m": None}
    assert set(contents(conn, "My Schema.My Table")) == {"2"}

    conn.execute('DELETE FROM "My Schema"."My Table"')
    assert contents(conn, "My Schema.My Table") == {}
    removed = conn.execute(
        "SELECT embedding_unregister_target('My Schema.My Table', 'Embedding Col') AS removed"
    ).fetchone()
    assert removed == {"removed": True}


def test_application_role_without_queue_privileges(conn: Conn, dsn: str) -> None:
    """SECURITY DEFINER trigger functions queue writes of roles with no grant on the queue."""
    role = f"app_{uuid.uuid4().hex[:8]}"
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, emb vector(3))")
        conn.execute("SELECT embedding_register_target('docs', 'emb', ARRAY['body'])")
        conn.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON docs TO {}").format(
                sql.Identifier(role)
            )
        )
        conn.execute("REVOKE ALL ON embedding_queue FROM PUBLIC")
        with psycopg.connect(dsn, autocommit=True) as app:
            app.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            app.execute("INSERT INTO docs VALUES (1, 'from the app'), (2, 'gone soon')")
            app.execute("UPDATE docs SET body = 'edited by the app' WHERE id = 1")
            app.execute("DELETE FROM docs WHERE id = 2")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("SELECT * FROM embedding_queue")
        assert contents(conn) == {"1": "edited by the app"}
    finally:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_trigger_functions_resist_search_path_tricks(conn: Conn) -> None:
    """A caller's search_path cannot redirect the queue insert to a look-alike table."""
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, emb vector(3))")
    conn.execute("SELECT embedding_register_target('docs', 'emb', ARRAY['body'])")
    conn.execute("CREATE SCHEMA evil")
    conn.execute("CREATE TABLE evil.embedding_queue (LIKE public.embedding_queue)")
    conn.execute("SET search_path = evil, public")
    conn.execute("INSERT INTO public.docs VALUES (1, 'hello')")
    conn.execute("RESET search_path")
    assert contents(conn) == {"1": "hello"}
    assert conn.execute("SELECT count(*) AS n FROM evil.embedding_queue").fetchone() == {"n": 0}


# --- unusual but legal table shapes -------------------------------------------------------


def test_rows_without_a_key_are_skipped_not_fatal(conn: Conn) -> None:
    """A nullable unique p_id_column: rows whose key is NULL cannot be queued, but writing
    them must not fail the application's statement."""
    conn.execute(
        "CREATE TABLE films (id serial PRIMARY KEY, code text UNIQUE, title text, emb vector(3))"
    )
    conn.execute(
        "SELECT embedding_register_target('films', 'emb', ARRAY['title'], p_id_column => 'code')"
    )
    conn.execute("INSERT INTO films (code, title) VALUES (NULL, 'no code'), ('F1', 'coded')")
    assert contents(conn, "films") == {"F1": "coded"}
    conn.execute("UPDATE films SET code = NULL, title = 'lost its code' WHERE code = 'F1'")
    assert contents(conn, "films") == {}
    conn.execute("UPDATE films SET code = 'F2' WHERE title = 'no code'")
    assert contents(conn, "films") == {"F2": "no code"}
    backfilled = conn.execute(
        "SELECT embedding_queue_backfill('films', 'emb', 'all') AS n"
    ).fetchone()
    assert backfilled == {"n": 1}


def test_stored_generated_content_column(conn: Conn) -> None:
    conn.execute(
        """CREATE TABLE notes (
               id int PRIMARY KEY, a text, b text,
               c text GENERATED ALWAYS AS (btrim(coalesce(a, '') || ' ' || coalesce(b, '')))
                   STORED,
               emb vector(3), model text
           )"""
    )
    conn.execute(
        "SELECT embedding_register_target('notes', 'emb', ARRAY['c'], p_model_column => 'model')"
    )
    conn.execute("INSERT INTO notes (id, a, b) VALUES (1, 'x', 'y'), (2, 'z', NULL), (3, NULL, '')")
    assert contents(conn, "notes") == {"1": "x y", "2": "z"}
    conn.execute("UPDATE notes SET emb = '[1,2,3]', model = 'm'")
    conn.execute("UPDATE notes SET a = NULL, b = ' ' WHERE id = 1")
    rows = conn.execute("SELECT id, emb IS NULL AS cleared, model FROM notes ORDER BY id")
    assert rows.fetchall() == [
        {"id": 1, "cleared": True, "model": None},
        {"id": 2, "cleared": False, "model": "m"},
        {"id": 3, "cleared": True, "model": None},  # blank from the start: cleared on write
    ]
    assert contents(conn, "notes") == {"2": "z"}
    conn.execute("UPDATE notes SET a = 'back' WHERE id = 1")
    assert contents(conn, "notes") == {"1": "back", "2": "z"}


def test_virtual_generated_content_column_is_refused(conn: Conn) -> None:
    """PostgreSQL 18 virtual columns read as NULL in transition tables: refuse them."""
    version = conn.execute("SELECT current_setting('server_version_num')::int AS v").fetchone()
    assert version is not None
    ddl = """CREATE TABLE notes (id int PRIMARY KEY, a text,
                                 c text GENERATED ALWAYS AS ('<' || a || '>') VIRTUAL,
                                 emb vector(3))"""
    if version["v"] < 180000:
        with pytest.raises(psycopg.errors.SyntaxError):  # no virtual columns before 18
            conn.execute(ddl)
        return
    conn.execute(ddl)
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="make it STORED"):
        conn.execute("SELECT embedding_register_target('notes', 'emb', ARRAY['c'])")


def test_partitioned_table(conn: Conn) -> None:
    conn.execute(
        """CREATE TABLE events (id int PRIMARY KEY, body text, emb vector(3))
           PARTITION BY RANGE (id)"""
    )
    conn.execute("CREATE TABLE events_low PARTITION OF events FOR VALUES FROM (0) TO (100)")
    conn.execute("CREATE TABLE events_high PARTITION OF events FOR VALUES FROM (100) TO (200)")
    conn.execute("SELECT embedding_register_target('events', 'emb', ARRAY['body'])")
    conn.execute("INSERT INTO events VALUES (1, 'low'), (150, 'high')")
    conn.execute("UPDATE events SET id = 151 WHERE id = 1")  # moves across partitions
    conn.execute("UPDATE events SET emb = '[1,2,3]'")
    conn.execute("UPDATE events SET body = '' WHERE id = 150")
    assert contents(conn, "events") == {"151": "low"}
    cleared = conn.execute("SELECT emb FROM events WHERE id = 150").fetchone()
    assert cleared == {"emb": None}
    conn.execute("DELETE FROM events WHERE id = 151")
    assert contents(conn, "events") == {}
