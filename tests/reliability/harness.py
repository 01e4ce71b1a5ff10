"""The harness of the fault-injection tests: real worker processes, a fake provider that
can misbehave in every documented way, and the checks that prove "no item lost, no stale write".

Workers run as ``python -m queue_processor run ...`` subprocesses (so kill -9, SIGSTOP,
SIGTERM and restarts are real), configured only through the environment, with JSON logs on
stderr captured to a file per process. The fake OpenAI server runs in the test process, so
its counters (``input_counts``, ``requests_by_status``, ``faults_injected``, ``request_log``)
are read directly.

The write audit (``install_write_audit``) records every write of a target column from inside
the database (a row trigger), so a stale write cannot hide behind an identical vector.

Figures each test sees are printed as ``RELIABILITY: <case>: key=value ...`` lines (shown with
``pytest -s``) for the README's Reliability section.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from psycopg import sql

from queue_processor.testing import FakeOpenAIServer, fake_vectors
from queue_processor.testing.protocol import Snapshot as _Snapshot
from tests.support.helpers import DIMS, MODEL, connect, execute

REPO = Path(__file__).resolve().parents[2]
_OWN_PREFIXES = ("QUEUE_PROCESSOR_", "OPENAI_", "EMBEDDING_")


# --- figures ---------------------------------------------------------------------------------


def report(case: str, **figures: object) -> None:
    """Print one ``RELIABILITY:`` line of figures for the README (visible with ``pytest -s``)."""
    parts = ", ".join(f"{key}={value}" for key, value in figures.items())
    print(f"RELIABILITY: {case}: {parts}", flush=True)


# --- the fake provider -----------------------------------------------------------------------


class _InfinityCache:
    """Wraps the fake server's vector cache: texts in ``inf_for`` get +inf as first component."""

    def __init__(self, inner: Any, inf_for: set[str]) -> None:
        self._inner = inner
        self._inf_for = inf_for

    def matrix(self, texts: Sequence[str], dims: int) -> npt.NDArray[np.float32]:
        out: npt.NDArray[np.float32] = self._inner.matrix(texts, dims)
        for row, text in enumerate(texts):
            if text in self._inf_for:
                out[row, 0] = np.inf
        return out


class ChaosServer(FakeOpenAIServer):
    """The fake server plus two behaviours the reliability cases need.

    - ``retry_after_s``: random (``fault_rate``) 429 answers carry ``Retry-After`` too, like
      OpenAI's (the base class adds it only to ``fail_next`` faults).
    - ``inf_for``: texts whose vector comes back with an infinity (``nan_for`` gives NaN).
    """

    def __init__(self, *, retry_after_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.retry_after_s = retry_after_s
        self.inf_for: set[str] = set()
        self._cache = _InfinityCache(self._cache, self.inf_for)  # type: ignore[assignment]

    def _snapshot(self) -> _Snapshot:
        snap = super()._snapshot()
        if snap.fault == "429" and snap.retry_after is None:
            snap.retry_after = self.retry_after_s
        return snap


def fault_figures(server: FakeOpenAIServer) -> dict[str, int]:
    """Faults injected by kind, plus totals, from the server's counters."""
    stats = server.stats()
    figures = {f"fault_{kind}": n for kind, n in sorted(stats["faults_injected"].items())}
    figures["requests"] = stats["requests_total"]
    figures["faults_total"] = sum(stats["faults_injected"].values())
    return figures


# --- worker processes ------------------------------------------------------------------------


def worker_env(dsn: str, server: FakeOpenAIServer, **settings: object) -> dict[str, str]:
    """The environment of a worker process: this machine's, minus any queue_processor/OpenAI
    setting it may carry, plus the test database, the fake server and ``settings``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_OWN_PREFIXES) and key != "DATABASE_URL"
    }
    env.update(
        DATABASE_URL=dsn,
        OPENAI_BASE_URL=server.base_url,
        EMBEDDING_MODEL=MODEL,
        QUEUE_PROCESSOR_LOG_FORMAT="json",
        QUEUE_PROCESSOR_POLL_SECONDS="0.2",
        PYTHONPATH=str(REPO),
    )
    env.update({key: str(value) for key, value in settings.items()})
    return env


@dataclass
class WorkerProcess:
    """One ``queue-processor run`` subprocess with its output captured to files."""

    name: str
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    stdout_path: Path
    peak_rss_kib: int = 0
    rss_samples_kib: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, signum: int) -> None:
        """Deliver ``signum`` to the worker (not to its whole group)."""
        os.kill(self.proc.pid, signum)

    def kill9(self) -> int:
        """kill -9 and reap; returns the exit status (-9)."""
        self.send(signal.SIGKILL)
        return self.proc.wait(timeout=10)

    def wait(self, timeout_s: float) -> int:
        """Wait for exit (a liveness bound); fails the test with the log tail on timeout."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.name} did not exit within {timeout_s}s:\n{self.tail()}"
            ) from None

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM (graceful stop) and wait for the exit status."""
        if self.alive:
            self.send(signal.SIGTERM)
        return self.wait(timeout_s)

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def output(self) -> str:
        """Everything the process printed (stdout and stderr)."""
        return self.stdout() + self.stderr()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log events on stderr (only those called ``name`` if given)."""
        found: list[dict[str, Any]] = []
        for line in self.stderr().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and (name is None or event.get("event") == name):
                    found.append(event)
        return found

    def sample_rss(self) -> None:
        """Record VmRSS and the peak (VmHWM) from /proc while the process runs."""
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{self.pid}/status").read_text()
            fields = dict(
                line.split(":", 1) for line in status.splitlines() if line.startswith("Vm")
            )
            if "VmHWM" not in fields:
                return  # exited, not yet reaped
            hwm = int(fields["VmHWM"].split()[0])
            rss = int(fields["VmRSS"].split()[0])
            self.peak_rss_kib = max(self.peak_rss_kib, hwm)
            self.rss_samples_kib.append(rss)


