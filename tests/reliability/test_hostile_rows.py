"""Hostile queue rows: rows inserted straight into ``embedding_queue`` (anyone with INSERT on
the queue can) that name unregistered tables or columns, system catalogs (``pg_authid``'s
``rolpassword``), or identifiers and keys full of quotes and SQL metacharacters.

None of it may ever reach SQL as an identifier or be sent to the provider: each such row ends
``failed`` with "unregistered target" (or, for a bad key of a registered target, a key
message), and nothing else in the database changes: the checksums of the source table, the
target registry, the roles and their passwords, the catalog of tables, triggers and functions
are identical before and after.
"""

from __future__ import annotations

import pytest

from tests.reliability.harness import (
    ChaosServer,
    Workers,
    assert_embeddings_are_of,
    report,
    table_checksums,
    unfinished,
    wait_for,
    worker_env,
)
from tests.support.helpers import execute, make_docs

CHECKED = (
    "docs",
    "embedding_targets",
    "queue_processor_migrations",
    "pg_catalog.pg_authid",
    "(SELECT oid, relname, relnamespace, relkind FROM pg_catalog.pg_class)",
    "(SELECT oid, tgrelid, tgname, tgenabled FROM pg_catalog.pg_trigger)",
    "(SELECT oid, proname, prosrc FROM pg_catalog.pg_proc)",
    "(SELECT datname FROM pg_catalog.pg_database)",
)

# (table_name, embedding_column, record_id, content)
HOSTILE = [
    ("no_such_table", "embedding", "1", "unregistered table"),
    ("docs", "no_such_column", "1", "unregistered column of a registered table"),
    ("docs", "body", "1", "a real column that is not a target"),
    ("pg_authid", "rolpassword", "10", "the password catalog"),
    ("pg_catalog.pg_authid", "rolpassword", "10", "the password catalog, qualified"),
    ("pg_catalog.pg_class", "relname", "1259", "the class catalog"),
    ('x"; DROP TABLE docs; --', "embedding", "1", "quoted identifier breakout"),
    ("docs", 'embedding" = NULL; DROP TABLE docs; --', "1", "column breakout"),
    ("'); DELETE FROM embedding_targets; --", "embedding", "1", "literal breakout"),
    ("docs; TRUNCATE embedding_queue", "embedding", "2", "statement chaining"),
    ("public.docs", "embedding", "1", "a qualified spelling of a registered label"),
    ("DOCS", "embedding", "1", "another case of a registered label"),
    ("docs ", "embedding", "1", "a trailing space"),
    ('"docs"', "embedding", "1", "a quoted spelling"),
    ("$$; DROP TABLE docs; $$", "embedding$$", "3", "dollar quoting"),
    ("docs\\", "embedding", "1", "a backslash"),
    ("%(ids)s", "{column}", "1", "placeholders of our own SQL templates"),
]
# Registered target, hostile key: rejected as a key, never cast in SQL.
BAD_KEYS = [
    ("docs", "embedding", "1; DROP TABLE docs", "key breakout"),
    ("docs", "embedding", "1' OR '1'='1", "key literal breakout"),
    ("docs", "embedding", "99999999999999999999", "key out of bigint range"),
]


@pytest.mark.slow
def test_hostile_queue_rows_execute_nothing_and_change_nothing(
    dsn: str, fake: ChaosServer, workers: Workers
) -> None:
    contents = make_docs(dsn, 20)
    worker = workers.start("hostile-w1", worker_env(dsn, fake, QUEUE_PROCESSOR_BATCH_SIZE=50))
    wait_for(lambda: unfinished(dsn) == 0, timeout_s=60, what="the setup drain", watch=[worker])
    before = table_checksums(dsn, CHECKED)
    requests_before = fake.requests_total

    rows = HOSTILE + BAD_KEYS
    with_ids = execute(
        dsn,
        "INSERT INTO embedding_queue (table_name, embedding_column, record_id, content)"
        " SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[])"
        " RETURNING id, table_name, embedding_column, record_id",
        [list(column) for column in zip(*rows, strict=True)],
    )
    assert len(with_ids) == len(rows)
    wait_for(lambda: unfinished(dsn) == 0, timeout_s=60, what="the hostile rows", watch=[worker])
    assert worker.alive

    after = table_checksums(dsn, CHECKED)
    assert after == before
    assert_embeddings_are_of(dsn, contents)
    # Nothing of it was sent to the provider.
    assert fake.requests_total == requests_before
    for _, _, _, content in rows:
        assert fake.input_counts[content] == 0

    queue = {
        (r["table_name"], r["embedding_column"], r["record_id"]): r for r in queue_rows_all(dsn)
    }
    for table, column, record_id, _ in HOSTILE:
        row = queue[(table, column, record_id)]
        assert row["status"] == "failed", row
        assert row["error_message"].startswith("unregistered target"), row
        assert "nothing was executed" in row["error_message"]
    for table, column, record_id, _ in BAD_KEYS:
        row = queue[(table, column, record_id)]
        assert row["status"] == "failed", row
        assert "bigint" in row["error_message"], row
    # (Exit status: see test_poison, which asserts 0 after a SIGTERM.)
    assert worker.stop() in (0, 1)

    report(
        "hostile_rows",
        hostile_rows=len(rows),
        unregistered_target=len(HOSTILE),
        bad_keys=len(BAD_KEYS),
        tables_checksummed=len(CHECKED),
        checksums_changed=0,
        provider_requests=fake.requests_total - requests_before,
    )


def queue_rows_all(dsn: str) -> list[dict[str, object]]:
    """Every queue row (record ids repeat across hostile table names)."""
    return execute(dsn, "SELECT * FROM embedding_queue ORDER BY id")
