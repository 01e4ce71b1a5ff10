"""kill -9 of a worker in the middle of an index build: its backend stops (the build session
checks its client every second), the INVALID index CREATE INDEX CONCURRENTLY left behind is
detected by the next worker, dropped and built again; nothing is left half-done.

What could go wrong, and how it would show:
- the killed worker's backend builds on for nobody -> its pid stays in pg_stat_activity, or
  the index turns valid without a worker (the check after the kill);
- the next worker keeps the invalid index (CREATE INDEX ... IF NOT EXISTS skips it) -> the
  build is recorded ready while pg_index says indisvalid = false;
- it builds a second index next to the leftover -> two indexes on the column;
- nobody takes the dead build over -> the state stays 'building'.
"""

from __future__ import annotations

import pytest

from tests.reliability.harness import ChaosServer, Workers, report, wait_for, worker_env
from tests.support.helpers import cli_env, execute, run_cli

ROWS = 20_000
VECTOR_DIMS = 128
INDEX = "docs_embedding_hnsw_idx"


def index_valid(dsn: str) -> bool | None:
    rows = execute(
        dsn, "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", (INDEX,)
    )
    return rows[0]["indisvalid"] if rows else None


def build_row(dsn: str) -> dict[str, object]:
    [row] = execute(
        dsn,
        "SELECT state, builder, builder_pid, attempts, error_message FROM embedding_index_builds",
    )
    return row


def building_in_server(dsn: str) -> bool:
    """A CREATE INDEX of docs is past its catalog entry, building the graph."""
    rows = execute(
        dsn,
        "SELECT count(*) AS n FROM pg_stat_progress_create_index"
        " WHERE relid = 'docs'::regclass AND phase LIKE 'building index%%'",
    )
    return bool(rows[0]["n"])


@pytest.mark.slow
def test_kill_9_mid_build_leaves_no_invalid_index(
    dsn: str, fake: ChaosServer, workers: Workers
) -> None:
    execute(
        dsn,
        f"CREATE TABLE docs (id bigint PRIMARY KEY, body text, embedding vector({VECTOR_DIMS}))",
    )
    # Rows already embedded (random vectors): the backlog is drained, the build is due.
    execute(
        dsn,
        "INSERT INTO docs SELECT i, 'doc ' || i,"
        " (SELECT array_agg(random()::real) FROM generate_series(1, %s) WHERE i > 0)::vector"
        " FROM generate_series(1, %s) AS i",
        (VECTOR_DIMS, ROWS),
    )
    registered = run_cli(
        ["register", "docs", "--column", "embedding", "--content", "body", "--index", "hnsw"],
        cli_env(dsn, fake, QUEUE_PROCESSOR_INDEX_DEFER_ROWS="0"),
    )
    assert registered.returncode == 0, registered.stderr
    assert build_row(dsn)["state"] == "pending"

    common = {
        "QUEUE_PROCESSOR_LEASE_SECONDS": 2,
        "QUEUE_PROCESSOR_INDEX_CHECK_SECONDS": 0.1,
    }
    # 1 MB: the graph does not fit, pgvector inserts on disk: a build of many seconds.
    first = workers.start(
        "index-w1", worker_env(dsn, fake, QUEUE_PROCESSOR_INDEX_BUILD_MEMORY_MB=1, **common)
    )
    wait_for(lambda: building_in_server(dsn), timeout_s=120, what="the build to start")
    assert index_valid(dsn) is False  # CONCURRENTLY: the entry exists, not yet valid
    pid = build_row(dsn)["builder_pid"]
    assert first.kill9() == -9

    # The backend notices its client is gone and stops; what it built stays INVALID.
    wait_for(
        lambda: not execute(dsn, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)),
        timeout_s=60,
        what="the killed worker's build backend to end",
    )
    assert index_valid(dsn) is False
    dead = build_row(dsn)
    assert (dead["state"], dead["builder"], dead["attempts"]) == ("building", "index-w1", 1)

    second = workers.start("index-w2", worker_env(dsn, fake, **common))
    wait_for(lambda: build_row(dsn)["state"] == "ready", timeout_s=300, what="the rebuild")
    assert second.stop() == 0, second.tail()

    assert index_valid(dsn) is True
    indexes = execute(
        dsn,
        "SELECT indexrelid::regclass::text AS name FROM pg_index"
        " WHERE indrelid = 'docs'::regclass AND NOT indisprimary",
    )
    assert indexes == [{"name": INDEX}]
    done = build_row(dsn)
    assert (done["state"], done["builder"], done["attempts"], done["error_message"]) == (
        "ready",
        None,
        2,
        None,
    )
    assert [e["index"] for e in second.events("index_invalid_dropped")] == [INDEX]
    [built] = second.events("index_built")
    report("index_build_kill", rows=ROWS, rebuild_s=built["seconds"], memory_mb=built["memory_mb"])
