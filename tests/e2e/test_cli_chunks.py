"""`register --chunks`, `run`, `status` and `search` on a chunked target, as an operator runs
them: subprocesses against real Postgres and the fake server enforcing a 64-token limit per
input over HTTP (texts far longer than that are chunked, never sent whole)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from queue_processor.testing import FakeOpenAIServer
from tests.support.helpers import (
    DIMS,
    chunked_register_args,
    cli_env,
    create_table,
    execute,
    insert_rows,
    run_cli,
)

MODEL = "text-embedding-3-small"


def text(i: int) -> str:
    return "\n\n".join(
        " ".join(
            f"Row {i} paragraph {p} sentence {s} about subject {i * 10 + s}." for s in range(4)
        )
        for p in range(4)
    )


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=DIMS, max_input_tokens=64) as srv:
        yield srv


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def test_register_chunks_run_status_and_search(dsn: str, server: FakeOpenAIServer) -> None:
    env = cli_env(dsn, server, EMBEDDING_MODEL=MODEL, COLUMNS="200")
    ok(run_cli(["migrate"], env))
    create_table(dsn)
    insert_rows(dsn, [(i, text(i)) for i in range(1, 6)])
    done = ok(run_cli(chunked_register_args("--max-chunks", "50", "--backfill"), env))
    assert "queued for embedding: 5 row(s) (missing)" in done.stdout
    assert "registered chunked target docs.body" in done.stdout
    ok(run_cli(["run", "--drain"], env))
    assert 400 not in server.requests_by_status
    chunks = execute(dsn, "SELECT record_id, count(*) AS n FROM docs_body_chunks GROUP BY 1")
    assert len(chunks) == 5
    assert all(r["n"] > 2 for r in chunks)
    total = sum(r["n"] for r in chunks)

    status = ok(run_cli(["status"], env)).stdout
    assert f"chunked target docs.body: {total} chunks of 5 rows in docs_body_chunks" in status
    report = json.loads(ok(run_cli(["status", "--json"], env)).stdout)
    assert report["chunks"] == [
        {
            "table_name": "docs",
            "embedding_column": "body",
            "chunks_table": "docs_body_chunks",
            "chunks": total,
            "records": 5,
        }
    ]

    probe = execute(
        dsn, "SELECT chunk_text FROM docs_body_chunks WHERE record_id = 4 AND chunk_index = 1"
    )[0]["chunk_text"]
    found = json.loads(
        ok(run_cli(["search", "docs", "--column", "body", probe, "-k", "3", "--json"], env)).stdout
    )
    results = found["results"]
    assert [(r["id"], r["chunk_index"], r["chunk_text"]) for r in results[:1]] == [("4", 1, probe)]
    assert len({r["id"] for r in results}) == 3
    human = ok(run_cli(["search", "docs", "--column", "body", probe, "-k", "2"], env)).stdout
    assert "best chunk per row" in human
    assert "chunk_index" in human


def test_chunks_refuses_column_target_options(dsn: str, server: FakeOpenAIServer) -> None:
    env = cli_env(dsn, server, EMBEDDING_MODEL=MODEL)
    ok(run_cli(["migrate"], env))
    create_table(dsn)
    base = ["register", "docs", "--column", "body", "--content", "body", "--chunks"]
    done = run_cli([*base, "--index", "hnsw", "--dimensions", "8"], env)
    assert done.returncode == 2, done.stderr
    assert "--index" in done.stderr
    done = run_cli(base, env)
    assert done.returncode == 2
    assert "--chunks needs --dimensions" in done.stderr
    done = run_cli([*base, "--dimensions", "8", "--chunk-overlap", "300"], env)
    assert done.returncode != 0
    assert "chunk overlap must be at least 0 and below half" in done.stderr
    assert execute(dsn, "SELECT count(*) AS n FROM embedding_targets") == [{"n": 0}]
    helped = ok(run_cli(["register", "--help"], env)).stdout
    for flag in ("--chunks", "--chunk-tokens", "--chunk-overlap", "--max-chunks"):
        assert flag in helped
