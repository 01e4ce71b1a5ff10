"""The operator commands of ``queue-processor`` (issue 4) as real subprocesses.

Every command runs as the installed console script with the environment an operator sets
(DATABASE_URL, OPENAI_BASE_URL, JSON logs, a wide terminal) against a fresh database and the
fake OpenAI server. Tests check exit codes, what was printed (``--json`` where there is one)
and, above all, the database: the queue rows a command moved, queued or deleted, the columns
and indexes it created, and the requests the fake server received.

Queue states that would take a worker and injected faults to reach (failed items with given
messages, in-flight claims, old done rows) are set up with plain SQL, as an operator's
history would have left them; the commands under test never see the difference.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pty
import re
import select
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import anyio
import numpy as np
import pytest
from psycopg import sql

from queue_processor import queue, targets
from queue_processor.db import Database, float4_array
from queue_processor.db import statement as db_statement
from queue_processor.models import STATUSES, Target
from queue_processor.testing import FakeOpenAIServer, fake_token_count, fake_vector
from tests.support.helpers import (
    DIMS,
    MODEL,
    QUEUE_PROCESSOR,
    body,
    cli_env,
    create_table,
    execute,
    insert_rows,
    make_docs,
    queue_rows,
    register,
    run_cli,
    seed_status_counts,
    status_counts,
    summary_counts,
    vector_rows,
)

SUBCOMMANDS = (
    "migrate",
    "register",
    "build-index",
    "unregister",
    "bind",
    "run",
    "status",
    "requeue",
    "enqueue",
    "estimate",
    "search",
    "purge",
    "grant-worker",
    "db-url",
    "demo",
    "db-stop",
)


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=DIMS) as srv:
        yield srv


@pytest.fixture
def env(dsn: str, server: FakeOpenAIServer) -> dict[str, str]:
    """The operator's environment; COLUMNS keeps rich tables on one line per row."""
    return cli_env(dsn, server, COLUMNS="200")


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """Assert a clean exit (0, no traceback) and return the process."""
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    return done


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    """The JSON document a successful ``--json`` command printed."""
    return json.loads(ok(done).stdout)


