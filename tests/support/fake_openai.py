"""A real HTTP server on 127.0.0.1 that speaks the OpenAI embeddings API, with fault injection.

Used in-process (``with FakeOpenAIServer(dims=8) as srv: srv.base_url``) by integration and
reliability tests, and as a subprocess by scripts and end-to-end tests::

    python -m tests.support.fake_openai --port 0 --dims 8 [--latency-ms N]
        [--fault-rate 0.3 --faults 429,500,timeout,reset,slow] [--seed N]

prints ``LISTENING <port>`` on stdout, then serves until SIGTERM/SIGINT. A subprocess is
driven over HTTP: ``GET /stats`` returns the counters, ``POST /control`` changes behaviour
(see ``FakeOpenAIServer.configure``).

Vectors are deterministic per text (``fake_vector``), so tests can recompute what the server
sent. Endpoints: ``POST /v1/embeddings`` (and ``/embeddings``), ``GET /stats``,
``POST /control``, ``GET /health``. Only the standard library and numpy are used.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import random
import signal
import socket
import struct
import sys
import threading
import urllib.parse
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, Self

import numpy as np
import numpy.typing as npt

FAULT_KINDS = ("429", "500", "timeout", "reset", "slow")
"""Fault names accepted by ``faults`` / ``--faults``."""

DROPPED = 0
"""``requests_by_status`` key for connections dropped without a response (timeout, reset)."""

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _seed(text: str) -> int:
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "little")


def fake_vectors(texts: Sequence[str], dims: int) -> npt.NDArray[np.float32]:
    """Deterministic unit vectors for ``texts``, shape ``(len(texts), dims)``, float32.

    Each text seeds a splitmix64 stream (seed = first 8 bytes of its SHA-256); components are
    uniform in [-1, 1), then the row is L2-normalised. Vectorised: ~10 ms for 1000 x 768.
    """
    if dims < 1:
        raise ValueError("dims must be positive")
    seeds = np.fromiter((_seed(text) for text in texts), dtype=np.uint64, count=len(texts))
    z = seeds[:, None] + np.arange(1, dims + 1, dtype=np.uint64)[None, :] * _GOLDEN
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    values = (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-23) - np.float32(1.0)
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    values /= np.maximum(norms, np.float32(1e-12))
    return values


def fake_vector(text: str, dims: int) -> npt.NDArray[np.float32]:
    """The vector the fake server returns for ``text`` at ``dims`` dimensions."""
    vector: npt.NDArray[np.float32] = fake_vectors([text], dims)[0]
    return vector


def fake_token_count(text: str) -> int:
    """Tokens the fake server reports for one input (one per 4 UTF-8 bytes, at least 1)."""
    return max(1, len(text.encode("utf-8", "surrogatepass")) // 4)


class _VectorCache:
    """A bounded, thread-safe LRU of fake vectors keyed by (text, dims)."""

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[tuple[str, int], npt.NDArray[np.float32]] = OrderedDict()
        self._lock = threading.Lock()

    def matrix(self, texts: Sequence[str], dims: int) -> npt.NDArray[np.float32]:
        out = np.empty((len(texts), dims), dtype=np.float32)
        missing: list[int] = []
        with self._lock:
            for row, text in enumerate(texts):
                cached = self._entries.get((text, dims))
                if cached is None:
                    missing.append(row)
                else:
                    self._entries.move_to_end((text, dims))
                    out[row] = cached
        if missing:
            fresh = fake_vectors([texts[row] for row in missing], dims)
            out[missing] = fresh
            if self._max_entries > 0:
                with self._lock:
                    for row, vector in zip(missing, fresh, strict=True):
                        self._entries[(texts[row], dims)] = vector
                    while len(self._entries) > self._max_entries:
                        self._entries.popitem(last=False)
        return out


@dataclass(frozen=True)
class _Reply:
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
class _Snapshot:
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
    fault: str | None = None
    retry_after: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _json_error(status: int, message: str, type_: str, code: str | None = None) -> _Reply:
    error: dict[str, Any] = {"message": message, "type": type_, "param": None, "code": code}
    body = json.dumps({"error": error}).encode()
    return _Reply(status=status, body=body)


class FakeOpenAIServer:
    """An OpenAI-compatible embeddings server on a background thread; a context manager.

    Control attributes may be changed at any time from the test thread (each request reads a
    consistent copy under a lock). Counters: ``requests_total`` (embedding requests
    received), ``requests_by_status`` (responses by status; ``DROPPED`` = 0 for connections
    dropped by a timeout/reset fault), ``input_counts`` (how often each input text was part
    of a 200 response), ``faults_injected``, ``request_log`` (one dict per embedding request:
    status, n_inputs, model, authorization (bool, never the key), dimensions,
    encoding_format, fault), ``in_flight`` / ``max_in_flight`` (concurrent embedding requests),
    ``oversized_bytes_sent`` (body bytes of ``oversized_body_bytes`` answers the client took:
    handed to the kernel, so at most a few MB of socket buffers more than it read).

    ``oversized_body_bytes`` > 0 answers every authorised embeddings request with a 200 whose
    body is that many bytes of a never-ending-looking ``data`` list, streamed in 64 KiB chunks
    (chunked, or with Content-Length when ``oversized_declares_length``), until the client
    hangs up.
    """

    def __init__(
        self,
        *,
        dims: int = 8,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_s: float = 0.0,
        required_api_key: str | None = None,
        known_models: Iterable[str] | None = None,
        fault_rate: float = 0.0,
        faults: Iterable[str] = ("429", "500"),
        seed: int | None = 0,
        timeout_sleep_s: float = 5.0,
        slow_s: float = 1.0,
        cache_entries: int = 20_000,
    ) -> None:
        self.dims = dims
        self.host = host
        self._requested_port = port
        self.latency_s = latency_s
        self.required_api_key = required_api_key
        self.known_models: set[str] | None = None if known_models is None else set(known_models)
        self.fault_rate = fault_rate
        self.faults: list[str] = list(faults)
        self.timeout_sleep_s = timeout_sleep_s
        self.slow_s = slow_s
        self.reject_inputs: set[str] = set()
        self.reject_if: Callable[[str], bool] | None = None
        self.wrong_dims_for: set[str] = set()
        self.nan_for: set[str] = set()
        self.drop_vector_for: set[str] = set()
        self.ignore_base64 = False
        self.shuffle_order = False
        self.oversized_body_bytes = 0
        self.oversized_declares_length = False
        self.rng = random.Random(seed)
        self._check_faults(self.faults)

        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._fail_queue: deque[tuple[int | str, float | None]] = deque()
        self._cache = _VectorCache(cache_entries)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._init_counters()

    def _init_counters(self) -> None:
        self.requests_total = 0
        self.requests_by_status: Counter[int] = Counter()
        self.input_counts: Counter[str] = Counter()
        self.faults_injected: Counter[str] = Counter()
        self.request_log: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.oversized_bytes_sent = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind and serve on a daemon thread; returns self."""
        if self._httpd is not None:
            raise RuntimeError("server already started")
        self._stopping.clear()
        self._httpd = _HTTPServer((self.host, self._requested_port), self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-openai-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: interrupt sleeping handlers, close every connection, join threads."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """E.g. ``http://127.0.0.1:PORT/v1`` (the provider appends ``/embeddings``)."""
        return f"http://{self.host}:{self.port}/v1"

    # -- control ---------------------------------------------------------------------------

    def fail_next(self, status: int | str, n: int = 1, retry_after: float | None = None) -> None:
        """Answer the next ``n`` embedding requests with ``status``.

        ``status`` is an HTTP status or a fault name ("timeout", "reset", "slow"). A 429/503
        carries ``Retry-After: <retry_after>`` when given.
        """
        if isinstance(status, str) and status not in FAULT_KINDS:
            raise ValueError(f"unknown fault {status!r}; expected one of {FAULT_KINDS}")
        with self._lock:
            self._fail_queue.extend([(status, retry_after)] * n)

    def reset(self) -> None:
        """Clear counters, queued failures and every fault/rejection setting."""
        with self._lock:
            self._init_counters()
            self._fail_queue.clear()
            self.fault_rate = 0.0
            self.latency_s = 0.0
            self.reject_inputs = set()
            self.reject_if = None
            self.wrong_dims_for = set()
            self.nan_for = set()
            self.drop_vector_for = set()
            self.ignore_base64 = False
            self.shuffle_order = False
            self.oversized_body_bytes = 0
            self.oversized_declares_length = False

    def configure(self, **settings: Any) -> None:
        """Change settings by name; used by ``POST /control``.

        Keys: latency_s, fault_rate, faults, seed, timeout_sleep_s, slow_s, reject_inputs,
        wrong_dims_for, nan_for, drop_vector_for, ignore_base64, shuffle_order,
        oversized_body_bytes, oversized_declares_length, required_api_key, known_models,
        fail_next ({"status", "n", "retry_after"}), reset.
        """
        if settings.pop("reset", False):
            self.reset()
        fail = settings.pop("fail_next", None)
        with self._lock:
            for key, value in settings.items():
                if key in ("latency_s", "fault_rate", "timeout_sleep_s", "slow_s"):
                    setattr(self, key, float(value))
                elif key == "faults":
                    faults = [str(item) for item in value]
                    self._check_faults(faults)
                    self.faults = faults
                elif key == "seed":
                    self.rng = random.Random(value)
                elif key in ("reject_inputs", "wrong_dims_for", "nan_for", "drop_vector_for"):
                    setattr(self, key, {str(item) for item in value})
                elif key in ("ignore_base64", "shuffle_order", "oversized_declares_length"):
                    setattr(self, key, bool(value))
                elif key == "oversized_body_bytes":
                    self.oversized_body_bytes = int(value)
                elif key == "required_api_key":
                    self.required_api_key = None if value is None else str(value)
                elif key == "known_models":
                    self.known_models = None if value is None else {str(m) for m in value}
                else:
                    raise ValueError(f"unknown control setting {key!r}")
        if fail is not None:
            self.fail_next(fail["status"], int(fail.get("n", 1)), fail.get("retry_after"))

    def stats(self, *, include_log: bool = False) -> dict[str, Any]:
        """A JSON-ready copy of the counters (what ``GET /stats`` returns)."""
        with self._lock:
            stats: dict[str, Any] = {
                "requests_total": self.requests_total,
                "by_status": {str(k): v for k, v in sorted(self.requests_by_status.items())},
                "input_counts": dict(self.input_counts),
                "faults_injected": dict(self.faults_injected),
                "max_in_flight": self.max_in_flight,
                "oversized_bytes_sent": self.oversized_bytes_sent,
            }
            if include_log:
                stats["request_log"] = list(self.request_log)
        return stats

    @staticmethod
    def _check_faults(faults: Sequence[str]) -> None:
        unknown = [fault for fault in faults if fault not in FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown faults {unknown}; expected some of {FAULT_KINDS}")

    # -- request handling (called on handler threads) --------------------------------------

    def _snapshot(self) -> _Snapshot:
        with self._lock:
            snapshot = _Snapshot(
                dims=self.dims,
                latency_s=self.latency_s,
                required_api_key=self.required_api_key,
                known_models=None if self.known_models is None else frozenset(self.known_models),
                reject_inputs=frozenset(self.reject_inputs),
                reject_if=self.reject_if,
                wrong_dims_for=frozenset(self.wrong_dims_for),
                nan_for=frozenset(self.nan_for),
                drop_vector_for=frozenset(self.drop_vector_for),
                ignore_base64=self.ignore_base64,
                shuffle_order=self.shuffle_order,
                timeout_sleep_s=self.timeout_sleep_s,
                slow_s=self.slow_s,
                oversized_body_bytes=self.oversized_body_bytes,
                oversized_declares_length=self.oversized_declares_length,
            )
            if self._fail_queue:
                fault, snapshot.retry_after = self._fail_queue.popleft()
                snapshot.fault = str(fault)
            elif self.fault_rate > 0 and self.faults and self.rng.random() < self.fault_rate:
                snapshot.fault = self.rng.choice(self.faults)
            if snapshot.shuffle_order:
                snapshot.extra["shuffle_seed"] = self.rng.random()
        return snapshot

    def _embeddings_reply(self, authorization: str | None, raw: bytes) -> _Reply:
        """Decide the answer to one embeddings request and record it in the counters."""
        try:
            request = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            request = None
        with self._lock:
            self.requests_total += 1
        snap = self._snapshot()
        model = request.get("model") if isinstance(request, dict) else None
        inputs = request.get("input") if isinstance(request, dict) else None
        if isinstance(inputs, str):
            inputs = [inputs]
        entry: dict[str, Any] = {
            "n_inputs": len(inputs) if isinstance(inputs, list) else 0,
            "model": model,
            "authorization": authorization is not None,
            "dimensions": request.get("dimensions") if isinstance(request, dict) else None,
            "encoding_format": (
                request.get("encoding_format") if isinstance(request, dict) else None
            ),
            "fault": None,
        }
        reply = self._decide(request, authorization, model, inputs, snap, entry)
        with self._lock:
            status = DROPPED if reply.drop else reply.status
            entry["status"] = status
            self.requests_by_status[status] += 1
            self.request_log.append(entry)
            if entry["fault"] is not None:
                self.faults_injected[entry["fault"]] += 1
            if status == 200 and isinstance(inputs, list):
                self.input_counts.update(inputs)
        return reply

    def _decide(
        self,
        request: object,
        authorization: str | None,
        model: object,
        inputs: object,
        snap: _Snapshot,
        entry: dict[str, Any],
    ) -> _Reply:
        latency = snap.latency_s
        if not isinstance(request, dict):
            return _json_error(400, "We could not parse the JSON body of your request.", "invalid")
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
                return _json_error(401, message, "invalid_request_error", "invalid_api_key")
        if snap.known_models is not None and model not in snap.known_models:
            return _json_error(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                "invalid_request_error",
                "model_not_found",
            )

        if snap.oversized_body_bytes > 0:
            return _Reply(
                status=200,
                oversized_bytes=snap.oversized_body_bytes,
                declare_length=snap.oversized_declares_length,
                sleep_s=latency,
            )
        if snap.fault is not None:
            entry["fault"] = snap.fault
            reply = self._fault_reply(snap)
            if reply is not None:
                return reply
            latency += snap.slow_s  # "slow": answer normally, late

        if (
            not isinstance(inputs, list)
            or not inputs
            or not all(isinstance(text, str) for text in inputs)
        ):
            return _replace_sleep(
                _json_error(
                    400, "'input' must be a string or a non-empty list of strings.", "invalid"
                ),
                latency,
            )
        texts: list[str] = inputs
        if any(text in snap.reject_inputs for text in texts) or (
            snap.reject_if is not None and any(snap.reject_if(text) for text in texts)
        ):
            return _replace_sleep(
                _json_error(
                    400,
                    "This model's maximum context length is 8192 tokens, however you requested "
                    "more tokens in your input. Please reduce your input.",
                    "invalid_request_error",
                ),
                latency,
            )

        dims = request.get("dimensions", snap.dims)
        if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= 65_536:
            return _replace_sleep(
                _json_error(400, "'dimensions' must be a positive integer.", "invalid"), latency
            )
        use_base64 = request.get("encoding_format") == "base64" and not snap.ignore_base64
        body = self._success_body(texts, dims, str(model), use_base64, snap)
        return _Reply(status=200, body=body, sleep_s=latency)

    def _fault_reply(self, snap: _Snapshot) -> _Reply | None:
        fault = snap.fault
        if fault == "timeout":
            return _Reply(drop="timeout", sleep_s=snap.timeout_sleep_s)
        if fault == "reset":
            return _Reply(drop="reset")
        if fault == "slow":
            return None
        status = int(fault) if fault is not None else 500
        if status == 429:
            reply = _json_error(
                429,
                "Rate limit reached for requests. Please try again later.",
                "requests",
                "rate_limit_exceeded",
            )
        elif status >= 500:
            reply = _json_error(
                status, "The server had an error while processing your request.", "server_error"
            )
        else:
            reply = _json_error(status, f"Injected HTTP {status}.", "invalid_request_error")
        headers: tuple[tuple[str, str], ...] = ()
        if snap.retry_after is not None:
            headers = (("Retry-After", f"{snap.retry_after:g}"),)
        return _Reply(status=reply.status, body=reply.body, headers=headers, sleep_s=snap.latency_s)

    def _success_body(
        self, texts: list[str], dims: int, model: str, use_base64: bool, snap: _Snapshot
    ) -> bytes:
        """The 200 JSON body, assembled from bytes: json.dumps of megabytes of base64 is slow."""
        matrix = self._cache.matrix(texts, dims)
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
                items.append(
                    b'{"object":"embedding","index":%d,"embedding":"%s"}' % (index, encoded)
                )
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

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


def _replace_sleep(reply: _Reply, sleep_s: float) -> _Reply:
    return _Reply(reply.status, reply.body, reply.headers, sleep_s, reply.drop)


def _percent_encoded(text: str) -> str:
    """Every byte of ``text`` as %xx (lower-case hex), as some proxies log a header."""
    return "".join(f"%{byte:02x}" for byte in text.encode("utf-8"))


_OVERSIZED_HEAD = b'{"object":"list","data":['
_OVERSIZED_ITEM = b'{"object":"embedding","index":0,"embedding":[' + b"0.125," * 1000 + b"0.125]},"


class _HTTPServer(ThreadingHTTPServer):
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
    server: _HTTPServer
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
            self._send(404, _json_error(404, f"No route {path}", "invalid_request_error").body)

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
                self._send(400, _json_error(400, str(exc), "invalid_request_error").body)
            else:
                self._send(200, b'{"ok":true}')
        else:
            self._send(404, _json_error(404, f"No route {path}", "invalid_request_error").body)

    def _answer(self, reply: _Reply) -> None:
        stopping = self.server.fake._stopping
        if reply.sleep_s > 0 and stopping.wait(reply.sleep_s):
            reply = _Reply(drop="timeout")  # shutting down: just go away
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
        pattern = _OVERSIZED_HEAD + _OVERSIZED_ITEM * (64 * 1024 // len(_OVERSIZED_ITEM) + 1)
        remaining = size
        try:
            while remaining > 0 and not fake._stopping.is_set():
                chunk = pattern[: min(64 * 1024, remaining)]
                frame = chunk if declare_length else b"%x\r\n%s\r\n" % (len(chunk), chunk)
                self.wfile.write(frame)
                remaining -= len(chunk)
                with fake._lock:
                    fake.oversized_bytes_sent += len(chunk)
            if not declare_length:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client stopped reading and closed: what a capped client does


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.fake_openai",
        description="Fake OpenAI embeddings server for tests and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--dims", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--faults", default="429,500", help=f"comma list of {FAULT_KINDS}")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--api-key", default=None, help="require this Bearer key")
    parser.add_argument("--models", default=None, help="comma list of known model names")
    parser.add_argument("--timeout-sleep-s", type=float, default=30.0)
    parser.add_argument("--slow-ms", type=float, default=1000.0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; prints ``LISTENING <port>`` once ready."""
    args = _parse_args(argv)
    server = FakeOpenAIServer(
        dims=args.dims,
        host=args.host,
        port=args.port,
        latency_s=args.latency_ms / 1000,
        required_api_key=args.api_key,
        known_models=None if args.models is None else args.models.split(","),
        fault_rate=args.fault_rate,
        faults=[fault for fault in args.faults.split(",") if fault],
        seed=args.seed,
        timeout_sleep_s=args.timeout_sleep_s,
        slow_s=args.slow_ms / 1000,
    )
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    with server:
        print(f"LISTENING {server.port}", flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
