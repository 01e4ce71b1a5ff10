"""The worker under a least-privilege database role (issue 4, section 4).

``queue-processor grant-worker ROLE`` (``embedding_grant_worker``) gives a role the queue,
the registry, usage accounting and, on each registered source table, SELECT of the key plus
UPDATE of the target and companion columns, nothing else. These tests create a LOGIN role
``qp_worker`` on the test server, register targets as the owner, grant, and then:

- run ``queue-processor run --drain`` as ``qp_worker`` against the fake OpenAI server and
  check every row ends done with the right vector (and that without the grant it cannot);
- check, statement by statement, what the role may and may not do: no reading content, no
  writing other columns or other tables, no rewriting the registry.

The role is cluster-wide: the fixture creates it (with a password, so servers that do not
trust local connections work too) and drops it, with its grants, afterwards.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from collections.abc import Iterator

import numpy as np
import psycopg
import pytest
from psycopg import conninfo, errors, sql

from queue_processor.testing import FakeOpenAIServer, fake_vector
from tests.support.helpers import (
    DIMS,
    MODEL,
    QUEUE_PROCESSOR,
    cli_env,
    execute,
    insert_rows,
    make_docs,
    register,
    run_cli,
    status_counts,
    summary_counts,
    vector_rows,
)

ROLE = "qp_worker"
PASSWORD = "qp-worker-test-password"


@pytest.fixture
def worker_dsn(pg_admin_dsn: str, dsn: str) -> Iterator[str]:
    """A DSN of this test's database as ``qp_worker``: LOGIN, nothing granted yet."""
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        conn.execute(
            sql.SQL(
                "{} ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS PASSWORD {}"
            ).format(sql.SQL(verb), sql.Identifier(ROLE), sql.Literal(PASSWORD))
        )
    try:
        yield conninfo.make_conninfo(dsn, user=ROLE, password=PASSWORD)
    finally:
        execute(dsn, sql.SQL("DROP OWNED BY {}").format(sql.Identifier(ROLE)))
        with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(ROLE)))


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=DIMS) as srv:
        yield srv


def two_targets(dsn: str) -> dict[str, str]:
    """docs (public, 12 rows, model/embedded_at companions) and app.articles (3 rows), both
    queued, plus an unregistered table ``secrets``. Returns {queue label/id: content}."""
    contents = {f"docs/{i}": c for i, c in make_docs(dsn, 12).items()}
    execute(dsn, "CREATE SCHEMA app")
    execute(
        dsn,
        f"CREATE TABLE app.articles (id bigint PRIMARY KEY, body text, embedding vector({DIMS}))",
    )
    register(dsn, "app.articles", companions=False)
    articles = {i: f"article number {i} about least privilege" for i in range(1, 4)}
    execute(
        dsn,
        "INSERT INTO app.articles (id, body) SELECT * FROM unnest(%s::bigint[], %s::text[])",
        (list(articles), list(articles.values())),
    )
    contents.update({f"app.articles/{i}": c for i, c in articles.items()})
    execute(dsn, f"CREATE TABLE secrets (id bigint PRIMARY KEY, data text, v vector({DIMS}))")
    execute(dsn, "INSERT INTO secrets VALUES (1, 'the owner only')")
    return contents


def assert_embedded(dsn: str, contents: dict[str, str]) -> None:
    """Every row holds the fake server's vector of its content; docs' companions are set."""
    stored = {f"docs/{k}": v for k, v in vector_rows(dsn, "docs").items()}
    rows = execute(dsn, "SELECT id, embedding::real[] AS v FROM app.articles")
    stored.update({f"app.articles/{r['id']}": np.array(r["v"], dtype=np.float32) for r in rows})
    assert set(stored) == set(contents)
    for key, content in contents.items():
        got = stored[key]
        assert got is not None, f"{key} has no embedding"
        np.testing.assert_array_equal(got, fake_vector(content, DIMS))
    companions = execute(dsn, "SELECT DISTINCT model, embedded_at IS NOT NULL AS at FROM docs")
    assert companions == [{"model": MODEL, "at": True}]


