"""The fake server's HTTP side: a threading server that can close its keep-alive connections,
and the handler that routes requests and carries out each ``Reply`` (sleep, answer, reset,
time out, or stream an oversized body)."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import sys
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from queue_processor.testing.protocol import Reply, json_error

if TYPE_CHECKING:
    from queue_processor.testing.server import FakeOpenAIServer

_OVERSIZED_HEAD = b'{"object":"list","data":['
_OVERSIZED_ITEM = b'{"object":"embedding","index":0,"embedding":[' + b"0.125," * 1000 + b"0.125]},"
_CHUNK_BYTES = 64 * 1024


class FakeHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that tracks connections so ``stop()`` can close idle keep-alives."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], fake: FakeOpenAIServer) -> None:
        self.fake = fake
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.discard(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that time out or go away are part of the job; only report real bugs.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real APIs; every answer has a length
    # Headers and body are separate writes; with Nagle on, the body waits for the client's
    # delayed ACK (~40 ms per request).
    disable_nagle_algorithm = True
    server: FakeHTTPServer
    server_version = "FakeOpenAI/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request stderr line."""

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/stats":
            stats = self.server.fake.stats(include_log="log=1" in query.split("&"))
            self._send(200, json.dumps(stats).encode())
        elif path == "/health":
            self._send(200, b'{"status":"ok"}')
        else:
            self._send(404, json_error(404, f"No route {path}", "invalid_request_error").body)

    def do_POST(self) -> None:
        path = self.path.partition("?")[0]
        raw = self._read_body()
        fake = self.server.fake
        if path in ("/v1/embeddings", "/embeddings"):
            fake._enter()
            try:
                self._answer(fake._embeddings_reply(self.headers.get("Authorization"), raw))
            finally:
                fake._leave()
        elif path == "/control":
            try:
                settings = json.loads(raw or b"{}")
                if not isinstance(settings, dict):
                    raise ValueError("the control body must be a JSON object")
                fake.configure(**settings)
            except (ValueError, TypeError, KeyError) as exc:
                self._send(400, json_error(400, str(exc), "invalid_request_error").body)
            else:
                self._send(200, b'{"ok":true}')
        else:
            self._send(404, json_error(404, f"No route {path}", "invalid_request_error").body)

    def _answer(self, reply: Reply) -> None:
        stopping = self.server.fake._stopping
        if reply.sleep_s > 0 and stopping.wait(reply.sleep_s):
            reply = Reply(drop="timeout")  # shutting down: just go away
        if reply.drop == "reset":
            # SO_LINGER 0 makes close() send RST instead of FIN: a "connection reset by peer".
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if reply.drop == "timeout":
            self.close_connection = True
            return
        if reply.oversized_bytes > 0:
            self._send_oversized(reply.oversized_bytes, declare_length=reply.declare_length)
            return
        self._send(reply.status, reply.body, reply.headers)

    def _send_oversized(self, size: int, *, declare_length: bool) -> None:
        """Stream ``size`` bytes of a success body until done or the client hangs up."""
        fake = self.server.fake
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if declare_length:
            self.send_header("Content-Length", str(size))
        else:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        pattern = _OVERSIZED_HEAD + _OVERSIZED_ITEM * (_CHUNK_BYTES // len(_OVERSIZED_ITEM) + 1)
        remaining = size
        try:
            while remaining > 0 and not fake._stopping.is_set():
                chunk = pattern[: min(_CHUNK_BYTES, remaining)]
                frame = chunk if declare_length else b"%x\r\n%s\r\n" % (len(chunk), chunk)
                self.wfile.write(frame)
                remaining -= len(chunk)
                fake._add_oversized_sent(len(chunk))
            if not declare_length:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client stopped reading and closed: what a capped client does
