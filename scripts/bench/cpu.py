"""CPU accounting from /proc: load-independent evidence on a shared machine.

A probe reads the CPU seconds so far of this process ("worker"), the fake server and the
embedded PostgreSQL; the difference of two readings, per 1,000 rows, is what a table note
shows and what the "CPU-bound ratio" lines compare.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bench.report import median

if TYPE_CHECKING:
    from bench.cluster import Cluster
    from bench.processes import FakeServer

_HZ = os.sysconf("SC_CLK_TCK")

CpuProbe = Callable[[], dict[str, float]]


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
