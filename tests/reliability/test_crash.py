"""Crash: worker processes die with kill -9 mid-batch, or freeze past their lease, while three
of them drain 5,000 rows; the queue still ends with every row embedded exactly once.

What could go wrong, and how it would show:
- a claim of a dead worker never comes back -> rows left ``processing`` / not ``done``;
- a frozen worker wakes up and writes after its rows were reclaimed (a stale claim) -> the
  write audit shows a second write of the row, or a write outside its acknowledgement;
- a row's text goes to the provider more often than the row was claimed -> duplicate work.
"""

from __future__ import annotations

import random
import signal
import time

import pytest

from tests.reliability.harness import (
    ChaosServer,
    WorkerProcess,
    Workers,
    assert_embeddings_are_of,
    assert_sent_at_most_once_per_claim,
    counts,
    held_by,
    install_write_audit,
    report,
    unfinished,
    wait_for,
    worker_env,
    writes_per_row,
)
from tests.support.helpers import execute, make_docs

ROWS = 5_000
WORKERS = 3
KILLS = 5
FREEZES = 2
LEASE_S = 2.0


@pytest.mark.slow
def test_kill_9_and_freezes_mid_batch_lose_nothing_and_write_nothing_stale(
    dsn: str, fake: ChaosServer, workers: Workers
) -> None:
    fake.latency_s = 0.05  # batches are mid-flight most of the time
    contents = make_docs(dsn, ROWS)
    install_write_audit(dsn)
    env = worker_env(
        dsn,
        fake,
        QUEUE_PROCESSOR_LEASE_SECONDS=LEASE_S,
        QUEUE_PROCESSOR_BATCH_SIZE=10,
        QUEUE_PROCESSOR_CONCURRENCY=1,
        # Several kills may hit the same row; a row must not run out of attempts here.
        QUEUE_PROCESSOR_MAX_ATTEMPTS=20,
        QUEUE_PROCESSOR_SHUTDOWN_GRACE_SECONDS=10,
    )
    generation = dict.fromkeys(range(WORKERS), 0)
    running: dict[int, WorkerProcess] = {}

    def start(slot: int) -> None:
        generation[slot] += 1
        running[slot] = workers.start(f"crash-w{slot}-g{generation[slot]}", env)

    for slot in range(WORKERS):
        start(slot)

    rng = random.Random(2024)
    kills = freezes = rows_in_killed_claims = rows_in_frozen_claims = 0
    superseded_by_frozen = 0
    plan = ["kill"] * KILLS + ["freeze"] * FREEZES
    rng.shuffle(plan)
    for action in plan:
        if unfinished(dsn) < 400:
            break  # keep the last actions inside the drain
        time.sleep(rng.uniform(0.3, 0.8))
        slot = rng.randrange(WORKERS)
        victim = running[slot]
        # Strike mid-batch: only while the worker holds claimed rows.
        wait_for(
            lambda v=victim: bool(held_by(dsn, v.name)),
            timeout_s=30,
            what=f"{victim.name} to hold a claim",
            every_s=0.01,
            watch=[victim],
        )
        if action == "kill":
            held = held_by(dsn, victim.name)
            assert victim.kill9() == -signal.SIGKILL
            kills += 1
            rows_in_killed_claims += len(held)
            start(slot)
        else:
            victim.send(signal.SIGSTOP)
            held = held_by(dsn, victim.name)
            # Frozen past its lease: the others reclaim its rows while it sleeps (unless it
            # froze inside its completion transaction: then its row locks keep them, rightly).
            deadline = time.monotonic() + LEASE_S + 5
            while set(held) & set(held_by(dsn, victim.name)) and time.monotonic() < deadline:
                time.sleep(0.05)
            victim.send(signal.SIGCONT)
            freezes += 1
            rows_in_frozen_claims += len(held)

    wait_for(
        lambda: unfinished(dsn) == 0,
        timeout_s=180,
        what="the queue to drain",
        every_s=0.2,
        watch=running.values(),
    )
    exit_codes = [worker.stop() for worker in running.values()]
    for worker in workers.started:
        superseded_by_frozen += sum(e.get("items", 0) for e in worker.events("claims_superseded"))

    assert kills >= 3, "the drain ended before the kills: make it slower"
    assert exit_codes == [0] * WORKERS, [w.tail() for w in running.values()]
    assert counts(dsn) == {"done": ROWS}
    # Every row holds the vector of its (final) content.
    assert_embeddings_are_of(dsn, contents)
    # Exactly one write per row, and it is the acknowledged one: the companion timestamp of
    # the row equals processed_at of its queue row (one transaction), so no late write landed.
    writes = writes_per_row(dsn)
    assert set(writes) == set(contents)
    assert [i for i, n in writes.items() if n != 1] == []
    late = execute(
        dsn,
        "SELECT d.id FROM docs d JOIN embedding_queue q ON q.record_id = d.id::text"
        " WHERE d.embedded_at IS DISTINCT FROM q.processed_at",
    )
    assert late == []
    # Killed claims were reclaimed (attempts count claims), and no text was sent more often
    # than its row was claimed.
    reclaimed = execute(dsn, "SELECT count(*) AS n FROM embedding_queue WHERE attempts > 1")
    assert reclaimed[0]["n"] >= 1
    repeats = assert_sent_at_most_once_per_claim(dsn, fake)
    # Every request was answered 200, except bodies cut off by a kill -9 mid-upload (the
    # server could not parse them: 400 with no inputs), at most one per kill.
    torn = [e for e in fake.request_log if e["status"] != 200]
    assert all(e["status"] == 400 and e["n_inputs"] == 0 for e in torn), torn
    assert len(torn) <= kills

    report(
        "crash",
        rows=ROWS,
        workers=WORKERS,
        kills=kills,
        restarts=kills,
        freezes_past_lease=freezes,
        rows_in_killed_claims=rows_in_killed_claims,
        rows_in_frozen_claims=rows_in_frozen_claims,
        stale_items_refused=superseded_by_frozen,
        rows_reclaimed=reclaimed[0]["n"],
        texts_resent=repeats,
        requests=fake.requests_total,
        requests_torn_by_kill=len(torn),
        writes=sum(writes.values()),
        items_lost=0,
        stale_writes=0,
    )
