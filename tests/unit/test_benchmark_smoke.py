"""scripts/benchmark.py still runs: its quick floor and pipeline sections, end to end.

The benchmark measures; this only checks that it works and reports what it promises (the
numbers themselves are never asserted: speed is measured, not tested).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "benchmark.py"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDING_", "OPENAI_"))}
    env.pop("DATABASE_URL", None)
    dsn = os.environ.get("QUEUE_PROCESSOR_TEST_DSN")
    if dsn:
        env["DATABASE_URL"] = dsn  # the test server; otherwise the script starts its own
    return env


def test_unknown_section_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--only", "floor,nonsense"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
        cwd=REPO,
    )
    assert result.returncode == 2
    assert "nonsense" in result.stderr


@pytest.mark.slow
def test_quick_floor_and_pipeline_report_every_promised_number(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--only", "floor,pipeline", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())

    assert report["mode"] == "quick"
    assert report["sections_run"] == ["floor", "pipeline"]
    assert report["errors"] == {}
    machine = report["machine"]
    for key in ("cores", "memory", "postgresql", "python", "git_commit"):
        assert machine[key], key

    floor = report["sections"]["floor"]
    assert floor["best_rows_per_s"] > 0
    assert set(floor["median_rows_per_s"]) == {
        "batch=500 concurrency=1",
        "batch=1000 concurrency=1",
        "batch=2000 concurrency=1",
    }
    pipeline = report["sections"]["pipeline"]
    assert pipeline["floor_rows_per_s"] > 0
    assert pipeline["best_rows_per_s"] > 0
    assert pipeline["default_rows_per_s"] > 0
    assert len(pipeline["in_process_median_rows_per_s"]) == 6  # 3 batch sizes x 2 concurrencies
    assert set(pipeline["processes"]["median_rows_per_s"]) == {"1", "2"}

    targets = {t["target"]: t for t in report["targets"]}
    assert set(targets) == {"default pipeline / floor", "best pipeline / floor"}
    for target in targets.values():
        assert target["value"] > 0
        assert isinstance(target["pass"], bool)
    # The table went to stdout, one row per measurement.
    assert "pipeline" in result.stdout
    assert "floor" in result.stdout
