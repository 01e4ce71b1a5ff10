"""Token counting and cutting (providers/tokens.py) and the length policies (worker/lengths.py)."""

from __future__ import annotations

import pytest

from queue_processor.providers.tokens import (
    ContextLimit,
    EstimateTokenizer,
    TiktokenTokenizer,
    context_limit,
    model_input_limit,
    openai_tokenizer,
)
from queue_processor.worker.lengths import Fitted, TooLong, fit


def test_openai_models_count_exactly_with_the_shipped_cl100k_file() -> None:
    tokenizer = openai_tokenizer("text-embedding-3-small")
    assert isinstance(tokenizer, TiktokenTokenizer)
    assert tokenizer.exact
    assert tokenizer.count("hello world, this is a test") == 7  # cl100k_base's own answer
    assert tokenizer.count("") == 0
    assert model_input_limit("text-embedding-3-large") == 8191
    assert model_input_limit("nomic-embed-text") is None
    assert not openai_tokenizer("nomic-embed-text").exact


@pytest.mark.parametrize("text", ["word " * 500, "日本語のテキスト。" * 200, "🙂🙃" * 300])
def test_tiktoken_truncation_keeps_a_prefix_within_the_limit(text: str) -> None:
    tokenizer = openai_tokenizer("text-embedding-3-small")
    cut = tokenizer.truncate(text, 100)
    assert text.startswith(cut)
    assert 90 <= tokenizer.count(cut) <= 100
    assert "\ufffd" not in cut  # no character broken in half
    assert tokenizer.truncate("short", 100) == "short"


def test_the_estimate_over_counts_english_and_cuts_within_its_count() -> None:
    estimate = EstimateTokenizer()
    text = "the quick brown fox jumps over the lazy dog " * 100
    exact = openai_tokenizer("text-embedding-3-small").count(text)
    assert estimate.count(text) > exact  # conservative: cut to N by it, fits N real tokens
    cut = estimate.truncate(text, 50)
    assert text.startswith(cut)
    assert estimate.count(cut) <= 50
    assert estimate.truncate("é" * 10, 3) == "é" * 4  # 9 bytes: never half a character


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "This model's maximum context length is 8192 tokens, however you requested 23125 "
            "tokens (23125 in your prompt; 0 for the completion). Please reduce your prompt.",
            ContextLimit(8192, 23125),
        ),
        (  # vLLM
            "This model's maximum context length is 512 tokens. However, you requested 1,024 "
            "tokens in the input for embedding generation. Please reduce the length of the input.",
            ContextLimit(512, 1024),
        ),
        (
            "This model's maximum context length is 8192 tokens, however you requested more "
            "tokens in your input.",
            ContextLimit(8192, None),
        ),
        ("Invalid 'input': must be a string.", None),
    ],
)
def test_context_limit_messages_are_read(message: str, expected: ContextLimit | None) -> None:
    assert context_limit(message) == expected


def test_fit_applies_the_policy() -> None:
    tokenizer = openai_tokenizer("text-embedding-3-small")
    text = "alpha beta gamma delta " * 50  # 200 tokens
    total = tokenizer.count(text)
    assert fit(text, "truncate", None, tokenizer) == Fitted(text)
    assert fit(text, "fail", total, tokenizer) == Fitted(text)
    cut = fit(text, "truncate", 120, tokenizer)
    assert cut == Fitted(tokenizer.truncate(text, 120), f"truncated to 120 of {total} tokens")
    failed = fit(text, "fail", 120, tokenizer)
    assert failed == TooLong(
        f"text has {total} tokens, over the model's input limit of 120 "
        "(the target's length policy is fail)"
    )
    estimated = fit(text, "truncate", 120, EstimateTokenizer())
    assert isinstance(estimated, Fitted)
    assert estimated.detail is not None
    assert estimated.detail.startswith("truncated to ~")
