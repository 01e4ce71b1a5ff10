"""Embedding providers: the interface, shared batching helpers and the HTTP implementations.

Providers never touch the database; they turn texts into vectors or per-input errors.
"""

from __future__ import annotations

from queue_processor.providers.base import (
    EmbeddingProvider,
    EmbedResult,
    RateLimiter,
    Vector,
    dedupe,
    estimate_tokens,
    pack_requests,
    validate_vector,
)
from queue_processor.providers.openai import OpenAIProvider

__all__ = [
    "EmbedResult",
    "EmbeddingProvider",
    "OpenAIProvider",
    "RateLimiter",
    "Vector",
    "dedupe",
    "estimate_tokens",
    "pack_requests",
    "validate_vector",
]
