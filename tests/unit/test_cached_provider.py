"""The cache decorator and the one backoff policy, without a database.

``CachedProvider`` serves stored vectors, sends only the misses to the provider behind it
(aligned back to their positions, errors included), stores what came back and counts the
hits; the database-backed store and the worker around it are covered in
tests/integration/test_cache.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from queue_processor.backoff import backoff_seconds
from queue_processor.errors import ProviderUnavailable
from queue_processor.providers.base import EmbeddingProvider, EmbedResult
from queue_processor.providers.cached import CachedProvider, content_hash
from queue_processor.providers.packing import Vector

pytestmark = pytest.mark.anyio


def vector_of(text: str) -> Vector:
    return np.full(3, float(len(text)), dtype=np.float32)


class Recording(EmbeddingProvider):
    """Embeds each text as ``vector_of(text)``, rejects ``bad`` texts, records every call."""

    name = "recording"
    model = "m"
    dimensions = 3
    max_inputs_per_request = 10
    max_tokens_per_request = 1000

    def __init__(self, bad: frozenset[str] = frozenset(), *, down: bool = False) -> None:
        self.bad = bad
        self.down = down
        self.calls: list[list[str]] = []
        self.closed = False

    async def embed(self, texts: Sequence[str]) -> EmbedResult:
        self.calls.append(list(texts))
        if self.down:
            raise ProviderUnavailable("down")
        vectors: list[Vector | None] = [None if t in self.bad else vector_of(t) for t in texts]
        errors = {i: f"rejected {t}" for i, t in enumerate(texts) if t in self.bad}
        return EmbedResult(vectors, errors, tokens=7 * len(texts), requests=1)

    async def aclose(self) -> None:
        self.closed = True


class MemoryStore:
    def __init__(self, entries: dict[str, Vector] | None = None) -> None:
        self.vectors = {content_hash(t): v for t, v in (entries or {}).items()}
        self.stored: list[list[bytes]] = []

    async def lookup(self, hashes: Sequence[bytes]) -> dict[bytes, Vector]:
        return {h: self.vectors[h] for h in hashes if h in self.vectors}

    async def store(self, pairs: Sequence[tuple[bytes, Vector]]) -> None:
        self.stored.append([h for h, _ in pairs])
        self.vectors.update(pairs)


async def test_hits_are_served_and_only_misses_are_sent_then_stored() -> None:
    cached_vector = np.zeros(3, dtype=np.float32)
    store = MemoryStore({"seen": cached_vector})
    inner = Recording(bad=frozenset({"poison"}))
    provider = CachedProvider(inner, store)

    result = await provider.embed(["new", "seen", "poison", "newer"])

    assert inner.calls == [["new", "poison", "newer"]]
    assert result.cached == 1
    assert (result.tokens, result.requests) == (21, 1)
    assert result.vectors[1] is cached_vector
    np.testing.assert_array_equal(result.vectors[0], vector_of("new"))
    np.testing.assert_array_equal(result.vectors[3], vector_of("newer"))
    assert result.vectors[2] is None
    assert result.errors == {2: "rejected poison"}
    assert store.stored == [[content_hash("new"), content_hash("newer")]]

    again = await provider.embed(["newer", "seen", "new"])
    assert len(inner.calls) == 1
    assert (again.cached, again.tokens, again.requests, again.errors) == (3, 0, 0, {})


async def test_a_failed_call_stores_nothing_and_an_empty_call_costs_nothing() -> None:
    store = MemoryStore()
    inner = Recording(down=True)
    provider = CachedProvider(inner, store)
    with pytest.raises(ProviderUnavailable):
        await provider.embed(["a"])
    assert store.stored == []
    assert (await provider.embed([])).vectors == []
    assert inner.calls == [["a"]]


async def test_describes_itself_as_the_backend_and_closes_it() -> None:
    inner = Recording()
    provider = CachedProvider(inner, MemoryStore())
    assert (provider.name, provider.model, provider.dimensions) == ("recording", "m", 3)
    inner.dimensions = 5  # a local model learns its dimension count when it loads
    assert provider.dimensions == 5
    async with provider:
        pass
    assert inner.closed


def test_backoff_doubles_from_the_base_up_to_the_cap() -> None:
    waits = [backoff_seconds(n, base_seconds=1.0, max_seconds=30.0) for n in range(1, 8)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff_seconds(10**6, base_seconds=0.4, max_seconds=15.0) == 15.0
    assert backoff_seconds(1, base_seconds=0.4, max_seconds=15.0) == 0.4
