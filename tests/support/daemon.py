"""Running `ghost-buildpackd run` as a real process, for tests that stop or kill it and for scripts/demo.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .waiting import wait_until


class DaemonProcess:
    """One daemon instance; its JSON log lines are kept in a file for assertions."""

    def __init__(
        self, config: Path, log_path: Path, extra_env: dict[str, str] | None = None, trivial_bodies: bool = False
    ):
        self.config = config
        # The production command, or the same daemon with trivial step bodies (tests/support/trivial_daemon.py).
        self.argv = (
            [sys.executable, "-m", "tests.support.trivial_daemon", str(config)]
            if trivial_bodies
            else [sys.executable, "-m", "ghost_buildpackd", "run", "--config", str(config)]
        )
        self.log_path = log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        handle = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            cwd=Path(__file__).resolve().parents[2],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        handle.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def events(self) -> list[dict[str, Any]]:
        found = []
        if not self.log_path.exists():
            return found
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
        return found

    def saw(self, event: str, since: int = 0, **fields: Any) -> dict[str, Any] | None:
        """The first log line of `event` with these fields, among lines from index `since` on."""
        for item in self.events()[since:]:
            if item.get("event") == event and all(item.get(k) == v for k, v in fields.items()):
                return item
        return None

    def wait_ready(self, timeout: float = 60) -> None:
        wait_until(lambda: self.assert_alive() and self.saw("daemon_ready"), timeout, "daemon_ready in the log")

    def assert_alive(self) -> bool:
        """True while the process runs; fails with the end of its log once it has exited."""
        if not self.alive():
            raise AssertionError(
                f"daemon exited with {self.process.returncode if self.process else None}:\n"
                + self.log_path.read_text(errors="replace")[-4000:]
            )
        return True

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait for the exit code."""
        assert self.process is not None
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no chance to clean anything up."""
        if self.process is not None and self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.alive():
            try:
                self.terminate(30)
            except subprocess.TimeoutExpired:
                self.kill()


class Daemons:
    """Daemon processes of one test, each with its own config and log; all stopped at the end."""

    def __init__(self, write_config: Callable[..., Path], tmp_path: Path, overrides: dict[str, Any]):
        self.write_config = write_config
        self.tmp_path = tmp_path
        self.overrides = overrides
        self.started: list[DaemonProcess] = []

    def start(self, env: dict[str, str] | None = None, **more: Any) -> DaemonProcess:
        """One more instance with these config overrides (and `env` added to its environment), once ready."""
        name = f"d{len(self.started)}"
        config = self.write_config(f"{name}.yml", **{**self.overrides, **more})
        process = DaemonProcess(config, self.tmp_path / f"{name}.log", extra_env=env).start()
        self.started.append(process)
        process.wait_ready()
        return process

    def stop_all(self) -> None:
        for process in self.started:
            if process.alive():
                try:
                    process.terminate(60)
                except Exception:
                    process.kill()
