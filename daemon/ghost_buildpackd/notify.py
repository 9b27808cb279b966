"""systemd notifications (sd_notify) without extra dependencies.

systemd passes `NOTIFY_SOCKET` (a path, or `@name` for the abstract
namespace) to a `Type=notify` service; each notification is one datagram of
`KEY=value` lines. Without `NOTIFY_SOCKET` (a terminal, a test, another
supervisor) every method is a no-op.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from .logs import get_logger

log = get_logger(__name__)


class SystemdNotifier:
    """Tells systemd the daemon is ready, stopping, alive (watchdog), and what it is doing."""

    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        self._env = dict(env)
        self._address = self._socket_address(env.get("NOTIFY_SOCKET", ""))
        self._failed_once = False

    @staticmethod
    def _socket_address(value: str) -> str | None:
        if not value:
            return None
        if value.startswith("@"):  # abstract namespace: a leading NUL byte on Linux
            return "\0" + value[1:]
        return value

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, message: str) -> bool:
        """Send one notification; False when there is no socket or sending failed (logged once)."""
        if self._address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(message.encode("utf-8"))
        except OSError as error:
            # Never fatal: a lost notification must not stop the daemon's work.
            if not self._failed_once:
                log.warning("systemd_notify_failed", error=str(error))
                self._failed_once = True
            return False
        return True

    def ready(self) -> bool:
        return self.notify(f"READY=1\nMAINPID={os.getpid()}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        # One line: a newline would start another (unknown) assignment.
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """How often to send WATCHDOG=1: half of WATCHDOG_USEC, or None when no watchdog applies to us."""
        if self._address is None:  # nobody to send keep-alives to
            return None
        usec = self._env.get("WATCHDOG_USEC", "")
        pid = self._env.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0:
            return None
        if pid and pid != str(os.getpid()):  # meant for another process (e.g. our parent)
            return None
        return int(usec) / 2_000_000
