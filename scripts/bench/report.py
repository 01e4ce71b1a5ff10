"""What a run found (table lines, per-section detail, target verdicts) and how it is shown:
progress on stderr, the table on stdout."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


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
        progress(f"  {line.section}: {line.measure} = {fmt(line.value)} {line.unit}")

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


def progress(message: str) -> None:
    """One timestamped line on stderr (stdout carries only the table)."""
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def cpu_note(cpu: dict[str, float]) -> str:
    """'CPU/1k rows: worker 26 + postgres 90 = 116 ms' (empty when nothing was measured)."""
    parts = [f"{k} {v:.0f}" for k, v in cpu.items() if k != "total"]
    if not parts:
        return ""
    return f"CPU/1k rows: {' + '.join(parts)} = {cpu.get('total', 0):.0f} ms"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def print_table(report: Report, meta: dict[str, Any]) -> None:
    """The table on stdout: rich when available, plain columns otherwise."""
    headers = ["section", "measure", "value", "unit", "ratio", "target", "result", "note"]
    rows = []
    for line in report.lines:
        ratio = f"{line.ratio:.2f}x {line.ratio_of}" if line.ratio is not None else ""
        result = "" if line.passed is None else ("PASS" if line.passed else "FAIL")
        rows.append(
            [
                line.section,
                line.measure,
                fmt(line.value),
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
