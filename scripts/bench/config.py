"""Constants every section shares and the two size presets (full and ``--quick``)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from queue_processor import queue
from queue_processor.settings import Settings

REPO = Path(__file__).resolve().parents[2]

# The CLI's defaults (what `queue-processor run` does with no flags and no environment).
DEFAULTS = Settings.model_construct()
# Inbox keys per expansion: what a worker with the default batch size expands before a claim.
EXPAND_SLICE = max(queue.EXPAND_MIN, queue.EXPAND_FACTOR * DEFAULTS.batch_size)

SECTIONS = (
    "floor",
    "pipeline",
    "latency",
    "local",
    "trigger",
    "claim",
    "memory",
    "cache",
    "index",
    "steady",
    "longtexts",
    "reembed",
    "pooler",
    "chunks",
)
MODEL = "text-embedding-3-small"
DIMS = 768
LOCAL_DIMS = 384
PREFIX = "qpbench"
VECTOR_POOL = 1024  # distinct precomputed vectors the floor cycles through
CLI = [sys.executable, "-m", "queue_processor"]


@dataclass(frozen=True)
class Sizes:
    """How much work each section does; ``full`` and ``quick`` below."""

    repeats: int
    floor_rows: int
    floor_batches: tuple[int, ...]
    floor_concurrency: tuple[int, ...]
    pipeline_rows: int
    pipeline_batches: tuple[int, ...]
    pipeline_concurrency: tuple[int, ...]
    latency_rows: int
    latency_default_rows: int
    local_texts: int
    local_pipeline_runs: int
    trigger_rows: int
    claim_pending: int
    claim_done_rows: int
    claim_samples: int
    memory_rows: tuple[int, int]
    memory_repeats: int
    cache_rows: int
    index_rows: int
    index_present_rows: int
    steady_rows: int
    steady_batches: tuple[int, ...]


FULL = Sizes(
    repeats=3,
    floor_rows=30_000,
    floor_batches=(500, 1000, 2000),
    floor_concurrency=(1, 2),
    pipeline_rows=30_000,
    pipeline_batches=(100, 500, 1000),
    pipeline_concurrency=(1, 4),
    latency_rows=100_000,
    latency_default_rows=10_000,
    local_texts=2_000,
    local_pipeline_runs=1,
    trigger_rows=100_000,
    claim_pending=2_000,
    claim_done_rows=1_000_000,
    claim_samples=200,
    memory_rows=(10_000, 100_000),
    memory_repeats=2,
    cache_rows=10_000,
    index_rows=100_000,
    index_present_rows=20_000,
    steady_rows=10_000,
    steady_batches=(100, 500, 1000),
)

QUICK = Sizes(
    repeats=1,
    floor_rows=2_000,
    floor_batches=(500, 1000, 2000),
    floor_concurrency=(1,),
    pipeline_rows=2_000,
    pipeline_batches=(100, 500, 1000),
    pipeline_concurrency=(1, 4),
    latency_rows=4_000,
    latency_default_rows=500,
    local_texts=32,
    local_pipeline_runs=1,
    trigger_rows=10_000,
    claim_pending=1_000,
    claim_done_rows=50_000,
    claim_samples=20,
    memory_rows=(1_000, 5_000),
    memory_repeats=1,
    cache_rows=1_000,
    index_rows=3_000,
    index_present_rows=1_000,
    steady_rows=1_000,
    steady_batches=(500,),
)
