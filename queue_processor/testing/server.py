"""``FakeOpenAIServer``: the fake embeddings API on a background thread, its control knobs
and its counters."""

from __future__ import annotations

import json
import random
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Self

from queue_processor.testing.handler import FakeHTTPServer
from queue_processor.testing.protocol import (
    DROPPED,
    FAULT_KINDS,
    Reply,
    Snapshot,
    decide,
)
from queue_processor.testing.vectors import VectorCache


class FakeOpenAIServer:
    """An OpenAI-compatible embeddings server on a background thread; a context manager.

    Control attributes may be changed at any time from the test thread (each request reads a
    consistent copy under a lock). Counters: ``requests_total`` (embedding requests
    received), ``requests_by_status`` (responses by status; ``DROPPED`` = 0 for connections
    dropped by a timeout/reset fault), ``input_counts`` (how often each input text was part
    of a 200 response), ``inputs_by_model`` (the same, per requested model),
    ``faults_injected``, ``request_log`` (one dict per embedding request: status,
    n_inputs, model, authorization (bool, never the key), dimensions,
    encoding_format, fault), ``in_flight`` / ``max_in_flight`` (concurrent embedding requests),
    ``oversized_bytes_sent`` (body bytes of ``oversized_body_bytes`` answers the client took:
    handed to the kernel, so at most a few MB of socket buffers more than it read).

    ``oversized_body_bytes`` > 0 answers every authorised embeddings request with a 200 whose
    body is that many bytes of a never-ending-looking ``data`` list, streamed in 64 KiB chunks
    (chunked, or with Content-Length when ``oversized_declares_length``), until the client
    hangs up.

    ``max_input_tokens`` makes the server refuse, like OpenAI, a request with an input over
    that many tokens (400 "This model's maximum context length is N tokens, however you
    requested M tokens"), and ``max_request_tokens`` one whose inputs add up to more (400
    "Requested M tokens, max N tokens per request"). Tokens are counted with cl100k_base (as
    OpenAI's embedding models do), or as ``ceil(bytes / bytes_per_token)`` when that is set
    (a server whose tokenizer the client does not know).
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
        max_input_tokens: int | None = None,
        max_request_tokens: int | None = None,
        bytes_per_token: float | None = None,
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
        self.max_input_tokens = max_input_tokens
        self.max_request_tokens = max_request_tokens
        self.bytes_per_token = bytes_per_token
        self.rng = random.Random(seed)
        self._check_faults(self.faults)

        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._fail_queue: deque[tuple[int | str, float | None]] = deque()
        self._cache = VectorCache(cache_entries)
        self._httpd: FakeHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._init_counters()

    def _init_counters(self) -> None:
        self.requests_total = 0
        self.requests_by_status: Counter[int] = Counter()
        self.input_counts: Counter[str] = Counter()
        self.inputs_by_model: dict[str, Counter[str]] = {}
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
        self._httpd = FakeHTTPServer((self.host, self._requested_port), self)
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
            self.max_input_tokens = None
            self.max_request_tokens = None
            self.bytes_per_token = None

    def configure(self, **settings: Any) -> None:
        """Change settings by name; used by ``POST /control``.

        Keys: latency_s, fault_rate, faults, seed, timeout_sleep_s, slow_s, reject_inputs,
        wrong_dims_for, nan_for, drop_vector_for, ignore_base64, shuffle_order,
        oversized_body_bytes, oversized_declares_length, max_input_tokens, max_request_tokens,
        bytes_per_token, required_api_key, known_models,
        fail_next ({"status", "n", "retry_after"}), reset.
        """
        if settings.pop("reset", False):
            self.reset()
        fail = settings.pop("fail_next", None)
        with self._lock:
            for key, value in settings.items():
                self._set(key, value)
        if fail is not None:
            self.fail_next(fail["status"], int(fail.get("n", 1)), fail.get("retry_after"))

    def _set(self, key: str, value: Any) -> None:
        """One ``configure`` setting, converted to its type; the caller holds the lock."""
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
        elif key in ("max_input_tokens", "max_request_tokens"):
            setattr(self, key, None if value is None else int(value))
        elif key == "bytes_per_token":
            self.bytes_per_token = None if value is None else float(value)
        elif key == "required_api_key":
            self.required_api_key = None if value is None else str(value)
        elif key == "known_models":
            self.known_models = None if value is None else {str(m) for m in value}
        else:
            raise ValueError(f"unknown control setting {key!r}")

    def stats(self, *, include_log: bool = False) -> dict[str, Any]:
        """A JSON-ready copy of the counters (what ``GET /stats`` returns)."""
        with self._lock:
            stats: dict[str, Any] = {
                "requests_total": self.requests_total,
                "by_status": {str(k): v for k, v in sorted(self.requests_by_status.items())},
                "input_counts": dict(self.input_counts),
                "inputs_by_model": {m: dict(c) for m, c in self.inputs_by_model.items()},
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

    def _snapshot(self) -> Snapshot:
        with self._lock:
            snapshot = Snapshot(
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
                max_input_tokens=self.max_input_tokens,
                max_request_tokens=self.max_request_tokens,
                bytes_per_token=self.bytes_per_token,
            )
            if self._fail_queue:
                fault, snapshot.retry_after = self._fail_queue.popleft()
                snapshot.fault = str(fault)
            elif self.fault_rate > 0 and self.faults and self.rng.random() < self.fault_rate:
                snapshot.fault = self.rng.choice(self.faults)
            if snapshot.shuffle_order:
                snapshot.extra["shuffle_seed"] = self.rng.random()
        return snapshot

    def _embeddings_reply(self, authorization: str | None, raw: bytes) -> Reply:
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
        reply = decide(request, authorization, model, inputs, snap, entry, self._cache)
        with self._lock:
            status = DROPPED if reply.drop else reply.status
            entry["status"] = status
            self.requests_by_status[status] += 1
            self.request_log.append(entry)
            if entry["fault"] is not None:
                self.faults_injected[entry["fault"]] += 1
            if status == 200 and isinstance(inputs, list):
                self.input_counts.update(inputs)
                self.inputs_by_model.setdefault(str(model), Counter()).update(inputs)
        return reply

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _add_oversized_sent(self, n_bytes: int) -> None:
        with self._lock:
            self.oversized_bytes_sent += n_bytes
