"""Chunked targets and roles: the companion chunks table and embedding_chunks_write.

- the worker role writes chunks only through embedding_chunks_write (SECURITY DEFINER), and
  only for queue rows it holds a valid claim on: it has no INSERT, UPDATE, DELETE or TRUNCATE
  on the chunks table, a call with another token writes nothing;
- application roles write the source table (their deletes take the chunks with them) but
  may neither read the chunks table nor call the function; neither may PUBLIC;
- temporary tables named like ours redirect neither the function nor the generated triggers.

PostgreSQL 18 only: a chunks table needs pgvector (the PostgreSQL 15 server has none).
"""

from __future__ import annotations

import uuid

import pytest
from psycopg import errors, sql

from queue_processor.testing import FakeOpenAIServer
from tests.security.conftest import Roles
from tests.support.helpers import DIMS, cli_env, execute, run_cli, summary_counts

WRITE = (
    "SELECT * FROM public.embedding_chunks_write('docs', 'body', %s::uuid, %s::bigint[],"
    " %s::text[], %s::bigint[], %s::text[], %s::real[], 'm')"
)
TEXT = " ".join(f"Sentence {i} of a private document about budget item {i}." for i in range(40))


def chunked_docs(dsn: str) -> None:
    """As the owner: ``docs`` with a chunked target ``body`` (chunks of 32 tokens)."""
    execute(dsn, "CREATE TABLE docs (id int PRIMARY KEY, body text)")
    execute(
        dsn,
        "SELECT embedding_register_chunked_target('docs', 'body', ARRAY['body'],"
        " p_dimensions => %s, p_chunk_tokens => 32, p_chunk_overlap => 4)",
        (DIMS,),
    )


def app_role(dsn: str, vector_roles: Roles) -> str:
    role = vector_roles.create("app")
    execute(
        dsn,
        sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON docs TO {}").format(
            sql.Identifier(role)
        ),
    )
    return role


def chunk_count(dsn: str) -> int:
    return int(execute(dsn, "SELECT count(*) AS n FROM docs_body_chunks")[0]["n"])