def usage_error(done: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """Assert a failed run with ``code``, a one-line message and no traceback; return stderr."""
    assert done.returncode == code, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    return done.stderr


def queue_snapshot(dsn: str) -> list[tuple[Any, ...]]:
    """Everything a command could change about the queue, in a comparable form."""
    rows = execute(
        dsn,
        "SELECT id, table_name, record_id, embedding_column, status, attempts, error_message,"
        " generation, next_attempt_at, processed_at FROM embedding_queue ORDER BY id",
    )
    return [tuple(r.values()) for r in rows]


def notes_table(dsn: str, n: int) -> None:
    """``notes`` with two registered targets (title_embedding, body_embedding), n rows queued."""
    execute(
        dsn,
        f"CREATE TABLE notes (id integer PRIMARY KEY, title text, body text, "
        f"title_embedding vector({DIMS}), body_embedding vector({DIMS}))",
    )
    register(dsn, "notes", "title_embedding", content_columns=["title"], companions=False)
    register(dsn, "notes", "body_embedding", content_columns=["body"], companions=False)
    execute(
        dsn,
        "INSERT INTO notes (id, title, body) "
        "SELECT g, 'note title ' || g, 'note body ' || g FROM generate_series(1, %s) AS g",
        (n,),
    )


def mark_done(dsn: str, *, table: str = "docs", where: str = "true") -> None:
    """As a drain would leave rows: a vector in the target column and the queue row done.
    Writing the vector changes no content, so the update trigger queues nothing."""
    unit = "[" + ",".join(["1"] + ["0"] * (DIMS - 1)) + "]"
    execute(
        dsn,
        sql.SQL("UPDATE {} SET embedding = %s::vector WHERE {}").format(
            sql.Identifier(table), sql.SQL(where)
        ),
        (unit,),
    )
    execute(
        dsn,
        sql.SQL(
            "UPDATE embedding_queue SET status = 'done', processed_at = now(), attempts = 1"
            " WHERE table_name = %s AND record_id IN (SELECT id::text FROM {} WHERE {})"
        ).format(sql.Identifier(table), sql.SQL(where)),
        (table,),
    )


def fail_items(dsn: str, messages: dict[str, str], *, table: str = "docs") -> None:
    """Mark queue rows of ``table`` failed (3 attempts used) with a message per record id."""
    execute(
        dsn,
        "UPDATE embedding_queue AS q SET status = 'failed', attempts = 3, processed_at = now(),"
        " error_message = m.message, next_attempt_at = now() + interval '1 hour'"
        "  FROM unnest(%s::text[], %s::text[]) AS m(record_id, message)"
        " WHERE q.table_name = %s AND q.record_id = m.record_id",
        (list(messages), list(messages.values()), table),
    )


def ids_of(rows: list[dict[str, Any]]) -> set[str]:
    return {str(r["record_id"]) for r in rows}


def tokens_estimate(texts: list[str]) -> int:
    """The documented estimate: one token per 4 UTF-8 bytes, rounded up, at least 1."""
    return sum(max(1, math.ceil(len(t.encode()) / 4)) for t in texts)


# --- register ------------------------------------------------------------------------------


def test_register_creates_column_and_hnsw_index_and_backfills(
    dsn: str, env: dict[str, str], server: FakeOpenAIServer
) -> None:
    execute(dsn, "CREATE TABLE articles (id bigint PRIMARY KEY, title text, body text)")
    execute(
        dsn,
        "INSERT INTO articles VALUES (1, 'Alpha', 'first body'), (2, 'Beta', 'second body'),"
        " (3, 'Gamma', NULL), (4, NULL, '   ')",  # row 4: blank content, never queued
    )
    done = ok(
        run_cli(
            [
                "register",
                "articles",
                "--column",
                "embedding",
                "--content",
                "title",
                "--content",
                "body",
                "--create-column",
                "--dimensions",
                str(DIMS),
                "--index",
                "hnsw",
                "--backfill",
            ],
            env,
        )
    )
    assert f"column embedding is vector({DIMS})" in done.stdout
    assert "index articles_embedding_hnsw_idx" in done.stdout
    assert "registered articles.embedding" in done.stdout

    column = execute(
        dsn,
        "SELECT format_type(atttypid, atttypmod) AS type FROM pg_attribute"
        " WHERE attrelid = 'articles'::regclass AND attname = 'embedding'",
    )
    assert column == [{"type": f"vector({DIMS})"}]
    index = execute(
        dsn,
        "SELECT i.indexdef, c.reloptions FROM pg_indexes AS i"
        " JOIN pg_class AS c ON c.relname = i.indexname"
        " WHERE i.tablename = 'articles' AND i.indexname = 'articles_embedding_hnsw_idx'",
    )
    assert len(index) == 1
    assert "USING hnsw (embedding vector_cosine_ops)" in index[0]["indexdef"]
    assert sorted(index[0]["reloptions"]) == ["ef_construction=64", "m=16"]
    target = execute(dsn, "SELECT * FROM embedding_targets WHERE table_name = 'articles'")
    assert [(t["content_columns"], t["column_type"], t["dimensions"]) for t in target] == [
        (["title", "body"], "vector", DIMS)
    ]

    # --backfill queued the existing rows with their content; the triggers queue new ones.
    expected = {"1": "Alpha\nfirst body", "2": "Beta\nsecond body", "3": "Gamma"}
    rows = queue_rows(dsn)
    assert {k: (r["status"], r["content"]) for k, r in rows.items()} == {
        k: ("pending", v) for k, v in expected.items()
    }
    execute(dsn, "INSERT INTO articles VALUES (5, 'Delta', 'fifth body')")
    expected["5"] = "Delta\nfifth body"
    assert queue_rows(dsn)["5"]["content"] == expected["5"]

    # And the worker fills the new column with the vectors of exactly that content.
    drained = ok(run_cli(["run", "--drain"], env))
    assert summary_counts(drained.stdout)["processed"] == 4
    stored = vector_rows(dsn, "articles")
    assert stored[4] is None
    for key, content in expected.items():
        got = stored[int(key)]
        assert got is not None
        np.testing.assert_array_equal(got, fake_vector(content, DIMS))


def test_register_template_turns_backslash_n_into_a_newline(dsn: str, env: dict[str, str]) -> None:
    execute(
        dsn,
        f"CREATE TABLE movies (id integer PRIMARY KEY, title text, genre text,"
        f" embedding vector({DIMS}))",
    )
    execute(
        dsn,
        "INSERT INTO movies (id, title, genre) VALUES (1, 'Alien', 'sci-fi'),"
        " (2, 'Heat', 'crime'), (3, 'Up', 'animation')",
    )
    mark_done(dsn, table="movies", where="id = 3")  # already embedded: --backfill skips it
    done = ok(
        run_cli(
            [
                "register",
                "movies",
                "--column",
                "embedding",
                "--template",
                r"Title: {title}\nGenre: {genre}",  # typed by the operator: backslash, n
                "--backfill",
            ],
            env,
        )
    )
    assert "registered movies.embedding" in done.stdout
    [target] = execute(dsn, "SELECT * FROM embedding_targets WHERE table_name = 'movies'")
    assert target["content_template"] == "Title: {title}\nGenre: {genre}"
    assert target["content_columns"] == ["title", "genre"]
    assert {k: (r["status"], r["content"]) for k, r in queue_rows(dsn).items()} == {
        "1": ("pending", "Title: Alien\nGenre: sci-fi"),
        "2": ("pending", "Title: Heat\nGenre: crime"),
    }


def test_register_template_keeps_non_ascii_text(dsn: str, env: dict[str, str]) -> None:
    """A template is text: only its escapes are decoded, accented letters stay as typed."""
    execute(
        dsn,
        f"CREATE TABLE films (id integer PRIMARY KEY, titre text, genre text,"
        f" embedding vector({DIMS}))",
    )
    execute(dsn, "INSERT INTO films (id, titre, genre) VALUES (1, 'Amélie', 'comédie')")
    ok(
        run_cli(
            [
                "register",
                "films",
                "--column",
                "embedding",
                "--template",
                r"Titre : {titre}\nRésumé — {genre}",
                "--backfill",
            ],
            env,
        )
    )
    [target] = execute(dsn, "SELECT content_template FROM embedding_targets")
    assert target["content_template"] == "Titre : {titre}\nRésumé — {genre}"
    assert queue_rows(dsn)["1"]["content"] == "Titre : Amélie\nRésumé — comédie"


def test_register_create_column_above_2000_dimensions_makes_halfvec(
    dsn: str, env: dict[str, str]
) -> None:
    execute(dsn, "CREATE TABLE big (id bigint PRIMARY KEY, body text)")
    done = ok(
        run_cli(
            [
                "register",
                "big",
                "--column",
                "embedding",
                "--content",
                "body",
                "--create-column",
                "--dimensions",
                "3000",
                "--index",
                "hnsw",
            ],
            env,
        )
    )
    assert "column embedding is halfvec(3000)" in done.stdout
    column = execute(
        dsn,
        "SELECT format_type(atttypid, atttypmod) AS type FROM pg_attribute"
        " WHERE attrelid = 'big'::regclass AND attname = 'embedding'",
    )
    assert column == [{"type": "halfvec(3000)"}]
    [index] = execute(
        dsn, "SELECT indexdef FROM pg_indexes WHERE tablename = 'big' AND indexname <> 'big_pkey'"
    )
    assert "USING hnsw (embedding halfvec_cosine_ops)" in index["indexdef"]
    [target] = execute(dsn, "SELECT column_type, dimensions FROM embedding_targets")
    assert (target["column_type"], target["dimensions"]) == ("halfvec", 3000)


def test_register_backfill_reports_the_rows_it_queued(dsn: str, env: dict[str, str]) -> None:
    """The message after --backfill counts this target's rows, not the whole queue's."""
    make_docs(dsn, 4)  # four items of another target are already pending
    execute(dsn, "CREATE TABLE small (id bigint PRIMARY KEY, body text)")
    execute(dsn, "INSERT INTO small VALUES (1, 'one'), (2, 'two')")
    done = ok(
        run_cli(
            [
                "register",
                "small",
                "--column",
                "embedding",
                "--content",
                "body",
                "--create-column",
                "--dimensions",
                str(DIMS),
                "--backfill",
            ],
            env,
        )
    )
    assert status_counts(dsn) == {"pending": 6}
    assert "queued for embedding: 2 " in done.stdout, done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["docs", "--column", "nope", "--content", "body"], "table docs has no column nope"),
        (["docs", "--column", "embedding", "--content", "nobody"], "has no column nobody"),
        (["nosuch", "--column", "embedding", "--content", "body"], '"nosuch" does not exist'),
        (
            ["docs", "--column", "fresh", "--content", "body", "--create-column"],
            "--create-column needs --dimensions",
        ),
    ],
    ids=["missing-target-column", "missing-content-column", "missing-table", "no-dimensions"],
)
def test_register_errors_exit_nonzero_with_a_clear_message(
    dsn: str, env: dict[str, str], args: list[str], message: str
) -> None:
    create_table(dsn)
    done = run_cli(["register", *args], env)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert message in done.stderr
    assert execute(dsn, "SELECT count(*) AS n FROM embedding_targets") == [{"n": 0}]
    columns = execute(
        dsn, "SELECT attname FROM pg_attribute WHERE attrelid = 'docs'::regclass AND attnum > 0"
    )
    assert "fresh" not in {c["attname"] for c in columns}


