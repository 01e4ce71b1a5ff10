"""The fake OpenAI embeddings server: protocol, fault injection, control surface, subprocess.

Other tests trust this server to behave like the real API and to count what it saw, so its
own behaviour is pinned here over real sockets.
"""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from queue_processor.testing import DROPPED, FakeOpenAIServer, fake_vector, fake_vectors

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-fake-server-key-0123456789"


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=8) as srv:
        yield srv


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as http:
        yield http


def embed(http: httpx.Client, srv: FakeOpenAIServer, inputs: Any, **extra: Any) -> httpx.Response:
    headers = extra.pop("headers", None)
    body = {"model": "m", "input": inputs, **extra}
    return http.post(f"{srv.base_url}/embeddings", json=body, headers=headers)


def decode(item: dict[str, Any]) -> np.ndarray[Any, Any]:
    raw = item["embedding"]
    if isinstance(raw, str):
        return np.frombuffer(base64.b64decode(raw), dtype="<f4")
    return np.asarray(raw, dtype=np.float32)


def test_fake_vector_is_deterministic_unit_float32() -> None:
    first = fake_vector("hello", 16)
    assert first.dtype == np.float32
    assert first.shape == (16,)
    np.testing.assert_array_equal(first, fake_vector("hello", 16))
    assert not np.array_equal(first, fake_vector("hello!", 16))
    assert abs(float(np.linalg.norm(first)) - 1.0) < 1e-5
    batch = fake_vectors(["a", "b", "hello"], 16)
    np.testing.assert_array_equal(batch[2], first)
    np.testing.assert_array_equal(batch[0], fake_vector("a", 16))
    # Lone surrogates (possible in JSON) must not crash the server.
    assert fake_vector("\ud800", 4).shape == (4,)


def test_base64_and_float_formats_carry_the_same_vectors(
    server: FakeOpenAIServer, client: httpx.Client
) -> None:
    texts = ["alpha", "beta", "gamma"]
    as_base64 = embed(client, server, texts, encoding_format="base64").json()
    as_floats = embed(client, server, texts, encoding_format="float").json()
    default = embed(client, server, texts).json()
    for payload in (as_base64, as_floats, default):
        assert payload["object"] == "list"
        assert payload["model"] == "m"
        assert [item["index"] for item in payload["data"]] == [0, 1, 2]
        assert payload["usage"]["prompt_tokens"] == payload["usage"]["total_tokens"] >= 3
        for item, text in zip(payload["data"], texts, strict=True):
            np.testing.assert_array_equal(decode(item), fake_vector(text, 8))
    assert isinstance(as_base64["data"][0]["embedding"], str)
    assert isinstance(as_floats["data"][0]["embedding"], list)
    assert isinstance(default["data"][0]["embedding"], list)

    server.ignore_base64 = True
    ignored = embed(client, server, texts, encoding_format="base64").json()
    assert isinstance(ignored["data"][0]["embedding"], list)

    single = embed(client, server, "just one", dimensions=5, encoding_format="base64").json()
    np.testing.assert_array_equal(decode(single["data"][0]), fake_vector("just one", 5))
    assert server.requests_by_status[200] == 5
    assert server.input_counts["alpha"] == 4


def test_accepts_both_paths_and_rejects_bad_bodies(
    server: FakeOpenAIServer, client: httpx.Client
) -> None:
    root = server.base_url.removesuffix("/v1")
    ok = client.post(f"{root}/embeddings", json={"model": "m", "input": ["x"]})
    assert ok.status_code == 200
    assert client.post(f"{root}/v1/embeddings", content=b"{not json").status_code == 400
    assert embed(client, server, []).status_code == 400
    assert embed(client, server, [1, 2]).status_code == 400
    assert client.get(f"{root}/nowhere").status_code == 404
    assert client.get(f"{root}/health").json() == {"status": "ok"}


