"""Wanted indexes behind a transaction pooler.

CREATE INDEX CONCURRENTLY may not run inside a transaction block, and a pooled statement of
ours runs in one (the pin, then the statement), so builds go to the database's direct
address (QUEUE_PROCESSOR_DIRECT_URL). Without it a pooled worker says once that it builds no
index and keeps embedding, and ``build-index`` through the pooler exits 2 naming the setting;
with it both build the index (valid, on the direct connection).
"""

from __future__ import annotations

import subprocess

import pytest

from tests.pooler.pooled import FakeOpenAIServer, pooled_cli_env, pooled_worker_env
from tests.reliability.harness import Workers, counts, wait_for
from tests.support.helpers import DIMS, execute, run_cli

pytestmark = pytest.mark.pooler

INDEX = "notes_embedding_hnsw_idx"
ROWS = 40


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    return done


def register_deferred(dsn: str, env: dict[str, str]) -> None:
    """A ``notes`` target whose HNSW index waits for its backlog of ROWS rows."""
    execute(dsn, "CREATE TABLE notes (id bigint PRIMARY KEY, body text)")
    execute(
        dsn,
        "INSERT INTO notes SELECT i, 'note number ' || i FROM generate_series(1, %s) i",
        (ROWS,),
    )
    args = ["register", "notes", "--column", "embedding", "--content", "body"]
    args += ["--create-column", "--dimensions", str(DIMS), "--index", "hnsw", "--backfill"]
    done = ok(run_cli(args, {**env, "QUEUE_PROCESSOR_INDEX_DEFER_ROWS": "10"}))
    assert f"index {INDEX} (hnsw, cosine, m=16, ef_construction=64) is pending" in done.stdout


def index_valid(dsn: str) -> bool | None:
    rows = execute(
        dsn, "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", (INDEX,)
    )
    return rows[0]["indisvalid"] if rows else None


def build_state(dsn: str) -> str:
    [row] = execute(dsn, "SELECT state FROM embedding_index_builds")
    return str(row["state"])


def test_a_pooled_worker_builds_on_the_direct_address(
    dsn: str, pooled_dsn: str, fake: FakeOpenAIServer, workers: Workers
) -> None:
    env = pooled_cli_env(pooled_dsn, fake)
    register_deferred(dsn, env)
    worker = workers.start(
        "pooled-index",
        pooled_worker_env(
            pooled_dsn,
            fake,
            QUEUE_PROCESSOR_DIRECT_URL=dsn,
            QUEUE_PROCESSOR_INDEX_CHECK_SECONDS=0.2,
        ),
    )
    wait_for(
        lambda: build_state(dsn) == "ready",
        timeout_s=60,
        what="the pooled worker to build the wanted index",
        watch=[worker],
    )
    assert worker.stop() == 0, worker.tail()
    assert counts(dsn) == {"done": ROWS}
    assert index_valid(dsn) is True
    assert [e["index"] for e in worker.events("index_built")] == [INDEX]


def test_a_pooled_worker_without_a_direct_address_embeds_and_says_it_builds_nothing(
    dsn: str, pooled_dsn: str, fake: FakeOpenAIServer, workers: Workers
) -> None:
    env = pooled_cli_env(pooled_dsn, fake)
    register_deferred(dsn, env)
    worker = workers.start(
        "pooled-no-direct",
        pooled_worker_env(pooled_dsn, fake, QUEUE_PROCESSOR_INDEX_CHECK_SECONDS=0.2),
    )
    wait_for(
        lambda: counts(dsn) == {"done": ROWS} and worker.events("index_builds_skipped"),
        timeout_s=60,
        what="the backlog embedded and the skipped builds reported",
        watch=[worker],
    )
    execute(dsn, "INSERT INTO notes VALUES (%s, 'one more note')", (ROWS + 1,))
    wait_for(
        lambda: counts(dsn) == {"done": ROWS + 1},
        timeout_s=30,
        what="a later insert to be embedded",
        watch=[worker],
    )
    assert worker.stop() == 0, worker.tail()
    [skipped] = worker.events("index_builds_skipped")
    assert "QUEUE_PROCESSOR_DIRECT_URL" in skipped["error"]
    assert build_state(dsn) == "pending"
    assert index_valid(dsn) is None

    # build-index through the pooler: refused, naming the setting; with it, built.
    refused = run_cli(["build-index", "notes"], env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "QUEUE_PROCESSOR_DIRECT_URL" in refused.stderr
    assert "Traceback" not in refused.stderr
    built = ok(run_cli(["build-index", "notes"], {**env, "QUEUE_PROCESSOR_DIRECT_URL": dsn}))
    assert f"index {INDEX} is ready" in built.stdout
    assert index_valid(dsn) is True
    assert build_state(dsn) == "ready"
