"""Deterministic text: the same varied documents on every run."""

from __future__ import annotations

import random

import numpy as np

_ONSETS = ["b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ea", "ou", "ai"]
_CODAS = ["", "n", "r", "s", "t", "l", "nd", "ck", "m"]


class Corpus:
    """Varied ~50-word texts, the same for every run (seeded), generated once and cached."""

    def __init__(self, seed: int = 7) -> None:
        self._rng = random.Random(seed)
        words: set[str] = set()
        while len(words) < 3000:
            syllables = self._rng.randint(1, 3)
            words.add(
                "".join(
                    self._rng.choice(_ONSETS) + self._rng.choice(_VOWELS) + self._rng.choice(_CODAS)
                    for _ in range(syllables)
                )
            )
        self._vocab = sorted(words)
        # Zipf-like weights: a few common words, a long tail, as in prose.
        self._weights = [1.0 / (rank + 1) for rank in range(len(self._vocab))]
        self._cum = list(np.cumsum(self._weights))
        self._texts: list[str] = []

    def texts(self, n: int) -> list[str]:
        """The first ``n`` texts (distinct, 40-60 words each)."""
        while len(self._texts) < n:
            k = self._rng.randint(40, 60)
            words = self._rng.choices(self._vocab, cum_weights=self._cum, k=k)
            self._texts.append(f"document {len(self._texts) + 1}: " + " ".join(words) + ".")
        return self._texts[:n]

    def copy_payload(self, n: int, *, start_id: int = 1) -> bytes:
        """COPY text format rows ``id<TAB>body`` for ids start_id.. (texts hold no tabs)."""
        return "".join(f"{start_id + i}\t{text}\n" for i, text in enumerate(self.texts(n))).encode()
