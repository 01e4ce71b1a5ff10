"""A chunked target's deferred index and the worker role: the worker does not own the chunks
table, so its build is recorded as failed with the ownership message, exactly as for a column
target, and it keeps embedding; the owner's `build-index` builds it. The registration
function that can leave a chunks table without its index is not executable by PUBLIC.

PostgreSQL 18 only: a chunks table needs pgvector (the PostgreSQL 15 server has none).
"""

from __future__ import annotations

import json

from queue_processor.testing import FakeOpenAIServer
from tests.security.conftest import Roles
from tests.support.helpers import DIMS, cli_env, execute, run_cli, summary_counts

INDEX = "docs_body_chunks_hnsw"
TEXT = " ".join(f"Sentence {i} of a private document about budget item {i}." for i in range(20))


def test_a_worker_that_does_not_own_the_chunks_table_records_the_failure(
    dsn: str, vector_roles: Roles, fake_api: FakeOpenAIServer
) -> None:
    execute(dsn, "CREATE TABLE docs (id int PRIMARY KEY, body text)")
    execute(dsn, "INSERT INTO docs SELECT i, %s || i FROM generate_series(1, 6) i", (TEXT,))
    owner_env = cli_env(dsn, fake_api, QUEUE_PROCESSOR_INDEX_DEFER_ROWS="6")
    registered = run_cli(
        [
            "register", "docs", "--column", "body", "--content", "body", "--chunks",
            "--dimensions", str(DIMS), "--chunk-tokens", "32", "--chunk-overlap", "4",
            "--backfill",
        ],
        owner_env,
    )  # fmt: skip
    assert registered.returncode == 0, registered.stderr
    assert f"index {INDEX} (hnsw, cosine, m=16, ef_construction=64) is pending" in (
        registered.stdout
    )
    worker = vector_roles.create("worker")
    assert run_cli(["grant-worker", worker], owner_env).returncode == 0

    drained = run_cli(["run", "--drain"], cli_env(vector_roles.dsn(dsn, worker), fake_api))
    assert drained.returncode == 0, drained.stderr
    assert summary_counts(drained.stdout)["processed"] == 6
    [build] = execute(dsn, "SELECT state, error_message, attempts FROM embedding_index_builds")
    assert (build["state"], build["attempts"]) == ("failed", 1)
    assert (
        f"role {worker} may not create index {INDEX}: must be owner of table docs_body_chunks"
        in build["error_message"]
    )
    assert execute(dsn, "SELECT to_regclass(%s) IS NULL AS absent", (INDEX,)) == [{"absent": True}]
    status = run_cli(["status"], {**owner_env, "COLUMNS": "300"})
    assert f"failed: role {worker} may not create index {INDEX}" in status.stdout
    assert "run build-index as the table's owner" in status.stdout

    built = run_cli(["build-index", "docs", "--column", "body", "--poll", "0.1"], owner_env)
    assert built.returncode == 0, built.stderr
    assert f"index {INDEX} is ready (built in" in built.stdout
    [index] = json.loads(run_cli(["status", "--json"], owner_env).stdout)["indexes"]
    assert (index["state"], index["valid"], index["attempts"]) == ("ready", True, 2)
    [owned] = execute(
        dsn,
        "SELECT i.indrelid::regclass::text AS on_table FROM pg_index i"
        " WHERE i.indexrelid = to_regclass(%s)",
        (INDEX,),
    )
    assert owned["on_table"] == "docs_body_chunks"


def test_public_may_not_call_the_chunked_registration_functions(
    dsn: str, vector_roles: Roles
) -> None:
    app = vector_roles.create("app")
    for function in ("embedding_chunks_register", "embedding_chunks_create_index"):
        [row] = execute(
            dsn,
            "SELECT bool_or(has_function_privilege(%s, p.oid, 'EXECUTE')) AS app,"
            " bool_or(coalesce(aclcontains(p.proacl, makeaclitem(0, p.proowner, 'EXECUTE',"
            " false)), true)) AS public, count(*) AS n"
            " FROM pg_proc p WHERE p.proname = %s",
            (app, function),
        )
        assert row == {"app": False, "public": False, "n": 1}, function
