"""A provider for OpenAI-compatible ``POST /embeddings`` endpoints (OpenAI, vLLM, Ollama, TEI...).

The call itself (de-duplication, packing by count and estimated tokens, concurrent requests,
vector validation) is ``BatchingProvider``'s; this module sends one packed request and
translates its failures, at the edge, into the shapes the worker acts on:

- 429 / 408 / 5xx / timeouts / connection errors / unreadable bodies: retried in the call
  with exponential backoff and jitter, honouring ``Retry-After`` and OpenAI's
  ``x-ratelimit-reset-*`` hints; afterwards ``ProviderUnavailable``.
- 400 / 413 / 422: the request is split in halves until the offending input is alone; that
  input gets a per-input error, the others their vectors. When the error says "maximum
  context length is N tokens", the input is marked too long (``EmbedResult.too_long``: the
  worker cuts it and sends it again) and N lowers the limit for the rest of the run.
- wrong dimension, NaN/inf, missing or undecodable vectors: per-input errors.
- 401 / 403 / 404 / unknown model / other 4xx: ``ConfigurationError`` (stop the worker).
- a success body larger than the request can legitimately produce (see
  ``OpenAIProvider.response_limit_bytes``): reading stops at the limit and the answer counts
  as unreadable (retried, then ``ProviderUnavailable``); error bodies are read up to 64 KiB.

The API key is sent only in the Authorization header, and only over https or to a loopback
host (plain http elsewhere needs ``allow_insecure_http``). It never appears in a message, a log
event or ``repr``: every message is built here from the status, a credential-free URL and the
server's error text with the key redacted in any letter case and URL/percent-encoding.
HTTP plumbing lives in ``providers.http``, the response format in ``providers.openai_protocol``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import anyio
import httpx
import structlog
from pydantic import SecretStr

from queue_processor.errors import ConfigurationError, ProviderUnavailable
from queue_processor.providers.base import BatchingProvider, RequestResult, Usage
from queue_processor.providers.http import (
    Answer,
    Redactor,
    Retryable,
    checked_api_key,
    checked_base_url,
    keep_alive_client,
    read_limited,
    retry_hint_s,
    retrying,
)
from queue_processor.providers.openai_protocol import (
    error_text,
    parse_embeddings,
    says_model_missing,
    usage_tokens,
)
from queue_processor.providers.packing import estimate_tokens, require
from queue_processor.providers.ratelimit import RateLimiter
from queue_processor.providers.tokens import context_limit, model_input_limit, openai_tokenizer

log = structlog.get_logger(__name__)

# An error body only has to yield a message of MAX_ERROR_CHARS: read this much of it.
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


class _Rejected(Exception):
    """The server refused the request's input (400/413/422); internal, drives splitting."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class _HTTPFailure(Exception):
    """A clean description of a non-retryable HTTP answer, kept as ``__cause__``."""


