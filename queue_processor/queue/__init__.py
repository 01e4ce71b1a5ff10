"""The repository: every read and write of the queue and the target registry.

Functions take an open ``Database`` and return model values; the SQL they run lives in
queries.sql, one named statement per function. The worker never sees SQL text.

- ``claims``      the processing cycle: ``claim_batch``, ``renew_leases``, ``complete``,
                  ``fail``, ``schedule_retry``, ``release`` and their result types
- ``registry``    registered targets: list, register, unregister, backfill, grant a worker
                  role, add a vector column and its HNSW index
- ``operations``  the queue as a whole: ``status``, ``requeue_failed``, ``purge``,
                  estimates, ``search``, ``queue_depth``
- ``chunks``      chunked targets: ``ChunkWrite`` (written by ``complete``),
                  ``search_chunks``, ``chunk_counts``
- ``cache``       the opt-in embedding cache and ``EmbeddingCacheStore``
- ``indexes``     wanted vector indexes and their builds: ``hnsw_spec``, ``want_index``,
                  ``build_next_index``, ``index_builds``
- ``workers``     running workers and their models (``worker_seen``, ``worker_gone``), and
                  ``bind_target``

Callers use the package (``queue.claim_batch(...)``): every name is re-exported here, so
tests that patch ``queue.<name>`` reach every caller that goes through the package.
"""

from __future__ import annotations

from queue_processor.queue.cache import EmbeddingCacheStore, cache_lookup, cache_store
from queue_processor.queue.chunks import ChunkWrite, chunk_counts, search_chunks
from queue_processor.queue.claims import (
    EXPAND_FACTOR,
    EXPAND_MIN,
    ClaimResult,
    CompleteResult,
    Usage,
    Write,
    claim_batch,
    complete,
    fail,
    release,
    renew_leases,
    schedule_retry,
)
from queue_processor.queue.indexes import (
    HNSW_MAX_HALFVEC_DIMS,
    HNSW_MAX_VECTOR_DIMS,
    build_memory_mb,
    build_next_index,
    hnsw_spec,
    index_build_wanted,
    index_builds,
    index_usable,
    retry_index_build,
    want_index,
)
from queue_processor.queue.operations import (
    StatusReport,
    estimate_pending,
    estimate_target,
    purge,
    queue_depth,
    requeue_failed,
    search,
    status,
)
from queue_processor.queue.registry import (
    add_embedding_column,
    backfill,
    create_hnsw_index,
    grant_worker,
    hnsw_index_valid,
    list_targets,
    register_chunked_target,
    register_target,
    set_length_policy,
    unregister_target,
)
from queue_processor.queue.workers import bind_target, worker_gone, worker_seen

__all__ = [
    "EXPAND_FACTOR",
    "EXPAND_MIN",
    "HNSW_MAX_HALFVEC_DIMS",
    "HNSW_MAX_VECTOR_DIMS",
    "ChunkWrite",
    "ClaimResult",
    "CompleteResult",
    "EmbeddingCacheStore",
    "StatusReport",
    "Usage",
    "Write",
    "add_embedding_column",
    "backfill",
    "bind_target",
    "build_memory_mb",
    "build_next_index",
    "cache_lookup",
    "cache_store",
    "chunk_counts",
    "claim_batch",
    "complete",
    "create_hnsw_index",
    "estimate_pending",
    "estimate_target",
    "fail",
    "grant_worker",
    "hnsw_index_valid",
    "hnsw_spec",
    "index_build_wanted",
    "index_builds",
    "index_usable",
    "list_targets",
    "purge",
    "queue_depth",
    "register_chunked_target",
    "register_target",
    "release",
    "renew_leases",
    "requeue_failed",
    "retry_index_build",
    "schedule_retry",
    "search",
    "search_chunks",
    "set_length_policy",
    "status",
    "unregister_target",
    "want_index",
    "worker_gone",
    "worker_seen",
]
