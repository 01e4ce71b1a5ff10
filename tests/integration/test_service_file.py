"""The systemd service: the unit file passes ``systemd-analyze verify``, the env example covers
every setting, and ``queue-processor run`` speaks the notify protocol over a real socket.

``systemd-analyze`` comes with Debian's ``systemd`` package (``apt-get install systemd``); it
does not need a running systemd. ``verify`` checks that ExecStart's binary exists, so the
unit is verified as shipped except for that path, which is pointed at this venv's
``queue-processor``. It does not resolve ``User=``, so the dedicated user need not exist.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from queue_processor.settings import Settings
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.helpers import MODEL, make_docs

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "scripts" / "queue-processor.service"
ENV_EXAMPLE = ROOT / "scripts" / "queue-processor.env.example"
SHIPPED_EXEC = "/opt/queue-processor/.venv/bin/queue-processor"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"


def queue_processor_executable() -> str:
    path = Path(sys.executable).parent / "queue-processor"
    assert path.exists(), f"{path} is missing: install the project (pip install -e .)"
    return str(path)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (keys may repeat), as systemd reads them (no continuations)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"line {number}: keep directives on one line"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"line {number}: directive outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"line {number}: not KEY=VALUE: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def run_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert Path(SYSTEMD_ANALYZE).exists(), (
        "systemd-analyze not found: install Debian's systemd package (apt-get install systemd)"
    )
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )


def verify(unit_text: str, directory: Path) -> tuple[int, list[str]]:
    """``systemd-analyze verify`` on ``unit_text`` saved as queue-processor.service; returns
    the exit code and the output lines that concern our unit."""
    path = directory / "queue-processor.service"
    path.write_text(unit_text)
    result = run_analyze("verify", "--man=no", "--recursive-errors=no", str(path))
    lines = (result.stdout + result.stderr).splitlines()
    ours = [line for line in lines if str(path) in line or "queue-processor.service" in line]
    return result.returncode, ours


def with_local_exec(unit_text: str) -> str:
    assert unit_text.count(f"ExecStart={SHIPPED_EXEC} ") == 1
    return unit_text.replace(
        f"ExecStart={SHIPPED_EXEC} ", f"ExecStart={queue_processor_executable()} "
    )


# --- the unit file ----------------------------------------------------------------------


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    code, complaints = verify(with_local_exec(UNIT.read_text()), tmp_path)
    assert complaints == []
    assert code == 0


def test_shipped_unit_only_lacks_the_installed_binary(tmp_path: Path) -> None:
    """Unmodified, the only complaint is the not-yet-installed /opt binary."""
    code, complaints = verify(UNIT.read_text(), tmp_path)
    assert code != 0
    assert len(complaints) == 1, complaints
    assert f"Command {SHIPPED_EXEC} is not executable" in complaints[0]


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ("NotifyAcess=main", "Unknown key"),
        ("RestrictAddressFamilies=AF_UNIX AF_NOPE", "Failed to parse"),
        ("WatchdogSec=sixty", "Failed to parse"),
    ],
)
def test_verify_check_catches_mistakes(tmp_path: Path, bad_line: str, expected: str) -> None:
    """The verify test can fail: a typo in [Service] is reported on our unit's lines
    (systemd still exits 0 for these, so the output must be read, not only the exit code)."""
    text = with_local_exec(UNIT.read_text()).replace("[Service]\n", f"[Service]\n{bad_line}\n", 1)
    _, complaints = verify(text, tmp_path)
    assert any(expected in line for line in complaints), complaints


def test_unit_file_directives() -> None:
    unit = parse_unit(UNIT.read_text())
    service = {key: values[-1] for key, values in unit["Service"].items()}
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["ExecStart"] == f"{SHIPPED_EXEC} run --metrics-port 9187"
    assert service["EnvironmentFile"] == "/etc/queue-processor/queue-processor.env"
    assert service["User"] == service["Group"] == "queue-processor"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["StateDirectory"] == "queue-processor"
    watchdog_s = int(service["WatchdogSec"])
    assert watchdog_s == 60
    # A graceful stop (shutdown grace) must fit inside the stop timeout.
    grace_s = Settings.model_fields["shutdown_grace_seconds"].default
    assert int(service["TimeoutStopSec"]) > grace_s
    hardening = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
        "SystemCallArchitectures": "native",
    }
    assert {key: service.get(key) for key in hardening} == hardening
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_unit_file_security_exposure(tmp_path: Path) -> None:
    """``systemd-analyze security --offline`` rates the hardening; keep it at "OK" or better."""
    path = tmp_path / "queue-processor.service"
    path.write_text(with_local_exec(UNIT.read_text()))
    result = run_analyze("security", "--offline=yes", "--no-pager", str(path))
    assert result.returncode == 0, result.stderr
    match = re.search(
        r"Overall exposure level for queue-processor\.service: ([\d.]+)", result.stdout
    )
    assert match is not None, result.stdout[-2000:]
    assert float(match.group(1)) < 5.0, result.stdout


def test_env_example_documents_every_setting_commented() -> None:
    text = ENV_EXAMPLE.read_text()
    assignments = re.findall(r"^(#?)([A-Z][A-Z0-9_]*)=", text, flags=re.MULTILINE)
    active = [name for hashed, name in assignments if not hashed]
    assert active == [], "every variable in the example stays commented out"
    documented = {name for _, name in assignments}
    settings = {field.alias or name.upper() for name, field in Settings.model_fields.items()}
    assert settings - documented == set(), "add these settings to queue-processor.env.example"
    assert documented - settings == set(), "these example variables are not settings"


# --- the notify protocol, end to end ----------------------------------------------------


class NotifySocket:
    """A bound datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: str, sock: socket.socket) -> None:
        self.path = path
        self.sock = sock
        self.assignments: list[str] = []

    def wait_for(
        self, wanted: str, proc: subprocess.Popen[bytes], log_dir: Path, timeout_s: float
    ) -> None:
        """Collect assignments until ``wanted`` arrives; fail early if the process exits."""
        deadline = time.monotonic() + timeout_s
        while wanted not in self.assignments:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(
                    f"no {wanted} within {timeout_s}s; got {self.assignments}\n{logs(log_dir)}"
                )
            self.sock.settimeout(min(0.2, remaining))
            try:
                datagram = self.sock.recv(4096)
            except TimeoutError:
                if proc.poll() is not None:
                    pytest.fail(
                        f"queue-processor exited ({proc.returncode}) before {wanted}; "
                        f"got {self.assignments}\n{logs(log_dir)}"
                    )
                continue
            self.assignments.extend(datagram.decode().split("\n"))


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    with (
        tempfile.TemporaryDirectory(prefix="qp-sd-") as directory,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        path = str(Path(directory) / "notify")
        sock.bind(path)
        yield NotifySocket(path, sock)


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(dims=8) as server:
        yield server


def service_env(dsn: str, fake: FakeOpenAIServer, notify: NotifySocket) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("NOTIFY_SOCKET", "WATCHDOG_", "QUEUE_PROCESSOR_", "EMBEDDING_"))
        and key not in ("DATABASE_URL", "OPENAI_BASE_URL", "OPENAI_API_KEY")
    }
    env.update(
        DATABASE_URL=dsn,
        OPENAI_BASE_URL=fake.base_url,
        OPENAI_API_KEY="sk-test",
        EMBEDDING_MODEL=MODEL,
        NOTIFY_SOCKET=notify.path,
        QUEUE_PROCESSOR_LOG_FORMAT="json",
    )
    return env


