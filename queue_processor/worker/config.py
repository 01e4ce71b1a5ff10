"""How a worker claims and paces work, and the cache it may embed through."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Literal

from queue_processor.db import Database
from queue_processor.providers.base import EmbeddingProvider
from queue_processor.providers.cached import CachedProvider
from queue_processor.queue import EmbeddingCacheStore

RunMode = Literal["continuous", "drain", "once"]


def default_owner() -> str:
    """A worker identity for claimed_by: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker claims and paces work. Units are in the names.

    No defaults of its own: the values come from ``Settings`` (whose fields document them),
    through ``cli.factories.worker_config``, the one place a WorkerConfig is built."""

    batch_size: int
    delay_ms: int
    concurrency: int
    lease_seconds: float
    max_attempts: int
    retry_base_seconds: float
    retry_max_seconds: float
    poll_interval_seconds: float
    shutdown_grace_seconds: float
    # claimed_by of this worker's claims (default_owner(): host and pid).
    owner: str
    # How long the registry of targets is trusted before a batch reloads it.
    target_cache_seconds: float
    # Serve already-embedded texts from embedding_cache instead of the provider. The worker
    # does not read it: the composition root wraps the provider (``with_cache``).
    cache: bool
    # The dimensions requested from the provider (None = the model's default): part of the
    # cache key, since the same model gives different vectors at different dimensions.
    requested_dimensions: int | None
    # What one claim may load (see queries.sql, claim_batch).
    max_content_chars: int
    max_claim_bytes: int
    # However many NOTIFYs arrive (any role may send one), an empty queue is scanned again at
    # most this often; new work still wakes the loop at once after a quiet period.
    min_rescan_seconds: float
    # How often a continuous run looks for a wanted index whose backlog drained, and builds
    # it (0: never; a drain run builds due indexes once the queue is empty unless 0).
    index_check_seconds: float
    # Ceiling on an index build's maintenance_work_mem.
    index_build_memory_mb: int


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