# --- status --------------------------------------------------------------------------------


def seed_every_status(dsn: str, env: dict[str, str], server: FakeOpenAIServer) -> None:
    """A queue with rows in all four statuses, over two tables and three target columns.

    docs: 10 rows drained by the real worker, two rejected by the provider (failed), eight
    done (three of them backdated 10 minutes); notes: 4 rows x 2 columns, two items held by
    another worker (processing), one pending item in backoff (not due), one queued an hour ago.
    """
    make_docs(dsn, 10)
    server.reject_inputs = {body(3), body(7)}
    drained = run_cli(["run", "--drain"], env)
    assert drained.returncode == 1, drained.stderr  # two items failed
    server.reject_inputs = set()
    execute(
        dsn,
        "UPDATE embedding_queue SET processed_at = now() - interval '10 minutes'"
        " WHERE table_name = 'docs' AND record_id IN ('1', '2', '4')",
    )
    notes_table(dsn, 4)
    execute(
        dsn,
        "UPDATE embedding_queue SET status = 'processing', attempts = 1, claimed_by = 'other',"
        " claim_token = gen_random_uuid(), lease_expires_at = now() + interval '10 minutes'"
        " WHERE table_name = 'notes' AND record_id IN ('1', '2')"
        "   AND embedding_column = 'title_embedding'",
    )
    execute(
        dsn,
        "UPDATE embedding_queue SET next_attempt_at = now() + interval '1 hour', attempts = 1"
        " WHERE table_name = 'notes' AND record_id = '3' AND embedding_column = 'body_embedding'",
    )
    execute(
        dsn,
        "UPDATE embedding_queue SET created_at = now() - interval '1 hour'"
        " WHERE table_name = 'notes' AND record_id = '4' AND embedding_column = 'body_embedding'",
    )


