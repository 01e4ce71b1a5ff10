"""How a worker claims and paces work, and the cache it may embed through."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Literal

from queue_processor.db import Database
from queue_processor.models import MAX_CLAIM_BYTES, MAX_CONTENT_CHARS
from queue_processor.providers.base import EmbeddingProvider
from queue_processor.providers.cached import CachedProvider
from queue_processor.queue import EmbeddingCacheStore

RunMode = Literal["continuous", "drain", "once"]


def default_owner() -> str:
    """A worker identity for claimed_by: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker claims and paces work. Units are in the names."""

    batch_size: int = 100
    delay_ms: int = 0
    concurrency: int = 1
    lease_seconds: float = 300.0
    max_attempts: int = 3
    retry_base_seconds: float = 10.0
    retry_max_seconds: float = 3600.0
    poll_interval_seconds: float = 5.0
    shutdown_grace_seconds: float = 30.0
    owner: str = field(default_factory=default_owner)
    target_cache_seconds: float = 30.0
    # Opt-in: serve already-embedded texts from embedding_cache instead of the provider. The
    # worker does not read it: the composition root wraps the provider (``with_cache``).
    cache: bool = False
    # The dimensions requested from the provider (None = the model's default): part of the
    # cache key, since the same model gives different vectors at different dimensions.
    requested_dimensions: int | None = None
    # What one claim may load (see queries.sql, claim_batch).
    max_content_chars: int = MAX_CONTENT_CHARS
    max_claim_bytes: int = MAX_CLAIM_BYTES
    # However many NOTIFYs arrive (any role may send one), an empty queue is scanned again at
    # most this often; new work still wakes the loop at once after a quiet period.
    min_rescan_seconds: float = 0.25


def with_cache(
    provider: EmbeddingProvider, db: Database, config: WorkerConfig
) -> EmbeddingProvider:
    """``provider`` behind the embedding cache if ``config.cache`` is on, else ``provider``.

    The cache key is the provider's "name/model" and ``config.requested_dimensions``; lookups
    and stores retry through a database outage for up to ``config.lease_seconds``, as the
    batch's other database work does."""
    if not config.cache:
        return provider
    store = EmbeddingCacheStore(
        db,
        f"{provider.name}/{provider.model}",
        config.requested_dimensions,
        retry_seconds=config.lease_seconds,
    )
    return CachedProvider(provider, store)
