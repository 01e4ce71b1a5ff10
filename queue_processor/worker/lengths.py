"""Texts longer than the model's input limit: each target's length policy, applied before
the provider call, and again when a server refuses a text for its length.

The limit is the provider's ``max_input_tokens`` (OpenAI's table, the local model's window,
``EMBEDDING_MAX_INPUT_TOKENS``), counted with its ``tokenizer`` (exact where one is on this
machine, a conservative estimate otherwise). Under ``truncate`` a longer text is cut to the
limit and its item is done with a detail ("truncated to 8,191 of 23,125 tokens"); under
``fail`` the item fails, saying how long the text was. A server that still answers "maximum
context length is N tokens" for a text (its tokenizer is not ours, or its limit is smaller
than configured) makes the provider report the text too long and lower its limit for the
rest of the run; the text is then cut again, from the original, and sent again, up to
``MAX_SHRINK_ROUNDS`` times.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from queue_processor.models import LengthPolicy
from queue_processor.providers.base import EmbeddingProvider, EmbedResult
from queue_processor.providers.packing import Vector
from queue_processor.providers.tokens import Tokenizer

log = structlog.get_logger(__name__)

MAX_SHRINK_ROUNDS = 3
"""How often one batch sends texts again after a server refused them for their length."""


@dataclass(frozen=True)
class Fitted:
    """A text that fits the model: what to send, and the item's detail when it was cut."""

    text: str
    detail: str | None = None


@dataclass(frozen=True)
class TooLong:
    """A text over the limit on a target whose policy is ``fail``: why it fails."""

    message: str


def fit(
    text: str, policy: LengthPolicy, limit: int | None, tokenizer: Tokenizer
) -> Fitted | TooLong:
    """``text`` as the model may take it under ``policy`` (``limit`` None: no known limit)."""
    if limit is None:
        return Fitted(text)
    # Cheap first: every token covers at least one byte, so a text of no more bytes than the
    # limit fits without counting.
    if len(text.encode("utf-8", "surrogatepass")) <= limit:
        return Fitted(text)
    total = tokenizer.count(text)
    if total <= limit:
        return Fitted(text)
    approx = "" if tokenizer.exact else "~"
    if policy == "fail":
        return TooLong(
            f"text has {approx}{total:,} tokens, over the model's input limit of {limit:,} "
            "(the target's length policy is fail)"
        )
    cut = tokenizer.truncate(text, limit)
    kept = tokenizer.count(cut)
    return Fitted(cut, f"truncated to {approx}{kept:,} of {approx}{total:,} tokens")


@dataclass
class Embedded:
    """The provider's answer for a batch's fitted texts, after any shrink rounds; aligned
    with the texts. ``details[i]`` is the detail of text ``i`` (None when not cut)."""

    vectors: list[Vector | None]
    errors: dict[int, str]
    details: list[str | None]
    tokens: int
    requests: int
    cached: int

    def as_result(self) -> EmbedResult:
        return EmbedResult(
            vectors=self.vectors,
            errors=self.errors,
            tokens=self.tokens,
            requests=self.requests,
            cached=self.cached,
        )


async def embed_fitted(
    provider: EmbeddingProvider,
    originals: Sequence[str],
    policies: Sequence[LengthPolicy],
    fitted: Sequence[Fitted],
) -> Embedded:
    """Embed ``fitted`` texts; those the server refused for their length and whose policy is
    ``truncate`` are cut again from ``originals`` to what the server allows and sent again.
    Raises what ``provider.embed`` raises."""
    result = await provider.embed([f.text for f in fitted])
    out = Embedded(
        vectors=list(result.vectors),
        errors=dict(result.errors),
        details=[f.detail for f in fitted],
        tokens=result.tokens,
        requests=result.requests,
        cached=result.cached,
    )
    too_long = dict(result.too_long)
    for _ in range(MAX_SHRINK_ROUNDS):
        again = [i for i in sorted(too_long) if policies[i] == "truncate"]
        if not again:
            break
        refitted = [fit(originals[i], "truncate", too_long[i], provider.tokenizer) for i in again]
        texts = [f.text for f in refitted if isinstance(f, Fitted)]
        log.info("inputs_shrunk", inputs=len(again), max_input_tokens=provider.max_input_tokens)
        retry = await provider.embed(texts)
        out.tokens += retry.tokens
        out.requests += retry.requests
        out.cached += retry.cached
        too_long = {}
        for offset, index in enumerate(again):
            f = refitted[offset]
            assert isinstance(f, Fitted)  # fit() under truncate never answers TooLong
            out.vectors[index] = retry.vectors[offset]
            out.details[index] = f.detail
            if retry.vectors[offset] is None:
                out.errors[index] = retry.errors.get(offset, "provider returned no vector")
                if offset in retry.too_long:
                    too_long[index] = retry.too_long[offset]
            else:
                out.errors.pop(index, None)
    return out