class Workers:
    """Starts worker processes and makes sure none outlives its test."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[WorkerProcess] = []

    def start(self, name: str, env: Mapping[str, str], *args: str) -> WorkerProcess:
        """Start ``python -m queue_processor run ARGS`` named ``name`` (its claimed_by)."""
        env = dict(env)
        env.setdefault("QUEUE_PROCESSOR_WORKER_NAME", name)
        stderr_path = self.log_dir / f"{name}.stderr"
        stdout_path = self.log_dir / f"{name}.stdout"
        with stderr_path.open("wb") as err, stdout_path.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "queue_processor", "run", *args],
                env=env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        worker = WorkerProcess(name, proc, stderr_path, stdout_path)
        self.started.append(worker)
        return worker

    def cleanup(self) -> None:
        for worker in self.started:
            if worker.alive:
                with contextlib.suppress(ProcessLookupError):
                    worker.send(signal.SIGCONT)
                    worker.send(signal.SIGKILL)
                worker.proc.wait(timeout=10)


# --- waiting ---------------------------------------------------------------------------------


def wait_for(
    check: Callable[[], bool],
    *,
    timeout_s: float,
    what: str,
    every_s: float = 0.05,
    watch: Iterable[WorkerProcess] = (),
) -> None:
    """Poll ``check()`` until true: a liveness bound, never a measurement. Fails early, with
    its log, if a watched worker exits meanwhile."""
    watched = list(watch)
    deadline = time.monotonic() + timeout_s
    while not check():
        for worker in watched:
            if not worker.alive:
                raise AssertionError(
                    f"worker {worker.name} exited ({worker.proc.returncode}) while waiting "
                    f"for {what}:\n{worker.tail()}"
                )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(every_s)


# --- database checks -------------------------------------------------------------------------


def counts(dsn: str) -> Counter[str]:
    """Queue rows by status."""
    rows = execute(dsn, "SELECT status, count(*) AS n FROM embedding_queue GROUP BY status")
    return Counter({r["status"]: int(r["n"]) for r in rows})


def inbox_rows(dsn: str) -> int:
    """Keys of bulk inserts not yet expanded into queue rows (workers expand them)."""
    rows = execute(dsn, "SELECT coalesce(sum(total - expanded), 0) AS n FROM embedding_queue_inbox")
    return int(rows[0]["n"])


def unfinished(dsn: str) -> int:
    """Work not finished: queue rows pending or processing, and bulk-inserted keys not yet
    queued."""
    c = counts(dsn)
    return c["pending"] + c["processing"] + inbox_rows(dsn)


def held_by(dsn: str, owner: str) -> list[int]:
    """Ids of queue rows currently claimed (processing) by ``owner``."""
    rows = execute(
        dsn,
        "SELECT id FROM embedding_queue WHERE status = 'processing' AND claimed_by = %s",
        (owner,),
    )
    return [int(r["id"]) for r in rows]


def install_write_audit(dsn: str, table: str = "docs", column: str = "embedding") -> None:
    """Record every write of ``table.column`` (id, vector, companion timestamp, transaction)
    in ``embedding_writes``, from a row trigger: the worker cannot bypass it."""
    execute(
        dsn,
        "CREATE TABLE IF NOT EXISTS embedding_writes ("
        " seq bigint GENERATED ALWAYS AS IDENTITY, tbl text, id bigint, embedding real[],"
        " embedded_at timestamptz, xact xid8, at timestamptz DEFAULT clock_timestamp())",
    )
    execute(
        dsn,
        sql.SQL(
            "CREATE OR REPLACE FUNCTION audit_{tbl}_write() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN INSERT INTO embedding_writes (tbl, id, embedding, embedded_at, xact)"
            " VALUES (TG_TABLE_NAME, NEW.id, NEW.{col}::real[], NEW.embedded_at,"
            " pg_current_xact_id()); RETURN NULL; END $$"
        ).format(tbl=sql.SQL(table), col=sql.Identifier(column)),
    )
    execute(
        dsn,
        sql.SQL(
            "CREATE TRIGGER audit_write AFTER UPDATE OF {col} ON {tbl} FOR EACH ROW"
            " WHEN (NEW.{col} IS NOT NULL) EXECUTE FUNCTION audit_{name}_write()"
        ).format(col=sql.Identifier(column), tbl=sql.Identifier(table), name=sql.SQL(table)),
    )


def writes_per_row(dsn: str, table: str = "docs") -> Counter[int]:
    """How many times each row's embedding was written (from the audit)."""
    rows = execute(
        dsn, "SELECT id, count(*) AS n FROM embedding_writes WHERE tbl = %s GROUP BY id", (table,)
    )
    return Counter({int(r["id"]): int(r["n"]) for r in rows})


