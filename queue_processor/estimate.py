"""What embedding some work would take: requests, dollars and minutes, computed without I/O.

The inputs are counts the database already estimated (items, and tokens at one token per
4 UTF-8 bytes); this module only does the arithmetic the ``estimate`` command reports:

- requests: per target, ``ceil(items / max_inputs_per_request)`` (a request never mixes
  targets), summed;
- cost in US dollars: ``tokens * price_per_million_tokens_usd / 1e6``, unknown without a price;
- minutes at the configured rate limits: the slower of requests/RPM and tokens/TPM, unknown
  when neither limit is set.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Workload:
    """Work queued (or a backfill would queue) for one target."""

    items: int
    tokens: int


@dataclass(frozen=True, slots=True)
class Estimate:
    """Totals over every workload; ``None`` where a price or a rate limit is missing."""

    items: int
    tokens: int
    requests: int
    cost_usd: float | None
    minutes_at_rate_limits: float | None


def requests_for(items: int, max_inputs_per_request: int) -> int:
    """Provider requests for ``items`` inputs of one target: ceil(items / inputs per request)."""
    return -(-items // max_inputs_per_request)


def estimate(
    workloads: Iterable[Workload],
    *,
    max_inputs_per_request: int,
    price_per_million_tokens_usd: float | None = None,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
) -> Estimate:
    """Add up ``workloads``: items, tokens, requests, dollars and minutes (see module doc)."""
    work = list(workloads)
    items = sum(w.items for w in work)
    tokens = sum(w.tokens for w in work)
    requests = sum(requests_for(w.items, max_inputs_per_request) for w in work)
    minutes: list[float] = []
    if requests_per_minute:
        minutes.append(requests / requests_per_minute)
    if tokens_per_minute:
        minutes.append(tokens / tokens_per_minute)
    return Estimate(
        items=items,
        tokens=tokens,
        requests=requests,
        cost_usd=None
        if price_per_million_tokens_usd is None
        else tokens * price_per_million_tokens_usd / 1e6,
        minutes_at_rate_limits=max(minutes) if minutes else None,
    )
