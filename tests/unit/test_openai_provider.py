"""OpenAIProvider and the provider helpers, run against the real fake server over sockets.

``httpx.MockTransport`` is used only for response-parsing edge cases the fake server does
not produce (malformed JSON, odd headers, duplicate indices...).
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import numpy as np
import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs

from queue_processor.errors import ConfigurationError, ProviderUnavailable
from queue_processor.providers import (
    EmbeddingProvider,
    EmbedResult,
    OpenAIProvider,
    RateLimiter,
    dedupe,
    estimate_tokens,
    pack_requests,
    validate_vector,
)
from queue_processor.providers.http import parse_duration_s, parse_retry_after_s, retry_hint_s
from queue_processor.testing import FakeOpenAIServer, fake_vector

DIMS = 8
KEY = "sk-test-SECRET-0123456789abcdef"
MODEL = "text-embedding-test"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=DIMS) as srv:
        yield srv


def make_provider(srv: FakeOpenAIServer | None = None, **overrides: Any) -> OpenAIProvider:
    settings: dict[str, Any] = {
        "base_url": srv.base_url if srv is not None else "http://127.0.0.1:9/v1",
        "api_key": SecretStr(KEY),
        "model": MODEL,
        "backoff_base_seconds": 0.01,
        "backoff_max_seconds": 0.05,
        "max_retries": 3,
        "timeout_seconds": 5,
    }
    settings.update(overrides)
    return OpenAIProvider(**settings)


def mock_provider(
    handler: Callable[[httpx.Request], httpx.Response], **overrides: Any
) -> tuple[OpenAIProvider, httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return make_provider(base_url="https://mock.test/v1", client=client, **overrides), client


def assert_matches_fake(result: EmbedResult, texts: list[str], dims: int = DIMS) -> None:
    assert result.errors == {}
    for vector, text in zip(result.vectors, texts, strict=True):
        assert vector is not None
        assert vector.dtype == np.float32
        np.testing.assert_array_equal(vector, fake_vector(text, dims))


def statuses(srv: FakeOpenAIServer) -> list[int]:
    return [entry["status"] for entry in srv.request_log]


# -- helpers in base.py ---------------------------------------------------------------------


def test_estimate_tokens_is_a_byte_quarter_at_least_one() -> None:
    assert estimate_tokens("") == 1
    assert estimate_tokens("abcd") == 1
    assert estimate_tokens("abcde") == 2
    assert estimate_tokens("é" * 4) == 2  # 8 UTF-8 bytes
    assert estimate_tokens("\ud800") == 1  # lone surrogate: no exception


def test_pack_requests_by_count_and_tokens() -> None:
    texts = ["a" * 40] * 7  # 10 estimated tokens each
    assert pack_requests(texts, max_inputs=3, max_tokens=1000) == [[0, 1, 2], [3, 4, 5], [6]]
    assert pack_requests(texts, max_inputs=100, max_tokens=25) == [[0, 1], [2, 3], [4, 5], [6]]
    mixed = ["a" * 40, "b" * 400, "c" * 40, "d" * 40]  # 10, 100, 10, 10 tokens
    assert pack_requests(mixed, max_inputs=10, max_tokens=30) == [[0], [1], [2, 3]]
    assert pack_requests([], max_inputs=1, max_tokens=1) == []
    with pytest.raises(ValueError, match="positive"):
        pack_requests(texts, max_inputs=0, max_tokens=10)


def test_dedupe_maps_every_position_to_one_unique_text() -> None:
    unique, index_map = dedupe(["b", "a", "b", "c", "a"])
    assert unique == ["b", "a", "c"]
    assert index_map == [0, 1, 0, 2, 1]
    assert dedupe([]) == ([], [])


def test_validate_vector_messages() -> None:
    good = np.ones(4, dtype=np.float32)
    assert validate_vector(good, 4) is None
    assert validate_vector(good, None) is None
    assert validate_vector(np.ones(3, dtype=np.float32), 4) == (
        "provider returned 3 dimensions, expected 4"
    )
    bad = good.copy()
    bad[1] = np.nan
    assert validate_vector(bad, 4) == "provider returned a non-finite value (NaN or infinity)"
    bad[1] = np.inf
    assert validate_vector(bad, None) == "provider returned a non-finite value (NaN or infinity)"
    assert validate_vector(np.ones((2, 2), dtype=np.float32), None) is not None
    assert (
        validate_vector(np.ones(0, dtype=np.float32), None) == "provider returned an empty vector"
    )


@pytest.mark.anyio
async def test_provider_base_is_an_async_context_manager() -> None:
    closed: list[bool] = []

    class Dummy(EmbeddingProvider):
        name = "dummy"
        model = "m"
        dimensions = None
        max_inputs_per_request = 1
        max_tokens_per_request = 1

        async def embed(self, texts: Any) -> EmbedResult:
            return EmbedResult(vectors=[None] * len(texts))

        async def aclose(self) -> None:
            closed.append(True)

    async with Dummy() as provider:
        assert (await provider.embed([])).vectors == []
    assert closed == [True]


# -- RateLimiter ----------------------------------------------------------------------------


class FakeClock:
    """A monotonic clock that only moves when the limiter sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


