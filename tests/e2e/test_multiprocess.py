"""Several ``queue-processor run --drain`` processes share one queue: each row embedded once.

The processes start together against one in-process fake server (its own thread), so the
server's per-input counters see every request any of them made. SKIP LOCKED claims must
split the 5,000 rows between them without overlap: every input text is embedded exactly
once and every row ends done with its own vector.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from queue_processor.testing import FakeOpenAIServer, fake_vectors
from tests.support.helpers import (
    API_KEY,
    DIMS,
    QUEUE_PROCESSOR,
    cli_env,
    execute,
    json_events,
    make_docs,
    status_counts,
    summary_counts,
)

ROWS = 5_000


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=DIMS, required_api_key=API_KEY) as srv:
        yield srv


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 4])
def test_processes_drain_together_embedding_each_row_once(
    dsn: str, server: FakeOpenAIServer, tmp_path: Path, processes: int
) -> None:
    contents = make_docs(dsn, ROWS)
    # Fresh statistics, as autovacuum keeps them in production: planned against an "empty"
    # queue, the source table's update trigger scans every queue row for each batch write.
    execute(dsn, "ANALYZE")
    # A little latency per request keeps every process busy long enough to overlap.
    server.latency_s = 0.05
    procs: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    for n in range(processes):
        out, err = tmp_path / f"worker{n}.out", tmp_path / f"worker{n}.err"
        env = cli_env(dsn, server, QUEUE_PROCESSOR_WORKER_NAME=f"worker-{n}")
        with out.open("wb") as out_file, err.open("wb") as err_file:
            procs.append(
                (
                    subprocess.Popen(
                        [QUEUE_PROCESSOR, "run", "--drain", "--batch-size", "100"],
                        env=env,
                        stdout=out_file,
                        stderr=err_file,
                    ),
                    out,
                    err,
                )
            )
    try:
        codes = [proc.wait(timeout=240) for proc, _, _ in procs]
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    outputs = [(out.read_text(), err.read_text()) for _, out, err in procs]
    for (stdout, stderr), code in zip(outputs, codes, strict=True):
        assert code == 0, stderr
        assert API_KEY not in stdout + stderr
    processed = [summary_counts(stdout)["processed"] for stdout, _ in outputs]
    assert sum(processed) == ROWS
    assert sum(1 for p in processed if p > 0) >= 2, processed  # the work was shared

    # Counted at the server: every text embedded exactly once, nothing else sent.
    assert len(server.input_counts) == ROWS
    assert set(server.input_counts.values()) == {1}
    assert sum(server.input_counts.values()) == ROWS
    assert set(server.input_counts) == set(contents.values())

    assert status_counts(dsn) == {"done": ROWS}
    rows = execute(dsn, "SELECT id, embedding::real[] AS v FROM docs ORDER BY id")
    stored = np.array([r["v"] for r in rows], dtype=np.float32)
    expected = fake_vectors([contents[r["id"]] for r in rows], DIMS)
    np.testing.assert_array_equal(stored, expected)
    owners = execute(dsn, "SELECT DISTINCT claimed_by FROM embedding_queue")
    assert {r["claimed_by"] for r in owners} <= {f"worker-{n}" for n in range(processes)}
    for _, stderr in outputs:
        assert not [e for e in json_events(stderr) if e["event"] == "claims_superseded"]
