"""The systemd notify protocol (``sd_notify``) over ``NOTIFY_SOCKET``, with no dependency.

Under ``Type=notify`` systemd passes a datagram socket in ``NOTIFY_SOCKET`` (a filesystem
path, or ``@name`` for the abstract namespace) and waits for ``READY=1`` before it considers
the service started. With ``WatchdogSec=`` it also sets ``WATCHDOG_USEC`` (and
``WATCHDOG_PID``) and restarts the service unless ``WATCHDOG=1`` arrives within that time;
``STOPPING=1`` says a shutdown is under way and ``STATUS=...`` shows up in
``systemctl status``.

``SystemdNotifier`` reads those variables once, from a mapping the CLI passes in (only
the CLI reads the environment). Every method is a no-op without ``NOTIFY_SOCKET`` and none
raises: a notification that cannot be delivered is logged as a warning, because a service
that fails only because its supervisor went away would be worse than a missed ping.
``watchdog_loop`` pings only while a health callable says the process is making progress, so
a worker whose loop is stuck stops pinging and systemd restarts it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping

import anyio
import structlog

log = structlog.get_logger(__name__)

_SEND_TIMEOUT_SECONDS = 1.0


class SystemdNotifier:
    """Sends sd_notify datagrams to the socket systemd named in ``env``.

    ``env`` is the process environment as a mapping (``os.environ`` in the CLI); ``pid``
    defaults to this process's id and decides whether ``WATCHDOG_PID`` refers to us.
    """

    def __init__(self, env: Mapping[str, str], *, pid: int | None = None) -> None:
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = _watchdog_usec(env, os.getpid() if pid is None else pid)

    def __repr__(self) -> str:
        return (
            f"SystemdNotifier(enabled={self.enabled!r}, "
            f"watchdog_interval_seconds={self.watchdog_interval_seconds!r})"
        )

    @property
    def enabled(self) -> bool:
        """True when systemd gave us a notify socket (the process runs under Type=notify)."""
        return self._address is not None

    @property
    def watchdog_interval_seconds(self) -> float | None:
        """How often to send WATCHDOG=1: half of ``WATCHDOG_USEC`` (as systemd recommends),
        or None when no watchdog is configured for this process."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def notify(self, message: str) -> bool:
        """Send one datagram of newline-separated ``KEY=VALUE`` assignments.

        Returns True if it was sent; False when there is no socket or the send failed (then
        a ``systemd_notify_failed`` warning is logged). Never raises.
        """
        if self._address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # A full receive queue must not block the event loop for long.
                sock.settimeout(_SEND_TIMEOUT_SECONDS)
                sock.sendto(message.encode("utf-8", "replace"), self._address)
        except OSError as exc:
            log.warning(
                "systemd_notify_failed",
                message=message.split("\n", 1)[0][:64],
                error=f"{type(exc).__name__}: {exc}",
            )
            return False
        return True

    def ready(self) -> bool:
        """Tell systemd the service is up (connected, schema checked): ``READY=1``."""
        return self.notify("READY=1")

    def stopping(self) -> bool:
        """Tell systemd a shutdown has begun: ``STOPPING=1``."""
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        """Keep-alive ping for ``WatchdogSec=``: ``WATCHDOG=1``."""
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """A one-line status for ``systemctl status``: ``STATUS=text`` (newlines flattened,
        since they separate assignments in the protocol)."""
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    async def watchdog_loop(
        self,
        is_healthy: Callable[[], bool],
        *,
        interval_seconds: float | None = None,
    ) -> None:
        """Send WATCHDOG=1 every interval while ``is_healthy()`` is true, until cancelled.

        ``interval_seconds`` defaults to ``watchdog_interval_seconds``; with neither (no
        watchdog configured) this returns at once. While unhealthy no ping is sent, so
        systemd restarts the service once ``WatchdogSec`` passes; the transitions are logged.
        """
        interval = interval_seconds or self.watchdog_interval_seconds
        if interval is None or self._address is None:
            return
        withheld = False
        while True:
            if is_healthy():
                if withheld:
                    log.info("watchdog_resumed")
                    withheld = False
                self.watchdog()
            elif not withheld:
                log.warning("watchdog_withheld", reason="the worker is not making progress")
                withheld = True
            await anyio.sleep(interval)


def _socket_address(value: str) -> str | None:
    """The address to send to: an absolute path, or ``@name`` mapped to the abstract
    namespace (a leading NUL). Anything else (empty, relative, ``vsock:``) disables us."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    log.warning("systemd_notify_socket_unsupported", notify_socket=value[:100])
    return None


def _watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    """``WATCHDOG_USEC`` if it is a positive integer and ``WATCHDOG_PID`` (when set) is us."""
    raw_pid = env.get("WATCHDOG_PID", "").strip()
    if raw_pid:
        try:
            if int(raw_pid) != pid:
                return None
        except ValueError:
            return None
    try:
        usec = int(env.get("WATCHDOG_USEC", "").strip())
    except ValueError:
        return None
    return usec if usec > 0 else None
