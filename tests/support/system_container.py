"""A Debian 12 system container with systemd as PID 1, on the real LXD, for tests of the unit.

The image comes from scripts/build-systemd-image (debootstrap, cached in LXD). The container has no
network: it reaches the host's LXD through a unix-socket proxy device and MongoDB through a tcp one.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

from .waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("GHOST_BUILDPACKD_SYSTEMD_IMAGE", "ghost-buildpackd/debian-systemd")


def lxc(*args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(["lxc", *args], input=input, capture_output=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"lxc {' '.join(args)} failed ({result.returncode}): {result.stderr.decode()}")
    return result


def ensure_image() -> None:
    """Build the image when LXD lacks it (minutes, once per machine); a no-op otherwise."""
    subprocess.run([ROOT / "scripts/build-systemd-image", IMAGE], check=True, timeout=1800)


def tar_of(directory: Path, files: list[str], prefix: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name in files:
            archive.add(directory / name, arcname=f"{prefix}/{name}", recursive=False)
    return buffer.getvalue()


def checkout_files() -> list[str]:
    """The files of this checkout a clone would hold (tracked, and new ones not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted({name for name in listed.split("\0") if name and (ROOT / name).is_file()})


class SystemContainer:
    def __init__(self, name: str, privileged: bool = False):
        self.name = name
        self.privileged = privileged  # the host's ids inside: a host directory keeps its owners (add_disk)

    def launch(self) -> SystemContainer:
        lxc("launch", IMAGE, self.name, *(["-c", "security.privileged=true"] if self.privileged else []))
        # Until systemd's bus is up, systemctl answers nothing; `degraded` is still a booted system
        # (units this container cannot run, such as binfmt, failed: none is needed).
        state = wait_until(
            lambda: self.run("systemctl", "is-system-running", "--wait", check=False).stdout.strip(),
            120,
            "systemd to answer in the container",
            interval=0.5,
        )
        assert state in ("running", "degraded"), f"systemd did not boot: {state}\n" + self.failed_units()
        return self

    def failed_units(self) -> str:
        return self.run("systemctl", "--failed", "--no-legend", check=False).stdout

    def run(
        self, *argv: str, input: str | None = None, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["lxc", "exec", self.name, "--", *argv], input=input, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def push_tree(self, directory: Path, files: list[str], destination: str) -> None:
        """Copy `files` of `directory` to `destination` in the container, modes kept."""
        parent, name = os.path.split(destination.rstrip("/"))
        lxc("exec", self.name, "--", "tar", "-x", "-C", parent, input=tar_of(directory, files, name))

    def push_file(self, path: str, content: str, mode: int, gid: int = 0) -> None:
        lxc(
            "file",
            "push",
            "-",
            f"{self.name}{path}",
            "--mode",
            f"{mode:04o}",
            "--gid",
            str(gid),
            input=content.encode(),
        )

    def add_proxy(self, device: str, listen: str, connect: str, **options: str) -> None:
        extra = [f"{key}={value}" for key, value in options.items()]
        lxc("config", "device", "add", self.name, device, "proxy", f"listen={listen}", f"connect={connect}",
            "bind=container", *extra)  # fmt: skip

    def add_disk(self, device: str, path: Path) -> None:
        """The host's directory `path` at the same path inside (a privileged container: owners as on the host):
        a path the daemon inside names is one the host's LXD mounts into step containers."""
        assert self.privileged, "an unprivileged container would show the host's owners as nobody"
        lxc("config", "device", "add", self.name, device, "disk", f"source={path}", f"path={path}")

    def popen(self, *argv: str) -> subprocess.Popen[str]:
        """A command started in the container, its output collected by communicate()."""
        return subprocess.Popen(
            ["lxc", "exec", self.name, "--", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        text = self.run("systemctl", "show", unit, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def wait_for(self, unit: str, timeout: float, **expected: str) -> dict[str, str]:
        return wait_until(
            lambda: (shown := self.show(unit, *expected)) == expected and shown,
            timeout,
            f"{unit}: {expected}",
            interval=0.5,
        )

    def delete(self) -> None:
        lxc("delete", "--force", self.name, check=False)