def test_worker_role_drains_with_only_the_granted_privileges(
    dsn: str, worker_dsn: str, server: FakeOpenAIServer
) -> None:
    contents = two_targets(dsn)
    worker_env = cli_env(worker_dsn, server)

    # Control: the role has no access of its own, so a drain without the grant fails.
    denied = run_cli(["run", "--drain"], worker_env)
    assert denied.returncode != 0
    assert "permission denied" in denied.stderr
    assert "Traceback" not in denied.stderr
    assert status_counts(dsn) == {"pending": 15}

    granted = run_cli(["grant-worker", ROLE], cli_env(dsn, server))
    assert granted.returncode == 0, granted.stderr
    assert f"granted {ROLE} the worker's privileges on the queue and 2 target(s)" in (
        granted.stdout
    )

    done = run_cli(["run", "--drain", "--batch-size", "5"], worker_env)
    assert done.returncode == 0, done.stderr
    assert summary_counts(done.stdout) == {"processed": 15, "failed": 0, "skipped": 0, "retried": 0}
    assert status_counts(dsn) == {"done": 15}
    assert_embedded(dsn, contents)
    assert execute(dsn, "SELECT sum(items) AS n FROM embedding_usage") == [{"n": 15}]

    # A content change by the application re-pends its row; the worker role re-embeds it.
    execute(dsn, "UPDATE docs SET body = 'rewritten by the application' WHERE id = 7")
    contents["docs/7"] = "rewritten by the application"
    again = run_cli(["run", "--drain"], worker_env)
    assert again.returncode == 0, again.stderr
    assert summary_counts(again.stdout)["processed"] == 1
    assert status_counts(dsn) == {"done": 15}
    assert_embedded(dsn, contents)

    # A bulk insert by the application: its keys wait in the inbox, and the worker role
    # expands them (embedding_queue_expand is SECURITY DEFINER) and embeds them.
    execute(
        dsn,
        "INSERT INTO docs (id, body) SELECT g, 'bulk ' || g FROM generate_series(1001, 2000) g",
    )
    assert status_counts(dsn) == {"done": 15}
    bulk = run_cli(["run", "--drain"], worker_env)
    assert bulk.returncode == 0, bulk.stderr
    assert summary_counts(bulk.stdout)["processed"] == 1000
    assert status_counts(dsn) == {"done": 1015}


DENIED = [
    pytest.param("UPDATE docs SET body = 'changed' WHERE id = 1", id="update-content-column"),
    pytest.param("UPDATE docs SET body = body", id="update-content-no-where"),
    pytest.param("SELECT body FROM docs", id="select-content-column"),
    pytest.param("SELECT * FROM docs", id="select-star"),
    pytest.param("INSERT INTO docs (id, body) VALUES (100, 'x')", id="insert-source"),
    pytest.param("DELETE FROM docs WHERE id = 1", id="delete-source"),
    pytest.param("INSERT INTO secrets VALUES (2, 'x')", id="insert-unregistered"),
    pytest.param("UPDATE secrets SET data = 'x'", id="update-unregistered"),
    pytest.param("SELECT id FROM secrets", id="select-unregistered"),
    pytest.param("DELETE FROM embedding_queue", id="delete-queue"),
    pytest.param("UPDATE embedding_targets SET embedding_column = 'body'", id="rewrite-registry"),
    pytest.param(
        "SELECT embedding_register_target('secrets'::regclass, 'v', ARRAY['data'])",
        id="register-target",
    ),
]


@pytest.mark.parametrize("statement", DENIED)
def test_worker_role_is_denied(dsn: str, worker_dsn: str, statement: str) -> None:
    two_targets(dsn)
    assert execute(dsn, "SELECT embedding_grant_worker(%s) AS n", (ROLE,)) == [{"n": 2}]
    with (
        psycopg.connect(worker_dsn, autocommit=True) as conn,
        pytest.raises(errors.InsufficientPrivilege),
    ):
        conn.execute(statement)
    assert execute(dsn, "SELECT body FROM docs WHERE id = 1")[0]["body"] != "changed"
    assert execute(dsn, "SELECT data FROM secrets") == [{"data": "the owner only"}]
    triggers = "SELECT count(*) AS n FROM pg_trigger WHERE tgrelid = 'secrets'::regclass"
    assert execute(dsn, triggers) == [{"n": 0}]
    assert execute(dsn, "SELECT count(*) AS n FROM embedding_targets") == [{"n": 2}]


