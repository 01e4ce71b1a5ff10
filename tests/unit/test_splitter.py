"""The chunk splitter (worker/splitter.py): token windows on the model's tokenizer that end
on paragraph, sentence or word boundaries and overlap by about the asked number of tokens."""

from __future__ import annotations

import pytest

from queue_processor.providers.tokens import EstimateTokenizer, Tokenizer, openai_tokenizer
from queue_processor.worker.splitter import split

CL100K = openai_tokenizer("text-embedding-3-small")
ESTIMATE = EstimateTokenizer()


def paragraphs(n: int, sentences: int = 5) -> str:
    return "\n\n".join(
        " ".join(
            f"Paragraph {p} sentence {s} says something about item {p * 10 + s}."
            for s in range(sentences)
        )
        for p in range(n)
    )


@pytest.mark.parametrize("tokenizer", [CL100K, ESTIMATE], ids=["cl100k", "estimate"])
@pytest.mark.parametrize(("size", "overlap"), [(16, 0), (32, 4), (64, 16), (200, 40)])
def test_every_chunk_fits_and_the_chunks_cover_the_text_in_order(
    tokenizer: Tokenizer, size: int, overlap: int
) -> None:
    text = paragraphs(8)
    found = split(text, tokenizer, size=size, overlap=overlap, max_chunks=1000)
    assert not found.capped
    assert len(found.texts) > 1
    assert all(0 < tokenizer.count(c) <= size for c in found.texts)
    # In order, each found in the text after the previous one's start; together they cover
    # every word of the text.
    at = 0
    for chunk in found.texts:
        where = text.find(chunk, at)
        assert where >= 0, chunk
        at = where + 1
    covered = " ".join(found.texts).split()
    assert set(text.split()) <= set(covered)
    assert text.rstrip().endswith(found.texts[-1])


def test_chunks_end_on_paragraph_then_sentence_boundaries() -> None:
    text = paragraphs(6, sentences=3)  # each paragraph ~40 tokens
    found = split(text, CL100K, size=100, overlap=0, max_chunks=100)
    # Windows of 100 tokens hold two paragraphs and a part of the third: they end at a break.
    assert all(c.endswith(".") for c in found.texts)
    assert all(c.startswith("Paragraph") for c in found.texts)
    one = " ".join(f"Sentence {s} is about thing {s}." for s in range(60))  # no paragraphs
    found = split(one, CL100K, size=40, overlap=0, max_chunks=100)
    assert all(c.endswith(".") and c.startswith("Sentence") for c in found.texts)


def test_overlap_repeats_the_end_of_the_previous_chunk() -> None:
    text = " ".join(f"word{i}" for i in range(600))  # no sentence ends: word boundaries
    found = split(text, CL100K, size=50, overlap=10, max_chunks=100)
    for before, after in zip(found.texts, found.texts[1:], strict=False):
        head = after.split()[0]
        assert head in before.split()  # the next chunk starts inside the previous one
        shared = before[before.rindex(head) :]
        assert after.startswith(shared)
        assert 0 < CL100K.count(shared) <= 10
    without = split(text, CL100K, size=50, overlap=0, max_chunks=100)
    assert len(without.texts) < len(found.texts)
    assert " ".join(without.texts).split() == text.split()  # no word twice, none lost


def test_overlap_is_kept_below_half_the_size() -> None:
    text = paragraphs(10)
    found = split(text, CL100K, size=20, overlap=500, max_chunks=1000)
    assert all(CL100K.count(c) <= 20 for c in found.texts)
    assert len(found.texts) < 400  # each window advances by more than half


def test_cjk_and_emoji_without_spaces_are_cut_between_characters() -> None:
    cjk = "这是一个很长的中文句子，没有空格。" * 40 + "😀👍🏽" * 50
    for tokenizer in (CL100K, ESTIMATE):
        found = split(cjk, tokenizer, size=32, overlap=4, max_chunks=1000)
        assert len(found.texts) > 5
        assert all(0 < tokenizer.count(c) <= 32 for c in found.texts)
        assert all("\ufffd" not in c for c in found.texts)  # no broken character
        assert cjk.startswith(found.texts[0])
        assert cjk.endswith(found.texts[-1])
        # Full stops end chunks when one is in the window's second half.
        assert sum(c.endswith("。") for c in found.texts[:-1]) >= len(found.texts) // 3


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t "])
def test_a_blank_text_has_no_chunk(text: str) -> None:
    assert split(text, CL100K, size=32, overlap=4, max_chunks=10).texts == []


def test_a_short_text_is_one_chunk_stripped() -> None:
    assert split("  Hello there.  \n", CL100K, size=32, overlap=4, max_chunks=10).texts == [
        "Hello there."
    ]


def test_max_chunks_caps_the_split_and_says_how_much_was_left() -> None:
    text = paragraphs(20)
    full = split(text, CL100K, size=32, overlap=4, max_chunks=10_000)
    capped = split(text, CL100K, size=32, overlap=4, max_chunks=3)
    assert capped.texts == full.texts[:3]
    assert capped.capped
    assert not full.capped
    rest = text[len(text) - capped.rest_chars :]
    assert capped.texts[-1] not in rest
    assert 0 < capped.rest_chars < len(text)
    assert text.endswith(rest)
    assert rest.lstrip().startswith(
        text[text.index(capped.texts[-1]) + len(capped.texts[-1]) :].lstrip()[:20]
    )


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        split("text", CL100K, size=0, overlap=0, max_chunks=1)
    with pytest.raises(ValueError, match="at least 1"):
        split("text", CL100K, size=10, overlap=0, max_chunks=0)
