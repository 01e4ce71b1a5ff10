"""SIGTERM ends the operator commands as Ctrl-C does (issue 16).

A command stopped by SIGTERM (systemd, a CI runner, `kill`) used to die on the spot while its
backend went on with the statement and committed it: an `enqueue --all` "stopped" by SIGTERM
still queued every row. Now SIGTERM cancels the command, psycopg cancels the statement in the
server, and the command exits 130 with nothing committed. Waits are liveness bounds.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from queue_processor.testing import FakeOpenAIServer
from tests.support.helpers import DIMS, QUEUE_PROCESSOR, cli_env, execute, register

ROWS = 300_000
EXIT_ABORTED = 130


@pytest.fixture
def env(dsn: str) -> Iterator[dict[str, str]]:
    with FakeOpenAIServer(dims=DIMS) as server:
        yield cli_env(dsn, server)


def start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [QUEUE_PROCESSOR, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def signal_and_wait(proc: subprocess.Popen[str], sig: signal.Signals) -> str:
    """Send ``sig``, wait for the exit (a liveness bound) and return stderr; the process is
    killed if anything fails on the way."""
    try:
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return stderr


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def active_backfill(dsn: str) -> bool:
    rows = execute(
        dsn,
        "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
        " AND state = 'active' AND query LIKE '%%embedding_queue_backfill%%'"
        " AND pid <> pg_backend_pid()",
    )
    return bool(rows)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signal_cancels_enqueue_in_the_server_too(
    dsn: str, env: dict[str, str], sig: signal.Signals
) -> None:
    execute(dsn, "CREATE TABLE big (id bigint PRIMARY KEY, body text, embedding real[])")
    execute(dsn, f"INSERT INTO big SELECT g, 'text ' || g FROM generate_series(1, {ROWS}) g")
    register(dsn, "big", companions=False)
    proc = start(env, "enqueue", "big", "--all")
    try:
        wait_until(lambda: active_backfill(dsn), "the backfill statement to run")
    finally:
        stderr = signal_and_wait(proc, sig)
    assert proc.returncode == EXIT_ABORTED, stderr
    assert "Traceback" not in stderr
    # The statement was cancelled in the server, not left to finish and commit.
    wait_until(lambda: not active_backfill(dsn), "the backend to stop")
    assert execute(dsn, "SELECT count(*) AS n FROM embedding_queue")[0]["n"] == 0


def test_sigterm_ends_status_watch(dsn: str, env: dict[str, str]) -> None:
    execute(dsn, "CREATE TABLE docs (id bigint PRIMARY KEY, body text, embedding real[])")
    register(dsn, "docs", companions=False)
    proc = start(env, "status", "--watch", "--interval", "0.1")
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # a refresh has been printed: it is watching
    finally:
        stderr = signal_and_wait(proc, signal.SIGTERM)
    assert first, "status --watch printed nothing"
    assert proc.returncode == EXIT_ABORTED, stderr
    assert "Traceback" not in stderr
