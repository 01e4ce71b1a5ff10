"""One drain of a queue and the Worker running it in this process."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from bench.config import MODEL
from bench.cpu import CpuProbe, cpu_delta
from queue_processor.cli.factories import worker_config
from queue_processor.db import Database
from queue_processor.providers import EmbeddingProvider, OpenAIProvider
from queue_processor.settings import Settings
from queue_processor.worker import Worker


@dataclass
class Drain:
    """One drain: rows finished, seconds of draining, and the process wall time if any."""

    rows: int
    seconds: float
    wall_seconds: float | None = None
    requests: int | None = None
    maxrss_kib: int | None = None
    wait4_maxrss_kib: int | None = None
    cpu_s: dict[str, float] = field(default_factory=dict)
    cache_hits: int = 0

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def drain_in_process(
    dsn: str,
    provider_factory: Callable[[], EmbeddingProvider],
    batch_size: int,
    concurrency: int,
    probe: CpuProbe | None = None,
    *,
    pooled: bool = False,
) -> Drain:
    """Worker.run('drain') in this process; the clock (and the CPU probe) covers only the
    run: the pool is open and a local model loaded before it starts. ``pooled``: ``dsn`` is
    a transaction-mode pooler's (QUEUE_PROCESSOR_POOLED=true)."""

    async def run() -> Drain:
        config = dataclasses.replace(
            worker_config(
                Settings.model_construct(), batch_size=batch_size, concurrency=concurrency
            ),
            owner="bench",
        )
        async with (
            Database(dsn, max_size=max(4, concurrency * 2 + 2), pooled=pooled) as db,
            provider_factory() as provider,
        ):
            load = getattr(provider, "load", None)
            if load is not None:
                await load()  # a local model loads outside the clock (throughput only)
            worker = Worker(db, provider, config)
            cpu_before = probe() if probe else {}
            started = time.perf_counter()
            summary = await worker.run("drain")
            seconds = time.perf_counter() - started
            cpu = cpu_delta(cpu_before, probe()) if probe else {}
        return Drain(summary.processed, seconds, requests=summary.requests, cpu_s=cpu)

    return anyio.run(run)


def openai_factory(base_url: str) -> Callable[[], EmbeddingProvider]:
    def make() -> EmbeddingProvider:
        return OpenAIProvider(base_url=base_url, api_key=None, model=MODEL)

    return make
