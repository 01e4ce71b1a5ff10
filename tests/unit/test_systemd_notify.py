"""SystemdNotifier over real AF_UNIX datagram sockets: a path in a temp dir and an abstract name."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from queue_processor.systemd import SystemdNotifier


class Receiver:
    """The systemd side: a bound datagram socket and the env that points at it."""

    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        self.sock = sock
        self.notify_socket = notify_socket

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.notify_socket, **extra}

    def recv(self, timeout_s: float = 2.0) -> str:
        """The next datagram (fails the test if none arrives within the timeout)."""
        self.sock.settimeout(timeout_s)
        return self.sock.recv(4096).decode()

    def drain(self) -> list[str]:
        """Every datagram already queued, without waiting."""
        self.sock.setblocking(False)
        messages: list[str] = []
        try:
            while True:
                messages.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return messages


@pytest.fixture
def path_receiver() -> Iterator[Receiver]:
    # A short directory: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path can be longer.
    with (
        tempfile.TemporaryDirectory(prefix="qp-sd-") as directory,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        path = str(Path(directory) / "notify")
        sock.bind(path)
        yield Receiver(sock, path)


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"qp-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield Receiver(sock, "@" + name)


def test_path_socket_receives_each_message(path_receiver: Receiver) -> None:
    notifier = SystemdNotifier(path_receiver.env())
    assert notifier.enabled
    assert notifier.ready()
    assert path_receiver.recv() == "READY=1"
    assert notifier.watchdog()
    assert path_receiver.recv() == "WATCHDOG=1"
    assert notifier.status("processing: 12 pending")
    assert path_receiver.recv() == "STATUS=processing: 12 pending"
    assert notifier.stopping()
    assert path_receiver.recv() == "STOPPING=1"
    assert notifier.notify("RELOADING=1\nMONOTONIC_USEC=1")
    assert path_receiver.recv() == "RELOADING=1\nMONOTONIC_USEC=1"
    assert path_receiver.drain() == []


def test_abstract_socket(abstract_receiver: Receiver) -> None:
    notifier = SystemdNotifier(abstract_receiver.env())
    assert notifier.ready()
    assert abstract_receiver.recv() == "READY=1"
    assert notifier.stopping()
    assert abstract_receiver.recv() == "STOPPING=1"


def test_status_is_one_line(path_receiver: Receiver) -> None:
    """A newline would start a new assignment in the protocol."""
    SystemdNotifier(path_receiver.env()).status("line one\nREADY=1")
    assert path_receiver.recv() == "STATUS=line one READY=1"


def test_no_socket_is_a_no_op() -> None:
    notifier = SystemdNotifier({"WATCHDOG_USEC": "60000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval_seconds is None
    with capture_logs() as logs:
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.status("x")
        assert not notifier.stopping()
    assert logs == []


@pytest.mark.anyio
async def test_watchdog_loop_returns_without_a_watchdog(path_receiver: Receiver) -> None:
    with anyio.fail_after(2):
        await SystemdNotifier({}).watchdog_loop(lambda: True, interval_seconds=0.01)
        await SystemdNotifier(path_receiver.env()).watchdog_loop(lambda: True)
    assert path_receiver.drain() == []


def test_send_failure_is_logged_not_raised() -> None:
    with tempfile.TemporaryDirectory(prefix="qp-sd-") as directory:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": str(Path(directory) / "missing")})
        assert notifier.enabled
        with capture_logs() as logs:
            assert not notifier.ready()
    assert [e["event"] for e in logs] == ["systemd_notify_failed"]
    assert logs[0]["log_level"] == "warning"
    assert "FileNotFoundError" in logs[0]["error"]


@pytest.mark.parametrize("value", ["relative/notify", "vsock:2:1234"])
def test_unsupported_socket_disables(value: str) -> None:
    with capture_logs() as logs:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": value})
    assert not notifier.enabled
    assert not notifier.ready()
    assert [e["event"] for e in logs] == ["systemd_notify_socket_unsupported"]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),  # another process's
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(
    path_receiver: Receiver, extra: dict[str, str], expected: float | None
) -> None:
    assert SystemdNotifier(path_receiver.env(**extra)).watchdog_interval_seconds == expected


def test_watchdog_pid_compares_with_given_pid(path_receiver: Receiver) -> None:
    env = path_receiver.env(WATCHDOG_USEC="2000000", WATCHDOG_PID="4242")
    assert SystemdNotifier(env, pid=4242).watchdog_interval_seconds == 1.0
    assert SystemdNotifier(env, pid=4243).watchdog_interval_seconds is None


@pytest.mark.anyio
async def test_watchdog_loop_pings_only_while_healthy(path_receiver: Receiver) -> None:
    # WATCHDOG_USEC=100ms -> a ping every 50 ms.
    notifier = SystemdNotifier(path_receiver.env(WATCHDOG_USEC="100000"))
    assert notifier.watchdog_interval_seconds == 0.05
    healthy = True
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(notifier.watchdog_loop, lambda: healthy)
            await anyio.sleep(0.3)
            pings = path_receiver.drain()
            assert len(pings) >= 2
            assert set(pings) == {"WATCHDOG=1"}

            healthy = False
            path_receiver.drain()  # whatever was sent before the loop could see the change
            await anyio.sleep(0.3)
            assert path_receiver.drain() == []

            healthy = True
            await anyio.sleep(0.3)
            resumed = path_receiver.drain()
            assert len(resumed) >= 2
            assert set(resumed) == {"WATCHDOG=1"}
            tg.cancel_scope.cancel()
    events = [e["event"] for e in logs]
    assert events == ["watchdog_withheld", "watchdog_resumed"]