class OpenAIProvider(BatchingProvider):
    """Embeddings from an OpenAI-compatible HTTP API. See the module docstring for behaviour.

    ``max_retries`` is the number of attempts per HTTP request for transient failures.
    ``max_response_bytes`` caps one success body (see ``response_limit_bytes``).
    ``allow_insecure_http`` permits sending the key over plain http to a host that is not
    loopback (otherwise a ``ConfigurationError``). If ``client`` is given it is used as is
    and not closed by ``aclose()``; otherwise the provider owns one keep-alive
    ``httpx.AsyncClient``. ``max_concurrent_requests`` bounds requests in flight across all
    concurrent ``embed()`` calls of this provider. ``on_response`` sees every attempt's
    HTTP status, or "timeout" / "error" when there was none (for metrics).
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
        max_input_tokens: int | None = None,
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
        super().__init__(
            model,
            dimensions=dimensions,
            max_inputs_per_request=max_inputs_per_request,
            max_tokens_per_request=max_tokens_per_request,
            # The model's input limit: given (EMBEDDING_MAX_INPUT_TOKENS), else OpenAI's table.
            max_input_tokens=max_input_tokens or model_input_limit(model),
            tokenizer=openai_tokenizer(model),
        )
        require(dimensions is None or dimensions > 0, "dimensions must be positive")
        require(timeout_seconds > 0, "timeout_seconds must be positive")
        require(connect_timeout_seconds > 0, "connect_timeout_seconds must be positive")
        require(max_concurrent_requests >= 1, "max_concurrent_requests must be at least 1")
        require(max_retries >= 1, "max_retries must be at least 1")
        require(max_response_bytes >= 1, "max_response_bytes must be at least 1")
        require(
            0 <= backoff_base_seconds <= backoff_max_seconds,
            "backoff seconds must satisfy 0 <= backoff_base_seconds <= backoff_max_seconds",
        )
        url = checked_base_url(base_url)
        # The URL shown in messages and logs: no query or fragment.
        self.base_url = f"{url.scheme}://{url.netloc.decode('ascii')}{url.path.rstrip('/')}"
        self._endpoint = url.copy_with(path=url.path.rstrip("/") + "/embeddings")
        self._endpoint_display = self.base_url + "/embeddings"
        key = checked_api_key(api_key, url, self.base_url, allow_insecure_http)
        # Never held as plain str attributes, so that even vars(provider) or a traceback that
        # shows locals stays clean: SecretStr, Redactor and httpx.Headers mask their repr.
        self._secrets = [SecretStr(key)] if key else []
        self._redact = Redactor([key])
        self._headers = httpx.Headers({"Authorization": f"Bearer {key}"} if key else {})
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
            else keep_alive_client(self._timeout, max_concurrent_requests)
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

    async def _embed_request(self, texts: list[str], usage: Usage) -> RequestResult:
        """One packed request; on an input rejection, bisect it until the culprit is alone."""
        try:
            return await self._request(texts, usage)
        except _Rejected as exc:
            if len(texts) == 1:
                log.warning("provider_input_rejected", status=exc.status)
                said = context_limit(exc.message)
                return RequestResult(
                    vectors=[None],
                    errors={0: f"provider rejected the input (HTTP {exc.status}): {exc.message}"},
                    context_limits={} if said is None else {0: said},
                )
            log.info("provider_request_split", status=exc.status, inputs=len(texts))
            middle = len(texts) // 2
            first = await self._embed_request(texts[:middle], usage)
            return first + await self._embed_request(texts[middle:], usage)

    async def _request(self, inputs: list[str], usage: Usage) -> RequestResult:
        """One logical request with in-call retries; raises ProviderUnavailable when spent."""
        body: dict[str, Any] = {"model": self.model, "input": inputs, "encoding_format": "base64"}
        if self.dimensions is not None:
            body["dimensions"] = self.dimensions
        # For the rate limiter and a server that reports no usage; packing counted exactly.
        estimated = sum(estimate_tokens(text) for text in inputs)
        limit_bytes = self.response_limit_bytes(len(inputs))

        async def attempt() -> tuple[RequestResult, int]:
            if self._rate_limiter is not None:
                await self._rate_limiter.acquire(estimated)
            async with self._limiter:
                usage.requests += 1
                answer = await self._send_observed(body, limit_bytes)
            return self._interpret(answer, len(inputs), estimated)

        retrier = retrying(
            attempts=self.max_retries,
            backoff_base_s=self.backoff_base_seconds,
            backoff_max_s=self.backoff_max_seconds,
        )
        try:
            outcome: tuple[RequestResult, int] = await retrier(attempt)
        except Retryable as exc:
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
        result, tokens = outcome
        usage.tokens += tokens
        return result

    async def _send_observed(self, body: dict[str, Any], limit_bytes: int) -> Answer:
        """``_send``, reporting the attempt's outcome to ``on_response``."""
        try:
            answer = await self._send(body, limit_bytes)
        except Retryable as exc:
            if exc.status is not None:  # answered, but with an oversized body
                self._observe_response(exc.status)
            elif isinstance(exc.__cause__, httpx.TimeoutException):
                self._observe_response("timeout")
            else:
                self._observe_response("error")
            raise
        self._observe_response(answer.status)
        return answer

    def _observe_response(self, status: int | str) -> None:
        if self._on_response is not None:
            self._on_response(status)

    async def _send(self, body: dict[str, Any], limit_bytes: int) -> Answer:
        """POST once and read the answer: a success body up to ``limit_bytes``, an error body
        up to 64 KiB. Transport failures become Retryable with a clean message."""
        try:
            async with self._client.stream(
                "POST", self._endpoint, json=body, headers=self._headers, timeout=self._timeout
            ) as response:
                status = response.status_code
                success = 200 <= status < 300
                content, complete = await read_limited(
                    response, limit_bytes if success else _MAX_ERROR_BODY_BYTES
                )
                # Leaving the block unread closes the connection: the rest is never read.
        except httpx.TimeoutException as exc:
            raise Retryable(
                f"request to {self._endpoint_display} timed out ({type(exc).__name__})"
            ) from exc
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError):
            # The request itself could not be built; str() of these may quote header values.
            raise ConfigurationError(
                f"could not send a request to {self._endpoint_display}: "
                "check the base URL and the API key format"
            ) from None
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise Retryable(
                f"request to {self._endpoint_display} failed: {type(exc).__name__}"
                f" ({self._redact(str(exc)) or 'no details'})"
            ) from exc
        if success and not complete:
            # Transient, like any unreadable success body: a provider sending more than the
            # request can produce is misbehaving (a proxy's page, a runaway server), so this
            # answer is garbage; the retries and then the item's attempts bound the cost, and
            # the message names the limit in case it is the setting that is too small.
            raise Retryable(
                f"{self._endpoint_display} sent a response body over {limit_bytes} bytes for "
                f"{len(body['input'])} input(s) (HTTP {status}); stopped reading it. The limit "
                "follows from the inputs and dimensions, capped by EMBEDDING_MAX_RESPONSE_BYTES",
                status=status,
            )
        return Answer(status=status, headers=response.headers, body=content)

    def _interpret(
        self, answer: Answer, n_inputs: int, estimated: int
    ) -> tuple[RequestResult, int]:
        """Turn one HTTP answer into (result, tokens used) or the matching exception."""
        status = answer.status
        if 200 <= status < 300:
            try:
                payload = answer.json()
            except ValueError as exc:
                raise Retryable(
                    f"{self._endpoint_display} returned an unreadable body (HTTP {status})",
                    status=status,
                ) from exc
            result = parse_embeddings(payload, n_inputs)
            if result is None:
                raise Retryable(
                    f"{self._endpoint_display} returned a response without a 'data' list "
                    f"(HTTP {status})",
                    status=status,
                )
            return result, usage_tokens(payload, estimated)
        self._raise_for_error(answer)

    def _raise_for_error(self, answer: Answer) -> NoReturn:
        """Translate an error answer: Retryable, _Rejected (split) or ConfigurationError."""
        status = answer.status
        server_message = error_text(answer, self._redact)
        if status in _RETRYABLE_STATUSES:
            hint = retry_hint_s(answer.headers) if status in _HINTED_STATUSES else None
            raise Retryable(
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
        if status == 404 or (status in _INPUT_STATUSES and says_model_missing(answer)):
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