def test_status_json_equals_the_seed_sql(
    dsn: str, env: dict[str, str], server: FakeOpenAIServer
) -> None:
    seed_every_status(dsn, env, server)
    report = as_json(
        run_cli(["status", "--json"], {**env, "EMBEDDING_PRICE_PER_MILLION_TOKENS": "0.5"})
    )

    by_table: Counter[tuple[str, str]] = Counter()
    for row in report["counts"]:
        by_table[(row["table_name"], row["status"])] += row["count"]
    seed = seed_status_counts(dsn)
    assert dict(by_table) == seed
    assert {s for _, s in seed} == set(STATUSES)  # the queue really has all four
    per_column = {
        (r["table_name"], r["embedding_column"], r["status"]): r["count"] for r in report["counts"]
    }
    assert per_column == {
        ("docs", "embedding", "done"): 8,
        ("docs", "embedding", "failed"): 2,
        ("notes", "body_embedding", "pending"): 4,
        ("notes", "title_embedding", "pending"): 2,
        ("notes", "title_embedding", "processing"): 2,
    }

    summary = report["summary"]
    assert {k: summary[k] for k in STATUSES} == {
        "pending": 6,
        "processing": 2,
        "done": 8,
        "failed": 2,
    }
    assert summary["pending_due"] == 5  # one item waits for its backoff
    assert 3600 <= summary["oldest_pending_seconds"] < 3600 + 600
    assert summary["done_last_1m"] == summary["done_last_5m"] == 5
    assert summary["done_last_15m"] == 8

    failures = report["recent_failures"]
    assert ids_of(failures) == {"3", "7"}
    for failure in failures:
        assert failure["table_name"] == "docs"
        assert "maximum context length" in failure["error_message"]

    # Usage of the drain: what the fake server answered, priced at the override.
    served_tokens = sum(n * fake_token_count(text) for text, n in server.input_counts.items())
    assert served_tokens > 0
    [usage] = report["usage"]
    assert usage["model"] == MODEL
    assert usage["items_total"] == 10  # items sent, the two the provider rejected included
    assert usage["tokens_total"] == served_tokens
    assert usage["tokens_last_1m"] == served_tokens
    assert usage["requests_total"] == server.stats()["requests_total"]
    assert usage["estimated_cost_usd"] == pytest.approx(served_tokens * 0.5 / 1e6)


def test_status_human_output_shows_tables_counts_and_failures(
    dsn: str, env: dict[str, str], server: FakeOpenAIServer
) -> None:
    seed_every_status(dsn, env, server)
    out = ok(run_cli(["status"], env)).stdout

    rows: dict[tuple[str, str], list[int]] = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 3 + len(STATUSES) and cells[0] in ("docs", "notes"):
            rows[(cells[0], cells[1])] = [int(c) for c in cells[2:]]
    # columns: pending, processing, done, failed, truncated (of done)
    assert rows == {
        ("docs", "embedding"): [0, 0, 8, 2, 0],
        ("notes", "body_embedding"): [4, 0, 0, 0, 0],
        ("notes", "title_embedding"): [2, 2, 0, 0, 0],
    }
    assert re.search(r"oldest pending: 6[01]m", out), out
    assert "due now: 5" in out
    assert "done in the last 1m/5m/15m: 5/5/8" in out
    assert f"model {MODEL}:" in out
    assert "recent failures" in out
    assert "maximum context" in out


