"""Poison input: items that can never be embedded sit in one batch with good ones, in front of
a running worker process.

Each poison item must end with a clear ``error_message`` (status ``failed``) or a documented
skip, the good items of the same batch must be written, and the worker must keep running
(it then embeds rows added afterwards, and stops cleanly on SIGTERM).

Documented skips: blank content (empty, whitespace only, NULL) in a source row is never
queued (the enqueue trigger's ``embedding_queue_is_blank``); a deleted source row takes its
queue row with it (the delete trigger); a queue row whose source row is gone ends ``done`` with
``detail = 'source row not found; nothing written'``.

A text longer than the server's context length is no poison: the server's 400 "maximum context
length is N tokens" makes the worker cut it and send it again (the default length policy,
truncate), and it ends ``done`` with a detail saying so.

Invalid text cannot reach the queue at all: PostgreSQL ``text`` holds only valid UTF-8 without
NUL, so lone surrogates, invalid byte sequences and ``\\x00`` are refused at insert (shown
below); the nearest thing that can be stored, text full of unusual but valid Unicode, must
embed normally.
"""

from __future__ import annotations

import psycopg
import pytest

from tests.reliability.harness import (
    ChaosServer,
    Workers,
    assert_embeddings_are_of,
    counts,
    report,
    unfinished,
    wait_for,
    worker_env,
)
from tests.support.helpers import (
    body,
    connect,
    create_table,
    execute,
    insert_rows,
    make_docs,
    queue_rows,
    register,
)

GOOD = 20
HUGE = "lorem ipsum " * 87_382  # ~1 MB
UNUSUAL = (
    "RTL \u202eoverride\u202c, family \U0001f469\u200d\U0001f469\u200d\U0001f467, e\u0301, "
    "noncharacter \uffff, private \ue000, BOM \ufeff, separators \u2028\u2029, "
    "\U0001d518\U0001d52b\U0001d526\U0001d520\U0001d52c\U0001d521\U0001d522, \u6f22\u5b57, "
    "controls \x01\x1f\x7f, quotes '\"\\ `$(x)` %s {0} \\x00"
)


def test_invalid_text_never_reaches_the_queue(dsn: str) -> None:
    """Lone surrogates, invalid UTF-8 and NUL are refused before any row exists."""
    make_docs(dsn, 0)
    with connect(dsn) as conn:
        with pytest.raises(UnicodeEncodeError):
            conn.execute("INSERT INTO docs (id, body) VALUES (1, %s)", ("lone \ud800 surrogate",))
        with pytest.raises(psycopg.DataError, match="NUL"):
            conn.execute("INSERT INTO docs (id, body) VALUES (2, %s)", ("nul \x00 byte",))
        with pytest.raises(psycopg.errors.CharacterNotInRepertoire):
            conn.execute(
                "INSERT INTO docs (id, body) VALUES (3, convert_from('\\xc328'::bytea, 'UTF8'))"
            )
        with pytest.raises(psycopg.errors.CharacterNotInRepertoire):
            conn.execute(
                "INSERT INTO embedding_queue (table_name, record_id, embedding_column, content)"
                " VALUES ('docs', '4', 'embedding', convert_from('\\xff'::bytea, 'UTF8'))"
            )
    assert execute(dsn, "SELECT count(*) AS n FROM embedding_queue")[0]["n"] == 0