def limiter(rpm: int | None, tpm: int | None, clock: FakeClock) -> RateLimiter:
    return RateLimiter(rpm, tpm, clock, sleep=clock.sleep)


@pytest.mark.anyio
async def test_rate_limiter_requests_per_minute() -> None:
    clock = FakeClock()
    limit = limiter(60, None, clock)
    for _ in range(60):  # the bucket starts full
        await limit.acquire(1_000_000)
    assert clock.sleeps == []
    await limit.acquire(1)
    assert clock.sleeps == [pytest.approx(1.0)]  # one request per second refill
    clock.now += 3600  # idle: refills, but never above capacity
    for _ in range(60):
        await limit.acquire(1)
    assert len(clock.sleeps) == 1
    await limit.acquire(1)
    assert clock.sleeps[1] == pytest.approx(1.0)


@pytest.mark.anyio
async def test_rate_limiter_tokens_per_minute_and_oversized_requests() -> None:
    clock = FakeClock()
    limit = limiter(None, 600, clock)  # 10 tokens per second
    await limit.acquire(600)
    await limit.acquire(100)
    assert clock.sleeps == [pytest.approx(10.0)]
    clock.sleeps.clear()
    clock.now += 60  # full again
    await limit.acquire(1000)  # bigger than the bucket: allowed once it is full
    assert clock.sleeps == []
    await limit.acquire(10)  # 400 tokens of debt + 10 needed, at 10/s
    assert clock.sleeps == [pytest.approx(41.0)]
    clock.sleeps.clear()
    clock.now += 60
    await limit.acquire(300)
    await limit.acquire(1000)  # waits for a full bucket (300 missing), no deadlock
    assert clock.sleeps == [pytest.approx(30.0)]


@pytest.mark.anyio
async def test_rate_limiter_waits_for_the_stricter_limit_and_none_is_unlimited() -> None:
    clock = FakeClock()
    both = limiter(1, 6000, clock)
    await both.acquire(10)
    await both.acquire(10)
    assert clock.sleeps == [pytest.approx(60.0)]  # the request bucket, not the token one

    free = limiter(None, None, clock)
    for _ in range(1000):
        await free.acquire(10**9)
    assert clock.sleeps == [pytest.approx(60.0)]
    with pytest.raises(ValueError, match="positive"):
        RateLimiter(0, None)


@pytest.mark.anyio
async def test_provider_acquires_the_rate_limiter_per_request(server: FakeOpenAIServer) -> None:
    clock = FakeClock()
    async with make_provider(
        server, max_inputs_per_request=1, rate_limiter=limiter(1, None, clock)
    ) as provider:
        result = await provider.embed(["a", "b", "c"])
    assert_matches_fake(result, ["a", "b", "c"])
    assert clock.sleeps == [pytest.approx(60.0), pytest.approx(60.0)]


# -- happy paths over a socket ---------------------------------------------------------------


