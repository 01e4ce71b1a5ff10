"""A provider for OpenAI-compatible ``POST /embeddings`` endpoints (OpenAI, vLLM, Ollama, TEI...).

One ``embed()`` call de-duplicates its texts, packs them into requests by count and estimated
tokens, and sends those requests concurrently (bounded per provider). Failures are translated
here, at the edge, into the shapes the worker acts on:

- 429 / 408 / 5xx / timeouts / connection errors / unreadable bodies: retried in the call
  with exponential backoff and jitter, honouring ``Retry-After`` and OpenAI's
  ``x-ratelimit-reset-*`` hints; afterwards ``ProviderUnavailable``.
- 400 / 413 / 422: the request is split in halves until the offending input is alone; that
  input gets a per-input error, the others their vectors.
- wrong dimension, NaN/inf, missing or undecodable vectors: per-input errors.
- 401 / 403 / 404 / unknown model / other 4xx: ``ConfigurationError`` (stop the worker).
- a success body larger than the request can legitimately produce (see
  ``OpenAIProvider.response_limit_bytes``): reading stops at the limit and the answer counts
  as unreadable (retried, then ``ProviderUnavailable``); error bodies are read up to 64 KiB.

The API key is sent only in the Authorization header, and only over https or to a loopback
host (plain http elsewhere needs ``allow_insecure_http``). It never appears in a message, a log
event or ``repr``: every message is built here from the status, a credential-free URL and the
server's error text with the key redacted in any letter case and URL/percent-encoding.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.utils
import ipaddress
import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import anyio
import httpx
import numpy as np
import structlog
from pydantic import SecretStr
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from queue_processor.errors import ConfigurationError, ProviderUnavailable
from queue_processor.providers.base import (
    EmbeddingProvider,
    EmbedResult,
    RateLimiter,
    Vector,
    dedupe,
    estimate_tokens,
    pack_requests,
    validate_vector,
)

log = structlog.get_logger(__name__)

_MAX_ERROR_CHARS = 500
# An error body only has to yield a message of _MAX_ERROR_CHARS: read this much of it.
_MAX_ERROR_BODY_BYTES = 64 * 1024
# Bytes one vector component can take in a success body: 5.3 as base64 (what we ask for);
# up to ~25 as a JSON number in a pretty-printed list ("      -0.012345678,\n"), from servers
# that ignore encoding_format. 32 leaves room for either.
_BODY_BYTES_PER_VALUE = 32
# Components assumed per vector when no dimension is configured (the largest common models
# have 4096; 8192 leaves room).
_ASSUMED_MAX_DIMENSIONS = 8192
# The envelope around the vectors: object names, indices, usage, model; pretty-printing.
_BODY_HEADROOM_BYTES = 1024 * 1024
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
"""The default ceiling on one success body (EMBEDDING_MAX_RESPONSE_BYTES), in bytes: 512
inputs of 4096 dimensions as pretty-printed JSON numbers fit."""
_RETRYABLE_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
_HINTED_STATUSES = frozenset({429, 503})
_INPUT_STATUSES = frozenset({400, 413, 422})
_MODEL_MISSING = re.compile(
    r"\bmodel\b.*\b(does not exist|not found|no such model|is not supported)",
    re.IGNORECASE | re.DOTALL,
)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


class _Retryable(Exception):
    """A transient failure of one HTTP attempt (internal; becomes ProviderUnavailable).

    ``str()`` is a clean message; ``retry_after_s`` is the server's hint, if any.
    """

    def __init__(
        self, message: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s


class _Rejected(Exception):
    """The server refused the request's input (400/413/422); internal, drives splitting."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class _HTTPFailure(Exception):
    """A clean description of a non-retryable HTTP answer, kept as ``__cause__``."""


@dataclass(frozen=True)
class _Answer:
    """One HTTP answer with its body, read within a byte limit (``_read_limited``)."""

    status: int
    headers: httpx.Headers
    body: bytes | bytearray

    def json(self) -> Any:
        """The body parsed as JSON; ValueError if it is not JSON."""
        return json.loads(self.body)

    def text(self) -> str:
        """The body as text (UTF-8, undecodable bytes replaced)."""
        return self.body.decode("utf-8", "replace")


