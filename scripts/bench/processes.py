"""Work in other processes: the fake OpenAI server (so it does not share our GIL) and
``queue-processor run --drain`` workers, with their peak memory and printed summaries."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cluster import Cluster
from bench.config import CLI, MODEL, REPO
from bench.drain import Drain

_DURATION = re.compile(r"^Duration: ([0-9.]+)s", re.MULTILINE)
_PROCESSED = re.compile(r"^Total records processed: (\d+)", re.MULTILINE)
_REQUESTS = re.compile(r"^Tokens: \d+ in (\d+) requests", re.MULTILINE)
_CACHE_HITS = re.compile(r"^Served from the embedding cache: (\d+)", re.MULTILINE)


class FakeServer:
    """``python -m queue_processor.testing`` in its own process."""

    def __init__(self, dims: int, latency_ms: float = 0.0) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "queue_processor.testing",
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


def worker_env(dsn: str, base_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This machine's environment minus any EMBEDDING_/OPENAI_ setting, plus the database,
    the fake server and ``extra``."""
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
        summaries = [_summary(proc, out_path, err_path) for proc, out_path, err_path in procs]
    seconds = summaries[0].duration if processes == 1 else wall
    return Drain(
        sum(s.processed for s in summaries),
        seconds,
        wall_seconds=wall,
        requests=sum(s.requests for s in summaries),
        maxrss_kib=max(peaks.values()),
        wait4_maxrss_kib=wait4_rss,
        cache_hits=sum(s.cache_hits for s in summaries),
    )


@dataclass(frozen=True)
class _Summary:
    """The figures a finished worker printed (``Total records processed``, ``Duration``...)."""

    processed: int
    duration: float
    requests: int
    cache_hits: int


def _summary(proc: subprocess.Popen[bytes], out_path: Path, err_path: Path) -> _Summary:
    """The summary a worker printed on stdout; RuntimeError if it failed or printed none."""
    stdout = out_path.read_text()
    if proc.returncode != 0:
        tail = err_path.read_text()[-2000:]
        raise RuntimeError(f"worker exited {proc.returncode}: {stdout[-500:]}\n{tail}")
    processed_match = _PROCESSED.search(stdout)
    duration_match = _DURATION.search(stdout)
    if not processed_match or not duration_match:
        raise RuntimeError(f"no summary in worker output: {stdout[-500:]}")
    requests_match = _REQUESTS.search(stdout)
    hits_match = _CACHE_HITS.search(stdout)
    return _Summary(
        processed=int(processed_match.group(1)),
        duration=float(duration_match.group(1)),
        requests=int(requests_match.group(1)) if requests_match else 0,
        cache_hits=int(hits_match.group(1)) if hits_match else 0,
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