@pytest.mark.slow
def test_poison_items_fail_alone_and_the_worker_keeps_running(
    dsn: str, fake: ChaosServer, workers: Workers
) -> None:
    good = make_docs(dsn, GOOD)
    # Blank content in the source table: never queued.
    insert_rows(dsn, [(101, ""), (102, " \t\n "), (103, None)])
    # Blank content queued by hand (operators' INSERTs bypass the trigger's check).
    insert_rows(dsn, [(104, None), (105, None), (106, None)])
    execute(
        dsn,
        "INSERT INTO embedding_queue (table_name, record_id, embedding_column, content)"
        " VALUES ('docs', '104', 'embedding', ''), ('docs', '105', 'embedding', '   '),"
        " ('docs', '106', 'embedding', NULL)",
    )
    special = {
        107: HUGE,
        108: UNUSUAL,
        110: "this text comes back with a NaN",
        111: "this text comes back with an infinity",
        112: "this text gets no vector in the response",
        113: "this text comes back with one dimension too many",
        114: "this text is rejected by the provider",
    }
    insert_rows(dsn, special.items())
    # Deleted after enqueue: the delete trigger takes the queue row too.
    insert_rows(dsn, [(109, "deleted before it was embedded")])
    execute(dsn, "DELETE FROM docs WHERE id = 109")
    # A queue row whose source row never existed.
    execute(
        dsn,
        "INSERT INTO embedding_queue (table_name, record_id, embedding_column, content)"
        " VALUES ('docs', '999999', 'embedding', 'orphan text')",
    )
    # A target column whose dimension differs from the model's (12 vs 8).
    create_table(dsn, table="docs_wide", embedding_type="vector(12)")
    register(dsn, "docs_wide")
    insert_rows(dsn, [(1, "wide one"), (2, "wide two")], table="docs_wide")

    fake.reject_if = lambda text: len(text) > 100_000
    fake.reject_inputs = {special[114]}
    fake.nan_for = {special[110]}
    fake.inf_for.add(special[111])
    fake.drop_vector_for = {special[112]}
    fake.wrong_dims_for = {special[113]}

    queued = sum(counts(dsn).values())
    worker = workers.start("poison-w1", worker_env(dsn, fake, QUEUE_PROCESSOR_BATCH_SIZE=100))
    wait_for(
        lambda: unfinished(dsn) == 0,
        timeout_s=60,
        what="the poison batch to finish",
        watch=[worker],
    )
    # One batch held all of it: the poison shared its batch with the good rows.
    first = worker.events("batch_done")[0]
    assert first["items"] == queued

    docs = queue_rows(dsn)
    outcome = {
        key: (row["status"], row["error_message"] or row["detail"])
        for key, row in docs.items()
        if row["table_name"] == "docs"
    }
    wide = execute(
        dsn,
        "SELECT status, error_message FROM embedding_queue WHERE table_name = %s",
        ("docs_wide",),
    )

    # Blank source rows and the deleted row: never queued, never sent.
    for key in ("101", "102", "103", "109"):
        assert key not in outcome
    for text in ("", " \t\n ", "   ", "deleted before it was embedded"):
        assert fake.input_counts[text] == 0
    expected_failures = {
        "104": "content is empty",
        "105": "content is empty",
        "106": "content is empty",
        "110": "non-finite value (NaN or infinity)",
        "111": "non-finite value (NaN or infinity)",
        "112": "provider returned no vector for this input",
        "113": "provider returned 9 dimensions, expected 8",
        "114": "provider rejected the input (HTTP 400)",
    }
    for key, message in expected_failures.items():
        status, error = outcome[key]
        assert status == "failed", (key, outcome[key])
        assert message in error, (key, error)
    assert outcome["999999"] == ("done", "source row not found; nothing written")
    assert [(r["status"], r["error_message"]) for r in wide] == [
        ("failed", "model returned 8 dimensions but docs_wide.embedding holds 12")
    ] * 2
    assert (
        execute(dsn, "SELECT count(*) AS n FROM docs_wide WHERE embedding IS NOT NULL")[0]["n"] == 0
    )
    # The rest of the batch was written: the good rows and the unusual-Unicode row, exactly,
    # and the huge text as it was cut (a prefix of it, the one the server took).
    [cut] = [t for t in fake.input_counts if HUGE.startswith(t) and 0 < len(t) < len(HUGE)]
    assert len(cut) <= 8192 * 3  # the estimate's 3 bytes per token
    written = {**good, 108: UNUSUAL, 107: cut}
    assert_embeddings_are_of(dsn, written)
    assert outcome["108"] == ("done", None)
    # Too long for the server: not a poison since issue 14. Its 400 "maximum context length
    # is 8192 tokens" made the worker cut it to that (by the estimate: no tokenizer is known
    # for the test model) and send it again, under the default length policy, truncate.
    # The claim had cut it to QUEUE_PROCESSOR_MAX_CONTENT_CHARS first; its detail says both.
    assert outcome["107"][0] == "done"
    claim_cut, _, truncated = outcome["107"][1].partition("; ")
    assert claim_cut == (
        "content cut to its first 1,000,000 characters at claim"
        f" (QUEUE_PROCESSOR_MAX_CONTENT_CHARS: {len(HUGE.encode()):,} bytes stored)"
    ), outcome["107"]
    assert truncated.startswith("truncated to ~8,192 of ~"), outcome["107"]
    # The server saw the rejections as rejections (and the huge text only once).
    assert fake.requests_by_status[400] >= 2
    assert fake.input_counts[HUGE] == 0

    # Still running: rows added now are embedded by the same process.
    later = {i: body(i) for i in range(201, 206)}
    insert_rows(dsn, later.items())
    wait_for(lambda: unfinished(dsn) == 0, timeout_s=30, what="later rows", watch=[worker])
    assert_embeddings_are_of(dsn, {**written, **later})
    rc = worker.stop()
    assert rc == 0, (
        f"a SIGTERM stop of a continuous worker exited {rc} because items failed earlier:\n"
        f"{worker.tail()}"
    )

    c = counts(dsn)
    report(
        "poison",
        batch_items=queued,
        poison_failed_with_message=len(expected_failures) + len(wide),
        documented_skips=5,
        good_written=len(written),
        written_after=len(later),
        http_400=fake.requests_by_status[400],
        worker_exits=0,
        done=c["done"],
        failed=c["failed"],
        items_lost=0,
    )