def test_api_key_and_model_checks(server: FakeOpenAIServer, client: httpx.Client) -> None:
    server.required_api_key = KEY
    server.known_models = {"m"}
    missing = embed(client, server, ["x"])
    assert missing.status_code == 401
    wrong = embed(client, server, ["x"], headers={"Authorization": "Bearer sk-wrong"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    right = embed(client, server, ["x"], headers={"Authorization": f"Bearer {KEY}"})
    assert right.status_code == 200

    unknown = client.post(
        f"{server.base_url}/embeddings",
        json={"model": "nope", "input": ["x"]},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert unknown.status_code == 404
    error = unknown.json()["error"]
    assert error["code"] == "model_not_found"
    assert "The model `nope` does not exist" in error["message"]

    assert [entry["authorization"] for entry in server.request_log] == [False, True, True, True]
    assert [entry["status"] for entry in server.request_log] == [401, 401, 200, 404]
    assert KEY not in json.dumps(server.request_log)
    assert KEY not in json.dumps(server.stats(include_log=True))


def test_fail_next_with_retry_after_then_success(
    server: FakeOpenAIServer, client: httpx.Client
) -> None:
    server.fail_next(429, n=2, retry_after=3)
    server.fail_next(503)
    first, second, third = (embed(client, server, ["x"]) for _ in range(3))
    assert (first.status_code, second.status_code, third.status_code) == (429, 429, 503)
    assert first.headers["Retry-After"] == "3"
    assert "retry-after" not in third.headers
    assert first.json()["error"]["code"] == "rate_limit_exceeded"
    assert embed(client, server, ["x"]).status_code == 200
    assert server.requests_by_status == {429: 2, 503: 1, 200: 1}
    assert server.faults_injected == {"429": 2, "503": 1}
    assert server.input_counts["x"] == 1  # only 200 responses count inputs


def test_rejected_inputs_get_a_context_length_error(
    server: FakeOpenAIServer, client: httpx.Client
) -> None:
    server.reject_inputs = {"too long"}
    response = embed(client, server, ["fine", "too long"])
    assert response.status_code == 400
    assert "maximum context length" in response.json()["error"]["message"]
    server.reject_inputs = set()
    server.reject_if = lambda text: text.startswith("X")
    assert embed(client, server, ["fine", "Xylophone"]).status_code == 400
    assert embed(client, server, ["fine"]).status_code == 200


def test_per_input_vector_faults_and_shuffled_order(
    server: FakeOpenAIServer, client: httpx.Client
) -> None:
    server.wrong_dims_for = {"w"}
    server.nan_for = {"n"}
    server.drop_vector_for = {"d"}
    server.shuffle_order = True
    texts = ["ok1", "w", "n", "d", "ok2", "ok3", "ok4", "ok5"]
    payload = embed(client, server, texts, encoding_format="base64").json()
    by_index = {item["index"]: decode(item) for item in payload["data"]}
    assert sorted(by_index) == [0, 1, 2, 4, 5, 6, 7]
    assert [item["index"] for item in payload["data"]] != sorted(by_index)  # shuffled
    assert by_index[1].shape == (9,)
    assert np.isnan(by_index[2][0])
    np.testing.assert_array_equal(by_index[4], fake_vector("ok2", 8))
    floats = client.post(
        f"{server.base_url}/embeddings",
        json={"model": "m", "input": ["n"]},  # float lists carry NaN as the NaN literal
    )
    assert np.isnan(decode(floats.json()["data"][0])[0])


def test_reset_fault_drops_the_connection(server: FakeOpenAIServer, client: httpx.Client) -> None:
    server.fail_next("reset")
    with pytest.raises(httpx.TransportError):
        embed(client, server, ["x"])
    assert embed(client, server, ["x"]).status_code == 200
    assert server.requests_by_status == {DROPPED: 1, 200: 1}
    assert server.faults_injected == {"reset": 1}


def test_timeout_fault_outlasts_the_client(server: FakeOpenAIServer) -> None:
    server.timeout_sleep_s = 3.0
    server.fail_next("timeout")
    with httpx.Client(timeout=0.2) as http, pytest.raises(httpx.ReadTimeout):
        embed(http, server, ["x"])
    with httpx.Client(timeout=5) as http:
        assert embed(http, server, ["x"]).status_code == 200


def test_latency_and_slow_fault_delay_the_answer(
    server: FakeOpenAIServer, client: httpx.Client
) -> None:
    server.latency_s = 0.1
    server.slow_s = 0.2
    server.fail_next("slow")
    started = time.monotonic()
    assert embed(client, server, ["x"]).status_code == 200
    assert time.monotonic() - started >= 0.3
    assert server.faults_injected == {"slow": 1}


def test_random_faults_are_reproducible_with_a_seed(client: httpx.Client) -> None:
    sequences = []
    for _ in range(2):
        with FakeOpenAIServer(dims=4, fault_rate=0.5, faults=["429", "500"], seed=7) as srv:
            sequences.append([embed(client, srv, ["x"]).status_code for _ in range(20)])
    assert sequences[0] == sequences[1]
    assert {200, 429, 500} <= set(sequences[0])


def test_max_in_flight_counts_concurrent_requests(server: FakeOpenAIServer) -> None:
    # Each request is held 1 s and all three are sent together, so they overlap at the server
    # even on a loaded machine.
    server.latency_s = 1.0
    together = threading.Barrier(3)

    def one() -> None:
        with httpx.Client(timeout=10) as http:
            together.wait(timeout=10)
            assert embed(http, server, ["x"]).status_code == 200

    threads = [threading.Thread(target=one) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert server.max_in_flight == 3
    assert server.in_flight == 0


def test_stats_and_control_endpoints(server: FakeOpenAIServer, client: httpx.Client) -> None:
    root = server.base_url.removesuffix("/v1")
    embed(client, server, ["a", "b", "a"])
    control = {
        "fail_next": {"status": 500, "n": 1},
        "reject_inputs": ["bad"],
        "nan_for": ["n"],
        "latency_s": 0,
    }
    assert client.post(f"{root}/control", json=control).json() == {"ok": True}
    assert embed(client, server, ["a"]).status_code == 500
    assert embed(client, server, ["bad"]).status_code == 400
    stats = client.get(f"{root}/stats").json()
    assert stats["requests_total"] == 3
    assert stats["by_status"] == {"200": 1, "400": 1, "500": 1}
    assert stats["input_counts"] == {"a": 2, "b": 1}
    assert "request_log" not in stats
    logged = client.get(f"{root}/stats?log=1").json()["request_log"]
    assert [entry["n_inputs"] for entry in logged] == [3, 1, 1]

    assert client.post(f"{root}/control", json={"bogus": 1}).status_code == 400
    assert client.post(f"{root}/control", json={"faults": ["boom"]}).status_code == 400
    assert client.post(f"{root}/control", json={"reset": True}).status_code == 200
    assert client.get(f"{root}/stats").json()["requests_total"] == 0
    assert embed(client, server, ["bad"]).status_code == 200  # reset cleared rejections


def test_reset_clears_counters_and_faults(server: FakeOpenAIServer, client: httpx.Client) -> None:
    server.fail_next(500, n=5)
    server.drop_vector_for = {"x"}
    embed(client, server, ["x"])
    server.reset()
    assert server.requests_total == 0
    assert not server.requests_by_status
    assert not server.request_log
    response = embed(client, server, ["x"])
    assert response.status_code == 200
    assert len(response.json()["data"]) == 1


def test_stop_is_prompt_despite_keepalive_and_sleeping_handlers() -> None:
    srv = FakeOpenAIServer(dims=4, timeout_sleep_s=60).start()
    idle = httpx.Client(timeout=10)
    assert embed(idle, srv, ["x"]).status_code == 200  # leaves a kept-alive connection open
    srv.fail_next("timeout")
    errors: list[BaseException] = []

    def stuck() -> None:
        with httpx.Client(timeout=30) as http:
            try:
                embed(http, srv, ["x"])
            except httpx.TransportError as exc:
                errors.append(exc)

    thread = threading.Thread(target=stuck)
    thread.start()
    deadline = time.monotonic() + 5
    while srv.faults_injected["timeout"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    srv.stop()
    assert time.monotonic() - started < 5
    thread.join(timeout=5)
    idle.close()
    assert len(errors) == 1


def _read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    assert ready, "the fake server did not print LISTENING in time"
    return proc.stdout.readline()


def test_subprocess_mode_prints_listening_and_serves_until_sigterm() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "queue_processor.testing", "--port", "0", "--dims", "6"]
    command += ["--latency-ms", "1", "--seed", "3", "--api-key", KEY]
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = _read_line(proc, 20)
        assert line.startswith("LISTENING ")
        port = int(line.split()[1])
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(timeout=10) as http:
            body = {"model": "m", "input": ["a", "b"], "encoding_format": "base64"}
            response = http.post(f"{base}/v1/embeddings", json=body, headers=headers)
            assert response.status_code == 200
            vector = np.frombuffer(base64.b64decode(response.json()["data"][1]["embedding"]), "<f4")
            np.testing.assert_array_equal(vector, fake_vector("b", 6))
            assert http.post(f"{base}/v1/embeddings", json=body).status_code == 401
            http.post(f"{base}/control", json={"fail_next": {"status": 500, "n": 1}})
            assert http.post(f"{base}/v1/embeddings", json=body, headers=headers).status_code == 500
            stats = http.get(f"{base}/stats").json()
        assert stats["by_status"] == {"200": 1, "401": 1, "500": 1}
        assert stats["input_counts"] == {"a": 1, "b": 1}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _, stderr = proc.communicate()
    assert stderr == ""
