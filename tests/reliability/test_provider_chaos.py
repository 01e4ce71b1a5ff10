"""Provider chaos: 30% of embedding requests fail at random with a mix of 429 + Retry-After,
500, timeouts (the server holds the request past the client's timeout), connection resets and
slow answers, while two worker processes drain 2,000 rows.

Every fault here is transient, so the drain must complete 100% with nothing ``failed``; the
retries must show in the queue (``attempts`` counts every claim of a row, and exactly matches
the retries the workers logged) and every vector must be that of its row's content.
"""

from __future__ import annotations

import pytest

from queue_processor.testing import DROPPED, FAULT_KINDS
from tests.reliability.harness import (
    ChaosServer,
    Workers,
    assert_embeddings_are_of,
    assert_sent_at_most_once_per_claim,
    counts,
    fault_figures,
    report,
    unfinished,
    wait_for,
    worker_env,
)
from tests.support.helpers import execute, make_docs

ROWS = 2_000
FAULT_RATE = 0.3
CLIENT_TIMEOUT_S = 0.5


@pytest.mark.slow
def test_drain_completes_through_random_transient_faults(
    dsn: str, fake: ChaosServer, workers: Workers
) -> None:
    contents = make_docs(dsn, ROWS)
    fake.latency_s = 0.01
    fake.fault_rate = FAULT_RATE
    fake.faults = list(FAULT_KINDS)
    fake.retry_after_s = 0.3
    fake.timeout_sleep_s = CLIENT_TIMEOUT_S + 0.2  # just past the client's timeout
    fake.slow_s = 0.2  # late, but inside the client's timeout
    env = worker_env(
        dsn,
        fake,
        QUEUE_PROCESSOR_BATCH_SIZE=10,
        QUEUE_PROCESSOR_CONCURRENCY=2,
        EMBEDDING_TIMEOUT_SECONDS=CLIENT_TIMEOUT_S,
        # Two HTTP attempts per request, so that whole batches regularly go back to the queue
        # too (p = 0.3^2 per request) and exercise the queue-level retry, not only httpx's.
        EMBEDDING_MAX_RETRIES=2,
        QUEUE_PROCESSOR_RETRY_BASE_SECONDS=0.1,
        QUEUE_PROCESSOR_RETRY_MAX_SECONDS=1,
        QUEUE_PROCESSOR_MAX_ATTEMPTS=25,
    )
    running = [workers.start(f"chaos-w{n}", env) for n in range(2)]
    wait_for(
        lambda: unfinished(dsn) == 0,
        timeout_s=150,
        what="the drain to complete",
        every_s=0.2,
        watch=running,
    )
    assert [w.stop() for w in running] == [0, 0], [w.tail() for w in running]

    # 100%: nothing failed, every vector is right.
    assert counts(dsn) == {"done": ROWS}
    assert_embeddings_are_of(dsn, contents)
    leftovers = execute(
        dsn, "SELECT count(*) AS n FROM embedding_queue WHERE error_message IS NOT NULL"
    )
    assert leftovers[0]["n"] == 0  # a successful item keeps no stale error

    # Every kind of fault was really injected, and reached the client as what it is.
    injected = fake.stats()["faults_injected"]
    assert set(injected) == set(FAULT_KINDS), injected
    assert fake.requests_by_status[429] == injected["429"]
    assert fake.requests_by_status[500] == injected["500"]
    assert fake.requests_by_status[DROPPED] == injected["timeout"] + injected["reset"]

    # Attempts are recorded: each row's attempts is the number of times it was claimed, and
    # the extra claims are exactly the items the workers sent back to the queue.
    retried_logged = sum(e["retried"] for w in running for e in w.events("batch_retry"))
    row = execute(
        dsn, "SELECT sum(attempts - 1) AS extra, max(attempts) AS most FROM embedding_queue"
    )
    assert retried_logged > 0, "no batch went back to the queue: the queue-level retry is untested"
    assert row[0]["extra"] == retried_logged
    repeats = assert_sent_at_most_once_per_claim(dsn, fake)
    http_retries = sum(len(w.events("provider_retry")) for w in running)
    assert http_retries > 0

    report(
        "provider_chaos",
        rows=ROWS,
        fault_rate=FAULT_RATE,
        **fault_figures(fake),
        http_retries=http_retries,
        items_requeued=retried_logged,
        max_attempts_of_a_row=row[0]["most"],
        texts_resent=repeats,
        failed=0,
        items_lost=0,
    )