class _Redactor:
    """Replaces every spelling of the secrets in a text with ``[redacted]``: any letter case,
    and each character either as itself or percent-encoded (upper- or lower-case hex, encoded
    once or twice), which covers ``quote``, ``quote_plus`` and full percent-encoding.

    Holds the secrets only inside a compiled pattern and masks its own ``repr``.
    """

    __slots__ = ("_pattern",)

    def __init__(self, secrets: Sequence[str]) -> None:
        spellings = [_spellings(secret) for secret in secrets if secret]
        self._pattern = re.compile("|".join(spellings), re.IGNORECASE) if spellings else None

    def __call__(self, text: str) -> str:
        return text if self._pattern is None else self._pattern.sub("[redacted]", text)

    def __repr__(self) -> str:
        return "_Redactor(<hidden>)"


def _spellings(secret: str) -> str:
    """A regex (to compile with IGNORECASE) matching ``secret`` in any of its spellings."""
    parts = []
    for char in secret:
        encoded = "".join(f"%(?:25)?{byte:02x}" for byte in char.encode("utf-8"))
        alternatives = [re.escape(char), encoded] + (["\\+"] if char == " " else [])
        parts.append(f"(?:{'|'.join(alternatives)})")
    return "".join(parts)


def _is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1, ::ffff:127.x.y.z)."""
    name = host.lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


async def _read_limited(response: httpx.Response, limit_bytes: int) -> tuple[bytearray, bool]:
    """Read the (decoded) body, stopping once it passes ``limit_bytes``.

    Returns ``(body, True)`` when all of it fit, else ``(the first limit_bytes, False)``
    without reading the rest; a declared Content-Length over the limit stops before reading.
    """
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit_bytes:
        return bytearray(), False
    body = bytearray()
    async for chunk in response.aiter_bytes():
        if len(body) + len(chunk) > limit_bytes:
            body += chunk[: limit_bytes - len(body)]
            return body, False
        body += chunk
    return body, True


@dataclass
class _Batch:
    """Per-position outcome of one successful HTTP request."""

    vectors: list[Vector | None]
    errors: dict[int, str]
    tokens: int


@dataclass
class _CallState:
    """Everything one ``embed()`` call accumulates across its concurrent requests."""

    vectors: dict[int, Vector] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    tokens: int = 0
    requests: int = 0


def parse_duration_s(value: str) -> float | None:
    """Parse OpenAI's reset durations ("1s", "6m0s", "20ms", "1h2m3.5s"); None if malformed."""
    text = value.strip()
    if not text:
        return None
    total = 0.0
    position = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(text):
        try:
            return max(0.0, float(text))  # a bare number means seconds
        except ValueError:
            return None
    return total


def parse_retry_after_s(value: str, *, now: float | None = None) -> float | None:
    """Parse ``Retry-After`` as delta-seconds or an HTTP date; None if malformed."""
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def retry_hint_s(headers: httpx.Headers) -> float | None:
    """The longest wait the server asked for, from Retry-After / retry-after-ms / x-ratelimit-*.

    A ``x-ratelimit-reset-requests``/``-tokens`` value counts only when the matching
    ``x-ratelimit-remaining-*`` is absent or zero: that is the limit that was hit.
    """
    hints: list[float] = []
    if "retry-after-ms" in headers:
        with contextlib.suppress(ValueError):
            hints.append(max(0.0, float(headers["retry-after-ms"]) / 1000))
    if "retry-after" in headers:
        parsed = parse_retry_after_s(headers["retry-after"])
        if parsed is not None:
            hints.append(parsed)
    for kind in ("requests", "tokens"):
        reset = headers.get(f"x-ratelimit-reset-{kind}")
        if reset is None:
            continue
        remaining = headers.get(f"x-ratelimit-remaining-{kind}")
        if remaining is not None and remaining.strip() not in ("0", ""):
            continue
        parsed = parse_duration_s(reset)
        if parsed is not None:
            hints.append(parsed)
    return max(hints) if hints else None


def _decode_embedding(raw: object) -> Vector | None:
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