def stored_vectors(dsn: str, table: str = "docs") -> tuple[list[int], npt.NDArray[np.float32]]:
    """(ids, matrix) of every row of ``table`` whose embedding is set, in id order."""
    ids: list[int] = []
    values: list[list[float]] = []
    with connect(dsn) as conn:
        cur = conn.execute(
            sql.SQL(
                "SELECT id, embedding::real[] AS v FROM {} WHERE embedding IS NOT NULL ORDER BY id"
            ).format(sql.Identifier(table))
        )
        for row in cur:
            ids.append(int(row["id"]))
            values.append(row["v"])
    return ids, np.array(values, dtype=np.float32).reshape(len(ids), -1)


def assert_embeddings_are_of(dsn: str, contents: Mapping[int, str], *, table: str = "docs") -> None:
    """Every row in ``contents`` holds exactly fake_vector(its content), and no other row of
    ``table`` holds an embedding."""
    ids, matrix = stored_vectors(dsn, table)
    missing = sorted(set(contents) - set(ids))
    extra = sorted(set(ids) - set(contents))
    assert not missing, f"{len(missing)} rows lack their embedding: {missing[:10]}"
    assert not extra, f"{len(extra)} rows were embedded unexpectedly: {extra[:10]}"
    expected = fake_vectors([contents[i] for i in ids], DIMS)
    wrong = [ids[k] for k in np.flatnonzero(~np.all(matrix == expected, axis=1))]
    assert not wrong, f"{len(wrong)} rows hold a vector that is not of their content: {wrong[:10]}"


def assert_sent_at_most_once_per_claim(dsn: str, server: FakeOpenAIServer) -> int:
    """Every queued text reached the provider at least once, and at most once per claim of
    its row (a text sent more often than its row was claimed would mean a duplicate send or
    a stale claim). Returns how many sends were repeats."""
    rows = execute(dsn, "SELECT record_id, content, attempts FROM embedding_queue")
    sent = server.input_counts
    never = [r["record_id"] for r in rows if sent[r["content"]] < 1]
    over = [
        (r["record_id"], sent[r["content"]], r["attempts"])
        for r in rows
        if sent[r["content"]] > r["attempts"]
    ]
    assert not never, f"{len(never)} queued items never reached the provider: {never[:10]}"
    assert not over, f"texts sent more often than their rows were claimed: {over[:10]}"
    return sum(sent[r["content"]] - 1 for r in rows)


def table_checksums(dsn: str, tables: Sequence[str]) -> dict[str, str]:
    """md5 over every row (as text, in a stable order) of each table."""
    sums: dict[str, str] = {}
    for table in tables:
        row = execute(
            dsn,
            sql.SQL(
                "SELECT md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) AS h"
                " FROM {} AS t"
            ).format(sql.SQL(table)),
        )
        sums[table] = str(row[0]["h"])
    return sums
