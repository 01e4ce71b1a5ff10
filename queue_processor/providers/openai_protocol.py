"""The OpenAI embeddings wire format: reading ``POST /embeddings`` answers, success or error.

Pure functions over parsed JSON and ``Answer`` bodies; no I/O and no policy. Which status
means what (retry, split, stop) is decided by ``OpenAIProvider``.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Callable

import numpy as np
import structlog

from queue_processor.providers.base import RequestResult
from queue_processor.providers.http import Answer
from queue_processor.providers.packing import Vector

log = structlog.get_logger(__name__)

MAX_ERROR_CHARS = 500
"""The longest server error text quoted in a message, in characters."""

_MODEL_MISSING = re.compile(
    r"\bmodel\b.*\b(does not exist|not found|no such model|is not supported)",
    re.IGNORECASE | re.DOTALL,
)


def parse_embeddings(payload: object, n_inputs: int) -> RequestResult | None:
    """Match ``data[*]`` to the request's ``n_inputs`` inputs by ``index``.

    Returns None when the payload has no ``data`` list. Every input without exactly one
    decodable vector gets an error; items with a missing or out-of-range index are ignored
    (and logged). Vectors are decoded here and validated by the caller.
    """
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        return None
    vectors: list[Vector | None] = [None] * n_inputs
    errors: dict[int, str] = {}
    seen: set[int] = set()
    ignored = 0
    for position, item in enumerate(data):
        index = item.get("index", position) if isinstance(item, dict) else None
        if (
            not isinstance(item, dict)
            or not isinstance(index, int)
            or isinstance(index, bool)
            or not 0 <= index < n_inputs
        ):
            ignored += 1
            continue
        if index in seen:
            vectors[index] = None
            errors[index] = "provider returned more than one vector for this input"
            continue
        seen.add(index)
        vector = decode_embedding(item.get("embedding"))
        if vector is None:
            errors[index] = "provider returned a vector that could not be decoded"
            continue
        vectors[index] = vector
    for index in range(n_inputs):
        if index not in seen:
            errors[index] = "provider returned no vector for this input"
    if ignored:
        log.warning("provider_response_items_ignored", items=ignored)
    return RequestResult(vectors=vectors, errors=errors)


def decode_embedding(raw: object) -> Vector | None:
    """Decode a base64 little-endian float32 string or a list of numbers; None if neither."""
    if isinstance(raw, str):
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(data) % 4:
            return None
        return np.frombuffer(data, dtype="<f4").astype(np.float32, copy=False)
    if isinstance(raw, list):
        try:
            floats = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError):
            return None
        # Out-of-range values become inf here and are then rejected as non-finite.
        with np.errstate(over="ignore", invalid="ignore"):
            return floats.astype(np.float32)
    return None


def usage_tokens(payload: object, estimated: int) -> int:
    """``usage.total_tokens`` (or ``prompt_tokens``) when reported, else ``estimated``."""
    usage = payload.get("usage") if isinstance(payload, dict) else None
    if isinstance(usage, dict):
        for key in ("total_tokens", "prompt_tokens"):
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
            if isinstance(value, float) and math.isfinite(value) and value >= 0:
                return int(value)
    return estimated


def error_text(answer: Answer, redact: Callable[[str], str]) -> str:
    """The server's error text (``error.message`` if JSON) on one line, redacted, truncated
    to ``MAX_ERROR_CHARS``."""
    try:
        payload = answer.json()
    except ValueError:
        payload = None
    message: object = None
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            message = error.get("message")
        elif isinstance(error, str):
            message = error
        if message is None:
            message = payload.get("message") or payload.get("detail")
    if message is None:
        message = answer.text()
    text = redact(" ".join(str(message).split()))
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 3] + "..."
    return text or "no error message"


def says_model_missing(answer: Answer) -> bool:
    """True when an error body says the model does not exist (OpenAI, vLLM, Ollama...)."""
    try:
        payload = answer.json()
    except ValueError:
        return False
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        if error.get("code") == "model_not_found":
            return True
        message = error.get("message")
    else:
        message = error
    return isinstance(message, str) and bool(_MODEL_MISSING.search(message))