class OpenAIProvider(EmbeddingProvider):
    """Embeddings from an OpenAI-compatible HTTP API. See the module docstring for behaviour.

    ``max_retries`` is the number of attempts per HTTP request for transient failures.
    ``max_response_bytes`` caps one success body (see ``response_limit_bytes``).
    ``allow_insecure_http`` permits sending the key over plain http to a host that is not
    loopback (otherwise a ``ConfigurationError``). If ``client`` is given it is used as is
    and not closed by ``aclose()``; otherwise the provider owns one keep-alive
    ``httpx.AsyncClient``. ``max_concurrent_requests`` bounds requests in flight across all
    concurrent ``embed()`` calls of this provider.
    """

    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        api_key: SecretStr | None,
        model: str,
        dimensions: int | None = None,
        timeout_seconds: float = 60,
        connect_timeout_seconds: float = 10,
        max_inputs_per_request: int = 512,
        max_tokens_per_request: int = 250_000,
        max_concurrent_requests: int = 4,
        max_retries: int = 5,
        backoff_base_seconds: float = 0.5,
        backoff_max_seconds: float = 30,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        allow_insecure_http: bool = False,
        rate_limiter: RateLimiter | None = None,
        client: httpx.AsyncClient | None = None,
        on_response: Callable[[int | str], None] | None = None,
    ) -> None:
        _require(bool(model.strip()), "the embedding model name is empty")
        _require(dimensions is None or dimensions > 0, "dimensions must be positive")
        _require(timeout_seconds > 0, "timeout_seconds must be positive")
        _require(connect_timeout_seconds > 0, "connect_timeout_seconds must be positive")
        _require(max_inputs_per_request >= 1, "max_inputs_per_request must be at least 1")
        _require(max_tokens_per_request >= 1, "max_tokens_per_request must be at least 1")
        _require(max_concurrent_requests >= 1, "max_concurrent_requests must be at least 1")
        _require(max_retries >= 1, "max_retries must be at least 1")
        _require(max_response_bytes >= 1, "max_response_bytes must be at least 1")
        _require(
            0 <= backoff_base_seconds <= backoff_max_seconds,
            "backoff seconds must satisfy 0 <= backoff_base_seconds <= backoff_max_seconds",
        )

        try:
            url = httpx.URL(base_url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ConfigurationError("the provider base URL is not a valid URL") from exc
        _require(
            url.scheme in ("http", "https") and bool(url.host),
            "the provider base URL must be an absolute http(s) URL",
        )
        # user:password@ in the URL would make httpx send Basic auth in place of the Bearer
        # key (every request a 401) and could leak through error text: refuse it.
        _require(
            not url.userinfo,
            "the provider base URL must not contain credentials: put the key in OPENAI_API_KEY",
        )
        # The URL shown in messages and logs: no query or fragment.
        self.base_url = f"{url.scheme}://{url.netloc.decode('ascii')}{url.path.rstrip('/')}"
        self._endpoint = url.copy_with(path=url.path.rstrip("/") + "/embeddings")
        self._endpoint_display = self.base_url + "/embeddings"

        key = api_key.get_secret_value() if api_key is not None else ""
        _require(
            all(0x21 <= ord(char) <= 0x7E for char in key),
            "the API key contains whitespace or characters not allowed in an HTTP header",
        )
        if key and url.scheme == "http" and not _is_loopback(url.host):
            _require(
                allow_insecure_http,
                f"the provider base URL {self.base_url} is plain http to a host that is not "
                "loopback: the API key would cross the network unencrypted. Use https, or set "
                "OPENAI_ALLOW_INSECURE_HTTP=true if the path to that host is trusted",
            )
            log.warning("provider_insecure_http", url=self.base_url)
        # Never held as plain str attributes, so that even vars(provider) or a traceback that
        # shows locals stays clean: SecretStr, _Redactor and httpx.Headers mask their repr.
        self._secrets = [SecretStr(key)] if key else []
        self._redactor = _Redactor([key])
        self._headers = httpx.Headers({"Authorization": f"Bearer {key}"} if key else {})

        self.model = model
        self.dimensions = dimensions
        self.max_inputs_per_request = max_inputs_per_request
        self.max_tokens_per_request = max_tokens_per_request
        self.max_concurrent_requests = max_concurrent_requests
        self.max_retries = max_retries
        self.max_response_bytes = max_response_bytes
        self.backoff_base_seconds = backoff_base_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self._rate_limiter = rate_limiter
        self._on_response = on_response
        self._timeout = httpx.Timeout(timeout_seconds, connect=connect_timeout_seconds)
        self._limiter = anyio.CapacityLimiter(max_concurrent_requests)
        self._owns_client = client is None
        self._client = (
            client
            if client is not None
            else httpx.AsyncClient(
                timeout=self._timeout,
                limits=httpx.Limits(
                    max_connections=max_concurrent_requests,
                    max_keepalive_connections=max_concurrent_requests,
                    keepalive_expiry=30,
                ),
            )
        )

    def __repr__(self) -> str:
        return (
            f"OpenAIProvider(model={self.model!r}, base_url={self.base_url!r}, "
            f"dimensions={self.dimensions!r})"
        )

    @property
    def is_closed(self) -> bool:
        """True once the HTTP client this provider uses is closed."""
        return self._client.is_closed

    def response_limit_bytes(self, n_inputs: int) -> int:
        """The largest success body accepted for a request of ``n_inputs`` inputs, in bytes.

        What the request can legitimately produce, generously: 32 bytes per vector component
        (base64 takes 5.3, a pretty-printed JSON number up to ~25) times the configured
        dimensions (8192 when unset) per input, plus 1 MiB for the envelope; never more than
        ``max_response_bytes``. A body past it is not read further (rule: every input has a
        size, enforced where it enters).
        """
        dims = self.dimensions or _ASSUMED_MAX_DIMENSIONS
        expected = n_inputs * dims * _BODY_BYTES_PER_VALUE + _BODY_HEADROOM_BYTES
        return min(self.max_response_bytes, expected)

    async def aclose(self) -> None:
        """Close the owned HTTP client (a client passed in is left to its owner)."""
        if self._owns_client:
            await self._client.aclose()

    async def embed(self, texts: Sequence[str]) -> EmbedResult:
        """Embed ``texts``: vectors aligned with the inputs, per-input errors, usage."""
        if self._client.is_closed:
            raise RuntimeError("this provider is closed")
        if not texts:
            return EmbedResult(vectors=[], errors={}, tokens=0, requests=0)
        unique, index_map = dedupe(texts)
        state = _CallState()
        sendable: list[int] = []
        for position, text in enumerate(unique):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                state.errors[position] = "input is not valid Unicode (it contains a lone surrogate)"
            else:
                sendable.append(position)

        groups = [
            [sendable[i] for i in group]
            for group in pack_requests(
                [unique[i] for i in sendable],
                self.max_inputs_per_request,
                self.max_tokens_per_request,
            )
        ]
        failures: list[Exception] = []

        async def run(group: list[int], scope: anyio.CancelScope) -> None:
            try:
                await self._embed_group(unique, group, state)
            except (ConfigurationError, ProviderUnavailable) as exc:
                failures.append(exc)
                scope.cancel()

        async with anyio.create_task_group() as tg:
            for group in groups:
                tg.start_soon(run, group, tg.cancel_scope)
        if failures:
            # A configuration problem outranks an outage: it needs an operator either way.
            failures.sort(key=lambda exc: not isinstance(exc, ConfigurationError))
            raise failures[0]

        if self.dimensions is None:
            self._check_shared_dimension(state)

        vectors: list[Vector | None] = []
        errors: dict[int, str] = {}
        for index, position in enumerate(index_map):
            vector = state.vectors.get(position)
            vectors.append(vector)
            if vector is None:
                errors[index] = state.errors.get(position, "provider returned no vector")
        if errors:
            log.warning("provider_input_errors", inputs=len(texts), failed=len(errors))
        return EmbedResult(
            vectors=vectors, errors=errors, tokens=state.tokens, requests=state.requests
        )

    def _check_shared_dimension(self, state: _CallState) -> None:
        """Without a configured dimension, vectors off the call's majority dimension fail."""
        if not state.vectors:
            return
        counts = Counter(int(vector.shape[0]) for vector in state.vectors.values())
        if len(counts) == 1:
            return
        expected = counts.most_common(1)[0][0]
        for position, vector in list(state.vectors.items()):
            if vector.shape[0] != expected:
                del state.vectors[position]
                state.errors[position] = (
                    f"provider returned {vector.shape[0]} dimensions, expected {expected}"
                )

    async def _embed_group(self, unique: list[str], group: list[int], state: _CallState) -> None:
        """Embed one request's worth of inputs; on an input rejection, bisect the request."""
        try:
            batch = await self._request([unique[i] for i in group], state)
        except _Rejected as exc:
            if len(group) == 1:
                state.errors[group[0]] = (
                    f"provider rejected the input (HTTP {exc.status}): {exc.message}"
                )
                log.warning("provider_input_rejected", status=exc.status)
                return
            log.info("provider_request_split", status=exc.status, inputs=len(group))
            middle = len(group) // 2
            await self._embed_group(unique, group[:middle], state)
            await self._embed_group(unique, group[middle:], state)
            return
        state.tokens += batch.tokens
        for offset, position in enumerate(group):
            vector = batch.vectors[offset]
            if vector is not None:
                state.vectors[position] = vector
            else:
                state.errors[position] = batch.errors[offset]

    async def _request(self, inputs: list[str], state: _CallState) -> _Batch:
        """One logical request with in-call retries; raises ProviderUnavailable when spent."""
        body: dict[str, Any] = {"model": self.model, "input": inputs, "encoding_format": "base64"}
        if self.dimensions is not None:
            body["dimensions"] = self.dimensions
        estimated = sum(estimate_tokens(text) for text in inputs)
        limit_bytes = self.response_limit_bytes(len(inputs))

        async def attempt() -> _Answer:
            if self._rate_limiter is not None:
                await self._rate_limiter.acquire(estimated)
            async with self._limiter:
                state.requests += 1
                try:
                    answer = await self._send(body, limit_bytes)
                except _Retryable as exc:
                    if exc.status is not None:  # answered, but with an oversized body
                        self._observe_response(exc.status)
                    elif isinstance(exc.__cause__, httpx.TimeoutException):
                        self._observe_response("timeout")
                    else:
                        self._observe_response("error")
                    raise
                self._observe_response(answer.status)
                return answer

        async def attempt_and_read() -> _Batch:
            return self._interpret(await attempt(), len(inputs), estimated)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries),
            wait=self._wait_s,
            retry=retry_if_exception_type(_Retryable),
            before_sleep=self._log_retry,
            sleep=anyio.sleep,
            reraise=True,
        )
        try:
            batch: _Batch = await retrying(attempt_and_read)
        except _Retryable as exc:
            log.error(
                "provider_unavailable",
                status=exc.status,
                attempts=self.max_retries,
                retry_after_s=exc.retry_after_s,
            )
            raise ProviderUnavailable(
                f"{exc.message}; gave up after {self.max_retries} attempts",
                retry_after_seconds=exc.retry_after_s,
            ) from exc
        return batch

    def _observe_response(self, status: int | str) -> None:
        if self._on_response is not None:
            self._on_response(status)

    async def _send(self, body: dict[str, Any], limit_bytes: int) -> _Answer:
        """POST once and read the answer: a success body up to ``limit_bytes``, an error body
        up to 64 KiB. Transport failures become _Retryable with a clean message."""
        try:
            async with self._client.stream(
                "POST", self._endpoint, json=body, headers=self._headers, timeout=self._timeout
            ) as response:
                status = response.status_code
                success = 200 <= status < 300
                content, complete = await _read_limited(
                    response, limit_bytes if success else _MAX_ERROR_BODY_BYTES
                )
                # Leaving the block unread closes the connection: the rest is never read.
        except httpx.TimeoutException as exc:
            raise _Retryable(
                f"request to {self._endpoint_display} timed out ({type(exc).__name__})"
            ) from exc
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError):
            # The request itself could not be built; str() of these may quote header values.
            raise ConfigurationError(
                f"could not send a request to {self._endpoint_display}: "
                "check the base URL and the API key format"
            ) from None
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise _Retryable(
                f"request to {self._endpoint_display} failed: {type(exc).__name__}"
                f" ({self._redact(str(exc)) or 'no details'})"
            ) from exc
        if success and not complete:
            # Transient, like any unreadable success body: a provider sending more than the
            # request can produce is misbehaving (a proxy's page, a runaway server), so this
            # answer is garbage; the retries and then the item's attempts bound the cost, and
            # the message names the limit in case it is the setting that is too small.
            raise _Retryable(
                f"{self._endpoint_display} sent a response body over {limit_bytes} bytes for "
                f"{len(body['input'])} input(s) (HTTP {status}); stopped reading it. The limit "
                "follows from the inputs and dimensions, capped by EMBEDDING_MAX_RESPONSE_BYTES",
                status=status,
            )
        return _Answer(status=status, headers=response.headers, body=content)

    def _interpret(self, answer: _Answer, n_inputs: int, estimated: int) -> _Batch:
        """Turn one HTTP answer into a _Batch or the matching exception."""
        status = answer.status
        if 200 <= status < 300:
            try:
                payload = answer.json()
            except ValueError as exc:
                raise _Retryable(
                    f"{self._endpoint_display} returned an unreadable body (HTTP {status})",
                    status=status,
                ) from exc
            return self._parse(payload, n_inputs, estimated, status)

        server_message = self._error_message(answer)
        if status in _RETRYABLE_STATUSES:
            hint = retry_hint_s(answer.headers) if status in _HINTED_STATUSES else None
            raise _Retryable(
                f"{self._endpoint_display} answered HTTP {status}: {server_message}",
                status=status,
                retry_after_s=hint,
            ) from _HTTPFailure(f"HTTP {status} from {self._endpoint_display}")
        if status in (401, 403):
            key_note = "" if self._secrets else " (no API key is configured)"
            self._stop(
                f"{self._endpoint_display} rejected the API key (HTTP {status}){key_note}: "
                f"{server_message}. Check the API key setting.",
                status,
            )
        if status == 404 or (status in _INPUT_STATUSES and self._says_model_missing(answer)):
            self._stop(
                f"model {self.model!r} is not available at {self.base_url} (HTTP {status}): "
                f"{server_message}. Check the model name and the base URL.",
                status,
            )
        if (
            status in _INPUT_STATUSES
            and self.dimensions is not None
            and "dimension" in server_message.lower()
        ):
            # E.g. "This model does not support specifying dimensions": every input would
            # fail the same way, so this is a setting to fix, not a bad input.
            self._stop(
                f"{self._endpoint_display} refused dimensions={self.dimensions} for model "
                f"{self.model!r} (HTTP {status}): {server_message}. "
                "Change or unset the dimensions setting.",
                status,
            )
        if status in _INPUT_STATUSES:
            raise _Rejected(server_message, status=status)
        self._stop(
            f"{self._endpoint_display} answered HTTP {status}: {server_message}. "
            "Check the provider settings.",
            status,
        )

    def _stop(self, message: str, status: int) -> NoReturn:
        log.error("provider_configuration_error", status=status, url=self._endpoint_display)
        raise ConfigurationError(message) from _HTTPFailure(
            f"HTTP {status} from {self._endpoint_display}"
        )

    def _parse(self, payload: object, n_inputs: int, estimated: int, status: int) -> _Batch:
        """Match ``data[*]`` to inputs by ``index`` and validate every vector."""
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list):
            raise _Retryable(
                f"{self._endpoint_display} returned a response without a 'data' list "
                f"(HTTP {status})",
                status=status,
            )
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
            vector = _decode_embedding(item.get("embedding"))
            if vector is None:
                errors[index] = "provider returned a vector that could not be decoded"
                continue
            problem = validate_vector(vector, self.dimensions)
            if problem is not None:
                errors[index] = problem
                continue
            vector.setflags(write=False)  # may be shared by identical inputs of the call
            vectors[index] = vector
        for index in range(n_inputs):
            if index not in seen:
                errors[index] = "provider returned no vector for this input"
        if ignored:
            log.warning("provider_response_items_ignored", items=ignored)
        return _Batch(vectors=vectors, errors=errors, tokens=_usage_tokens(payload, estimated))

    def _error_message(self, answer: _Answer) -> str:
        """The server's error text (``error.message`` if JSON), redacted and truncated."""
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
        text = " ".join(str(message).split())
        text = self._redact(text)
        if len(text) > _MAX_ERROR_CHARS:
            text = text[: _MAX_ERROR_CHARS - 3] + "..."
        return text or "no error message"

    def _says_model_missing(self, answer: _Answer) -> bool:
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

    def _redact(self, text: str) -> str:
        """``text`` with the API key removed in every spelling (see ``_Redactor``)."""
        return self._redactor(text)

    def _wait_s(self, retry_state: RetryCallState) -> float:
        """Exponential backoff with jitter, but at least the server's hint (both capped)."""
        base, cap = self.backoff_base_seconds, self.backoff_max_seconds
        exponent = min(retry_state.attempt_number - 1, 60)
        wait = float(min(cap, base * 2**exponent + random.uniform(0, base)))
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, _Retryable) and exc.retry_after_s is not None:
            wait = max(wait, min(cap, exc.retry_after_s))
        return wait

    def _log_retry(self, retry_state: RetryCallState) -> None:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        action = retry_state.next_action
        log.warning(
            "provider_retry",
            status=exc.status if isinstance(exc, _Retryable) else None,
            error=exc.message if isinstance(exc, _Retryable) else type(exc).__name__,
            attempt=retry_state.attempt_number,
            wait_s=round(action.sleep, 3) if action is not None else None,
        )


def _usage_tokens(payload: object, estimated: int) -> int:
    """``usage.total_tokens`` (or ``prompt_tokens``) when reported, else the estimate."""
    usage = payload.get("usage") if isinstance(payload, dict) else None
    if isinstance(usage, dict):
        for key in ("total_tokens", "prompt_tokens"):
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
            if isinstance(value, float) and math.isfinite(value) and value >= 0:
                return int(value)
    return estimated


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigurationError(message)
