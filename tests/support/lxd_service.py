"""Stopping and starting the LXD daemon the way its service manager does (tests of LXD outages).

Debian's lxd.service stops LXD with SIGTERM to the daemon alone
(KillMode=process) and SIGKILL after TimeoutStopSec: containers keep running
under their monitors, an exec in progress loses its connection. `restart`
does the same with a shorter grace, then starts LXD again through
scripts/setup-lxd (idempotent: systemd or a background daemon).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.waiting import wait_until

SETUP_LXD = Path(__file__).resolve().parents[2] / "scripts" / "setup-lxd"


def lxd_daemon_pid() -> int | None:
    """The LXD daemon's pid (not `lxd forkexec` helpers, container monitors or client subcommands)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        is_lxd = os.path.basename(argv[0]) == b"lxd"
        if is_lxd and (len(argv) < 2 or argv[1] in (b"", b"--") or argv[1].startswith(b"--")):
            return int(entry.name)
    return None


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaped yet (the daemon was started detached)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def stop(grace: float, while_stopping: Callable[[], Any] | None = None) -> None:
    """SIGTERM the daemon, SIGKILL it if it is still there after `grace` seconds; returns once it is gone.

    `while_stopping` runs right after the SIGTERM, while LXD refuses changes but still answers reads.
    """
    pid = lxd_daemon_pid()
    assert pid is not None, "no LXD daemon process found"
    os.kill(pid, signal.SIGTERM)
    if while_stopping is not None:
        while_stopping()
    try:
        wait_until(lambda: _gone(pid), grace, "LXD to stop on SIGTERM")
    except AssertionError:  # it waits for running operations, as in production: kill it as systemd would
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: _gone(pid), 30, "LXD to die on SIGKILL")


def start() -> None:
    subprocess.run(["bash", str(SETUP_LXD)], check=True, timeout=300, capture_output=True)
