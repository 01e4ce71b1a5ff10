"""The API key stays secret: redaction of every spelling of it, and no key over plain http.

Reproduces issue 11 item 8: a provider (or a proxy in front of it) that echoes the key
lower-cased or percent-encoded in its error text got that text stored in ``error_message`` and
logged, because only the exact key was redacted; and a plain ``http://`` base URL to a remote
host sent the key in clear without a word. Over real sockets to the fake server where the
server matters; ``httpx.MockTransport`` only to put arbitrary text in a transport error.
"""

from __future__ import annotations

import json
import secrets
import urllib.parse
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs

from queue_processor.cli import build_provider
from queue_processor.errors import ConfigurationError, ProviderUnavailable
from queue_processor.providers.openai import OpenAIProvider
from queue_processor.settings import Settings
from queue_processor.testing import FakeOpenAIServer

MODEL = "text-embedding-test"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=8) as srv:
        yield srv


def fresh_key() -> str:
    """A key with characters that URL-encoding changes (``/``, ``+``, ``=``) and mixed case."""
    return f"sk-proj-Test/{secrets.token_hex(10)}+Key=AbC"


def spellings(key: str) -> dict[str, str]:
    """The ways a server or proxy may echo the key."""
    every_byte = "".join(f"%{byte:02X}" for byte in key.encode())
    return {
        "exact": key,
        "lower": key.lower(),
        "upper": key.upper(),
        "swapcase": key.swapcase(),
        "quote": urllib.parse.quote(key, safe=""),
        "quote default safe": urllib.parse.quote(key),
        "quote_plus": urllib.parse.quote_plus(key),
        "quote lower hex": urllib.parse.quote(key, safe="").replace("%2F", "%2f"),
        "every byte upper hex": every_byte,
        "every byte lower hex": every_byte.lower(),
        "quoted twice": urllib.parse.quote(urllib.parse.quote(key, safe=""), safe=""),
    }


def leaked(text: str, key: str) -> list[str]:
    """The spellings of ``key`` (and its random middle, in any case) found in ``text``."""
    middle = key.split("/")[1].split("+")[0]
    needles = {**spellings(key), "middle": middle}
    lowered = text.lower()
    return [name for name, needle in needles.items() if needle.lower() in lowered]


def provider(base_url: str, key: str | None, **overrides: Any) -> OpenAIProvider:
    settings: dict[str, Any] = {
        "base_url": base_url,
        "api_key": None if key is None else SecretStr(key),
        "model": MODEL,
        "max_retries": 2,
        "backoff_base_seconds": 0.01,
        "backoff_max_seconds": 0.02,
        "timeout_seconds": 5,
    }
    settings.update(overrides)
    return OpenAIProvider(**settings)


# --- redaction ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_lower_cased_or_percent_encoded_echo_of_the_key_is_redacted(
    fake: FakeOpenAIServer,
) -> None:
    """The fake server, like OpenAI, quotes a rejected key, and also lower-cased and
    percent-encoded (as proxies do): none of it reaches the error or the logs."""
    key = fresh_key()
    fake.required_api_key = "sk-the-right-one"
    with capture_logs() as logs:
        async with provider(fake.base_url, key) as embedder:
            with pytest.raises(ConfigurationError, match=r"rejected the API key") as caught:
                await embedder.embed(["x"])
    assert fake.requests_by_status[401] == 1  # the key went out and the echo came back
    message = str(caught.value)
    assert leaked(message, key) == [], message
    # Exact, lower-cased, percent-encoded, quote_plus-encoded.
    assert message.count("[redacted]") == 4
    assert leaked(repr(logs), key) == []


@pytest.mark.anyio
@pytest.mark.parametrize("spelling", sorted(spellings("k").keys()))
async def test_every_spelling_in_an_error_body_is_redacted(spelling: str) -> None:
    key = fresh_key()
    echo = spellings(key)[spelling]

    def handler(request: httpx.Request) -> httpx.Response:
        text = f"bad key {echo}; also as a query: /v1?key={echo}&x=1"
        return httpx.Response(401, json={"error": {"message": text}})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    with capture_logs() as logs:
        async with client, provider("https://mock.test/v1", key, client=client) as embedder:
            with pytest.raises(ConfigurationError) as caught:
                await embedder.embed(["x"])
    message = str(caught.value)
    assert leaked(message, key) == [], message
    assert message.count("[redacted]") == 2
    assert leaked(repr(logs), key) == []