@pytest.mark.anyio
async def test_base64_and_float_responses_decode_identically(server: FakeOpenAIServer) -> None:
    texts = ["first text", "second text", "third text é ✓"]
    async with make_provider(server) as provider:
        as_base64 = await provider.embed(texts)
        server.ignore_base64 = True
        as_floats = await provider.embed(texts)
    assert_matches_fake(as_base64, texts)
    assert_matches_fake(as_floats, texts)
    assert [entry["encoding_format"] for entry in server.request_log] == ["base64", "base64"]
    assert as_base64.tokens == as_floats.tokens > 0
    assert as_base64.requests == 1


@pytest.mark.anyio
async def test_results_are_matched_by_index_not_order(server: FakeOpenAIServer) -> None:
    server.shuffle_order = True
    texts = [f"text {i}" for i in range(40)]
    async with make_provider(server) as provider:
        result = await provider.embed(texts)
    assert_matches_fake(result, texts)


@pytest.mark.anyio
async def test_batches_by_count(server: FakeOpenAIServer) -> None:
    texts = [f"t{i}" for i in range(10)]
    async with make_provider(server, max_inputs_per_request=4) as provider:
        result = await provider.embed(texts)
    assert_matches_fake(result, texts)
    assert result.requests == 3
    assert sorted(entry["n_inputs"] for entry in server.request_log) == [2, 4, 4]


