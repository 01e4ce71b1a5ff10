"""9. reembed: changing the model of a 100,000-row target with no downtime (issue 13).

The target is drained with the old model, bound to it, then `reembed --model NEW
--dimensions 512` starts the shadow column; one `run --drain` worker of the new model fills
it (time and provider requests); `reembed --switch` swaps it in while a reader issues
primary-key lookups of the column back to back: the longest of those during the switch, next
to the longest before it, is how long a query was blocked. (No HNSW index here: building one
over 100,000 x 512 is an index build, measured by pgvector, not by this tool.)"""

from __future__ import annotations

import re
import subprocess
import threading
import time

import psycopg

from bench.config import CLI, DIMS, MODEL, REPO
from bench.context import Context
from bench.processes import FakeServer, drain_processes, worker_env
from bench.report import Line

NEW_MODEL = "text-embedding-3-large"
NEW_DIMS = 512
_SWITCH_MS = re.compile(r"the swap under the table's lock ([0-9.]+) ms")


class Reader:
    """Point lookups of docs.embedding on one connection, back to back, each timed."""

    def __init__(self, dsn: str, rows: int) -> None:
        self.dsn, self.rows = dsn, rows
        self.samples: list[tuple[float, float]] = []  # (start, seconds)
        self.errors = 0
        self.first_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Reader:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            key = 0
            while not self._stop.is_set():
                key = key % self.rows + 1
                started = time.perf_counter()
                try:
                    # Not prepared: a server-side prepared statement that returns the column
                    # fails once its type (dimensions) changes ("cached plan must not change
                    # result type"; see the README), which is no blocking.
                    conn.execute(
                        "SELECT embedding FROM docs WHERE id = %s", (key,), prepare=False
                    ).fetchone()
                except psycopg.Error as exc:
                    self.errors += 1
                    self.first_error = self.first_error or str(exc)
                self.samples.append((started, time.perf_counter() - started))
                time.sleep(0.0005)

    def longest_ms(self, start: float, end: float) -> float:
        """The longest lookup that overlapped [start, end]."""
        spans = [s for t, s in self.samples if t <= end and t + s >= start]
        return 1000 * max(spans, default=0.0)


def _cli(dsn: str, base_url: str, *args: str) -> str:
    done = subprocess.run(
        [*CLI, *args],
        env=worker_env(dsn, base_url),
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    return done.stdout


def run(ctx: Context) -> None:
    rows = ctx.sizes.latency_rows
    template = ctx.cluster.loaded(ctx.corpus, rows)
    new_env = {"EMBEDDING_MODEL": NEW_MODEL, "EMBEDDING_DIMENSIONS": str(NEW_DIMS)}
    with FakeServer(DIMS) as server, ctx.cluster.fresh(template) as dsn:
        drain_processes(dsn, server.base_url, 1)
        _cli(dsn, server.base_url, "bind", "docs", "--column", "embedding", "--model", MODEL)
        started = time.perf_counter()
        _cli(
            dsn,
            server.base_url,
            "reembed",
            "docs",
            "--column",
            "embedding",
            "--model",
            NEW_MODEL,
            "--dimensions",
            str(NEW_DIMS),
        )
        start_s = time.perf_counter() - started
        fill = drain_processes(dsn, server.base_url, 1, (), new_env)
        total_s = time.perf_counter() - started
        with Reader(dsn, rows) as reader:
            time.sleep(1.0)
            before_end = time.perf_counter()
            switch_started = time.perf_counter()
            out = _cli(dsn, server.base_url, "reembed", "docs", "--column", "embedding", "--switch")
            switch_ended = time.perf_counter()
            time.sleep(0.5)
        match = _SWITCH_MS.search(out)
        switch_ms = float(match.group(1)) if match else None
        blocked_ms = reader.longest_ms(switch_started, switch_ended)
        baseline_ms = reader.longest_ms(switch_started - 1.0, before_end)
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE vector_dims(embedding) = %s) FROM docs", (NEW_DIMS,)
            ).fetchone()
        switched = int(row[0]) if row else 0
    if switched != rows:
        raise RuntimeError(f"reembed: {switched} of {rows} rows switched")
    ctx.report.sections["reembed"] = {
        "rows": rows,
        "start_s": start_s,
        "fill_s": fill.seconds,
        "total_s": total_s,
        "requests": fill.requests,
        "swap_under_lock_ms": switch_ms,
        "longest_lookup_during_switch_ms": blocked_ms,
        "longest_lookup_before_ms": baseline_ms,
        "lookup_errors": reader.errors,
        "first_lookup_error": reader.first_error,
    }
    ctx.report.add(
        Line(
            "reembed",
            f"re-embed {rows:,} rows with a new model (start + fill), s",
            round(total_s, 1),
            "",
            note=f"{fill.requests} provider requests; fill {fill.seconds:.1f}s, "
            f"start {start_s:.1f}s",
        )
    )
    ctx.report.add(
        Line(
            "reembed",
            "switch: longest blocked lookup, ms",
            round(blocked_ms, 1),
            "",
            note=f"swap under the lock {switch_ms} ms (server); longest lookup before it "
            f"{baseline_ms:.1f} ms; {reader.errors} failed lookups",
        )
    )