def test_the_worker_role_writes_chunks_only_through_a_valid_claim(
    dsn: str, vector_roles: Roles, fake_api: FakeOpenAIServer
) -> None:
    chunked_docs(dsn)
    execute(dsn, "INSERT INTO docs VALUES (1, %s), (2, %s)", (TEXT, TEXT + " Two."))
    worker = vector_roles.create("worker")
    owner_env = cli_env(dsn, fake_api)
    assert run_cli(["grant-worker", worker], owner_env).returncode == 0

    # The tool's path works as the worker role.
    drained = run_cli(["run", "--drain"], cli_env(vector_roles.dsn(dsn, worker), fake_api))
    assert drained.returncode == 0, drained.stderr
    assert summary_counts(drained.stdout)["processed"] == 2
    written = chunk_count(dsn)
    assert written > 2

    with vector_roles.login(dsn, worker) as conn:
        # It may read the chunks (search, status)...
        assert conn.execute("SELECT count(*) AS n FROM docs_body_chunks").fetchone() == {
            "n": written
        }
        # ...and write them by no other path.
        for statement in (
            "INSERT INTO docs_body_chunks (record_id, chunk_index, chunk_text, embedding)"
            f" VALUES (1, 99, 'forged', array_fill(0.5, ARRAY[{DIMS}])::real[]::vector)",
            "UPDATE docs_body_chunks SET chunk_text = 'forged'",
            "DELETE FROM docs_body_chunks",
            "TRUNCATE docs_body_chunks",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(statement)
        # No source column either: the worker needs none of a chunked target.
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT body FROM docs")
        # The function writes nothing without a valid claim (done rows, another token).
        ids = [r["id"] for r in conn.execute("SELECT id FROM embedding_queue").fetchall()]
        forged = conn.execute(
            WRITE, (uuid.uuid4(), ids, [None] * len(ids), ids, ["forged"] * len(ids),
                    [0.5] * DIMS * len(ids))
        ).fetchall()  # fmt: skip
        assert forged == []
    assert chunk_count(dsn) == written
    assert execute(dsn, "SELECT count(*) AS n FROM docs_body_chunks WHERE chunk_text = 'forged'")[
        0
    ] == {"n": 0}


def test_app_roles_and_public_may_not_read_chunks_or_call_the_writer(
    dsn: str, vector_roles: Roles, fake_api: FakeOpenAIServer
) -> None:
    chunked_docs(dsn)
    app = app_role(dsn, vector_roles)
    with vector_roles.login(dsn, app) as conn:
        conn.execute("INSERT INTO docs VALUES (1, %s), (2, %s)", (TEXT, TEXT + " Two."))
    assert run_cli(["run", "--drain"], cli_env(dsn, fake_api)).returncode == 0
    assert chunk_count(dsn) > 2
    public_may = execute(
        dsn,
        "SELECT has_function_privilege('public', 'embedding_chunks_write(text, text, uuid,"
        " bigint[], text[], bigint[], text[], real[], text)', 'EXECUTE') AS may",
    )
    assert public_may == [{"may": False}]
    with vector_roles.login(dsn, app) as conn:
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT chunk_text FROM docs_body_chunks")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute(WRITE, (uuid.uuid4(), [1], [None], [1], ["x"], [0.5] * DIMS))
        # Its own writes still remove the chunks of its rows (the definer triggers).
        conn.execute("DELETE FROM docs WHERE id = 1")
        assert execute(dsn, "SELECT DISTINCT record_id FROM docs_body_chunks") == [{"record_id": 2}]
        conn.execute("TRUNCATE docs")
    assert chunk_count(dsn) == 0


def test_temp_tables_named_like_ours_redirect_nothing(
    dsn: str, vector_roles: Roles, fake_api: FakeOpenAIServer
) -> None:
    """A worker role forges a claimed row in a temporary ``embedding_queue`` and a chunked
    target in a temporary ``embedding_targets``; an app role shadows the chunks table. The
    function reads only the real queue (the forged claim is not valid there), and the
    triggers delete the real chunks, never the temporary ones."""
    chunked_docs(dsn)
    execute(dsn, "INSERT INTO docs VALUES (1, %s), (2, %s)", (TEXT, TEXT + " Two."))
    assert run_cli(["run", "--drain"], cli_env(dsn, fake_api)).returncode == 0
    written = chunk_count(dsn)
    worker = vector_roles.create("worker")
    assert run_cli(["grant-worker", worker], cli_env(dsn, fake_api)).returncode == 0
    token = uuid.uuid4()
    with vector_roles.login(dsn, worker) as conn:
        conn.execute("CREATE TEMP TABLE embedding_queue AS SELECT * FROM public.embedding_queue")
        conn.execute(
            "UPDATE pg_temp.embedding_queue SET status = 'processing', claim_token = %s", (token,)
        )
        conn.execute("CREATE TEMP TABLE docs_body_chunks (LIKE public.docs_body_chunks)")
        conn.execute("SET search_path = pg_temp, public")
        ids = [r["id"] for r in conn.execute("SELECT id FROM embedding_queue").fetchall()]
        forged = conn.execute(
            WRITE, (token, ids, [None] * len(ids), ids, ["forged"] * len(ids),
                    [0.5] * DIMS * len(ids))
        ).fetchall()  # fmt: skip
        assert forged == []
        assert conn.execute("SELECT count(*) AS n FROM pg_temp.docs_body_chunks").fetchone() == {
            "n": 0
        }
    assert chunk_count(dsn) == written
    app = app_role(dsn, vector_roles)
    with vector_roles.login(dsn, app) as conn:
        conn.execute("CREATE TEMP TABLE docs_body_chunks (record_id int, chunk_index int)")
        conn.execute("INSERT INTO pg_temp.docs_body_chunks VALUES (1, 0)")
        conn.execute("SET search_path = pg_temp, public")
        conn.execute("DELETE FROM public.docs WHERE id = 1")
        assert conn.execute("SELECT count(*) AS n FROM pg_temp.docs_body_chunks").fetchone() == {
            "n": 1
        }
    assert execute(dsn, "SELECT DISTINCT record_id FROM docs_body_chunks") == [{"record_id": 2}]


def test_every_new_security_definer_function_is_private_with_a_closed_path(dsn: str) -> None:
    chunked_docs(dsn)
    found = execute(
        dsn,
        "SELECT p.oid::regprocedure::text AS function, p.proconfig,"
        " has_function_privilege('public', p.oid, 'EXECUTE') AS public_may"
        " FROM pg_proc p WHERE p.prosecdef AND p.pronamespace = 'public'::regnamespace"
        "   AND (p.proname LIKE 'embedding_chunks%%' OR p.proname LIKE 'embedding_queue_t%%')",
    )
    names = {r["function"] for r in found}
    assert any(n.startswith("embedding_chunks_write(") for n in names)
    assert sum(n.startswith("embedding_queue_t") for n in names) == 4  # ins, upd, del, trunc
    for r in found:
        assert not r["public_may"], r["function"]
        assert "search_path=pg_catalog, pg_temp" in r["proconfig"], r