@pytest.mark.anyio
async def test_batches_by_token_budget(server: FakeOpenAIServer) -> None:
    # A model without a known tokenizer: one token per 3 bytes, 30 bytes = 10 tokens each.
    texts = [f"{i:02d}" * 15 for i in range(6)]
    async with make_provider(server, max_tokens_per_request=25) as provider:
        result = await provider.embed(texts)
    assert_matches_fake(result, texts)
    assert [entry["n_inputs"] for entry in server.request_log] == [2, 2, 2]
    assert result.tokens == sum(max(1, len(text) // 4) for text in texts)  # server's usage


@pytest.mark.anyio
async def test_identical_texts_are_sent_once(server: FakeOpenAIServer) -> None:
    texts = ["same", "other", "same", "same", "other"]
    async with make_provider(server) as provider:
        result = await provider.embed(texts)
    assert_matches_fake(result, texts)
    assert server.input_counts == {"same": 1, "other": 1}
    assert server.request_log[0]["n_inputs"] == 2


@pytest.mark.anyio
async def test_requests_run_concurrently_up_to_the_limit(server: FakeOpenAIServer) -> None:
    server.latency_s = 0.05
    texts = [f"t{i}" for i in range(8)]
    async with make_provider(
        server, max_inputs_per_request=1, max_concurrent_requests=2
    ) as provider:
        result = await provider.embed(texts)
    assert_matches_fake(result, texts)
    assert server.requests_total == 8
    assert server.max_in_flight == 2


@pytest.mark.anyio
async def test_dimensions_and_authorization_are_sent_only_when_set(
    server: FakeOpenAIServer,
) -> None:
    async with make_provider(server, dimensions=5) as provider:
        with_dims = await provider.embed(["x"])
    async with make_provider(server, api_key=None) as provider:
        without = await provider.embed(["x"])
    assert_matches_fake(with_dims, ["x"], dims=5)
    assert_matches_fake(without, ["x"])
    assert [(e["dimensions"], e["authorization"]) for e in server.request_log] == [
        (5, True),
        (None, False),
    ]


@pytest.mark.anyio
async def test_empty_input_makes_no_request(server: FakeOpenAIServer) -> None:
    async with make_provider(server) as provider:
        result = await provider.embed([])
    assert result == EmbedResult(vectors=[], errors={}, tokens=0, requests=0)
    assert server.requests_total == 0


@pytest.mark.anyio
async def test_owned_client_is_closed_and_a_given_client_is_not(server: FakeOpenAIServer) -> None:
    async with make_provider(server) as owned:
        await owned.embed(["x"])
        assert not owned.is_closed
    assert owned.is_closed

    async with httpx.AsyncClient() as client:
        async with make_provider(server, client=client) as borrowed:
            await borrowed.embed(["x"])
        assert not client.is_closed
        assert not borrowed.is_closed


@pytest.mark.anyio
async def test_cancellation_stops_the_call_promptly(server: FakeOpenAIServer) -> None:
    server.latency_s = 10
    started = time.monotonic()
    async with make_provider(server) as provider:
        with anyio.move_on_after(0.2):
            await provider.embed(["x", "y"])
    assert time.monotonic() - started < 5


# -- transient failures ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_429_retry_after_is_honoured(server: FakeOpenAIServer) -> None:
    server.fail_next(429, retry_after=0.4)
    started = time.monotonic()
    with capture_logs() as logs:
        async with make_provider(server, backoff_max_seconds=5) as provider:
            result = await provider.embed(["x"])
    assert time.monotonic() - started >= 0.35
    assert_matches_fake(result, ["x"])
    assert result.requests == 2
    assert statuses(server) == [429, 200]
    retries = [entry for entry in logs if entry["event"] == "provider_retry"]
    assert len(retries) == 1
    assert retries[0]["status"] == 429
    assert retries[0]["attempt"] == 1
    assert retries[0]["wait_s"] >= 0.4


@pytest.mark.anyio
async def test_retry_after_is_capped_by_backoff_max(server: FakeOpenAIServer) -> None:
    server.fail_next(429, retry_after=3600)
    started = time.monotonic()
    async with make_provider(server, backoff_max_seconds=0.05) as provider:
        result = await provider.embed(["x"])
    assert time.monotonic() - started < 5
    assert_matches_fake(result, ["x"])


@pytest.mark.anyio
@pytest.mark.parametrize("fault", [500, 503, 408, "timeout", "reset"])
async def test_transient_failure_then_success(server: FakeOpenAIServer, fault: int | str) -> None:
    server.timeout_sleep_s = 2
    server.fail_next(fault)
    texts = ["a", "b"]
    async with make_provider(server, timeout_seconds=0.3) as provider:
        result = await provider.embed(texts)
    assert_matches_fake(result, texts)
    assert result.requests == 2
    assert server.requests_total == 2
    assert server.input_counts == {"a": 1, "b": 1}


@pytest.mark.anyio
async def test_persistent_500_raises_provider_unavailable(server: FakeOpenAIServer) -> None:
    server.fail_next(500, n=100)
    async with make_provider(server, max_retries=3) as provider:
        with pytest.raises(ProviderUnavailable) as caught:
            await provider.embed(["x"])
    assert server.requests_by_status == {500: 3}
    assert "HTTP 500" in str(caught.value)
    assert "gave up after 3 attempts" in str(caught.value)
    assert caught.value.__cause__ is not None
    assert caught.value.retry_after_seconds is None


@pytest.mark.anyio
async def test_exhausted_429_carries_the_server_hint(server: FakeOpenAIServer) -> None:
    server.fail_next(429, n=100, retry_after=7)
    async with make_provider(server, max_retries=2) as provider:
        with pytest.raises(ProviderUnavailable) as caught:
            await provider.embed(["x"])
    assert caught.value.retry_after_seconds == 7


@pytest.mark.anyio
async def test_connection_refused_is_transient() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with make_provider(base_url=f"http://127.0.0.1:{port}/v1", max_retries=2) as provider:
        with pytest.raises(ProviderUnavailable, match="ConnectError") as caught:
            await provider.embed(["x"])
    assert isinstance(caught.value.__cause__.__cause__, httpx.ConnectError)  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_unreadable_200_body_is_retried() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            return httpx.Response(200, content=b"<html>proxy error</html>")
        vector = [0.5, 0.5]
        return httpx.Response(200, json={"data": [{"index": 0, "embedding": vector}]})

    provider, client = mock_provider(handler)
    async with client, provider:
        result = await provider.embed(["x"])
    assert result.requests == 2
    assert result.vectors[0] is not None
    assert result.tokens == estimate_tokens("x")  # no usage reported: estimated


# -- per-input failures ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_one_rejected_input_among_ten_is_isolated(server: FakeOpenAIServer) -> None:
    server.reject_inputs = {"bad input"}
    texts = [f"good {i}" for i in range(10)]
    texts[3] = "bad input"
    async with make_provider(server) as provider:
        result = await provider.embed(texts)
    assert set(result.errors) == {3}
    assert result.vectors[3] is None
    assert "HTTP 400" in result.errors[3]
    assert "maximum context length is 8192 tokens" in result.errors[3]
    for index, text in enumerate(texts):
        if index != 3:
            np.testing.assert_array_equal(result.vectors[index], fake_vector(text, DIMS))
    # The server saw the bisection (halves may arrive in any order under load); each good
    # input embedded exactly once.
    sizes = sorted((entry["n_inputs"], entry["status"]) for entry in server.request_log)
    assert sizes == sorted(
        [
            (10, 400),
            (5, 400),
            (2, 200),
            (3, 400),
            (1, 200),
            (2, 400),
            (1, 400),
            (1, 200),
            (5, 200),
        ]
    )
    assert all(count == 1 for count in server.input_counts.values())
    assert len(server.input_counts) == 9
    assert result.requests == server.requests_total


@pytest.mark.anyio
async def test_single_input_413_becomes_a_per_input_error_with_truncated_message() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(413, json={"error": {"message": "x" * 2000}})

    provider, client = mock_provider(handler)
    async with client, provider:
        result = await provider.embed(["huge"])
    assert result.vectors == [None]
    assert result.errors[0].startswith("provider rejected the input (HTTP 413): xxx")
    assert len(result.errors[0]) < 600


@pytest.mark.anyio
@pytest.mark.parametrize("known_dims", [DIMS, None])
async def test_wrong_dims_nan_and_dropped_vectors_are_per_input_errors(
    server: FakeOpenAIServer, known_dims: int | None
) -> None:
    server.wrong_dims_for = {"wrong"}
    server.nan_for = {"nan"}
    server.drop_vector_for = {"dropped"}
    texts = ["wrong", "ok 1", "nan", "ok 2", "dropped", "ok 3"]
    async with make_provider(server, dimensions=known_dims) as provider:
        result = await provider.embed(texts)
    assert result.errors == {
        0: f"provider returned {DIMS + 1} dimensions, expected {DIMS}",
        2: "provider returned a non-finite value (NaN or infinity)",
        4: "provider returned no vector for this input",
    }
    for index in (1, 3, 5):
        np.testing.assert_array_equal(result.vectors[index], fake_vector(texts[index], DIMS))
    assert [result.vectors[i] for i in (0, 2, 4)] == [None, None, None]


@pytest.mark.anyio
async def test_duplicate_texts_share_their_error(server: FakeOpenAIServer) -> None:
    server.reject_inputs = {"bad"}
    async with make_provider(server) as provider:
        result = await provider.embed(["bad", "ok", "bad"])
    assert set(result.errors) == {0, 2}
    assert result.errors[0] == result.errors[2]


@pytest.mark.anyio
async def test_response_parsing_edge_cases() -> None:
    huge = [1e39, 0.0]  # overflows float32: must be rejected, not warned about
    data = [
        {"index": 0, "embedding": "not base64!!"},
        {"index": 1, "embedding": huge},
        {"index": 2, "embedding": [1.0, 2.0]},
        {"index": 2, "embedding": [1.0, 2.0]},
        {"index": 3, "embedding": {"nested": True}},
        {"index": 99, "embedding": [1.0, 2.0]},
        "garbage",
        {"index": 4, "embedding": [3.0, 4.0]},
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": data, "usage": {"prompt_tokens": 11}})

    provider, client = mock_provider(handler)
    async with client, provider:
        result = await provider.embed(["a", "b", "c", "d", "e", "f"])
    assert result.errors == {
        0: "provider returned a vector that could not be decoded",
        1: "provider returned a non-finite value (NaN or infinity)",
        2: "provider returned more than one vector for this input",
        3: "provider returned a vector that could not be decoded",
        5: "provider returned no vector for this input",
    }
    np.testing.assert_array_equal(result.vectors[4], np.array([3.0, 4.0], dtype=np.float32))
    assert result.tokens == 11


@pytest.mark.anyio
async def test_mixed_dimensions_without_configured_dims_fail_the_odd_ones() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        data = [
            {"index": 0, "embedding": [1.0, 2.0, 3.0]},
            {"index": 1, "embedding": [1.0, 2.0]},
            {"index": 2, "embedding": [4.0, 5.0]},
        ]
        return httpx.Response(200, json={"data": data})

    provider, client = mock_provider(handler)
    async with client, provider:
        result = await provider.embed(["a", "b", "c"])
    assert result.errors == {0: "provider returned 3 dimensions, expected 2"}


@pytest.mark.anyio
async def test_a_lone_surrogate_fails_only_its_input(server: FakeOpenAIServer) -> None:
    async with make_provider(server) as provider:
        result = await provider.embed(["ok", "bad \ud800"])
    assert set(result.errors) == {1}
    assert "lone surrogate" in result.errors[1]
    assert server.input_counts == {"ok": 1}


# -- configuration errors --------------------------------------------------------------------


@pytest.mark.anyio
async def test_401_is_a_configuration_error(server: FakeOpenAIServer) -> None:
    server.required_api_key = "sk-the-right-one"
    async with make_provider(server) as provider:
        with pytest.raises(
            ConfigurationError, match=r"rejected the API key \(HTTP 401\)"
        ) as caught:
            await provider.embed(["x"])
    assert "[redacted]" in str(caught.value)  # the server quoted the key; we did not
    assert server.requests_total == 1  # not retried


@pytest.mark.anyio
async def test_unknown_model_is_a_configuration_error(server: FakeOpenAIServer) -> None:
    server.known_models = {"some-other-model"}
    async with make_provider(server) as provider:
        with pytest.raises(ConfigurationError) as caught:
            await provider.embed(["x", "y"])
    message = str(caught.value)
    assert MODEL in message
    assert server.base_url in message
    assert "HTTP 404" in message
    assert server.requests_total == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (400, {"error": {"message": "The model `x` does not exist"}}, MODEL),
        (400, {"error": {"message": "bad", "code": "model_not_found"}}, MODEL),
        (403, {"error": {"message": "forbidden"}}, "rejected the API key (HTTP 403)"),
        (405, {"detail": "Method Not Allowed"}, "HTTP 405"),
    ],
)
async def test_other_configuration_answers(status: int, body: Any, expected: str) -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(status, json=body)

    provider, client = mock_provider(handler)
    async with client, provider:
        with pytest.raises(ConfigurationError, match=re.escape(expected)):
            await provider.embed(["a", "b"])
    assert len(calls) == 1  # neither retried nor split


@pytest.mark.anyio
async def test_unsupported_dimensions_setting_is_a_configuration_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["dimensions"] == 64
        message = "This model does not support specifying dimensions."
        return httpx.Response(400, json={"error": {"message": message}})

    provider, client = mock_provider(handler, dimensions=64)
    async with client, provider:
        with pytest.raises(ConfigurationError, match="dimensions=64"):
            await provider.embed(["a", "b", "c"])


@pytest.mark.anyio
async def test_returned_vectors_are_read_only_and_closed_providers_refuse_work(
    server: FakeOpenAIServer,
) -> None:
    provider = make_provider(server)
    async with provider:
        for fmt in (False, True):
            server.ignore_base64 = fmt
            result = await provider.embed(["same", "same"])
            assert result.vectors[0] is result.vectors[1]
            with pytest.raises(ValueError, match="read-only"):
                result.vectors[0][0] = 1.0  # type: ignore[index]
    with pytest.raises(RuntimeError, match="closed"):
        await provider.embed(["x"])


def test_invalid_settings_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="base URL"):
        make_provider(base_url="ftp://example.com/v1")
    with pytest.raises(ConfigurationError, match="API key"):
        make_provider(api_key=SecretStr("sk-with\nnewline"))
    with pytest.raises(ConfigurationError, match="max_retries"):
        make_provider(max_retries=0)


