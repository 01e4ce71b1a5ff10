"""`queue-processor reembed` end to end (issue 13): start, a worker of the new model killed
with SIGKILL halfway, `status` progress, a refused early --switch, resume, --switch,
--rollback, --switch, --finish; every row ends with the new model's vector of its content."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator

import numpy as np
import pytest

from queue_processor.testing import FakeOpenAIServer, fake_vector
from tests.support.helpers import (
    DIMS,
    MODEL,
    QUEUE_PROCESSOR,
    body,
    cli_env,
    create_table,
    execute,
    insert_rows,
    run_cli,
)

NEW, NEW_DIMS = "model-new", 12
ROWS = 400


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=DIMS) as srv:
        yield srv


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    return done


def column_holds(dsn: str, column: str, dims: int) -> None:
    rows = execute(dsn, f"SELECT id, body, {column}::real[] AS v FROM docs ORDER BY id")
    assert len(rows) == ROWS
    for r in rows:
        assert r["v"] is not None, r["id"]
        assert np.allclose(np.array(r["v"], dtype=np.float32), fake_vector(r["body"], dims))


def wait_for(check: object, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_reembed_survives_kill_9_and_switches_rolls_back_and_finishes(
    dsn: str, server: FakeOpenAIServer
) -> None:
    env = cli_env(dsn, server, COLUMNS="200", QUEUE_PROCESSOR_LEASE_SECONDS="2")
    new_env = {
        **env,
        "EMBEDDING_MODEL": NEW,
        "EMBEDDING_DIMENSIONS": str(NEW_DIMS),
        "QUEUE_PROCESSOR_BATCH_SIZE": "10",
        "QUEUE_PROCESSOR_DELAY_MS": "20",
        "QUEUE_PROCESSOR_CONCURRENCY": "1",
    }
    create_table(dsn)
    insert_rows(dsn, ((i, body(i)) for i in range(1, ROWS + 1)))
    ok(
        run_cli(
            [
                "register",
                "docs",
                "--column",
                "embedding",
                "--content",
                "body",
                "--model-column",
                "model",
                "--index",
                "hnsw",
                "--backfill",
            ],
            env,
        )
    )
    ok(run_cli(["run", "--drain"], env))
    column_holds(dsn, "embedding", DIMS)

    done = ok(
        run_cli(
            [
                "reembed",
                "docs",
                "--column",
                "embedding",
                "--model",
                NEW,
                "--dimensions",
                str(NEW_DIMS),
            ],
            env,
        )
    )
    assert f"queued {ROWS} row(s)" in done.stdout

    # A worker of the new model, killed with SIGKILL once it has written some rows.
    worker = subprocess.Popen(
        [QUEUE_PROCESSOR, "run"],
        env=new_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: execute(dsn, "SELECT count(embedding__next) AS n FROM docs")[0]["n"] >= 50)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
    written = execute(dsn, "SELECT count(embedding__next) AS n FROM docs")[0]["n"]
    assert written < ROWS

    progress = ok(run_cli(["reembed", "docs", "--column", "embedding"], env)).stdout
    assert f"/{ROWS} rows" in progress
    report = json.loads(ok(run_cli(["status", "--json"], env)).stdout)
    [r] = report["reembeds"]
    assert (r["new_model"], r["state"], r["total"]) == (NEW, "backfilling", ROWS)
    refused = run_cli(["reembed", "docs", "--column", "embedding", "--switch"], env)
    assert refused.returncode == 2
    assert "not complete" in refused.stderr
    assert execute(
        dsn, "SELECT model FROM embedding_targets WHERE embedding_column = 'embedding'"
    ) == [{"model": MODEL}]

    # Resume: the killed worker's leases lapse, a new worker finishes the shadow.
    wait_for(
        lambda: (
            not execute(
                dsn,
                "SELECT 1 FROM embedding_queue"
                " WHERE status = 'processing' AND lease_expires_at > now()",
            )
        )
    )
    ok(run_cli(["run", "--drain"], new_env))
    column_holds(dsn, "embedding__next", NEW_DIMS)

    switched = ok(run_cli(["reembed", "docs", "--column", "embedding", "--switch"], env)).stdout
    assert "index docs_embedding__next_hnsw_idx built" in switched
    assert f"switched docs.embedding to {NEW}: {ROWS} row(s)" in switched
    column_holds(dsn, "embedding", NEW_DIMS)
    column_holds(dsn, "embedding__old", DIMS)
    assert {r["model"] for r in execute(dsn, "SELECT model FROM docs")} == {NEW}
    # The switched column has its HNSW index (the shadow's, built before the switch).
    indexes = execute(
        dsn,
        "SELECT a.attname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_am am ON am.oid = c.relam AND am.amname = 'hnsw'"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
        " WHERE i.indrelid = 'docs'::regclass",
    )
    assert sorted(r["attname"] for r in indexes) == ["embedding", "embedding__old"]

    ok(run_cli(["reembed", "docs", "--column", "embedding", "--rollback"], env))
    column_holds(dsn, "embedding", DIMS)
    assert {r["model"] for r in execute(dsn, "SELECT model FROM docs")} == {MODEL}
    ok(run_cli(["reembed", "docs", "--column", "embedding", "--switch"], env))
    column_holds(dsn, "embedding", NEW_DIMS)

    finished = ok(run_cli(["reembed", "docs", "--column", "embedding", "--finish"], env)).stdout
    assert "dropped embedding__old" in finished
    targets = execute(dsn, "SELECT embedding_column, model, dimensions FROM embedding_targets")
    assert targets == [{"embedding_column": "embedding", "model": NEW, "dimensions": NEW_DIMS}]
    assert execute(
        dsn,
        "SELECT count(*) AS n FROM pg_attribute WHERE attrelid = 'docs'::regclass"
        " AND attname LIKE 'embedding\\_\\_%' AND NOT attisdropped",
    ) == [{"n": 0}]
