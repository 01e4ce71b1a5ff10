"""A provider's success body is read with a byte cap, streamed: a huge answer costs the
worker at most the cap, not the body (issue 11 item 5: a 300 MB body took a worker to 990 MB).

Over a real socket: the fake server streams an oversized body in 64 KiB chunks and counts
the bytes the client took off it. That count includes what sat in the two sockets' kernel
buffers when the client hung up (a few MB on loopback), so the assertions leave room for it
and compare with the body's size, never with time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from queue_processor.errors import ProviderUnavailable
from queue_processor.providers.openai import DEFAULT_MAX_RESPONSE_BYTES, OpenAIProvider
from queue_processor.settings import Settings
from queue_processor.testing import FakeOpenAIServer

MODEL = "text-embedding-test"
MiB = 1024 * 1024
BODY_BYTES = 300 * MiB
# Kernel socket buffers on both ends can hold this much that the client never read.
SOCKET_SLACK_BYTES = 24 * MiB


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=8) as srv:
        yield srv


def provider(srv: FakeOpenAIServer, **overrides: Any) -> OpenAIProvider:
    settings: dict[str, Any] = {
        "base_url": srv.base_url,
        "api_key": SecretStr("sk-test"),
        "model": MODEL,
        "max_retries": 2,
        "backoff_base_seconds": 0.01,
        "backoff_max_seconds": 0.02,
        "timeout_seconds": 30,
    }
    settings.update(overrides)
    return OpenAIProvider(**settings)


def wait_until_idle(srv: FakeOpenAIServer, timeout_s: float = 60) -> None:
    """Wait for the server's handlers to finish, so ``oversized_bytes_sent`` is final."""
    deadline = time.monotonic() + timeout_s
    while srv.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.in_flight == 0, "the fake server is still sending"


@pytest.mark.anyio
@pytest.mark.parametrize("declares_length", [False, True], ids=["chunked", "content-length"])
async def test_a_huge_body_is_not_read_past_the_cap(
    fake: FakeOpenAIServer, declares_length: bool
) -> None:
    fake.oversized_body_bytes = BODY_BYTES
    fake.oversized_declares_length = declares_length
    statuses: list[int | str] = []
    embedder = provider(fake, dimensions=8, on_response=statuses.append)
    limit = embedder.response_limit_bytes(2)
    assert limit < 2 * MiB  # 2 inputs x 8 dimensions x 32 bytes + 1 MiB of envelope
    async with embedder:
        with pytest.raises(ProviderUnavailable, match="response body over") as caught:
            await embedder.embed(["a", "b"])
    wait_until_idle(fake)

    message = str(caught.value)
    assert f"over {limit} bytes" in message
    assert "EMBEDDING_MAX_RESPONSE_BYTES" in message
    # Treated like an unreadable answer: retried in the call, then given up.
    assert fake.requests_by_status[200] == 2
    assert statuses == [200, 200]
    # Each attempt took at most the cap plus what the socket buffers held: far from 300 MB.
    sent = fake.oversized_bytes_sent
    assert sent <= 2 * (limit + SOCKET_SLACK_BYTES), sent
    assert sent < BODY_BYTES / 5, sent


@pytest.mark.anyio
async def test_the_setting_caps_the_limit_and_normal_answers_fit(fake: FakeOpenAIServer) -> None:
    small = provider(fake, max_response_bytes=64 * 1024, max_retries=1)
    assert small.response_limit_bytes(500) == 64 * 1024
    async with small:
        # 40 inputs of 8 dimensions, base64: ~4 KB, well within 64 KiB.
        result = await small.embed([f"text {i}" for i in range(40)])
        assert result.errors == {}

        fake.oversized_body_bytes = BODY_BYTES
        with pytest.raises(ProviderUnavailable, match="over 65536 bytes"):
            await small.embed(["x"])
    wait_until_idle(fake)
    assert fake.oversized_bytes_sent < SOCKET_SLACK_BYTES + 64 * 1024


def test_the_limit_follows_the_request_and_defaults() -> None:
    unknown_dims = OpenAIProvider(base_url="http://127.0.0.1:9/v1", api_key=None, model=MODEL)
    # Without a configured dimension, 8192 per vector is assumed; capped by the setting.
    assert unknown_dims.response_limit_bytes(1) == 8192 * 32 + MiB
    assert unknown_dims.response_limit_bytes(10_000) == DEFAULT_MAX_RESPONSE_BYTES
    sized = OpenAIProvider(
        base_url="http://127.0.0.1:9/v1", api_key=None, model=MODEL, dimensions=1536
    )
    assert sized.response_limit_bytes(100) == 100 * 1536 * 32 + MiB
    # 512 inputs of 4096 dimensions as pretty-printed JSON numbers (~25 bytes each) fit the
    # default ceiling, which is also the setting's default.
    assert DEFAULT_MAX_RESPONSE_BYTES > 512 * 4096 * 25
    default = Settings.model_fields["embedding_max_response_bytes"].default
    assert default == DEFAULT_MAX_RESPONSE_BYTES
