"""`register --length-policy`, `run` and `status` with texts over the model's limit, as an
operator runs them: subprocesses against real Postgres and the fake server enforcing
OpenAI's text-embedding-3-small limit over HTTP."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from queue_processor.providers.tokens import openai_tokenizer
from queue_processor.testing import FakeOpenAIServer
from tests.support.helpers import (
    DIMS,
    cli_env,
    create_table,
    execute,
    insert_rows,
    queue_rows,
    run_cli,
)

MODEL = "text-embedding-3-small"
LONG = " ".join(f"item {i % 50} of the support ticket thread, reply {i}." for i in range(3000))


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=DIMS, max_input_tokens=8192) as srv:
        yield srv


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def test_register_length_policy_then_run_and_status(dsn: str, server: FakeOpenAIServer) -> None:
    env = cli_env(dsn, server, EMBEDDING_MODEL=MODEL, COLUMNS="200")
    assert ok(run_cli(["migrate"], env))
    create_table(dsn)
    create_table(dsn, table="notes")
    for table, policy in (("docs", "truncate"), ("notes", "fail")):
        done = ok(
            run_cli(
                [
                    "register",
                    table,
                    "--column",
                    "embedding",
                    "--content",
                    "body",
                    "--length-policy",
                    policy,
                ],
                env,
            )
        )
        assert f"texts over the model's input limit: {policy}" in done.stdout
    insert_rows(dsn, [(1, LONG), (2, "short")])
    insert_rows(dsn, [(1, LONG), (2, "short")], table="notes")

    done = run_cli(["run", "--drain"], env)
    assert done.returncode == 1, done.stdout  # the note under `fail` failed

    total = openai_tokenizer(MODEL).count(LONG)
    assert total > 8191
    rows = {
        (r["table_name"], r["record_id"]): r for r in execute(dsn, "SELECT * FROM embedding_queue")
    }
    assert rows["docs", "1"]["status"] == "done"
    assert rows["docs", "1"]["detail"] == f"truncated to 8,191 of {total:,} tokens"
    assert rows["notes", "1"]["status"] == "failed"
    assert "over the model's input limit of 8,191" in rows["notes", "1"]["error_message"]
    assert {rows[t, "2"]["status"] for t in ("docs", "notes")} == {"done"}
    assert 400 not in server.requests_by_status
    assert len(queue_rows(dsn)) == 2  # by record_id: both tables' rows 1 and 2

    out = ok(run_cli(["status"], env)).stdout
    cells = {
        line.strip("│ ").split("│")[0].strip(): [c.strip() for c in line.strip("│ ").split("│")]
        for line in out.splitlines()
        if line.startswith("│")
    }
    assert cells["docs"][2:] == ["0", "0", "2", "0", "1"]  # one of the two done truncated
    assert cells["notes"][2:] == ["0", "0", "1", "1", "0"]
    report = ok(run_cli(["status", "--json"], env)).stdout
    assert '"truncated": 1' in report

    bad = run_cli(
        [
            "register",
            "docs",
            "--column",
            "embedding",
            "--content",
            "body",
            "--length-policy",
            "chop",
        ],
        env,
    )
    assert bad.returncode == 2
    assert "invalid choice: 'chop'" in bad.stderr
