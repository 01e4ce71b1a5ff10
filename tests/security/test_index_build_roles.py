"""Index builds and the worker role: a worker whose role may not create indexes on a table
(it does not own it) records the build as failed, with the server's message, and keeps
working; the owner's `build-index` builds it. The worker role may move a build through its
states but not change which index is built, on which table, with which parameters.

PostgreSQL 18 only: an HNSW index needs pgvector (the PostgreSQL 15 server has none).
"""

from __future__ import annotations

import json

import pytest
from psycopg import errors

from queue_processor.testing import FakeOpenAIServer
from tests.security.conftest import Roles
from tests.support.helpers import DIMS, cli_env, execute, run_cli, summary_counts


def test_a_worker_that_may_not_create_the_index_records_the_failure(
    dsn: str, vector_roles: Roles, fake_api: FakeOpenAIServer
) -> None:
    execute(dsn, f"CREATE TABLE articles (id int PRIMARY KEY, body text, embedding vector({DIMS}))")
    execute(dsn, "INSERT INTO articles SELECT i, 'text ' || i FROM generate_series(1, 12) i")
    owner_env = cli_env(dsn, fake_api, QUEUE_PROCESSOR_INDEX_DEFER_ROWS="10")
    registered = run_cli(
        [
            "register", "articles", "--column", "embedding", "--content", "body",
            "--index", "hnsw", "--backfill",
        ],
        owner_env,
    )  # fmt: skip
    assert registered.returncode == 0, registered.stderr
    assert "is pending" in registered.stdout
    worker = vector_roles.create("worker")
    assert run_cli(["grant-worker", worker], owner_env).returncode == 0

    worker_env = cli_env(vector_roles.dsn(dsn, worker), fake_api)
    drained = run_cli(["run", "--drain"], worker_env)
    assert drained.returncode == 0, drained.stderr
    assert summary_counts(drained.stdout)["processed"] == 12
    [build] = execute(
        dsn, "SELECT state, error_message, builder, attempts FROM embedding_index_builds"
    )
    assert build["state"] == "failed"
    assert "must be owner of table articles" in build["error_message"]
    assert (build["builder"], build["attempts"]) == (None, 1)
    assert execute(dsn, "SELECT count(*) AS n FROM pg_indexes WHERE tablename = 'articles'") == [
        {"n": 1}  # the primary key only
    ]
    status = run_cli(["status"], {**owner_env, "COLUMNS": "300"})
    assert (
        f"failed: role {worker} may not create index articles_embedding_hnsw_idx: "
        "must be owner of table articles" in status.stdout
    )
    assert "run build-index as the table's owner" in status.stdout

    # The worker role moves build states, and nothing else of the wish.
    with vector_roles.login(dsn, worker) as conn:
        conn.execute("UPDATE embedding_index_builds SET error_message = 'x', state = 'failed'")
        for forged in (
            "index_name = 'other_idx'",
            "table_name = 'secrets'",
            "opclass = 'halfvec_cosine_ops'",
            "m = 100",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(f"UPDATE embedding_index_builds SET {forged}")

    # The owner builds it.
    built = run_cli(["build-index", "articles", "--poll", "0.1"], owner_env)
    assert built.returncode == 0, built.stderr
    assert "is ready (built in" in built.stdout
    status_json = json.loads(run_cli(["status", "--json"], owner_env).stdout)
    [index] = status_json["indexes"]
    assert (index["state"], index["valid"], index["attempts"]) == ("ready", True, 2)
