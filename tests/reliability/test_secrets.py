"""Secrets: the API key (and any other credential in the configuration) appears in no log line,
no printed message and no stored error message, whatever goes wrong.

Tried: a key the server rejects (401; the fake server, like OpenAI, quotes the key it got in
its error text), at debug level and with both log formats; a key that cannot be sent in a
header; timeouts and connection resets, where httpx's exceptions carry the request (headers
included); credentials in OPENAI_BASE_URL; a database password with the database unreachable.
Each run's stdout and stderr and every text column of the queue and usage tables are searched
for the secret, for its distinctive part alone, and for the Basic-auth (base64) form of URL
credentials.
"""

from __future__ import annotations

import base64
import secrets

import pytest
from psycopg import conninfo

from queue_processor.testing import DROPPED
from tests.reliability.harness import (
    ChaosServer,
    WorkerProcess,
    Workers,
    counts,
    report,
    wait_for,
    worker_env,
)
from tests.support.helpers import execute, make_docs

EXIT_CONFIG = 2
EXIT_DB = 3


def leaks(text: str, needles: list[str]) -> list[str]:
    """The needles found in ``text``."""
    return [needle for needle in needles if needle in text]


def stored_leaks(dsn: str, needles: list[str]) -> list[str]:
    """Needles found in any column of embedding_queue or embedding_usage."""
    found = []
    for needle in needles:
        row = execute(
            dsn,
            "SELECT (SELECT count(*) FROM embedding_queue q WHERE strpos(q::text, %(n)s) > 0)"
            " + (SELECT count(*) FROM embedding_usage u WHERE strpos(u::text, %(n)s) > 0) AS n",
            {"n": needle},
        )
        if row[0]["n"]:
            found.append(needle)
    return found


def secret_key() -> tuple[str, list[str]]:
    """A fresh fake API key and the strings that must never be printed or stored."""
    distinctive = secrets.token_hex(12)
    key = f"sk-test-SECRET-{distinctive}"
    return key, [key, distinctive]


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["json", "console"])
def test_rejected_key_is_never_printed_or_stored(
    dsn: str, fake: ChaosServer, workers: Workers, log_format: str
) -> None:
    make_docs(dsn, 30)
    key, needles = secret_key()
    fake.required_api_key = "sk-test-the-right-key"
    worker = workers.start(
        f"secrets-401-{log_format}",
        worker_env(
            dsn,
            fake,
            OPENAI_API_KEY=key,
            QUEUE_PROCESSOR_LOG_LEVEL="debug",
            QUEUE_PROCESSOR_LOG_FORMAT=log_format,
        ),
    )
    rc = worker.wait(60)
    output = worker.output()

    assert fake.requests_by_status[401] >= 1  # the key was sent, and refused
    assert all(entry["authorization"] for entry in fake.request_log)
    assert leaks(output, needles) == [], output
    assert stored_leaks(dsn, needles) == []
    # The worker stopped as documented for a rejected key: exit 2 with a one-line message
    # (not a traceback), and its claims were given back untouched.
    assert "rejected the API key (HTTP 401)" in output
    assert rc == EXIT_CONFIG, f"exit {rc}, expected {EXIT_CONFIG}:\n{worker.tail()}"
    assert "Traceback" not in output, worker.tail()
    assert counts(dsn) == {"pending": 30}
    assert execute(dsn, "SELECT max(attempts) AS n FROM embedding_queue")[0]["n"] == 0
    report(f"secrets_401_{log_format}", requests_401=fake.requests_by_status[401], leaks=0)


