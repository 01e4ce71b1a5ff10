"""Test helpers shipped with the product: a real HTTP server on 127.0.0.1 that speaks the
OpenAI embeddings API, with fault injection. Shared by the tests and the benchmark; nothing
in the package imports it (``import queue_processor`` does not load it).

In-process (integration and reliability tests)::

    with FakeOpenAIServer(dims=8) as srv:
        srv.base_url  # http://127.0.0.1:PORT/v1

As a subprocess (scripts and end-to-end tests)::

    python -m queue_processor.testing --port 0 --dims 8 [--latency-ms N]
        [--fault-rate 0.3 --faults 429,500,timeout,reset,slow] [--seed N]

prints ``LISTENING <port>`` on stdout, then serves until SIGTERM/SIGINT. A subprocess is
driven over HTTP: ``GET /stats`` returns the counters, ``POST /control`` changes behaviour
(see ``FakeOpenAIServer.configure``).

Vectors are deterministic per text (``fake_vector``), so tests can recompute what the server
sent. Endpoints: ``POST /v1/embeddings`` (and ``/embeddings``), ``GET /stats``,
``POST /control``, ``GET /health``. Only the standard library and numpy are used.

Modules: ``vectors`` (the fake embeddings), ``protocol`` (request -> reply, faults),
``server`` (``FakeOpenAIServer``: lifecycle, control, counters), ``handler`` (HTTP),
``__main__`` (the subprocess entry point).
"""

from __future__ import annotations

from queue_processor.testing.protocol import DROPPED, FAULT_KINDS
from queue_processor.testing.server import FakeOpenAIServer
from queue_processor.testing.vectors import fake_token_count, fake_vector, fake_vectors

__all__ = [
    "DROPPED",
    "FAULT_KINDS",
    "FakeOpenAIServer",
    "fake_token_count",
    "fake_vector",
    "fake_vectors",
]
