"""The opt-in embedding cache: vectors by content hash, per model and dimension count."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import numpy.typing as npt

from queue_processor import targets
from queue_processor.backoff import retry_database
from queue_processor.db import Database


class EmbeddingCacheStore:
    """``embedding_cache`` as the store of a ``CachedProvider``: the vectors of one model
    (``model_key``, e.g. "openai/text-embedding-3-small") at one requested dimension count
    (None = the model's default), by content hash.

    Each lookup and store retries through a database outage for up to ``retry_seconds`` (the
    worker passes its lease: past that the batch's claim is lost anyway), then raises
    DatabaseUnavailable."""

    def __init__(
        self, db: Database, model_key: str, dimensions: int | None, *, retry_seconds: float
    ) -> None:
        self._db = db
        self._model_key = model_key
        self._dimensions = dimensions
        self._retry_seconds = retry_seconds

    async def lookup(self, hashes: Sequence[bytes]) -> dict[bytes, npt.NDArray[np.float32]]:
        """Cached vectors by content hash (only the hits)."""
        return await retry_database(
            partial(cache_lookup, self._db, self._model_key, self._dimensions, hashes),
            within_seconds=self._retry_seconds,
        )

    async def store(self, pairs: Sequence[tuple[bytes, npt.NDArray[np.float32]]]) -> None:
        """Remember vectors by content hash."""
        await retry_database(
            partial(cache_store, self._db, self._model_key, self._dimensions, pairs),
            within_seconds=self._retry_seconds,
        )


async def cache_lookup(
    db: Database, model: str, dimensions: int | None, hashes: Sequence[bytes]
) -> dict[bytes, npt.NDArray[np.float32]]:
    """Cached vectors by content hash (only the hits)."""
    if not hashes:
        return {}
    async with db.connection(autocommit=True) as conn:
        rows = await db.fetch_all(
            conn,
            db.statement("cache_lookup"),
            {"model": model, "dimensions": dimensions or 0, "hashes": list(hashes)},
        )
    return {bytes(r["content_hash"]): np.frombuffer(r["embedding"], dtype="<f4") for r in rows}


async def cache_store(
    db: Database,
    model: str,
    dimensions: int | None,
    entries: Sequence[tuple[bytes, npt.NDArray[np.float32]]],
) -> None:
    """Remember vectors by content hash."""
    if not entries:
        return
    async with db.connection(autocommit=True) as conn:
        await db.execute(
            conn,
            db.statement("cache_store"),
            {
                "model": model,
                "dimensions": dimensions or 0,
                "hashes": [h for h, _ in entries],
                "embeddings": [targets.vector_bytes(v) for _, v in entries],
            },
        )
