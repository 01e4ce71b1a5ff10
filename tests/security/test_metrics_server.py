"""The metrics/healthz server's cost is bounded whatever clients do (issue 11 item 7: 300 idle
connections made 281 threads, and none was ever dropped).

Real sockets against a running ``MetricsServer``: idle connections, half-sent requests, more
connections than the cap. Nothing here asserts a duration: waits are liveness bounds.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import pytest

from queue_processor.metrics import Metrics, MetricsServer

LIVENESS_S = 20  # how long a client waits for something that must happen "eventually"


def connect(server: MetricsServer, first_bytes: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=LIVENESS_S)
    if first_bytes:
        sock.sendall(first_bytes)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Block (up to LIVENESS_S) until the server closes ``sock``; True if it did."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def still_open(sock: socket.socket) -> bool:
    """Nothing (no EOF) is waiting to be read on ``sock`` right now."""
    readable, _, _ = select.select([sock], [], [], 0)
    return not readable


@pytest.fixture
def sockets() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def test_idle_and_half_sent_connections_hold_no_thread_and_healthz_answers(
    sockets: ExitStack,
) -> None:
    max_threads = 4
    server = MetricsServer(
        Metrics(), port=0, timeout_seconds=120, max_threads=max_threads, max_connections=256
    )
    sockets.enter_context(server)
    baseline = threading.active_count()

    idle = [sockets.enter_context(connect(server)) for _ in range(100)]
    # Slow loris: a request line, then nothing.
    half_sent = [
        sockets.enter_context(connect(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\n"))
        for _ in range(100)
    ]
    # Accepted in order: by the time this is answered, all 200 above are in the server's hands.
    for _ in range(3):
        response = httpx.get(f"{server.url}/healthz", timeout=LIVENESS_S)
        assert (response.status_code, response.text) == (200, "ok\n")
    metrics = httpx.get(f"{server.url}/metrics", timeout=LIVENESS_S)
    assert metrics.status_code == 200

    assert threading.active_count() <= baseline + max_threads, threading.enumerate()
    # Answered while every one of them was still open: nothing was dropped to make room.
    assert all(still_open(sock) for sock in idle + half_sent)


def test_an_idle_or_half_sent_connection_is_closed_after_the_timeout(sockets: ExitStack) -> None:
    server = sockets.enter_context(MetricsServer(Metrics(), port=0, timeout_seconds=0.3))
    idle = sockets.enter_context(connect(server))
    half_sent = sockets.enter_context(connect(server, b"GET /healthz HTTP/1.0\r\n"))
    assert closed_by_server(idle)
    assert closed_by_server(half_sent)

    # A client that sends its request in time is answered as before.
    prompt = sockets.enter_context(connect(server, b"GET /healthz HTTP/1.0\r\n\r\n"))
    answer = b""
    while chunk := prompt.recv(4096):
        answer += chunk
    assert answer.startswith(b"HTTP/1.0 200 ")
    assert answer.endswith(b"\r\n\r\nok\n")


def test_connections_beyond_the_cap_push_out_the_longest_waiting(sockets: ExitStack) -> None:
    cap = 10
    server = sockets.enter_context(
        MetricsServer(Metrics(), port=0, timeout_seconds=120, max_connections=cap)
    )
    idle = [sockets.enter_context(connect(server)) for _ in range(30)]
    response = httpx.get(f"{server.url}/healthz", timeout=LIVENESS_S)
    assert response.status_code == 200
    # 31 connections arrived for 10 places: the 21 that had waited longest were closed.
    assert all(closed_by_server(sock) for sock in idle[:21])
    assert all(still_open(sock) for sock in idle[21:])


def test_an_oversized_request_head_is_dropped(sockets: ExitStack) -> None:
    server = sockets.enter_context(MetricsServer(Metrics(), port=0, timeout_seconds=120))
    flood = sockets.enter_context(connect(server))
    line = b"X-Padding: " + b"a" * 65_000 + b"\r\n"
    refused: OSError | None = None
    for _ in range(1000):  # 64 MB at most, without the blank line that ends a request head
        try:
            flood.sendall(line)
        except OSError as exc:  # the server closed mid-stream: EPIPE or a reset
            refused = exc
            break
    assert isinstance(refused, BrokenPipeError | ConnectionResetError), refused
    assert httpx.get(f"{server.url}/healthz", timeout=LIVENESS_S).status_code == 200


def test_close_returns_with_connections_still_open(sockets: ExitStack) -> None:
    server = MetricsServer(Metrics(), port=0, timeout_seconds=120)
    server.start()
    idle = [sockets.enter_context(connect(server)) for _ in range(20)]
    server.close()
    assert not server.is_serving
    assert all(closed_by_server(sock) for sock in idle)
