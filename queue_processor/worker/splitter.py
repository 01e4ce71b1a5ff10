"""Split a text into chunks for a chunked target: token windows on the model's tokenizer that
end on a paragraph, else a sentence, else a word boundary, and overlap by about ``overlap``
tokens.

Why this and not a library (semchunk, langchain-text-splitters, semantic-text-splitter): the
size that matters is the model's own token count, and the worker already has the tokenizer
that counts it (``providers.tokens``: tiktoken's cl100k_base, the local model's own, or the
conservative estimate), behind the two operations used here (``count`` and ``truncate``).
A window cut by ``truncate`` fits by construction, whichever of the three it is; the
libraries would need an adapter per tokenizer, a new dependency, and their overlap and size
rules are in characters or ratios, not in the model's tokens.

How a window is cut: the longest prefix of the rest of the text with at most ``size`` tokens
(``truncate`` on a slice that grows until it is longer than the window); then its end moves
back to the last paragraph break in the window's second half, else the last sentence end
there, else the last whitespace there, else stays (CJK text without spaces, a long URL). The
next window starts ``overlap`` tokens before the previous one ended (found by bisection with
``count``), moved forward to a word start. At most ``max_chunks`` chunks: ``Chunks.capped``
says the split stopped early and how many characters were left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from queue_processor.providers.tokens import Tokenizer

_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n")
# A sentence ends with . ! ? or … (and closing quotes or brackets) before whitespace, or
# with CJK full stops, which need no space after them.
_SENTENCE = re.compile(r"[.!?\u2026][\"'\u201d\u2019)\]]*(?=\s)|[\u3002\uff01\uff1f]+")
_SPACE = re.compile(r"\s")
_WS = " \t\n\r\f\v"
_MAX_TOKEN_CHARS = 16


@dataclass(frozen=True)
class Chunks:
    """A text's chunks, in order. ``capped``: ``max_chunks`` stopped the split, and the last
    ``rest_chars`` characters of the text are in no chunk."""

    texts: list[str]
    capped: bool = False
    rest_chars: int = 0


def split(text: str, tokenizer: Tokenizer, *, size: int, overlap: int, max_chunks: int) -> Chunks:
    """Split ``text`` into chunks of at most ``size`` tokens (by ``tokenizer``) that repeat
    about ``overlap`` tokens of the previous chunk; a blank text has no chunk.

    ``overlap`` is lowered below half of ``size`` if needed, so every window advances.
    """
    if size < 1 or max_chunks < 1:
        raise ValueError("size and max_chunks must be at least 1")
    overlap = max(0, min(overlap, (size - 1) // 2))
    n = len(text)
    texts: list[str] = []
    pos = _skip_space(text, 0)
    covered = pos
    while pos < n:
        if len(texts) == max_chunks:
            return Chunks(texts, capped=True, rest_chars=n - covered)
        window = _window_end(text, pos, tokenizer, size)
        end = n if window >= n else _boundary(text, pos, window)
        piece = text[pos:end].strip(_WS)
        tokens = tokenizer.count(piece)
        if tokens > size and end != window:
            # The shorter cut counted more tokens alone (a BPE merge): keep the window.
            end = window
            piece = text[pos:end].strip(_WS)
            tokens = tokenizer.count(piece)
        if tokens > size:
            # Stripping changed the merges: keep what fits; the rest starts the next chunk.
            piece = tokenizer.truncate(piece, size)
            end = _skip_space(text, pos) + len(piece)
        if piece:
            texts.append(piece)
        covered = end
        if end >= n:
            break
        pos = _skip_space(text, _overlap_start(text, pos, end, tokenizer, overlap))
    return Chunks(texts)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _window_end(text: str, pos: int, tokenizer: Tokenizer, size: int) -> int:
    """The end of the longest prefix of ``text[pos:]`` with at most ``size`` tokens (at least
    one character), tokenizing a slice that grows only as far as needed."""
    span = size * 8
    while True:
        end = min(len(text), pos + span)
        piece = text[pos:end]
        cut = tokenizer.truncate(piece, size)
        if len(cut) < len(piece) or end == len(text):
            return pos + max(1, len(cut))
        span *= 4


def _boundary(text: str, pos: int, window: int) -> int:
    """Where a chunk starting at ``pos`` whose window ends at ``window`` should end: the last
    paragraph break, sentence end or whitespace in the window's second half, else ``window``."""
    low = pos + (window - pos) // 2
    region = text[low:window]
    for pattern, use_end in ((_PARAGRAPH, False), (_SENTENCE, True), (_SPACE, False)):
        last = None
        for found in pattern.finditer(region):
            last = found
        if last is not None:
            cut = low + (last.end() if use_end else last.start())
            if cut > pos:
                return cut
    return window


def _overlap_start(text: str, pos: int, end: int, tokenizer: Tokenizer, overlap: int) -> int:
    """Where the next window starts: the earliest position after ``pos`` from which the text
    up to ``end`` has at most ``overlap`` tokens, moved forward to the start of a word (when
    a space follows within the overlap)."""
    if overlap <= 0:
        return end
    # No token of ours spans more than _MAX_TOKEN_CHARS characters in prose, so the overlap
    # starts within overlap * that of the end; a longer token only makes the overlap shorter.
    low, high = max(pos + 1, end - overlap * _MAX_TOKEN_CHARS), end
    while low < high:
        mid = (low + high) // 2
        if tokenizer.count(text[mid:end]) <= overlap:
            high = mid
        else:
            low = mid + 1
    start = low
    if start < end and text[start - 1] not in _WS:
        space = _SPACE.search(text, start, end)
        if space is not None:
            start = space.end()
    return start
