"""The embedding provider interface and the provider-independent helpers behind it.

A provider turns a batch of texts into vectors. It never touches the database: the worker
hands it texts and gets back an ``EmbedResult`` aligned with its inputs, where each input has
either a vector or a permanent error message. Whole-call failures are exceptions from
``queue_processor.errors``: ``ProviderUnavailable`` (retry the batch later) or
``ConfigurationError`` (stop the worker).

The helpers here are shared by every provider: request packing by count and token budget,
in-call de-duplication, vector validation, and a client-side rate limiter.
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self, TypeAlias

import anyio
import numpy as np
import numpy.typing as npt

Vector: TypeAlias = npt.NDArray[np.float32]
"""A 1-D float32 embedding."""


@dataclass(frozen=True, slots=True)
class EmbedResult:
    """What one ``embed()`` call produced, aligned with its inputs.

    ``vectors[i]`` is the (read-only, possibly shared between identical inputs) vector of
    input ``i`` or None; for every None there is an entry
    ``errors[i]`` with a permanent, human-readable reason (never containing secrets).
    ``tokens`` is the usage the server reported (estimated where it reported none) and
    ``requests`` counts HTTP requests made, including retries and split requests;
    ``cached`` counts inputs served from a cache instead of the backend.
    """

    vectors: list[Vector | None]
    errors: dict[int, str] = field(default_factory=dict)
    tokens: int = 0
    requests: int = 0
    cached: int = 0


class EmbeddingProvider(abc.ABC):
    """An async embedding backend; use it as an async context manager.

    Attributes describe the backend for the worker: ``name`` (e.g. "openai"), ``model``,
    ``dimensions`` (the expected output dimension, None if unknown until the first vector),
    and the per-request limits the provider packs batches into.
    """

    name: str
    model: str
    dimensions: int | None
    max_inputs_per_request: int
    max_tokens_per_request: int

    @abc.abstractmethod
    async def embed(self, texts: Sequence[str]) -> EmbedResult:
        """Embed ``texts``; per-input problems go to ``EmbedResult.errors``.

        Raises ``ProviderUnavailable`` when the backend fails transiently after in-call
        retries, and ``ConfigurationError`` when no call can succeed until settings change.
        """

    async def aclose(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release resources (HTTP clients, models). Safe to call more than once."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def estimate_tokens(text: str) -> int:
    """A cheap upper-ish token estimate: one token per 4 UTF-8 bytes, at least 1.

    Real tokenizers average ~4 bytes per token for English; for packing requests under a
    budget a slight overestimate is the safe side, and it avoids a tokenizer dependency.
    """
    return max(1, math.ceil(len(text.encode("utf-8", "surrogatepass")) / 4))


def pack_requests(texts: Sequence[str], max_inputs: int, max_tokens: int) -> list[list[int]]:
    """Group input indices, in order, into requests within both limits.

    Each group has at most ``max_inputs`` inputs and at most ``max_tokens`` estimated
    tokens, except that a single input over the token budget gets a group of its own (the
    server decides whether it is too long).
    """
    if max_inputs < 1 or max_tokens < 1:
        raise ValueError("max_inputs and max_tokens must be positive")
    groups: list[list[int]] = []
    current: list[int] = []
    current_tokens = 0
    for index, text in enumerate(texts):
        tokens = estimate_tokens(text)
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


class _Bucket:
    """A token bucket holding at most ``capacity``, refilled continuously over a minute."""

    __slots__ = ("capacity", "level", "rate_per_s", "updated")

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate_per_s = per_minute / 60.0
        self.level = self.capacity
        self.updated = now

    def delay_s(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` can be taken (0 if now); refills first."""
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate_per_s)
        self.updated = now
        # A request bigger than the whole bucket waits for a full bucket, then goes through
        # (driving the level negative), instead of waiting forever.
        needed = min(amount, self.capacity)
        missing = needed - self.level
        # Tolerance: float rounding must not turn an exact wait into another tiny sleep.
        return 0.0 if missing <= 1e-9 * self.capacity else missing / self.rate_per_s


class RateLimiter:
    """Client-side requests-per-minute and tokens-per-minute limits (token buckets).

    Each limit is a bucket whose capacity is the per-minute amount, starting full and
    refilled continuously; None means unlimited. ``acquire(tokens)`` waits until both
    buckets allow one request of ``tokens`` tokens. Waiters are served first-come,
    first-served, so a large request is not starved by a stream of small ones. One limiter
    may be shared by several providers or calls within one event loop.

    ``clock`` (seconds, monotonic) and ``sleep`` are injectable for tests.
    """

    def __init__(
        self,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        clock: Callable[[], float] = time.monotonic,
        *,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        for label, value in (
            ("requests_per_minute", requests_per_minute),
            ("tokens_per_minute", tokens_per_minute),
        ):
            if value is not None and value <= 0:
                raise ValueError(f"{label} must be positive or None, got {value}")
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self._clock = clock
        self._sleep = sleep
        now = clock()
        self._requests = None if requests_per_minute is None else _Bucket(requests_per_minute, now)
        self._tokens = None if tokens_per_minute is None else _Bucket(tokens_per_minute, now)
        self._lock = anyio.Lock()

    def __repr__(self) -> str:
        return (
            f"RateLimiter(requests_per_minute={self.requests_per_minute!r}, "
            f"tokens_per_minute={self.tokens_per_minute!r})"
        )

    async def acquire(self, tokens: int) -> None:
        """Wait until one request carrying ``tokens`` tokens is allowed, then account for it."""
        if self._requests is None and self._tokens is None:
            return
        async with self._lock:
            while True:
                now = self._clock()
                wait_s = 0.0
                if self._requests is not None:
                    wait_s = max(wait_s, self._requests.delay_s(1, now))
                if self._tokens is not None:
                    wait_s = max(wait_s, self._tokens.delay_s(tokens, now))
                if wait_s <= 0:
                    break
                await self._sleep(wait_s)
            if self._requests is not None:
                self._requests.level -= 1
            if self._tokens is not None:
                self._tokens.level -= tokens
