"""The pure steps of ``BatchingProvider.embed`` (base.py): collapse identical texts, pack
inputs into requests under a count and a token budget, check each returned vector; and
``require``, the settings check every provider's constructor uses."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from queue_processor.errors import ConfigurationError

Vector: TypeAlias = npt.NDArray[np.float32]
"""A 1-D float32 embedding."""


def estimate_tokens(text: str) -> int:
    """A cheap upper-ish token estimate: one token per 4 UTF-8 bytes, at least 1.

    Real tokenizers average ~4 bytes per token for English; for packing requests under a
    budget a slight overestimate is the safe side, and it avoids a tokenizer dependency.
    """
    return max(1, math.ceil(len(text.encode("utf-8", "surrogatepass")) / 4))


def pack_requests(
    texts: Sequence[str],
    max_inputs: int,
    max_tokens: int,
    *,
    count: Callable[[str], int] = estimate_tokens,
) -> list[list[int]]:
    """Group input indices, in order, into requests within both limits.

    Each group has at most ``max_inputs`` inputs and at most ``max_tokens`` tokens as
    ``count`` counts them (the provider's tokenizer), except that a single input over the
    token budget gets a group of its own (the server decides whether it is too long).
    """
    if max_inputs < 1 or max_tokens < 1:
        raise ValueError("max_inputs and max_tokens must be positive")
    groups: list[list[int]] = []
    current: list[int] = []
    current_tokens = 0
    for index, text in enumerate(texts):
        tokens = max(1, count(text))
        if current and (len(current) >= max_inputs or current_tokens + tokens > max_tokens):
            groups.append(current)
            current, current_tokens = [], 0
        current.append(index)
        current_tokens += tokens
    if current:
        groups.append(current)
    return groups


def dedupe(texts: Sequence[str]) -> tuple[list[str], list[int]]:
    """Collapse identical texts: returns ``(unique_texts, index_map)``.

    ``unique_texts`` keeps first-occurrence order; ``index_map[i]`` is the position in
    ``unique_texts`` of ``texts[i]``, used to fan results back out to every position.
    """
    positions: dict[str, int] = {}
    unique: list[str] = []
    index_map: list[int] = []
    for text in texts:
        position = positions.get(text)
        if position is None:
            position = positions[text] = len(unique)
            unique.append(text)
        index_map.append(position)
    return unique, index_map


def validate_vector(vec: Vector, expected_dims: int | None) -> str | None:
    """Return why ``vec`` is unusable (wrong shape/dimension, non-finite value), else None."""
    if vec.ndim != 1:
        return f"provider returned a {vec.ndim}-dimensional array instead of a vector"
    dims = int(vec.shape[0])
    if dims == 0:
        return "provider returned an empty vector"
    if expected_dims is not None and dims != expected_dims:
        return f"provider returned {dims} dimensions, expected {expected_dims}"
    if not bool(np.isfinite(vec).all()):
        return "provider returned a non-finite value (NaN or infinity)"
    return None


def require(condition: bool, message: str) -> None:
    """Raise ``ConfigurationError(message)`` unless ``condition``: for checking settings."""
    if not condition:
        raise ConfigurationError(message)
