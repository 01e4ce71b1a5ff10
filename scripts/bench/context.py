"""What every section gets: the sizes, the server, the texts, the report, and what the floor
section found (the pipeline compares against it)."""

from __future__ import annotations

from dataclasses import dataclass

from bench.cluster import Cluster
from bench.config import Sizes
from bench.corpus import Corpus
from bench.report import Report


@dataclass
class Context:
    sizes: Sizes
    cluster: Cluster
    corpus: Corpus
    report: Report
    floor_rate: float | None = None
    floor_config: tuple[int, int] = (1000, 1)
