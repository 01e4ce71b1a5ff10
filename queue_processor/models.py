"""Frozen value types shared by the queue, the worker and the CLI. No I/O here."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal, NewType

QueueId = NewType("QueueId", int)
ClaimToken = NewType("ClaimToken", uuid.UUID)

Status = Literal["pending", "processing", "done", "failed"]
STATUSES: tuple[Status, ...] = ("pending", "processing", "done", "failed")

ColumnType = Literal["vector", "halfvec", "real[]", "double precision[]", "jsonb", "bytea"]
# What a target does with a text longer than the model's input limit (embedding_targets.
# length_policy, migration 0008): cut it to the limit (the item is done with a detail), or
# fail it; a chunked target's policy is ``chunk`` (migration 0010): its text is split into
# chunks that each fit, one vector per chunk in the target's companion table. Only
# registration makes a target chunked (LENGTH_POLICIES: what ``--length-policy`` may set).
LengthPolicy = Literal["truncate", "fail", "chunk"]
LENGTH_POLICIES: tuple[LengthPolicy, ...] = ("truncate", "fail")

IdType = Literal["smallint", "integer", "bigint", "uuid", "text", "character varying"]

# Why one claimed item ended failed. Each reason is final for that content: the item is not
# retried (a transient provider outage is no item failure; the batch goes back to pending).
FailureReason = Literal[
    "unregistered_target",  # its (table, column) is not in embedding_targets
    "empty_content",  # NULL or whitespace only
    "invalid_record_id",  # the queued key does not parse as the target's id type
    "provider_rejected",  # the provider returned an error instead of a vector for it
    "too_long",  # longer than the model's input limit, on a target whose policy is fail
    "dimension_mismatch",  # the vector does not fit the target column's dimensions
    "write_rejected",  # Postgres refused the write into its target
    "lease_expired",  # its claims lapsed max_attempts times (failed by the claim itself)
]

# Bounds on what one claim loads into the worker (QUEUE_PROCESSOR_MAX_CONTENT_CHARS and
# QUEUE_PROCESSOR_MAX_CLAIM_BYTES): far above any embedding model's input window (8,191
# tokens is ~33,000 characters), far below what exhausts a worker's memory.
MAX_CONTENT_CHARS = 1_000_000
MAX_CLAIM_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class QueueItem:
    """One claimed queue row: what to embed and where the vector goes."""

    id: QueueId
    table_name: str
    record_id: str
    embedding_column: str
    content: str | None
    attempts: int
    generation: int
    # Set when the claim cut the content to QUEUE_PROCESSOR_MAX_CONTENT_CHARS: what the
    # done item's detail says about it.
    capped: str | None = None

    def detail(self, written: str | None) -> str | None:
        """The done item's detail: the claim's cut (if any), then ``written`` (the write's
        own detail, e.g. "truncated to 8,191 of 23,125 tokens")."""
        parts = [p for p in (self.capped, written) if p]
        return "; ".join(parts) if parts else None


@dataclass(frozen=True)
class ItemFailure:
    """One item that ends failed: why (``reason``, for code and logs) and ``message``, the
    human-readable text stored in ``embedding_queue.error``."""

    item: QueueItem
    reason: FailureReason
    message: str


@dataclass(frozen=True)
class Claim:
    """A batch claimed by one worker: the items and the token that proves ownership."""

    token: ClaimToken
    owner: str
    items: tuple[QueueItem, ...]


@dataclass(frozen=True)
class Target:
    """A registered (table, embedding column) pair from ``embedding_targets``."""

    table_name: str
    embedding_column: str
    schema_name: str
    relation_name: str
    id_column: str
    id_type: IdType
    content_columns: tuple[str, ...]
    content_template: str | None
    column_type: ColumnType
    dimensions: int | None
    model: str | None
    model_column: str | None
    generated_at_column: str | None
    length_policy: LengthPolicy = "truncate"
    # A chunked target (length_policy 'chunk'): chunk size and overlap in the model's
    # tokens, the cap on chunks per record, and the companion table (in schema_name) that
    # holds the chunks; all None for a column target.
    chunk_tokens: int | None = None
    chunk_overlap: int | None = None
    max_chunks: int | None = None
    chunks_table: str | None = None

    @property
    def chunked(self) -> bool:
        """Whether this target stores chunks in a companion table (not a column)."""
        return self.chunks_table is not None

    @property
    def key(self) -> tuple[str, str]:
        """The registry key: (table_name label, embedding column)."""
        return (self.table_name, self.embedding_column)

    @property
    def vectors_at(self) -> tuple[str, str, str]:
        """Where the vectors (and the vector index) are: (schema, table, column): the target
        column, or a chunked target's chunks table and its ``embedding`` column."""
        if self.chunks_table is not None:
            return (self.schema_name, self.chunks_table, "embedding")
        return (self.schema_name, self.relation_name, self.embedding_column)


# Where a wanted vector index stands (embedding_index_builds.state, migration 0007).
IndexState = Literal["pending", "building", "ready", "failed"]

# pgvector's HNSW defaults, which the seeds' schema used too.
HNSW_DEFAULT_M = 16
HNSW_DEFAULT_EF_CONSTRUCTION = 64


@dataclass(frozen=True)
class IndexSpec:
    """The index a target wants: an HNSW index ``index_name`` (in the table's schema) with
    ``opclass`` (by the column's type) and its build parameters."""

    index_name: str
    opclass: Literal["vector_cosine_ops", "halfvec_cosine_ops"]
    m: int = HNSW_DEFAULT_M
    ef_construction: int = HNSW_DEFAULT_EF_CONSTRUCTION


@dataclass(frozen=True)
class IndexBuild:
    """A build one builder has claimed: the wanted index of target (``table_name``,
    ``embedding_column``) and where it goes: column ``index_column`` of table
    ``schema_name.relation_name`` (the target column, or a chunked target's chunks table's
    ``embedding``)."""

    table_name: str
    embedding_column: str
    index_name: str
    opclass: str
    m: int
    ef_construction: int
    schema_name: str
    relation_name: str
    index_column: str
    column_type: ColumnType
    dimensions: int | None


@dataclass(frozen=True)
class IndexBuildResult:
    """How a build ended: ``state`` 'ready', 'failed' (``error`` says why) or 'pending'
    (interrupted, given back). ``dropped_invalid``: an invalid index an earlier, killed build
    left behind was dropped first."""

    build: IndexBuild
    state: IndexState
    error: str | None
    memory_mb: int
    seconds: float
    dropped_invalid: bool