# -- secrets ---------------------------------------------------------------------------------


def exception_chain_text(exc: BaseException | None) -> str:
    parts = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts += [str(exc), repr(exc), repr(exc.args)]
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


SCENARIOS: dict[str, Callable[[FakeOpenAIServer], None]] = {
    "401": lambda srv: setattr(srv, "required_api_key", "sk-the-right-one"),
    "404": lambda srv: setattr(srv, "known_models", {"other"}),
    "500": lambda srv: srv.fail_next(500, n=100),
    "429": lambda srv: srv.fail_next(429, n=100, retry_after=0.01),
    "timeout": lambda srv: srv.fail_next("timeout", n=100),
    "reset": lambda srv: srv.fail_next("reset", n=100),
    "rejected": lambda srv: setattr(srv, "reject_inputs", {"a"}),
    "bad vectors": lambda srv: setattr(srv, "nan_for", {"a"}),
}


@pytest.mark.anyio
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
async def test_the_api_key_never_leaks(server: FakeOpenAIServer, scenario: str) -> None:
    SCENARIOS[scenario](server)
    server.timeout_sleep_s = 2
    raised: BaseException | None = None
    with capture_logs() as logs:
        provider = make_provider(server, timeout_seconds=0.2, max_retries=2)
        async with provider:
            try:
                result = await provider.embed(["a", "b"])
            except (ConfigurationError, ProviderUnavailable) as exc:
                raised = exc
            else:
                assert result.errors  # the non-raising scenarios produce per-input errors
                assert KEY not in json.dumps(result.errors)
        assert KEY not in repr(provider)
        assert KEY not in repr(vars(provider))
    assert logs, "every failure path logs an event"
    assert KEY not in repr(logs)
    assert KEY not in exception_chain_text(raised)
    assert scenario in ("rejected", "bad vectors") or raised is not None


