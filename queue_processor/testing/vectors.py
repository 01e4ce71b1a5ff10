"""The fake server's embeddings: deterministic unit vectors per text, so tests can recompute
what the server sent, and a bounded cache of them."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _seed(text: str) -> int:
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "little")


def fake_vectors(texts: Sequence[str], dims: int) -> npt.NDArray[np.float32]:
    """Deterministic unit vectors for ``texts``, shape ``(len(texts), dims)``, float32.

    Each text seeds a splitmix64 stream (seed = first 8 bytes of its SHA-256); components are
    uniform in [-1, 1), then the row is L2-normalised. Vectorised: ~10 ms for 1000 x 768.
    """
    if dims < 1:
        raise ValueError("dims must be positive")
    seeds = np.fromiter((_seed(text) for text in texts), dtype=np.uint64, count=len(texts))
    z = seeds[:, None] + np.arange(1, dims + 1, dtype=np.uint64)[None, :] * _GOLDEN
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    values = (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-23) - np.float32(1.0)
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    values /= np.maximum(norms, np.float32(1e-12))
    return values


def fake_vector(text: str, dims: int) -> npt.NDArray[np.float32]:
    """The vector the fake server returns for ``text`` at ``dims`` dimensions."""
    vector: npt.NDArray[np.float32] = fake_vectors([text], dims)[0]
    return vector


def fake_token_count(text: str) -> int:
    """Tokens the fake server reports for one input (one per 4 UTF-8 bytes, at least 1)."""
    return max(1, len(text.encode("utf-8", "surrogatepass")) // 4)


class VectorCache:
    """A bounded, thread-safe LRU of fake vectors keyed by (text, dims)."""

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[tuple[str, int], npt.NDArray[np.float32]] = OrderedDict()
        self._lock = threading.Lock()

    def matrix(self, texts: Sequence[str], dims: int) -> npt.NDArray[np.float32]:
        """The vectors of ``texts``, shape ``(len(texts), dims)``; computes the missing ones."""
        out = np.empty((len(texts), dims), dtype=np.float32)
        missing: list[int] = []
        with self._lock:
            for row, text in enumerate(texts):
                cached = self._entries.get((text, dims))
                if cached is None:
                    missing.append(row)
                else:
                    self._entries.move_to_end((text, dims))
                    out[row] = cached
        if missing:
            fresh = fake_vectors([texts[row] for row in missing], dims)
            out[missing] = fresh
            if self._max_entries > 0:
                with self._lock:
                    for row, vector in zip(missing, fresh, strict=True):
                        self._entries[(texts[row], dims)] = vector
                    while len(self._entries) > self._max_entries:
                        self._entries.popitem(last=False)
        return out
