"""Index-aware backfills of chunked targets through the command line: `register --chunks
--backfill` past QUEUE_PROCESSOR_INDEX_DEFER_ROWS creates the chunks table without its HNSW
index and records it as wanted; `status` and `search` say where it stands; a draining worker
builds it on the chunks table's vectors; below the threshold it is there at once;
`build-index` and `register --wait` build it on request."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from queue_processor.testing import FakeOpenAIServer
from tests.support.helpers import (
    DIMS,
    QUEUE_PROCESSOR,
    chunked_register_args,
    cli_env,
    create_table,
    execute,
    insert_rows,
    run_cli,
)

MODEL = "text-embedding-3-small"
CHUNKS = "docs_body_chunks"
INDEX = "docs_body_chunks_hnsw"


def text(i: int) -> str:
    return "\n\n".join(
        " ".join(f"Row {i} paragraph {p} sentence {s} about topic {i * 10 + s}." for s in range(4))
        for p in range(3)
    )


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=DIMS, max_input_tokens=64) as srv:
        yield srv


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    return done


def docs(dsn: str, env: dict[str, str], n: int) -> None:
    ok(run_cli(["migrate"], env))
    create_table(dsn)
    insert_rows(dsn, [(i, text(i)) for i in range(1, n + 1)])


def register_args(*extra: str) -> list[str]:
    return chunked_register_args("--backfill", *extra)


def chunk_index(dsn: str) -> dict[str, Any] | None:
    """The chunks index: valid, its table, access method and definition; None when absent."""
    rows = execute(
        dsn,
        "SELECT i.indisvalid AS valid, i.indrelid::regclass::text AS on_table,"
        " am.amname AS method, pg_get_indexdef(i.indexrelid) AS definition"
        " FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_am am ON am.oid = c.relam WHERE i.indexrelid = to_regclass(%s)",
        (INDEX,),
    )
    return rows[0] if rows else None


def assert_built(dsn: str) -> None:
    found = chunk_index(dsn)
    assert found is not None
    assert (found["valid"], found["on_table"], found["method"]) == (True, CHUNKS, "hnsw")
    assert "(embedding vector_cosine_ops)" in found["definition"], found["definition"]


def index_json(dsn: str, env: dict[str, str]) -> list[dict[str, Any]]:
    status = json.loads(ok(run_cli(["status", "--json"], env)).stdout)
    return list(status["indexes"])


def probe(dsn: str) -> str:
    """The text of record 3's second chunk: a search for it finds record 3 first."""
    rows = execute(dsn, f"SELECT chunk_text FROM {CHUNKS} WHERE record_id = 3 AND chunk_index = 1")
    return str(rows[0]["chunk_text"]) if rows else "Row 3 paragraph 1"


def search_json(dsn: str, env: dict[str, str]) -> dict[str, Any]:
    query = probe(dsn)
    done = ok(run_cli(["search", "docs", "--column", "body", query, "--json"], env))
    return dict(json.loads(done.stdout))


def test_a_chunked_backlog_at_the_threshold_gets_its_index_after_the_drain(
    dsn: str, server: FakeOpenAIServer
) -> None:
    env = cli_env(
        dsn, server, EMBEDDING_MODEL=MODEL, COLUMNS="200", QUEUE_PROCESSOR_INDEX_DEFER_ROWS="5"
    )
    docs(dsn, env, 5)
    done = ok(run_cli(register_args(), env))
    assert f"index {INDEX} (hnsw, cosine, m=16, ef_construction=64) is pending" in done.stdout
    assert "registered chunked target docs.body" in done.stdout
    assert chunk_index(dsn) is None  # the backlog drains into an unindexed chunks table

    [wanted] = index_json(dsn, env)
    assert (wanted["state"], wanted["index_name"], wanted["opclass"], wanted["valid"]) == (
        "pending",
        INDEX,
        "vector_cosine_ops",
        None,
    )
    assert (wanted["index_table"], wanted["index_column"]) == (CHUNKS, "embedding")
    status = ok(run_cli(["status"], env)).stdout
    assert f"index {INDEX} on docs.body" in status
    assert "pending: built once the target's queued rows are embedded" in status

    drained = ok(run_cli(["run", "--drain"], env))
    events = [json.loads(line) for line in drained.stderr.splitlines() if line.startswith("{")]
    built = [e["index"] for e in events if e.get("event") == "index_built"]
    assert built == [INDEX], drained.stderr
    assert_built(dsn)
    [counted] = execute(dsn, f"SELECT count(DISTINCT record_id) AS n FROM {CHUNKS}")
    assert counted["n"] == 5
    [wanted] = index_json(dsn, env)
    assert (wanted["state"], wanted["valid"], wanted["attempts"]) == ("ready", True, 1)

    found = search_json(dsn, env)
    assert (found["scan"], found["index_state"]) == ("index", "ready")
    assert found["results"][0]["id"] == "3"


def test_search_of_a_chunked_target_whose_index_is_pending_scans_sequentially(
    dsn: str, server: FakeOpenAIServer
) -> None:
    env = cli_env(
        dsn, server, EMBEDDING_MODEL=MODEL, COLUMNS="200", QUEUE_PROCESSOR_INDEX_DEFER_ROWS="5"
    )
    docs(dsn, env, 6)
    ok(run_cli(register_args(), env))
    # Embed the backlog without building (a worker that never looks for index builds).
    ok(run_cli(["run", "--drain"], {**env, "QUEUE_PROCESSOR_INDEX_CHECK_SECONDS": "0"}))
    assert chunk_index(dsn) is None
    found = search_json(dsn, env)
    assert (found["scan"], found["index_state"]) == ("sequential", "pending")
    assert found["results"][0]["id"] == "3"
    text_out = ok(run_cli(["search", "docs", "--column", "body", probe(dsn)], env))
    assert "sequential scan" in text_out.stdout
    assert "its index is pending" in text_out.stdout

    built = ok(run_cli(["build-index", "docs", "--column", "body", "--poll", "0.1"], env))
    assert f"index {INDEX} is ready (built in" in built.stdout
    assert_built(dsn)
    assert search_json(dsn, env)["scan"] == "index"