@pytest.mark.anyio
async def test_key_is_redacted_from_transport_and_parse_messages() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == f"Bearer {KEY}"
        raise httpx.ConnectError(f"proxy said: {KEY}", request=request)

    provider, client = mock_provider(handler, max_retries=2)
    with capture_logs() as logs:
        async with client, provider:
            with pytest.raises(ProviderUnavailable) as caught:
                await provider.embed(["x"])
    assert "[redacted]" in str(caught.value)
    assert KEY not in str(caught.value)
    assert KEY not in repr(logs)


# -- header parsing --------------------------------------------------------------------------


def test_duration_and_retry_after_parsing() -> None:
    assert parse_duration_s("1s") == 1.0
    assert parse_duration_s("6m0s") == 360.0
    assert parse_duration_s("20ms") == pytest.approx(0.02)
    assert parse_duration_s("1h2m3.5s") == pytest.approx(3723.5)
    assert parse_duration_s("2.5") == 2.5
    assert parse_duration_s("soon") is None
    assert parse_duration_s("") is None
    assert parse_retry_after_s("3") == 3.0
    assert parse_retry_after_s("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412480.0) == 30.0
    assert parse_retry_after_s("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412600.0) == 0.0
    assert parse_retry_after_s("whenever") is None


def test_retry_hint_from_headers() -> None:
    assert retry_hint_s(httpx.Headers({})) is None
    assert retry_hint_s(httpx.Headers({"retry-after": "2", "retry-after-ms": "2500"})) == 2.5
    limited = {
        "x-ratelimit-remaining-requests": "10",
        "x-ratelimit-reset-requests": "6m0s",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "20ms",
    }
    assert retry_hint_s(httpx.Headers(limited)) == pytest.approx(0.02)  # only the exhausted one
    no_remaining = {"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "250ms"}
    assert retry_hint_s(httpx.Headers(no_remaining)) == 1.0


@pytest.mark.anyio
async def test_x_ratelimit_reset_is_honoured_on_429() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            headers = {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "300ms"}
            return httpx.Response(429, headers=headers, json={"error": {"message": "slow down"}})
        return httpx.Response(200, json={"data": [{"index": 0, "embedding": [1.0]}]})

    provider, client = mock_provider(handler, backoff_base_seconds=0.001, backoff_max_seconds=5)
    started = time.monotonic()
    with capture_logs() as logs:
        async with client, provider:
            result = await provider.embed(["x"])
    assert time.monotonic() - started >= 0.25
    assert result.errors == {}
    waits = [entry["wait_s"] for entry in logs if entry["event"] == "provider_retry"]
    assert waits[0] >= 0.3
