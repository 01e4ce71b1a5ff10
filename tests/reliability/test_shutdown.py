"""Shutdown: SIGTERM while batches are in flight at a slow provider.

- With a grace period longer than the provider's answer, in-flight batches finish and are
  written; the process exits 0 and leaves no row ``processing``.
- With a grace period shorter than the answer, in-flight batches are cancelled and their claims
  released (pending again, the claim not counted as an attempt); exit 0, nothing ``processing``.
- A second SIGTERM exits at once, without waiting for the provider; the claims it held stay
  leased, and once the leases expire another worker completes everything.
"""

from __future__ import annotations

import signal

import pytest

from tests.reliability.harness import (
    ChaosServer,
    WorkerProcess,
    Workers,
    assert_embeddings_are_of,
    assert_sent_at_most_once_per_claim,
    counts,
    held_by,
    report,
    unfinished,
    wait_for,
    worker_env,
)
from tests.support.helpers import execute, make_docs

ROWS = 100


def start_slow_worker(
    dsn: str, fake: ChaosServer, workers: Workers, name: str, **env: object
) -> WorkerProcess:
    """A worker with two batches of 10 in flight at a provider that takes ``latency_s``."""
    worker = workers.start(
        name,
        worker_env(
            dsn,
            fake,
            QUEUE_PROCESSOR_BATCH_SIZE=10,
            QUEUE_PROCESSOR_CONCURRENCY=2,
            **env,
        ),
    )
    wait_for(
        lambda: fake.in_flight == 2 and len(held_by(dsn, name)) == 20,
        timeout_s=30,
        what="two batches in flight",
        every_s=0.01,
        watch=[worker],
    )
    return worker


def queue_contents(dsn: str) -> list[dict[str, object]]:
    return execute(dsn, "SELECT id, content FROM embedding_queue")


def drain_the_rest(dsn: str, fake: ChaosServer, workers: Workers, name: str) -> None:
    """Another worker (a fast provider now) drains what is left; every vector is checked."""
    fake.latency_s = 0.0
    finisher = workers.start(name, worker_env(dsn, fake), "--drain")
    assert finisher.wait(60) == 0, finisher.tail()
    assert counts(dsn) == {"done": ROWS}


@pytest.mark.slow
def test_sigterm_lets_in_flight_batches_finish_within_the_grace(
    dsn: str, fake: ChaosServer, workers: Workers
) -> None:
    contents = make_docs(dsn, ROWS)
    fake.latency_s = 2.0
    worker = start_slow_worker(
        dsn, fake, workers, "shutdown-grace", QUEUE_PROCESSOR_SHUTDOWN_GRACE_SECONDS=20
    )
    held = set(held_by(dsn, worker.name))
    worker.send(signal.SIGTERM)
    rc = worker.wait(30)

    assert rc == 0, worker.tail()
    c = counts(dsn)
    assert c["processing"] == 0
    # Exactly the batches in flight at the signal finished; nothing new was claimed.
    done = {
        int(r["id"]) for r in execute(dsn, "SELECT id FROM embedding_queue WHERE status = 'done'")
    }
    assert done == held
    assert c == {"done": 20, "pending": ROWS - 20}
    assert worker.events("worker_stop_requested")
    assert worker.events("worker_stopping")[0]["in_flight"] == len(held)
    drain_the_rest(dsn, fake, workers, "shutdown-grace-finisher")
    assert_embeddings_are_of(dsn, contents)
    assert assert_sent_at_most_once_per_claim(dsn, fake) == 0
    report(
        "shutdown_grace",
        rows=ROWS,
        in_flight_at_sigterm=len(held),
        finished=len(done),
        exit_code=rc,
    )


@pytest.mark.slow
def test_sigterm_releases_claims_when_the_grace_runs_out(
    dsn: str, fake: ChaosServer, workers: Workers
) -> None:
    contents = make_docs(dsn, ROWS)
    fake.latency_s = 10.0
    worker = start_slow_worker(
        dsn, fake, workers, "shutdown-short", QUEUE_PROCESSOR_SHUTDOWN_GRACE_SECONDS=0.5
    )
    held = set(held_by(dsn, worker.name))
    worker.send(signal.SIGTERM)
    rc = worker.wait(8)  # well before the provider would have answered

    assert rc == 0, worker.tail()
    assert counts(dsn) == {"pending": ROWS}
    released = execute(
        dsn,
        "SELECT id, attempts, claim_token, claimed_by FROM embedding_queue WHERE id = ANY(%s)",
        (sorted(held),),
    )
    assert all(r["attempts"] == 0 and r["claim_token"] is None for r in released), released
    assert sum(e["items"] for e in worker.events("claims_released")) == len(held)
    drain_the_rest(dsn, fake, workers, "shutdown-short-finisher")
    assert_embeddings_are_of(dsn, contents)
    # A released claim is not an attempt, but its texts had reached the provider: they were
    # sent once more by the finisher; every other text exactly once.
    sent = {int(r["id"]): fake.input_counts[r["content"]] for r in queue_contents(dsn)}
    assert {i: n for i, n in sent.items() if n != 1} == dict.fromkeys(held, 2)
    report("shutdown_grace_expired", rows=ROWS, claims_released=len(held), exit_code=rc)


@pytest.mark.slow
def test_second_sigterm_exits_at_once_and_leases_cover_it(
    dsn: str, fake: ChaosServer, workers: Workers
) -> None:
    contents = make_docs(dsn, ROWS)
    fake.latency_s = 10.0
    lease_s = 2.0
    worker = start_slow_worker(
        dsn,
        fake,
        workers,
        "shutdown-abort",
        QUEUE_PROCESSOR_SHUTDOWN_GRACE_SECONDS=60,
        QUEUE_PROCESSOR_LEASE_SECONDS=lease_s,
    )
    held = set(held_by(dsn, worker.name))
    worker.send(signal.SIGTERM)
    wait_for(lambda: bool(worker.events("worker_stopping")), timeout_s=10, what="the graceful stop")
    worker.send(signal.SIGTERM)
    rc = worker.wait(8)  # at once: not after the 10 s answer, nor the 60 s grace

    assert rc in (0, 130), worker.tail()
    assert worker.events("worker_abort")
    # Not released: the claims are still leased to the dead worker...
    still = set(held_by(dsn, worker.name))
    assert still == held
    assert counts(dsn) == {"processing": len(held), "pending": ROWS - len(held)}
    # ...until the leases lapse; then another worker takes them over and finishes.
    wait_for(
        lambda: (
            not execute(
                dsn,
                "SELECT 1 FROM embedding_queue"
                " WHERE status = 'processing' AND lease_expires_at > now()",
            )
        ),
        timeout_s=lease_s + 10,
        what="the leases to expire",
    )
    drain_the_rest(dsn, fake, workers, "shutdown-abort-finisher")
    assert_embeddings_are_of(dsn, contents)
    reclaimed = execute(dsn, "SELECT count(*) AS n FROM embedding_queue WHERE attempts = 2")
    assert reclaimed[0]["n"] == len(held)
    assert unfinished(dsn) == 0
    assert_sent_at_most_once_per_claim(dsn, fake)
    report(
        "shutdown_abort",
        rows=ROWS,
        leased_at_abort=len(held),
        reclaimed_after_lease=reclaimed[0]["n"],
        exit_code=rc,
        items_lost=0,
    )