def test_status_watch_refreshes_when_piped(dsn: str, env: dict[str, str]) -> None:
    """`status --watch > file` (or under systemd/ssh without a tty) prints every refresh."""
    make_docs(dsn, 2)
    # `timeout` sends SIGINT (Ctrl-C) after 6 s; --preserve-status reports the command's code.
    done = subprocess.run(
        [
            "timeout",
            "--preserve-status",
            "--signal=INT",
            "--kill-after=20",
            "6",
            QUEUE_PROCESSOR,
            "status",
            "--watch",
            "--interval",
            "0.2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 130, done.stderr  # KeyboardInterrupt, handled: not a crash
    assert "Traceback" not in done.stderr
    assert "docs" in done.stdout
    assert done.stdout.count("embedding_queue") >= 2, done.stdout


def test_status_watch_redraws_on_a_terminal_until_ctrl_c(dsn: str, env: dict[str, str]) -> None:
    make_docs(dsn, 2)
    execute(dsn, "CREATE TABLE zebra (id bigint PRIMARY KEY, body text)")
    execute(dsn, f"ALTER TABLE zebra ADD COLUMN embedding vector({DIMS})")
    register(dsn, "zebra", companions=False)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [QUEUE_PROCESSOR, "status", "--watch", "--interval", "0.2"],
        env={**env, "NO_COLOR": "1", "TERM": "xterm"},
        stdout=slave,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(slave)
    screen = b""

    def read_until(wanted: bytes, count: int = 1) -> None:
        nonlocal screen
        deadline = time.monotonic() + 30  # liveness bound only
        while screen.count(wanted) < count:
            assert time.monotonic() < deadline, screen.decode(errors="replace")
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                screen += os.read(master, 65536)

    try:
        read_until(b"embedding_queue")
        assert b"zebra" not in screen
        # A row queued now shows up in a later frame: the view is refreshed, not replayed.
        insert_rows(dsn, [(1, "a zebra")], table="zebra")
        read_until(b"zebra")
        read_until(b"embedding_queue", 3)
        proc.send_signal(signal.SIGINT)
        # Keep reading the terminal meanwhile: a terminal nobody reads fills up, and a
        # redraw blocked in write() cannot notice the signal (a real terminal always reads).
        deadline = time.monotonic() + 30  # liveness bound only
        while proc.poll() is None:
            assert time.monotonic() < deadline, "status --watch did not exit on Ctrl-C"
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                with contextlib.suppress(OSError):
                    os.read(master, 65536)
        assert proc.returncode == 130
        assert proc.stderr is not None
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        os.close(master)
    assert "Traceback" not in stderr


# --- requeue -------------------------------------------------------------------------------

ERRORS = {
    "2": "HTTP 400: 100% of the tokens are over the limit",
    "4": "HTTP 400: 1000 tokens over the limit",  # contains "100", but not "100%"
    "6": "invalid bad_value in the response",
    "8": "invalid badXvalue in the response",  # "bad_value" as a LIKE pattern would match
}


def failed_queue(dsn: str) -> None:
    """docs 1..25: 1..20 failed (messages above, else a 500), 21..25 done; notes 1..3 x 2
    columns failed."""
    make_docs(dsn, 25)
    mark_done(dsn, where="id > 20")
    fail_items(dsn, {str(i): ERRORS.get(str(i), "HTTP 500: server error") for i in range(1, 21)})
    notes_table(dsn, 3)
    fail_items(dsn, {str(i): "HTTP 500: server error" for i in range(1, 4)}, table="notes")


def failed_ids(dsn: str) -> set[tuple[str, str, str]]:
    rows = execute(
        dsn,
        "SELECT table_name, embedding_column, record_id FROM embedding_queue"
        " WHERE status = 'failed'",
    )
    return {(r["table_name"], r["embedding_column"], r["record_id"]) for r in rows}


def assert_requeued(dsn: str, keys: set[tuple[str, str, str]]) -> None:
    """These items are pending again with a fresh budget; nothing else changed status."""
    rows = execute(
        dsn,
        "SELECT table_name, embedding_column, record_id, status, attempts, error_message,"
        " claim_token, next_attempt_at <= now() AS due FROM embedding_queue",
    )
    for r in rows:
        if (r["table_name"], r["embedding_column"], r["record_id"]) in keys:
            assert (r["status"], r["attempts"], r["error_message"], r["claim_token"], r["due"]) == (
                "pending",
                0,
                None,
                None,
                True,
            ), r


def test_requeue_dry_run_lists_and_moves_nothing(dsn: str, env: dict[str, str]) -> None:
    failed_queue(dsn)
    before = queue_snapshot(dsn)
    report = as_json(run_cli(["requeue", "--dry-run", "--json"], env))
    assert report["dry_run"] is True
    assert report["count"] == 26
    assert {(i["table_name"], i["embedding_column"], i["record_id"]) for i in report["items"]} == (
        failed_ids(dsn)
    )
    messages = {(i["table_name"], i["record_id"]): i["error_message"] for i in report["items"]}
    assert {messages[("docs", k)] for k in ERRORS} == set(ERRORS.values())
    human = ok(run_cli(["requeue", "--dry-run", "--table", "docs", "--error", "100%"], env))
    assert "would requeue 1 failed item(s)" in human.stdout
    assert ERRORS["2"] in human.stdout
    assert queue_snapshot(dsn) == before


def test_requeue_by_table_and_id_ranges(dsn: str, env: dict[str, str]) -> None:
    failed_queue(dsn)
    before = failed_ids(dsn)
    report = as_json(run_cli(["requeue", "--table", "docs", "--ids", "1,5,10-20", "--json"], env))
    wanted = {"1", "5", *map(str, range(10, 21))}
    assert report["dry_run"] is False
    assert ids_of(report["items"]) == wanted
    moved = {("docs", "embedding", i) for i in wanted}
    assert failed_ids(dsn) == before - moved
    assert_requeued(dsn, moved)
    assert status_counts(dsn) == {"pending": 13, "failed": 26 - 13, "done": 5}

    stderr = usage_error(run_cli(["requeue", "--ids", "1,2"], env))
    assert "--ids needs --table" in stderr


def test_requeue_by_column(dsn: str, env: dict[str, str]) -> None:
    failed_queue(dsn)
    before = failed_ids(dsn)
    done = ok(run_cli(["requeue", "--table", "notes", "--column", "title_embedding"], env))
    assert "requeued 3 failed item(s)" in done.stdout
    moved = {("notes", "title_embedding", str(i)) for i in range(1, 4)}
    assert failed_ids(dsn) == before - moved
    assert_requeued(dsn, moved)


def test_requeue_error_text_is_matched_literally(dsn: str, env: dict[str, str]) -> None:
    failed_queue(dsn)
    before = failed_ids(dsn)
    percent = as_json(run_cli(["requeue", "--error", "100%", "--json"], env))
    assert ids_of(percent["items"]) == {"2"}
    underscore = as_json(run_cli(["requeue", "--error", "bad_value", "--json"], env))
    assert ids_of(underscore["items"]) == {"6"}
    moved = {("docs", "embedding", "2"), ("docs", "embedding", "6")}
    assert failed_ids(dsn) == before - moved
    assert_requeued(dsn, moved)


def test_requeue_without_filters_moves_every_failed_item(dsn: str, env: dict[str, str]) -> None:
    failed_queue(dsn)
    everything = failed_ids(dsn)
    done = ok(run_cli(["requeue"], env))
    assert "requeued 26 failed item(s)" in done.stdout
    assert failed_ids(dsn) == set()
    assert_requeued(dsn, everything)
    assert status_counts(dsn) == {"pending": 26, "done": 5}


# --- enqueue -------------------------------------------------------------------------------


def test_enqueue_missing_queues_only_null_embeddings(dsn: str, env: dict[str, str]) -> None:
    make_docs(dsn, 6)
    mark_done(dsn)
    execute(dsn, "UPDATE docs SET embedding = NULL WHERE id IN (2, 4)")
    assert status_counts(dsn) == {"done": 6}  # clearing a vector queues nothing by itself

    report = as_json(run_cli(["enqueue", "docs", "--missing", "--json"], env))
    assert report == {"table": "docs", "column": "embedding", "mode": "missing", "queued": 2}
    rows = queue_rows(dsn)
    assert {k for k, r in rows.items() if r["status"] == "pending"} == {"2", "4"}
    assert rows["2"]["content"] == body(2)

    # No flag means --missing; nothing is missing twice over.
    mark_done(dsn)
    done = ok(run_cli(["enqueue", "docs"], env))
    assert "queued 0 row(s) of docs.embedding (missing)" in done.stdout
    assert status_counts(dsn) == {"done": 6}


@pytest.mark.parametrize("flag", ["--all", "--force"])
def test_enqueue_all_re_pends_done_rows(dsn: str, env: dict[str, str], flag: str) -> None:
    make_docs(dsn, 6)
    mark_done(dsn)
    generations = {k: r["generation"] for k, r in queue_rows(dsn).items()}
    report = as_json(run_cli(["enqueue", "docs", flag, "--json"], env))
    assert (report["mode"], report["queued"]) == ("all", 6)
    rows = queue_rows(dsn)
    assert {r["status"] for r in rows.values()} == {"pending"}
    assert all(rows[k]["generation"] == g + 1 for k, g in generations.items())
    assert all(r["attempts"] == 0 for r in rows.values())


def test_enqueue_ids_with_ranges(dsn: str, env: dict[str, str]) -> None:
    make_docs(dsn, 8)
    mark_done(dsn)
    report = as_json(run_cli(["enqueue", "docs", "--ids", "1,3-5,99", "--json"], env))
    assert (report["mode"], report["queued"]) == ("ids", 4)  # 99 is not a row
    rows = queue_rows(dsn)
    assert {k for k, r in rows.items() if r["status"] == "pending"} == {"1", "3", "4", "5"}
    assert "99" not in rows


def test_enqueue_unknown_table_exits_2_with_a_hint(dsn: str, env: dict[str, str]) -> None:
    make_docs(dsn, 1)
    stderr = usage_error(run_cli(["enqueue", "nosuch"], env))
    assert "no registered target for table 'nosuch'" in stderr
    assert "queue-processor register" in stderr


def test_enqueue_table_with_two_targets_needs_column(dsn: str, env: dict[str, str]) -> None:
    notes_table(dsn, 3)
    execute(dsn, "UPDATE embedding_queue SET status = 'done'")
    stderr = usage_error(run_cli(["enqueue", "notes", "--all"], env))
    assert "body_embedding, title_embedding" in stderr
    assert "--column" in stderr
    assert status_counts(dsn) == {"done": 6}

    report = as_json(
        run_cli(["enqueue", "notes", "--column", "body_embedding", "--all", "--json"], env)
    )
    assert (report["column"], report["queued"]) == ("body_embedding", 3)
    pending = execute(
        dsn, "SELECT DISTINCT embedding_column FROM embedding_queue WHERE status = 'pending'"
    )
    assert pending == [{"embedding_column": "body_embedding"}]


# --- estimate ------------------------------------------------------------------------------


def test_estimate_prices_queued_work_and_sends_nothing(
    dsn: str, env: dict[str, str], server: FakeOpenAIServer
) -> None:
    contents = make_docs(dsn, 9)
    execute(dsn, "UPDATE docs SET body = 'Ünïcödé — 東京の夜景' WHERE id = 9")  # 4-byte tokens
    contents[9] = "Ünïcödé — 東京の夜景"
    execute(
        dsn,  # in flight elsewhere: still work that will be paid for
        "UPDATE embedding_queue SET status = 'processing', claim_token = gen_random_uuid(),"
        " lease_expires_at = now() + interval '5 minutes' WHERE record_id = '1'",
    )
    mark_done(dsn, where="id = 8")  # done: not in the estimate
    queued = [c for i, c in contents.items() if i != 8]
    tokens = tokens_estimate(queued)
    assert abs(tokens - sum(len(c.encode()) for c in queued) / 4) <= len(queued)
    rates = {
        "EMBEDDING_MODEL": "text-embedding-3-small",
        "EMBEDDING_REQUESTS_PER_MINUTE": "3",
        "EMBEDDING_TOKENS_PER_MINUTE": "40",
        "EMBEDDING_MAX_INPUTS_PER_REQUEST": "4",
    }
    before = queue_snapshot(dsn)

    report = as_json(run_cli(["estimate", "--json"], {**env, **rates}))
    assert report["model"] == "text-embedding-3-small"
    assert report["items"] == 8
    assert report["estimated_tokens"] == tokens
    assert report["estimated_requests"] == 2  # 8 items, 4 per request
    assert report["price_per_million_tokens_usd"] == 0.02
    assert report["estimated_cost_usd"] == pytest.approx(tokens * 0.02 / 1e6)
    assert report["minutes_at_rate_limits"] == pytest.approx(max(2 / 3, tokens / 40))
    assert [(t["table_name"], t["items"], t["tokens"]) for t in report["targets"]] == [
        ("docs", 8, tokens)
    ]

    human = ok(run_cli(["estimate"], {**env, **rates})).stdout
    assert f"8 item(s), ~{tokens} tokens, ~2 request(s) with model text-embedding-3-small" in human
    assert f"${tokens * 0.02 / 1e6:.4f} at $0.02/1M tokens" in human
    assert f"~{max(2 / 3, tokens / 40):.1f} min" in human

    assert queue_snapshot(dsn) == before
    assert server.stats()["requests_total"] == 0


def test_estimate_of_a_re_embed_queues_nothing(
    dsn: str, env: dict[str, str], server: FakeOpenAIServer
) -> None:
    contents = make_docs(dsn, 6)
    mark_done(dsn, where="id <= 4")
    before = queue_snapshot(dsn)

    everything = as_json(
        run_cli(
            ["estimate", "docs", "--all", "--json"],
            {**env, "EMBEDDING_PRICE_PER_MILLION_TOKENS": "1.5"},
        )
    )
    tokens_all = tokens_estimate(list(contents.values()))
    assert (everything["items"], everything["estimated_tokens"]) == (6, tokens_all)
    assert [t["scope"] for t in everything["targets"]] == ["backfill (all)"]
    assert everything["estimated_cost_usd"] == pytest.approx(tokens_all * 1.5 / 1e6)

    missing = as_json(run_cli(["estimate", "docs", "--json"], env))
    assert (missing["items"], missing["estimated_tokens"]) == (
        2,
        tokens_estimate([contents[5], contents[6]]),
    )
    assert missing["estimated_cost_usd"] is None  # no built-in price for the test model
    human = ok(run_cli(["estimate", "docs", "--force"], env)).stdout
    assert "unknown (set EMBEDDING_PRICE_PER_MILLION_TOKENS)" in human
    assert "no rate limits configured" in human

    assert queue_snapshot(dsn) == before
    assert server.stats()["requests_total"] == 0


# --- search --------------------------------------------------------------------------------


async def _explain_search(dsn: str, query: np.ndarray, k: int) -> str:
    """EXPLAIN of the statement `search` runs, as the product builds and binds it."""
    async with Database(dsn, max_size=1) as db:
        target: Target = next(t for t in await queue.list_targets(db) if t.table_name == "docs")
        async with db.connection() as conn:
            vtype = await db.fetch_one(
                conn,
                db_statement("vector_type", qs="public"),
                {"schema": "public", "table": "docs", "column": "embedding"},
            )
            assert vtype is not None
            statement = targets.search_statement(target, vtype["type_schema"], vtype["type_name"])
            # Five rows fit in one page: the planner rightly prefers a sequential scan and a
            # top-k sort to any index, so the plan would not tell whether the index *can*
            # serve the ORDER BY. Disabling seq scans (this transaction only) asks exactly
            # that; on a real table the planner picks the HNSW scan by cost.
            await conn.execute("SET LOCAL enable_seqscan = off")
            rows = await db.fetch_all(
                conn,
                sql.SQL("EXPLAIN {}").format(statement),
                {"query": float4_array(query), "k": k},
            )
    return "\n".join(r["QUERY PLAN"] for r in rows)


def test_search_finds_the_row_whose_text_it_is_given(
    dsn: str, env: dict[str, str], server: FakeOpenAIServer
) -> None:
    contents = make_docs(dsn, 5)
    ok(
        run_cli(
            ["register", "docs", "--column", "embedding", "--content", "body", "--index", "hnsw"],
            env,
        )
    )
    ok(run_cli(["run", "--drain"], env))
    assert status_counts(dsn) == {"done": 5}
    requests_before = server.stats()["requests_total"]

    report = as_json(run_cli(["search", "docs", contents[3], "-k", "3", "--json"], env))
    assert report["query"] == contents[3]
    results = report["results"]
    assert len(results) == 3
    assert results[0]["id"] == "3"
    assert results[0]["content"] == contents[3]
    assert results[0]["distance"] == pytest.approx(0.0, abs=1e-5)
    distances = [r["distance"] for r in results]
    assert distances == sorted(distances)
    assert distances[1] > 1e-3
    # Vectors are deterministic per text: the reported distances are the true cosine ones.
    query = fake_vector(contents[3], DIMS)
    for r in results[1:]:
        other = fake_vector(contents[int(r["id"])], DIMS)
        cosine = float(np.dot(query, other) / (np.linalg.norm(query) * np.linalg.norm(other)))
        assert r["distance"] == pytest.approx(1 - cosine, abs=1e-5)
    assert server.stats()["requests_total"] == requests_before + 1  # the query, once

    human = ok(run_cli(["search", "docs", contents[2], "-k", "1"], env)).stdout
    assert f"nearest to {contents[2]!r} in docs" in human
    assert contents[2] in human

    plan = anyio.run(_explain_search, dsn, query, 3)
    assert "Index Scan using docs_embedding_hnsw_idx" in plan, plan


def test_search_unknown_table_exits_2(dsn: str, env: dict[str, str]) -> None:
    make_docs(dsn, 1)
    stderr = usage_error(run_cli(["search", "nosuch", "text"], env))
    assert "no registered target for table 'nosuch'" in stderr


# --- purge ---------------------------------------------------------------------------------


def test_purge_deletes_only_done_rows_older_than_the_age(dsn: str, env: dict[str, str]) -> None:
    make_docs(dsn, 6)
    mark_done(dsn, where="id <= 3")
    mark_done(dsn, where="id = 5")
    execute(
        dsn,
        "UPDATE embedding_queue SET processed_at = now() - interval '8 days' WHERE record_id = '5'",
    )
    fail_items(dsn, {"4": "HTTP 500: server error"})
    execute(
        dsn,
        "UPDATE embedding_queue SET processed_at = now() - interval '30 days',"
        " created_at = now() - interval '30 days' WHERE record_id IN ('4', '6')",
    )

    assert as_json(run_cli(["purge", "--json"], env)) == {"deleted": 1}  # default: 7 days
    assert set(queue_rows(dsn)) == {"1", "2", "3", "4", "6"}
    assert as_json(run_cli(["purge", "--older-than", "7d", "--json"], env)) == {"deleted": 0}
    done = ok(run_cli(["purge", "--older-than", "0s"], env))
    assert "deleted 3 done item(s) older than 0s" in done.stdout
    assert {k: r["status"] for k, r in queue_rows(dsn).items()} == {
        "4": "failed",
        "6": "pending",
    }

    stderr = usage_error(run_cli(["purge", "--older-than", "7x"], env))
    assert "not a duration" in stderr
    assert set(queue_rows(dsn)) == {"4", "6"}


# --- unregister, db-url -------------------------------------------------------------------


def test_unregister_removes_triggers_and_queue_rows(dsn: str, env: dict[str, str]) -> None:
    make_docs(dsn, 3)
    done = ok(run_cli(["unregister", "docs", "--column", "embedding"], env))
    assert "unregistered docs.embedding" in done.stdout
    assert execute(dsn, "SELECT count(*) AS n FROM embedding_targets") == [{"n": 0}]
    assert status_counts(dsn) == {}
    insert_rows(dsn, [(4, "after unregister")])
    assert status_counts(dsn) == {}  # no trigger left to queue it

    again = run_cli(["unregister", "docs", "--column", "embedding"], env)
    assert again.returncode == 1
    assert "no such target" in again.stdout


def test_db_url_prints_the_configured_dsn(dsn: str, env: dict[str, str]) -> None:
    assert ok(run_cli(["db-url"], env)).stdout.strip() == dsn


# --- help ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["", *SUBCOMMANDS], ids=["(top level)", *SUBCOMMANDS])
def test_every_subcommand_has_help(command: str) -> None:
    """--help works without any configuration (no database, no provider)."""
    environment = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    done = subprocess.run(
        [QUEUE_PROCESSOR, *([command] if command else []), "--help"],
        env={**environment, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: queue-processor {command}".rstrip())
    assert done.stderr == ""
