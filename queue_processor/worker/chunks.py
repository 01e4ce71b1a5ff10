"""A batch's items of chunked targets: split each text (worker/splitter.py), embed every
chunk as one provider input (the provider packs them into requests by its token budget),
and gather each item's chunk set for ``queue.complete``.

The chunk size is the target's ``chunk_tokens``, lowered to the model's input limit when
that is smaller (a local model's 256-token window), counted with the provider's tokenizer.
An item whose chunks did not all get a vector fails whole: a record never gets part of a set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import anyio.to_thread
import numpy as np

from queue_processor.models import ItemFailure, Target
from queue_processor.providers.base import EmbeddingProvider
from queue_processor.providers.tokens import Tokenizer
from queue_processor.queue import ChunkWrite
from queue_processor.worker.items import Work
from queue_processor.worker.splitter import split


@dataclass(frozen=True)
class _Plan:
    work: Work
    texts: list[str]
    detail: str | None


@dataclass(frozen=True)
class Chunked:
    """What the provider made of a batch's chunked items: each item's chunk set or its
    failure, and the provider's usage."""

    writes: list[ChunkWrite]
    failures: list[ItemFailure]
    chunks: int
    tokens: int
    requests: int
    cached: int


def chunk_size(target: Target, limit: int | None) -> int:
    """Tokens per chunk for ``target``: its setting, at most the model's input limit."""
    size = target.chunk_tokens or 512
    return size if limit is None else max(1, min(size, limit))


def plan(work: Work, tokenizer: Tokenizer, limit: int | None) -> _Plan:
    """Split one item's text; the detail says when ``max_chunks`` cut it."""
    target = work.target
    size = chunk_size(target, limit)
    max_chunks = target.max_chunks or 1
    found = split(
        work.item.content or "",
        tokenizer,
        size=size,
        overlap=target.chunk_overlap or 0,
        max_chunks=max_chunks,
    )
    detail = None
    if found.capped:
        detail = (
            f"cut to {max_chunks:,} chunks of {size:,} tokens (max_chunks): "
            f"the last {found.rest_chars:,} characters were not embedded"
        )
    return _Plan(work, found.texts, detail)


async def embed_chunked(
    provider: EmbeddingProvider, work: Sequence[Work], *, model: str | None = None
) -> Chunked:
    """Split and embed ``work``'s texts with ``provider`` (``model``: the name recorded with
    the chunks, None for the worker's default). Raises what ``provider.embed`` raises."""
    if not work:
        return Chunked([], [], 0, 0, 0, 0)
    await provider.prepare()  # a local model's tokenizer and window, once loaded
    limit, tokenizer = provider.max_input_tokens, provider.tokenizer
    # Tokenizing long texts takes a while: off the event loop (lease renewal, LISTEN).
    plans = await anyio.to_thread.run_sync(lambda: [plan(w, tokenizer, limit) for w in work])
    texts = [t for p in plans for t in p.texts]
    result = await provider.embed(texts) if texts else None
    writes: list[ChunkWrite] = []
    failures: list[ItemFailure] = []
    offset = 0
    for p in plans:
        item, target = p.work.item, p.work.target
        vectors = result.vectors[offset : offset + len(p.texts)] if result else []
        errors = [result.errors.get(offset + i) for i in range(len(p.texts))] if result else []
        offset += len(p.texts)
        missing = [i for i, v in enumerate(vectors) if v is None]
        if missing:
            first = errors[missing[0]] or "provider returned no vector"
            message = f"chunk {missing[0]} of {len(p.texts)} has no vector: {first}"
            failures.append(ItemFailure(item, "provider_rejected", message))
            continue
        stacked = (
            np.stack([np.asarray(v, dtype=np.float32) for v in vectors])
            if vectors
            else np.zeros((0, target.dimensions or 0), dtype=np.float32)
        )
        if target.dimensions is not None and stacked.shape[1] != target.dimensions:
            message = (
                f"model returned {stacked.shape[1]} dimensions but chunked target "
                f"{target.table_name}.{target.embedding_column} holds {target.dimensions}"
            )
            failures.append(ItemFailure(item, "dimension_mismatch", message))
            continue
        writes.append(
            ChunkWrite(item, target, p.work.key, tuple(p.texts), stacked, p.detail, model)
        )
    return Chunked(
        writes,
        failures,
        chunks=len(texts),
        tokens=result.tokens if result else 0,
        requests=result.requests if result else 0,
        cached=result.cached if result else 0,
    )


def merged(parts: Sequence[Chunked]) -> Chunked:
    """One ``Chunked`` of several (a worker of several models embeds each model's part)."""
    return Chunked(
        [w for p in parts for w in p.writes],
        [f for p in parts for f in p.failures],
        chunks=sum(p.chunks for p in parts),
        tokens=sum(p.tokens for p in parts),
        requests=sum(p.requests for p in parts),
        cached=sum(p.cached for p in parts),
    )