def test_a_chunked_backlog_below_the_threshold_gets_its_index_at_once(
    dsn: str, server: FakeOpenAIServer
) -> None:
    env = cli_env(
        dsn, server, EMBEDDING_MODEL=MODEL, COLUMNS="200", QUEUE_PROCESSOR_INDEX_DEFER_ROWS="6"
    )
    docs(dsn, env, 5)
    done = ok(run_cli(register_args(), env))
    assert f"index {INDEX} (hnsw, cosine, m=16, ef_construction=64)\n" in done.stdout
    assert_built(dsn)
    [wanted] = index_json(dsn, env)
    assert (wanted["state"], wanted["valid"]) == ("ready", True)
    found = search_json(dsn, env)
    assert found["scan"] == "index"
    assert found["results"] == []  # nothing embedded yet


def test_register_chunks_wait_builds_the_index_once_a_worker_drained_the_backlog(
    dsn: str, server: FakeOpenAIServer
) -> None:
    env = cli_env(
        dsn, server, EMBEDDING_MODEL=MODEL, COLUMNS="200", QUEUE_PROCESSOR_INDEX_DEFER_ROWS="5"
    )
    docs(dsn, env, 5)
    # The worker embeds but builds nothing; register --wait builds once the backlog drained.
    worker = subprocess.Popen(
        [QUEUE_PROCESSOR, "run"],
        env={
            **env,
            "QUEUE_PROCESSOR_INDEX_CHECK_SECONDS": "0",
            "QUEUE_PROCESSOR_POLL_SECONDS": "0.2",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        done = ok(run_cli(register_args("--wait", "--poll", "0.1"), env))
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert "waiting for the backlog of docs.body to be embedded" in done.stdout
    assert f"index {INDEX} is ready (built in" in done.stdout
    assert_built(dsn)


def test_build_index_builds_a_chunks_index_that_no_build_recorded(
    dsn: str, server: FakeOpenAIServer
) -> None:
    # A chunked target whose index was dropped and whose wish is gone (as one registered
    # before chunks indexes were recorded): build-index wants it again and builds it.
    env = cli_env(dsn, server, EMBEDDING_MODEL=MODEL, COLUMNS="200")
    docs(dsn, env, 3)
    ok(run_cli(register_args(), env))
    ok(run_cli(["run", "--drain"], env))
    execute(dsn, f"DROP INDEX {INDEX}; DELETE FROM embedding_index_builds")
    built = ok(run_cli(["build-index", "docs", "--column", "body", "--poll", "0.1"], env))
    assert f"index {INDEX} is ready (built in" in built.stdout
    assert_built(dsn)


def test_the_sql_registration_indexes_a_new_chunks_table_at_once(
    dsn: str, server: FakeOpenAIServer
) -> None:
    # README's SQL example, verbatim but for the dimensions: a DBA's registration with a
    # backfill gets its index at once, recorded as ready (status, build-index see it).
    env = cli_env(dsn, server, EMBEDDING_MODEL=MODEL, QUEUE_PROCESSOR_INDEX_DEFER_ROWS="1")
    docs(dsn, env, 4)
    execute(
        dsn,
        "SELECT embedding_register_chunked_target('docs', 'body', ARRAY['body'],"
        f" p_dimensions => {DIMS}, p_chunk_tokens => 512, p_chunk_overlap => 64,"
        " p_max_chunks => 100, p_backfill => 'missing')",
    )
    assert_built(dsn)
    [wanted] = index_json(dsn, env)
    assert (wanted["state"], wanted["index_name"], wanted["valid"]) == ("ready", INDEX, True)
    # A re-registration keeps the table and its index, and creates nothing twice.
    execute(
        dsn,
        "SELECT embedding_register_chunked_target('docs', 'body', ARRAY['body'],"
        f" p_dimensions => {DIMS}, p_chunk_tokens => 256)",
    )
    indexes = execute(dsn, "SELECT indexname FROM pg_indexes WHERE tablename = %s", (CHUNKS,))
    assert sorted(r["indexname"] for r in indexes) == sorted([f"{CHUNKS}_pkey", INDEX])


def test_a_reregistration_past_the_threshold_keeps_the_existing_index_ready(
    dsn: str, server: FakeOpenAIServer
) -> None:
    env = cli_env(
        dsn, server, EMBEDDING_MODEL=MODEL, COLUMNS="200", QUEUE_PROCESSOR_INDEX_DEFER_ROWS="5"
    )
    docs(dsn, env, 4)
    ok(run_cli(register_args(), env))  # 4 rows: indexed at once
    ok(run_cli(["run", "--drain"], env))
    insert_rows(dsn, [(i, text(i)) for i in range(5, 7)])
    ok(run_cli(["run", "--drain"], env))
    # Re-chunk all 6 (past the threshold): the index is there, so it stays, and is ready.
    done = ok(run_cli([*register_args("all"), "--chunk-tokens", "48"], env))
    assert "queued for embedding: 6 row(s) (all)" in done.stdout
    assert f"index {INDEX} (hnsw, cosine, m=16, ef_construction=64)\n" in done.stdout
    [wanted] = index_json(dsn, env)
    assert (wanted["state"], wanted["valid"]) == ("ready", True)
    assert_built(dsn)