@pytest.mark.anyio
async def test_every_spelling_in_a_transport_error_text_is_redacted() -> None:
    """httpx error texts (a proxy's CONNECT refusal, say) become the stored error message."""
    key = fresh_key()
    echoed = " ".join(spellings(key).values())

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"proxy refused: {echoed}", request=request)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    with capture_logs() as logs:
        async with client, provider("https://mock.test/v1", key, client=client) as embedder:
            with pytest.raises(ProviderUnavailable) as caught:
                await embedder.embed(["x"])
    message = str(caught.value)
    assert "[redacted]" in message
    assert leaked(message, key) == [], message
    assert leaked(repr(logs), key) == []


def test_the_redactor_shows_nothing_of_the_key() -> None:
    key = fresh_key()
    embedder = provider("https://api.example.com/v1", key)
    state = repr(vars(embedder))
    assert leaked(state, key) == []
    assert "re.compile" not in state  # a pattern's repr spells the key out, char by char


# --- plain http -----------------------------------------------------------------------------

REMOTE_HTTP = [
    "http://api.example.com/v1",
    "http://10.0.0.5:8000/v1",
    "http://[2001:db8::1]:8080/v1",
    "http://127.0.0.1.example.com/v1",
    "http://localhost.example.com/v1",
]
LOCAL_HTTP = [
    "http://127.0.0.1:11434/v1",
    "http://127.8.9.10/v1",
    "http://localhost:8000/v1",
    "http://LOCALHOST./v1",
    "http://[::1]:8000/v1",
    "http://[::ffff:127.0.0.1]:8000/v1",
]


@pytest.mark.parametrize("url", REMOTE_HTTP)
def test_a_key_over_plain_http_to_a_remote_host_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="plain http") as caught:
        provider(url, fresh_key())
    assert "OPENAI_ALLOW_INSECURE_HTTP=true" in str(caught.value)


@pytest.mark.parametrize("url", REMOTE_HTTP)
def test_plain_http_is_allowed_when_asked_for_or_without_a_key(url: str) -> None:
    with capture_logs() as logs:
        provider(url, fresh_key(), allow_insecure_http=True)
    assert [entry["event"] for entry in logs] == ["provider_insecure_http"]
    provider(url, None)  # nothing secret to send


@pytest.mark.parametrize("url", [*LOCAL_HTTP, "https://api.example.com/v1"])
def test_https_and_loopback_http_are_allowed(url: str) -> None:
    with capture_logs() as logs:
        provider(url, fresh_key())
    assert logs == []


@pytest.mark.anyio
async def test_loopback_http_still_works_end_to_end(fake: FakeOpenAIServer) -> None:
    key = fresh_key()
    fake.required_api_key = key
    async with provider(fake.base_url, key) as embedder:
        result = await embedder.embed(["a", "b"])
    assert result.errors == {}
    assert fake.requests_by_status[200] == 1


@pytest.mark.parametrize(("allow", "refused"), [(None, True), ("false", True), ("true", False)])
def test_the_cli_passes_openai_allow_insecure_http(
    monkeypatch: pytest.MonkeyPatch, allow: str | None, refused: bool
) -> None:
    """The setting goes from the environment through ``build_provider`` to the provider."""
    for name in ("EMBEDDING_PROVIDER", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://embeddings.internal:8000/v1")
    monkeypatch.setenv("OPENAI_API_KEY", fresh_key())
    if allow is None:
        monkeypatch.delenv("OPENAI_ALLOW_INSECURE_HTTP", raising=False)
    else:
        monkeypatch.setenv("OPENAI_ALLOW_INSECURE_HTTP", allow)
    settings = Settings()
    if refused:
        with pytest.raises(ConfigurationError, match="plain http"):
            build_provider(settings)
    else:
        built = build_provider(settings)
        assert isinstance(built, OpenAIProvider)
        assert built.base_url == "http://embeddings.internal:8000/v1"


def test_the_fake_server_echo_is_what_these_tests_rely_on(fake: FakeOpenAIServer) -> None:
    """Guard for the tests above: the fake's 401 body does carry the lower-cased and the
    percent-encoded key (if it stopped doing so, they would pass for nothing)."""
    key = fresh_key()
    fake.required_api_key = "sk-the-right-one"
    response = httpx.post(
        f"{fake.base_url}/embeddings",
        json={"model": MODEL, "input": ["x"]},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    message = json.loads(response.content)["error"]["message"]
    assert key in message
    assert key.lower() in message
    assert "".join(f"%{byte:02x}" for byte in key.encode()) in message
