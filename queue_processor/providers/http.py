"""HTTP plumbing for providers that call a web API; nothing here knows a request format.

- ``checked_base_url`` and ``checked_api_key`` refuse settings that would misroute or leak
  the key (credentials in the URL, plain http to a host that is not loopback);
  ``keep_alive_client`` is the client a provider owns.
- ``read_limited`` reads a streamed body up to a byte cap (every input has a size, enforced
  where it enters) into an ``Answer``.
- ``Redactor`` removes a secret from text in every spelling a server or proxy may echo.
- ``Retryable`` and ``retrying`` retry transient failures within one call: exponential
  backoff with jitter, never shorter than the server's hint, which ``retry_hint_s`` reads
  from ``Retry-After``, ``retry-after-ms`` and OpenAI's ``x-ratelimit-reset-*`` headers.
"""

from __future__ import annotations

import contextlib
import email.utils
import ipaddress
import json
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import structlog
from pydantic import SecretStr
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from queue_processor.errors import ConfigurationError
from queue_processor.providers.packing import require

log = structlog.get_logger(__name__)

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


@dataclass(frozen=True)
class Answer:
    """One HTTP answer with its body, read within a byte limit (``read_limited``)."""

    status: int
    headers: httpx.Headers
    body: bytes | bytearray

    def json(self) -> Any:
        """The body parsed as JSON; ValueError if it is not JSON."""
        return json.loads(self.body)

    def text(self) -> str:
        """The body as text (UTF-8, undecodable bytes replaced)."""
        return self.body.decode("utf-8", "replace")


async def read_limited(response: httpx.Response, limit_bytes: int) -> tuple[bytearray, bool]:
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


class Redactor:
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
        return "Redactor(<hidden>)"


def _spellings(secret: str) -> str:
    """A regex (to compile with IGNORECASE) matching ``secret`` in any of its spellings."""
    parts = []
    for char in secret:
        encoded = "".join(f"%(?:25)?{byte:02x}" for byte in char.encode("utf-8"))
        alternatives = [re.escape(char), encoded] + (["\\+"] if char == " " else [])
        parts.append(f"(?:{'|'.join(alternatives)})")
    return "".join(parts)


def is_loopback(host: str) -> bool:
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


def checked_base_url(base_url: str) -> httpx.URL:
    """``base_url`` parsed; ConfigurationError unless absolute http(s) without credentials."""
    try:
        url = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ConfigurationError("the provider base URL is not a valid URL") from exc
    require(
        url.scheme in ("http", "https") and bool(url.host),
        "the provider base URL must be an absolute http(s) URL",
    )
    # user:password@ in the URL would make httpx send Basic auth in place of the Bearer
    # key (every request a 401) and could leak through error text: refuse it.
    require(
        not url.userinfo,
        "the provider base URL must not contain credentials: put the key in OPENAI_API_KEY",
    )
    return url


def checked_api_key(
    api_key: SecretStr | None, url: httpx.URL, display: str, allow_insecure_http: bool
) -> str:
    """The API key ("" for none), if it fits in a header and may travel to ``url``.

    Plain http to a host that is not loopback needs ``allow_insecure_http`` (then a warning
    is logged); otherwise, like a key with whitespace or control characters, it is a
    ConfigurationError.
    """
    key = api_key.get_secret_value() if api_key is not None else ""
    require(
        all(0x21 <= ord(char) <= 0x7E for char in key),
        "the API key contains whitespace or characters not allowed in an HTTP header",
    )
    if key and url.scheme == "http" and not is_loopback(url.host):
        require(
            allow_insecure_http,
            f"the provider base URL {display} is plain http to a host that is not "
            "loopback: the API key would cross the network unencrypted. Use https, or set "
            "OPENAI_ALLOW_INSECURE_HTTP=true if the path to that host is trusted",
        )
        log.warning("provider_insecure_http", url=display)
    return key


def keep_alive_client(timeout: httpx.Timeout, max_connections: int) -> httpx.AsyncClient:
    """The HTTP client a provider owns: ``max_connections`` kept alive for 30 s."""
    return httpx.AsyncClient(
        timeout=timeout,
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30,
        ),
    )


class Retryable(Exception):
    """A transient failure of one HTTP attempt (internal; becomes ProviderUnavailable).

    ``str()`` is a clean message; ``status`` the HTTP status if the server answered;
    ``retry_after_s`` the server's hint in seconds, if any.
    """

    def __init__(
        self, message: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s


def retrying(*, attempts: int, backoff_base_s: float, backoff_max_s: float) -> AsyncRetrying:
    """A tenacity retrier for ``Retryable``: at most ``attempts`` attempts in all.

    The wait before attempt n+1 is ``backoff_base_s * 2**(n-1)`` plus up to
    ``backoff_base_s`` of jitter, but at least the server's hint; both are capped at
    ``backoff_max_s``. Each retry logs ``provider_retry``; the last failure is re-raised.
    """

    def wait_s(retry_state: RetryCallState) -> float:
        exponent = min(retry_state.attempt_number - 1, 60)
        wait = float(
            min(backoff_max_s, backoff_base_s * 2**exponent + random.uniform(0, backoff_base_s))
        )
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, Retryable) and exc.retry_after_s is not None:
            wait = max(wait, min(backoff_max_s, exc.retry_after_s))
        return wait

    return AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait_s,
        retry=retry_if_exception_type(Retryable),
        before_sleep=_log_retry,
        sleep=anyio.sleep,
        reraise=True,
    )


def _log_retry(retry_state: RetryCallState) -> None:
    outcome = retry_state.outcome
    exc = outcome.exception() if outcome is not None else None
    action = retry_state.next_action
    log.warning(
        "provider_retry",
        status=exc.status if isinstance(exc, Retryable) else None,
        error=exc.message if isinstance(exc, Retryable) else type(exc).__name__,
        attempt=retry_state.attempt_number,
        wait_s=round(action.sleep, 3) if action is not None else None,
    )


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
