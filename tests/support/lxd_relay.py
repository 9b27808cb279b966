"""A unix socket relaying to the LXD daemon's own, which a test stops: LXD goes away for a daemon reaching it
through the relay, while the LXD daemon itself (and every other test's use of it) carries on."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path


def lxd_socket_path() -> str:
    """The LXD daemon's socket, found as pylxd finds it for the `local` endpoint."""
    if "LXD_DIR" in os.environ:
        return os.path.join(os.environ["LXD_DIR"], "unix.socket")
    snap = "/var/snap/lxd/common/lxd/unix.socket"
    return snap if os.path.exists(snap) else "/var/lib/lxd/unix.socket"


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy one direction until either end closes; then close both (the other direction stops too)."""
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    for end in (source, sink):
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)


class LxdRelay:
    """Listens at `path` (an `lxd.endpoint` of `unix:<path>`) and relays each connection to LXD until `stop`."""

    def __init__(self, path: Path):
        self.path = path
        self.target = lxd_socket_path()
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(16)
        threading.Thread(target=self._accept, name="lxd-relay", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"unix:{self.path}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # stopped
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            with self._lock:
                self._connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()

    def stop(self) -> None:
        """LXD, as seen through the relay, goes away: nothing listens any more and open connections are cut."""
        self._listener.close()
        self.path.unlink(missing_ok=True)
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()