def test_worker_role_may_do_what_the_worker_needs(dsn: str, worker_dsn: str) -> None:
    """The positive control for the denials above: the grant is real, and exactly this."""
    two_targets(dsn)
    execute(dsn, "SELECT embedding_grant_worker(%s)", (ROLE,))
    with psycopg.connect(worker_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(id) FROM docs").fetchone() == (12,)
        conn.execute(
            "UPDATE docs SET embedding = NULL, model = 'm', embedded_at = now() WHERE id = 1"
        )
        conn.execute("UPDATE app.articles SET embedding = NULL WHERE id = 1")
        conn.execute("SELECT 1 FROM docs WHERE id = 2 FOR NO KEY UPDATE")
        assert conn.execute("SELECT count(*) FROM embedding_queue").fetchone() == (15,)
        conn.execute("UPDATE embedding_queue SET updated_at = now() WHERE record_id = '1'")
        conn.execute(
            "INSERT INTO embedding_usage (owner, model, items, tokens, requests)"
            " VALUES ('w', 'm', 1, 1, 1)"
        )
        assert conn.execute("SELECT count(*) FROM embedding_targets").fetchone() == (2,)
    assert execute(dsn, "SELECT model FROM docs WHERE id = 1") == [{"model": "m"}]


def test_worker_role_drains_with_the_embedding_cache(
    dsn: str, worker_dsn: str, server: FakeOpenAIServer
) -> None:
    """EMBEDDING_CACHE=true is a documented worker setting: the grant must cover it."""
    contents = two_targets(dsn)
    execute(dsn, "SELECT embedding_grant_worker(%s)", (ROLE,))
    done = run_cli(["run", "--drain"], cli_env(worker_dsn, server, EMBEDDING_CACHE="true"))
    assert done.returncode == 0, done.stderr
    assert status_counts(dsn) == {"done": 15}
    assert_embedded(dsn, contents)


def test_worker_role_drains_on_a_terminal(
    dsn: str, worker_dsn: str, server: FakeOpenAIServer
) -> None:
    """An operator running `run --drain` as the worker role in a terminal gets the progress
    bar, which reads the queue's status views: the grant must cover them too."""
    contents = two_targets(dsn)
    execute(dsn, "SELECT embedding_grant_worker(%s)", (ROLE,))
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [QUEUE_PROCESSOR, "run", "--drain"],
        env={**cli_env(worker_dsn, server), "TERM": "xterm", "COLUMNS": "120"},
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
    )
    os.close(slave)
    terminal = b""
    try:
        deadline = time.monotonic() + 60  # liveness bound only
        while proc.poll() is None:
            assert time.monotonic() < deadline, terminal.decode(errors="replace")
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    terminal += os.read(master, 65536)
                except OSError:  # EIO: the child closed its end
                    break
        assert proc.stdout is not None
        stdout = proc.stdout.read()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        os.close(master)
    shown = terminal.decode(errors="replace")
    assert proc.returncode == 0, shown
    assert "embedding" in shown  # the progress bar was drawn
    assert summary_counts(stdout)["processed"] == 15
    assert status_counts(dsn) == {"done": 15}
    assert_embedded(dsn, contents)


def test_grant_covers_targets_registered_later_only_after_a_rerun(
    dsn: str, worker_dsn: str
) -> None:
    """grant-worker is re-run after registering a target (as documented): until then the
    role cannot write the new column, afterwards it can."""
    make_docs(dsn, 1)
    execute(dsn, "SELECT embedding_grant_worker(%s)", (ROLE,))
    execute(dsn, f"CREATE TABLE later (id bigint PRIMARY KEY, body text, v vector({DIMS}))")
    register(dsn, "later", "v", companions=False)
    insert_rows(dsn, [(1, "later row")], table="later")
    with (
        psycopg.connect(worker_dsn, autocommit=True) as conn,
        pytest.raises(errors.InsufficientPrivilege),
    ):
        conn.execute("UPDATE later SET v = NULL WHERE id = 1")
    assert execute(dsn, "SELECT embedding_grant_worker(%s) AS n", (ROLE,)) == [{"n": 2}]
    with psycopg.connect(worker_dsn, autocommit=True) as conn:
        conn.execute("UPDATE later SET v = NULL WHERE id = 1")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("UPDATE later SET body = 'x' WHERE id = 1")