@pytest.mark.slow
def test_transport_faults_never_print_or_store_the_key(
    dsn: str, fake: ChaosServer, workers: Workers
) -> None:
    make_docs(dsn, 30)
    key, needles = secret_key()
    fake.required_api_key = key
    fake.fault_rate = 1.0
    fake.faults = ["timeout", "reset"]
    fake.timeout_sleep_s = 0.5
    worker = workers.start(
        "secrets-faults",
        worker_env(
            dsn,
            fake,
            OPENAI_API_KEY=key,
            QUEUE_PROCESSOR_LOG_LEVEL="debug",
            EMBEDDING_TIMEOUT_SECONDS=0.3,
            EMBEDDING_MAX_RETRIES=2,
            QUEUE_PROCESSOR_MAX_ATTEMPTS=2,
            QUEUE_PROCESSOR_RETRY_BASE_SECONDS=0.05,
            QUEUE_PROCESSOR_BATCH_SIZE=10,
        ),
    )
    wait_for(
        lambda: counts(dsn) == {"failed": 30},
        timeout_s=90,
        what="every item to use up its attempts",
        every_s=0.1,
        watch=[worker],
    )
    worker.stop()
    output = worker.output()
    messages = [
        r["error_message"] for r in execute(dsn, "SELECT error_message FROM embedding_queue")
    ]

    assert fake.requests_by_status[DROPPED] >= 6
    assert leaks(output, needles) == [], output
    assert stored_leaks(dsn, needles) == []
    # The stored messages still say what happened.
    assert all("timed out" in m or "failed" in m for m in messages), messages
    report(
        "secrets_transport_faults",
        requests=fake.requests_total,
        dropped=fake.requests_by_status[DROPPED],
        failed_items=len(messages),
        leaks=0,
    )


@pytest.mark.slow
def test_credentials_in_the_base_url_are_never_printed_or_stored(
    dsn: str, fake: ChaosServer, workers: Workers
) -> None:
    make_docs(dsn, 10)
    key, needles = secret_key()
    password = f"urlpass-{secrets.token_hex(8)}"
    basic = base64.b64encode(f"proxyuser:{password}".encode()).decode()
    needles += [password, basic]
    fake.required_api_key = key
    worker = workers.start(
        "secrets-url",
        worker_env(
            dsn,
            fake,
            OPENAI_API_KEY=key,
            OPENAI_BASE_URL=fake.base_url.replace("://", f"://proxyuser:{password}@"),
            QUEUE_PROCESSOR_LOG_LEVEL="debug",
        ),
    )
    wait_for(
        lambda: not worker.alive or counts(dsn)["done"] == 10,
        timeout_s=60,
        what="the drain or the worker's exit",
    )
    if worker.alive:
        worker.stop()
    output = worker.output()
    assert leaks(output, needles) == [], output
    assert stored_leaks(dsn, needles) == []
    report("secrets_base_url", requests=fake.requests_total, leaks=0)


@pytest.mark.slow
def test_unsendable_key_and_database_password_are_never_printed(
    dsn: str, fake: ChaosServer, workers: Workers
) -> None:
    make_docs(dsn, 5)
    key, needles = secret_key()
    # A key that cannot go into a header (a stray newline from a copy-paste).
    bad_key = f"{key}\nsecond-line"
    worker = workers.start("secrets-badkey", worker_env(dsn, fake, OPENAI_API_KEY=bad_key))
    rc_key = worker.wait(60)
    # A database password, with the database unreachable.
    db_password = f"dbpass-{secrets.token_hex(8)}"
    unreachable = conninfo.make_conninfo(
        dsn, host="/nonexistent-qp-socket-dir", password=db_password, connect_timeout=1
    )
    db_worker = workers.start("secrets-db", worker_env(unreachable, fake, OPENAI_API_KEY=key))
    rc_db = db_worker.wait(60)

    outputs: dict[str, WorkerProcess] = {"bad key": worker, "unreachable db": db_worker}
    for label, proc in outputs.items():
        assert leaks(proc.output(), [*needles, db_password]) == [], (label, proc.output())
    assert fake.requests_total == 0
    assert rc_key == EXIT_CONFIG, worker.tail()
    assert rc_db == EXIT_DB, db_worker.tail()
    report("secrets_bad_key_and_db_password", exit_codes=f"{rc_key}/{rc_db}", leaks=0)
