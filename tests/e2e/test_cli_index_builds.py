"""Index-aware backfills through the command line: `register --index hnsw --backfill` defers
the index past a backlog threshold, `status` and `search` say where it stands, a draining
worker builds it, `build-index` / `register --wait` build it on request."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from queue_processor.testing import FakeOpenAIServer
from tests.support.helpers import DIMS, QUEUE_PROCESSOR, cli_env, execute, run_cli

INDEX = "articles_embedding_hnsw_idx"


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=DIMS) as srv:
        yield srv


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    return done


def articles(dsn: str, n: int) -> None:
    execute(dsn, "CREATE TABLE articles (id bigint PRIMARY KEY, body text)")
    execute(
        dsn,
        "INSERT INTO articles SELECT i, 'article number ' || i FROM generate_series(1, %s) i",
        (n,),
    )


def register_args(*extra: str) -> list[str]:
    return [
        "register",
        "articles",
        "--column",
        "embedding",
        "--content",
        "body",
        "--create-column",
        "--dimensions",
        str(DIMS),
        "--index",
        "hnsw",
        "--backfill",
        *extra,
    ]


def index_valid(dsn: str) -> bool | None:
    """indisvalid of the target's index; None when it does not exist."""
    rows = execute(
        dsn,
        "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(%s)",
        (INDEX,),
    )
    return rows[0]["indisvalid"] if rows else None


def index_json(dsn: str, env: dict[str, str]) -> list[dict[str, Any]]:
    status = json.loads(ok(run_cli(["status", "--json"], env)).stdout)
    return list(status["indexes"])


def test_a_backlog_at_the_threshold_gets_its_index_after_the_drain(
    dsn: str, server: FakeOpenAIServer
) -> None:
    env = cli_env(dsn, server, COLUMNS="200", QUEUE_PROCESSOR_INDEX_DEFER_ROWS="20")
    articles(dsn, 20)
    done = ok(run_cli(register_args(), env))
    assert f"index {INDEX} (hnsw, cosine, m=16, ef_construction=64) is pending" in done.stdout
    assert index_valid(dsn) is None  # not created: the backlog drains into an unindexed column

    [wanted] = index_json(dsn, env)
    assert (wanted["state"], wanted["index_name"], wanted["opclass"]) == (
        "pending",
        INDEX,
        "vector_cosine_ops",
    )
    status = ok(run_cli(["status"], env)).stdout
    assert "pending: built once the target's queued rows are embedded" in status
    assert status.count(f"index {INDEX} on articles.embedding") == 1, status  # one line each
    # A search works meanwhile, and says it scanned sequentially.
    found = ok(run_cli(["search", "articles", "article number 3", "-k", "2"], env))
    assert "sequential scan" in found.stdout
    assert "its index is pending" in found.stdout

    drained = ok(run_cli(["run", "--drain"], env))
    events = [json.loads(line) for line in drained.stderr.splitlines() if line.startswith("{")]
    built = [(e["index"], e["memory_mb"]) for e in events if e.get("event") == "index_built"]
    assert built == [(INDEX, 64)], drained.stderr  # 20 small rows: the 64 MB floor

    assert index_valid(dsn) is True
    embedded = execute(dsn, "SELECT count(embedding) AS n FROM articles")
    assert embedded == [{"n": 20}]
    [wanted] = index_json(dsn, env)
    assert (wanted["state"], wanted["valid"], wanted["attempts"], wanted["memory_mb"]) == (
        "ready",
        True,
        1,
        64,
    )
    found = json.loads(
        ok(run_cli(["search", "articles", "article number 3", "-k", "2", "--json"], env)).stdout
    )
    assert (found["scan"], found["index_state"]) == ("index", "ready")
    assert found["results"][0]["id"] == "3"

    # Unregistering forgets the wish (the index itself stays, as the table's).
    ok(run_cli(["unregister", "articles", "--column", "embedding"], env))
    assert execute(dsn, "SELECT count(*) AS n FROM embedding_index_builds") == [{"n": 0}]
    assert index_valid(dsn) is True


def test_a_backlog_below_the_threshold_gets_its_index_at_once(
    dsn: str, server: FakeOpenAIServer
) -> None:
    env = cli_env(dsn, server, QUEUE_PROCESSOR_INDEX_DEFER_ROWS="21")
    articles(dsn, 20)
    done = ok(run_cli([*register_args("--index-m", "8", "--index-ef-construction", "32")], env))
    assert f"index {INDEX} (hnsw, cosine, m=8, ef_construction=32)\n" in done.stdout
    assert index_valid(dsn) is True
    options = execute(dsn, "SELECT reloptions FROM pg_class WHERE relname = %s", (INDEX,))
    assert sorted(options[0]["reloptions"]) == ["ef_construction=32", "m=8"]
    [wanted] = index_json(dsn, env)
    assert (wanted["state"], wanted["m"], wanted["ef_construction"]) == ("ready", 8, 32)


def test_register_wait_builds_the_index_once_a_worker_drained_the_backlog(
    dsn: str, server: FakeOpenAIServer
) -> None:
    env = cli_env(
        dsn,
        server,
        QUEUE_PROCESSOR_INDEX_DEFER_ROWS="0",
        # The worker builds no index: the waiting command must.
        QUEUE_PROCESSOR_INDEX_CHECK_SECONDS="0",
        QUEUE_PROCESSOR_POLL_SECONDS="0.2",
    )
    articles(dsn, 30)
    worker = subprocess.Popen(
        [QUEUE_PROCESSOR, "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        done = ok(run_cli([*register_args("--wait", "--poll", "0.1")], env))
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    assert "is pending" in done.stdout
    assert f"index {INDEX} is ready (built in" in done.stdout
    assert index_valid(dsn) is True
    assert execute(dsn, "SELECT count(embedding) AS n FROM articles") == [{"n": 30}]
    [wanted] = index_json(dsn, env)
    assert wanted["state"] == "ready"


def test_build_index_needs_a_wanted_index(dsn: str, server: FakeOpenAIServer) -> None:
    env = cli_env(dsn, server)
    articles(dsn, 2)
    ok(run_cli([*register_args()[:-3], "--backfill"], env))  # no --index
    done = run_cli(["build-index", "articles"], env)
    assert done.returncode == 2, done.stderr
    assert "wants no index (register it with --index hnsw)" in done.stderr