class Service:
    """``queue-processor ARGS`` as a subprocess, stdout/stderr in files under ``log_dir``."""

    def __init__(self, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.log_dir = log_dir
        self.signalled = False
        with (
            (log_dir / "stdout.log").open("wb") as stdout,
            (log_dir / "stderr.log").open("wb") as stderr,
        ):
            self.proc = subprocess.Popen(
                [queue_processor_executable(), *args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )

    def sigterm(self) -> None:
        """Ask for a graceful stop, once (a second SIGTERM would abort)."""
        if not self.signalled and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.signalled = True

    def wait(self, timeout_s: float = 30) -> int:
        """Wait for the exit code (killing the process, and failing, on timeout)."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"queue-processor did not exit in {timeout_s}s:\n{logs(self.log_dir)}")

    def stop(self) -> int:
        """SIGTERM (unless already sent) and wait."""
        self.sigterm()
        return self.wait()


def logs(log_dir: Path) -> str:
    return "\n".join(
        f"--- {name}\n{(log_dir / name).read_text(errors='replace')[-4000:]}"
        for name in ("stdout.log", "stderr.log")
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path


def test_run_notifies_ready_watchdog_and_stopping(
    dsn: str, fake_openai: FakeOpenAIServer, notify_socket: NotifySocket, log_dir: Path
) -> None:
    """Under Type=notify: READY=1 once connected and the schema is checked, WATCHDOG=1 pings
    every WATCHDOG_USEC/2, STOPPING=1 when SIGTERM asks for a stop, then a clean exit."""
    env = service_env(dsn, fake_openai, notify_socket)
    env["WATCHDOG_USEC"] = "1000000"  # a ping every 0.5 s
    service = Service(["run"], env, log_dir)
    try:
        notify_socket.wait_for("READY=1", service.proc, log_dir, timeout_s=30)
        notify_socket.wait_for("WATCHDOG=1", service.proc, log_dir, timeout_s=5)
        assert "STOPPING=1" not in notify_socket.assignments
        service.sigterm()
        notify_socket.wait_for("STOPPING=1", service.proc, log_dir, timeout_s=15)
    finally:
        code = service.stop()
    assert code == 0, logs(log_dir)
    seen = notify_socket.assignments
    assert seen.count("READY=1") == 1
    assert seen.index("READY=1") < seen.index("WATCHDOG=1") < seen.index("STOPPING=1")
    assert "READY=1" not in seen[seen.index("STOPPING=1") :]


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics and parse it: (sample name, labels) -> value."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def sample(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_run_serves_metrics_and_healthz(
    dsn: str, fake_openai: FakeOpenAIServer, notify_socket: NotifySocket, log_dir: Path
) -> None:
    """``run --metrics-port P``: /healthz 200 once ready; /metrics counts the items, provider
    requests, tokens and batches of real work, and the queue depth from the database."""
    make_docs(dsn, 5)
    port = free_port()
    env = service_env(dsn, fake_openai, notify_socket)
    service = Service(["run", "--metrics-port", str(port)], env, log_dir)
    try:
        notify_socket.wait_for("READY=1", service.proc, log_dir, timeout_s=30)
        deadline = time.monotonic() + 20
        while True:  # the batch and the next queue-depth refresh land shortly after READY
            samples = scrape(port)
            done = sample(samples, "queue_processor_items_total", outcome="done")
            depth = sample(samples, "queue_processor_queue_depth", status="done")
            if (done, depth) == (5, 5) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert sample(samples, "queue_processor_items_total", outcome="done") == 5
        assert sample(samples, "queue_processor_items_total", outcome="failed") == 0
        assert sample(samples, "queue_processor_queue_depth", status="done") == 5
        assert sample(samples, "queue_processor_queue_depth", status="pending") == 0
        requests_ok = sample(samples, "queue_processor_provider_requests_total", status="200")
        assert requests_ok == fake_openai.requests_by_status[200] >= 1
        assert (sample(samples, "queue_processor_tokens_total") or 0) > 0
        assert (sample(samples, "queue_processor_batch_seconds_count") or 0) >= 1
        last = sample(samples, "queue_processor_last_progress_timestamp_seconds")
        assert last is not None
        assert abs(time.time() - last) < 60

        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert (health.status_code, health.text.strip()) == (200, "ok"), health.text
    finally:
        code = service.stop()
    assert code == 0, logs(log_dir)


def test_run_is_not_ready_without_the_schema(
    empty_dsn: str, fake_openai: FakeOpenAIServer, notify_socket: NotifySocket, log_dir: Path
) -> None:
    """READY=1 only after the schema check passes: a missing schema is a failed start."""
    service = Service(["run"], service_env(empty_dsn, fake_openai, notify_socket), log_dir)
    code = service.wait(timeout_s=60)
    notify_socket.sock.setblocking(False)
    received: list[str] = []
    try:
        while True:
            received.extend(notify_socket.sock.recv(4096).decode().split("\n"))
    except BlockingIOError:
        pass
    assert code == 2, logs(log_dir)
    assert "READY=1" not in received
    assert "queue-processor migrate" in (log_dir / "stderr.log").read_text()
