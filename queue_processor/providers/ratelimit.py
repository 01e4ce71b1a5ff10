"""A client-side rate limiter for providers that call a metered API.

Token buckets for requests per minute and tokens per minute, shared by every request of a
provider (or of several providers in one event loop). Used by ``OpenAIProvider`` before each
HTTP attempt.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio


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
