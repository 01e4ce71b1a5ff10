"""A configuration stop gives every claim back, whatever the timing (issue 16).

A rejected key (401) stops the worker with exit 2, and the README promises the queue is left as
it was: no row may stay ``processing`` under a claim nobody holds until its lease runs out. The
race that broke it: the failing batch released its rows while the claim loop, cancelled at the
same moment, was claiming them again; the claim committed in the database and the rows were
lost to a claim nobody held. Driven here many times with different batch sizes, concurrency,
poll intervals, a slow provider, in drain and continuous mode, and with both cores kept busy by
other processes; after every exit the whole queue must be pending with no attempt spent.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.reliability.harness import ChaosServer, Workers, counts, worker_env
from tests.support.helpers import execute, make_docs

EXIT_CONFIG = 2
ROWS = 60

# (batch size, concurrency, poll seconds, provider latency seconds, mode)
CASES = [
    (500, 2, 0.2, 0.0, "run"),
    (10, 2, 0.2, 0.0, "run"),
    (10, 4, 0.05, 0.0, "run"),
    (5, 3, 0.2, 0.3, "run"),
    (10, 1, 0.2, 0.0, "drain"),
    (7, 4, 1.0, 0.05, "drain"),
    (3, 4, 0.05, 0.0, "drain"),
]


@pytest.fixture(params=[False, True], ids=["idle", "cores-busy"])
def busy(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Two busy-loop processes for the whole test (both cores of this machine), or none."""
    hogs = []
    if request.param:
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        yield request.param
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


@pytest.mark.slow
def test_a_rejected_key_leaves_no_claim_behind(
    dsn: str, fake: ChaosServer, workers: Workers, busy: bool
) -> None:
    make_docs(dsn, ROWS)
    fake.required_api_key = "sk-test-the-right-key"
    for run, (batch, concurrency, poll_s, latency_s, mode) in enumerate(CASES * 2):
        fake.latency_s = latency_s
        worker = workers.start(
            f"config-stop-{run}",
            worker_env(
                dsn,
                fake,
                OPENAI_API_KEY="sk-test-a-wrong-key",
                QUEUE_PROCESSOR_BATCH_SIZE=batch,
                QUEUE_PROCESSOR_CONCURRENCY=concurrency,
                QUEUE_PROCESSOR_POLL_SECONDS=poll_s,
            ),
            *(["--drain"] if mode == "drain" else []),
        )
        rc = worker.wait(60)
        case = f"run {run}: batch {batch}, concurrency {concurrency}, poll {poll_s}, {mode}"
        assert rc == EXIT_CONFIG, f"{case}: exit {rc}\n{worker.tail()}"
        assert counts(dsn) == {"pending": ROWS}, f"{case}\n{worker.tail()}"
        spent = execute(dsn, "SELECT max(attempts) AS n FROM embedding_queue")[0]["n"]
        assert spent == 0, case
    assert fake.requests_by_status[401] >= len(CASES) * 2
