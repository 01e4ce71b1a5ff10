"""Embedding providers: the interface, the shared ``embed`` skeleton and the backends.

Providers never touch the database; they turn texts into vectors or per-input errors.
``base`` holds the interface (``EmbeddingProvider``) and the skeleton (``BatchingProvider``)
that ``openai`` and ``local`` fill in with one packed request each (``packing`` its pure
steps: dedupe, request packing, vector checks; and the ``Vector`` type); ``http`` and
``openai_protocol`` are the OpenAI provider's plumbing and wire format; ``ratelimit`` its
client-side limits; ``cached`` a decorator around any provider.
"""

from __future__ import annotations

from queue_processor.providers.base import (
    BatchingProvider,
    EmbeddingProvider,
    EmbedResult,
    RequestResult,
    Usage,
)
from queue_processor.providers.openai import OpenAIProvider
from queue_processor.providers.packing import (
    Vector,
    dedupe,
    estimate_tokens,
    pack_requests,
    validate_vector,
)
from queue_processor.providers.ratelimit import RateLimiter

__all__ = [
    "BatchingProvider",
    "EmbedResult",
    "EmbeddingProvider",
    "OpenAIProvider",
    "RateLimiter",
    "RequestResult",
    "Usage",
    "Vector",
    "dedupe",
    "estimate_tokens",
    "pack_requests",
    "validate_vector",
]
