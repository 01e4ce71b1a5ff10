"""The opt-in embedding cache: identical content is never paid for twice.

A forced re-embed of unchanged rows, with EMBEDDING_CACHE on, sends nothing to the provider
and still writes the right vectors; changed content is sent; the cache key includes the
model, so another model misses.
"""

from __future__ import annotations

import numpy as np
import pytest

from queue_processor import queue
from queue_processor.db import Database
from queue_processor.providers.base import EmbeddingProvider
from queue_processor.testing import FakeOpenAIServer, fake_vector
from queue_processor.worker import Worker, WorkerConfig, with_cache
from tests.support.helpers import (
    DIMS,
    execute,
    make_docs,
    make_provider,
    status_counts,
    vector_rows,
    worker_config,
)

pytestmark = pytest.mark.anyio


def cached_worker(db: Database, provider: EmbeddingProvider, config: WorkerConfig) -> Worker:
    """A worker wired as the CLI wires it: the provider behind the cache if config.cache."""
    return Worker(db, with_cache(provider, db, config), config)


async def test_forced_reembed_of_unchanged_rows_costs_no_requests(dsn: str) -> None:
    contents = make_docs(dsn, 40)
    with FakeOpenAIServer(dims=DIMS) as server:
        async with Database(dsn) as db, make_provider(server) as provider:
            first = await cached_worker(db, provider, worker_config(cache=True)).run("drain")
            assert first.processed == 40
            assert first.cache_hits == 0
            sent_first = server.stats()["requests_total"]
            assert sent_first >= 1

            # Re-embed everything (as after an outage or a --force), and change one row.
            assert await queue.backfill(db, "docs", "embedding", "all") == 40
            execute(dsn, "UPDATE docs SET body = 'a brand new text' WHERE id = 7")
            contents[7] = "a brand new text"
            server.reset()
            second = await cached_worker(db, provider, worker_config(cache=True)).run("drain")

    assert second.processed == 40
    assert second.cache_hits == 39
    stats = server.stats()
    assert stats["requests_total"] == 1
    assert stats["input_counts"] == {"a brand new text": 1}
    assert status_counts(dsn) == {"done": 40}
    vectors = vector_rows(dsn)
    for key, text in contents.items():
        got = vectors[key]
        assert got is not None
        np.testing.assert_array_equal(got, fake_vector(text, DIMS))


async def test_cache_is_keyed_by_model_and_off_by_default(dsn: str) -> None:
    make_docs(dsn, 5)
    with FakeOpenAIServer(dims=DIMS) as server:
        async with Database(dsn) as db:
            async with make_provider(server) as provider:
                await cached_worker(db, provider, worker_config(cache=True)).run("drain")
            await queue.backfill(db, "docs", "embedding", "all")
            server.reset()
            async with make_provider(server, model="another-model") as other:
                summary = await cached_worker(db, other, worker_config(cache=True)).run("drain")
            assert summary.cache_hits == 0
            assert server.stats()["requests_total"] == 1

            await queue.backfill(db, "docs", "embedding", "all")
            server.reset()
            async with make_provider(server) as provider:
                off = await cached_worker(db, provider, worker_config()).run("drain")
            assert off.cache_hits == 0
            assert sum(server.stats()["input_counts"].values()) == 5
    rows = execute(dsn, "SELECT model, count(*) AS n FROM embedding_cache GROUP BY model")
    assert {r["model"]: r["n"] for r in rows} == {
        "openai/text-embedding-test": 5,
        "openai/another-model": 5,
    }
