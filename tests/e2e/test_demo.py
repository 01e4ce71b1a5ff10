"""`queue-processor demo` end to end: a subprocess, the real local model, a real PostgreSQL.

The slow test runs the demo twice against the same database: the first run creates and
embeds the table, the second must reset it and succeed again (re-runnable). Outcomes are
checked in its output (the searches' nearest rows) and in the database (every row embedded,
the queue drained). A quick test checks the shipped documents and SQL.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import psycopg
import pytest

from queue_processor import queries
from queue_processor.demo_data import REWRITE, REWRITE_TITLE, SEARCHES, load_documents

# A search result row as rich renders it: rank, distance, topic, title, in columns separated
# by at least two spaces (topics such as "personal finance" contain one).
_HIT = re.compile(r"^\s*(\d+)\s+(\d+\.\d{3})\s{2,}(\S(?:.*?\S)?)\s{2,}(\S.*?)\s*$")


def run_demo(dsn: str) -> subprocess.CompletedProcess[str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("QUEUE_PROCESSOR_", "EMBEDDING_", "OPENAI_", "DATABASE_"))
    }
    env.update(
        DATABASE_URL=dsn,
        EMBEDDING_PROVIDER="local",
        HF_HUB_OFFLINE="1",
        # A wide, plain console: no wrapped table rows, no colour codes to parse around.
        COLUMNS="200",
        NO_COLOR="1",
        PYTHONIOENCODING="utf-8",
    )
    return subprocess.run(
        [sys.executable, "-m", "queue_processor", "demo"],
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=900,
        check=False,
    )


def top_hits(output: str) -> dict[str, tuple[str, str]]:
    """Query -> (topic, title) of the first row of that query's result table."""
    lines = output.splitlines()
    found: dict[str, tuple[str, str]] = {}
    for query, _ in SEARCHES:
        heading = next(i for i, line in enumerate(lines) if f'Search: "{query}"' in line)
        for line in lines[heading + 1 :]:
            match = _HIT.match(line)
            if match:
                assert match.group(1) == "1", line
                found[query] = (match.group(3), match.group(4))
                break
    return found


def assert_demo_state(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        total, embedded, dims, models = conn.execute(
            "SELECT count(*), count(embedding), min(vector_dims(embedding)),"
            "       array_agg(DISTINCT model)"
            "  FROM demo_documents"
        ).fetchone() or (0, 0, None, None)
        statuses = dict(
            conn.execute(
                "SELECT status, count(*) FROM embedding_queue"
                " WHERE table_name = 'demo_documents' GROUP BY status"
            ).fetchall()
        )
        rewritten = conn.execute(
            "SELECT topic, embedding IS NOT NULL FROM demo_documents WHERE title = %s",
            (REWRITE["title"],),
        ).fetchall()
    assert total == 300
    assert embedded == 300
    assert dims == 384
    assert models == ["sentence-transformers/all-MiniLM-L6-v2"]
    assert statuses == {"done": 300}
    assert rewritten == [(REWRITE["topic"], True)]


def check_run(result: subprocess.CompletedProcess[str], dsn: str) -> None:
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    hits = top_hits(result.stdout)
    for query, topic in SEARCHES:
        assert hits[query][0] == topic, (query, hits[query], result.stdout)
    assert "exactly one row was re-embedded" in result.stdout
    assert_demo_state(dsn)


def test_the_shipped_documents_and_statements_load() -> None:
    documents = load_documents()
    topics = {d.topic for d in documents}
    assert len(documents) == 300
    assert len(topics) == 10
    assert all(sum(d.topic == t for d in documents) == 30 for t in topics)
    assert len({d.title for d in documents}) == 300
    assert {expected for _, expected in SEARCHES} <= topics
    assert REWRITE_TITLE in {d.title for d in documents}
    assert REWRITE["title"] not in {d.title for d in documents}
    for name in ("create_table", "insert_documents", "search", "neighbours"):
        assert queries.get(name, "demo.sql")


@pytest.mark.slow
def test_demo_runs_end_to_end_and_again(dsn: str) -> None:
    first = run_demo(dsn)
    check_run(first, dsn)
    assert "demo_documents created with 300 documents" in first.stdout

    second = run_demo(dsn)
    check_run(second, dsn)
    assert "demo_documents reset with 300 documents" in second.stdout
