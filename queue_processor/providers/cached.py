"""A provider decorator that never pays twice for the same text: the opt-in embedding cache.

``CachedProvider(inner, store)`` looks every text up in ``store`` by its content hash, sends
only the misses to ``inner``, stores the fresh vectors, and reports the hits in
``EmbedResult.cached``. It knows no database: the store is anything with ``lookup`` and
``store`` (the worker uses ``queue.EmbeddingCacheStore``, a table keyed by model and
dimensions, so another model or dimension count misses).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

from queue_processor.providers.base import EmbeddingProvider, EmbedResult
from queue_processor.providers.packing import Vector
from queue_processor.providers.tokens import Tokenizer


class VectorStore(Protocol):
    """Vectors of one model by content hash (see ``content_hash``)."""

    async def lookup(self, hashes: Sequence[bytes]) -> dict[bytes, Vector]:
        """The stored vectors among ``hashes`` (only the hits)."""
        ...

    async def store(self, pairs: Sequence[tuple[bytes, Vector]]) -> None:
        """Remember ``(hash, vector)`` pairs."""
        ...


def content_hash(text: str) -> bytes:
    """The cache key of a text: SHA-256 of its UTF-8 bytes (surrogates kept)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class CachedProvider(EmbeddingProvider):
    """``inner`` behind a cache: hits come from ``store``, misses from ``inner``.

    Describes itself as ``inner`` does (name, model, dimensions, limits), so usage and the
    model recorded with each vector are the backend's. Closing it closes ``inner``. Errors
    of ``inner`` and of the store propagate unchanged; a failed ``inner`` call stores nothing.
    """

    def __init__(self, inner: EmbeddingProvider, store: VectorStore) -> None:
        self.inner = inner
        self._store = store
        self.name = inner.name
        self.model = inner.model
        self.max_inputs_per_request = inner.max_inputs_per_request
        self.max_tokens_per_request = inner.max_tokens_per_request

    @property
    def dimensions(self) -> int | None:
        """The backend's: a local model knows its dimension count only once loaded."""
        return self.inner.dimensions

    @dimensions.setter
    def dimensions(self, value: int | None) -> None:
        self.inner.dimensions = value

    @property
    def max_input_tokens(self) -> int | None:
        """The backend's (it learns a smaller one from the server's answers)."""
        return self.inner.max_input_tokens

    @max_input_tokens.setter
    def max_input_tokens(self, value: int | None) -> None:
        self.inner.max_input_tokens = value

    @property
    def tokenizer(self) -> Tokenizer:
        """The backend's (a local model's is known once it is loaded)."""
        return self.inner.tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Tokenizer) -> None:
        self.inner.tokenizer = value

    async def prepare(self) -> None:
        await self.inner.prepare()

    def __repr__(self) -> str:
        return f"CachedProvider({self.inner!r})"

    async def embed(self, texts: Sequence[str]) -> EmbedResult:
        """Vectors for ``texts`` (aligned): stored ones as they are, the rest from ``inner``
        (then stored). ``tokens`` and ``requests`` are what ``inner`` spent."""
        if not texts:
            return EmbedResult(vectors=[])
        hashes = [content_hash(text) for text in texts]
        hits = await self._store.lookup(hashes)
        vectors: list[Vector | None] = [hits.get(h) for h in hashes]
        missing = [i for i, vector in enumerate(vectors) if vector is None]
        if not missing:
            return EmbedResult(vectors=vectors, cached=len(texts))
        result = await self.inner.embed([texts[i] for i in missing])
        errors: dict[int, str] = {}
        too_long: dict[int, int] = {}
        fresh: list[tuple[bytes, Vector]] = []
        for position, index in enumerate(missing):
            vector = result.vectors[position]
            vectors[index] = vector
            if vector is None:
                errors[index] = result.errors.get(position, "provider returned no vector")
                if position in result.too_long:
                    too_long[index] = result.too_long[position]
            else:
                fresh.append((hashes[index], vector))
        await self._store.store(fresh)
        return EmbedResult(
            vectors=vectors,
            errors=errors,
            tokens=result.tokens,
            requests=result.requests,
            cached=len(texts) - len(missing),
            too_long=too_long,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()
