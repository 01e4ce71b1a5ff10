"""``queue-processor run`` and ``scripts/run-embedding-processor.sh`` as real subprocesses.

Each test runs the installed console script with the environment a user would set
(DATABASE_URL, OPENAI_BASE_URL, OPENAI_API_KEY, EMBEDDING_MODEL) against a fresh database
and the fake OpenAI server, then checks exit codes, printed summaries, JSON log events and
the database. Every run also checks that the API key appears nowhere in the output.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from queue_processor.testing import FakeOpenAIServer, fake_vector
from tests.support.helpers import (
    API_KEY,
    DIMS,
    QUEUE_PROCESSOR,
    cli_env,
    execute,
    json_events,
    make_docs,
    queue_rows,
    status_counts,
    summary_counts,
    vector_rows,
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "run-embedding-processor.sh"


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=DIMS, required_api_key=API_KEY) as srv:
        yield srv


def run(
    args: list[str], env: dict[str, str], *, timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; the API key must not appear in what it printed."""
    done = subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert API_KEY not in done.stdout
    assert API_KEY not in done.stderr
    return done


def assert_all_embedded(dsn: str, contents: dict[int, str]) -> None:
    stored = vector_rows(dsn)
    for i, content in contents.items():
        got = stored[i]
        assert got is not None, f"row {i} has no embedding"
        np.testing.assert_array_equal(got, fake_vector(content, DIMS))


def test_run_drain_prints_the_summary_and_exits_0(dsn: str, server: FakeOpenAIServer) -> None:
    contents = make_docs(dsn, 25)
    done = run([QUEUE_PROCESSOR, "run", "--drain", "--batch-size", "10"], cli_env(dsn, server))

    assert done.returncode == 0, done.stderr
    assert "=== PROCESSING SUMMARY ===" in done.stdout
    assert summary_counts(done.stdout) == {
        "processed": 25,
        "failed": 0,
        "skipped": 0,
        "retried": 0,
    }
    assert status_counts(dsn) == {"done": 25}
    assert_all_embedded(dsn, contents)
    events = json_events(done.stderr)
    started = [e for e in events if e["event"] == "worker_started"]
    assert len(started) == 1
    assert started[0]["mode"] == "drain"
    assert started[0]["batch_size"] == 10
    # Two batches are in flight at the default concurrency, so they may finish in any order:
    # what holds is the batches' sizes.
    assert sorted(e["items"] for e in events if e["event"] == "batch_done") == [5, 10, 10]
    assert all(entry["authorization"] for entry in server.request_log)


def test_run_drain_exits_1_when_an_item_failed(dsn: str, server: FakeOpenAIServer) -> None:
    contents = make_docs(dsn, 12)
    server.reject_inputs = {contents[5]}
    done = run([QUEUE_PROCESSOR, "run", "--drain", "--batch-size", "20"], cli_env(dsn, server))

    assert done.returncode == 1, done.stderr
    assert summary_counts(done.stdout)["processed"] == 11
    assert summary_counts(done.stdout)["failed"] == 1
    assert status_counts(dsn) == {"done": 11, "failed": 1}
    assert queue_rows(dsn)["5"]["status"] == "failed"
    failed = [e for e in json_events(done.stderr) if e["event"] == "item_failed"]
    assert [e["record_id"] for e in failed] == ["5"]


def test_run_once_processes_one_batch(dsn: str, server: FakeOpenAIServer) -> None:
    make_docs(dsn, 25)
    done = run([QUEUE_PROCESSOR, "run", "--once", "--batch-size", "10"], cli_env(dsn, server))
    assert done.returncode == 0, done.stderr
    assert summary_counts(done.stdout)["processed"] == 10
    assert status_counts(dsn) == {"done": 10, "pending": 15}


def test_run_embedding_processor_script_drains_like_the_seeds(
    dsn: str, server: FakeOpenAIServer
) -> None:
    contents = make_docs(dsn, 20)
    done = run([str(SCRIPT), "10", "2000"], cli_env(dsn, server))

    assert done.returncode == 0, done.stderr
    assert "batch size 10, delay 2000 ms" in done.stderr
    assert summary_counts(done.stdout)["processed"] == 20
    assert status_counts(dsn) == {"done": 20}
    assert_all_embedded(dsn, contents)
    started = [e for e in json_events(done.stderr) if e["event"] == "worker_started"]
    # One batch at a time, as the seeds' processor paced its work (the CLI default is 2).
    assert (started[0]["batch_size"], started[0]["delay_ms"], started[0]["concurrency"]) == (
        10,
        2000,
        1,
    )
    assert server.requests_total == 2  # two batches of ten, one request each
    assert server.max_in_flight == 1


def test_sigterm_mid_batch_finishes_it_and_exits_0(dsn: str, server: FakeOpenAIServer) -> None:
    contents = make_docs(dsn, 30)
    server.latency_s = 1.5
    proc = subprocess.Popen(
        [QUEUE_PROCESSOR, "run", "--batch-size", "10", "--concurrency", "1"],
        env=cli_env(dsn, server),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30  # liveness bound for start-up
        while server.in_flight < 1:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the worker never sent a request"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert API_KEY not in stdout + stderr

    assert proc.returncode == 0, stderr
    counts = status_counts(dsn)
    assert "processing" not in counts
    assert counts == {"done": 10, "pending": 20}
    assert_all_embedded(dsn, {i: contents[i] for i in range(1, 11)})
    events = [e["event"] for e in json_events(stderr)]
    assert "worker_stop_requested" in events
    assert "batch_done" in events


def test_401_exits_2_naming_the_key_problem_without_the_key(
    dsn: str, server: FakeOpenAIServer
) -> None:
    make_docs(dsn, 5)
    server.required_api_key = "sk-the-server-wants-another-key"
    done = run([QUEUE_PROCESSOR, "run", "--drain"], cli_env(dsn, server))

    assert done.returncode == 2, done.stderr
    assert "API key" in done.stderr
    assert "401" in done.stderr
    assert "Traceback" not in done.stderr
    rows = queue_rows(dsn)
    assert {(r["status"], r["attempts"]) for r in rows.values()} == {("pending", 0)}
    assert server.requests_by_status[401] >= 1


def test_api_key_never_printed_even_when_items_fail_and_retry(
    dsn: str, server: FakeOpenAIServer
) -> None:
    contents = make_docs(dsn, 6)
    server.reject_inputs = {contents[2]}
    server.fail_next(500, n=1)
    done = run(
        [QUEUE_PROCESSOR, "run", "--drain", "--batch-size", "3"],
        cli_env(dsn, server, QUEUE_PROCESSOR_LOG_LEVEL="debug"),
    )
    assert done.returncode == 1, done.stderr
    assert API_KEY not in done.stdout + done.stderr
    events = json_events(done.stderr)
    assert events, "expected JSON log events on stderr"
    assert any(e["event"] == "provider_retry" for e in events)
    assert (
        execute(dsn, "SELECT count(*) AS n FROM embedding_queue WHERE status = 'done'")[0]["n"] == 5
    )
