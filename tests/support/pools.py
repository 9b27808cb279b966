"""The storage pool a new LXD gets (scripts/lib.sh: ensure_storage_pool): its plan, run with the real kernel
and df, and a scratch pool made by it under a name of the test's, so the shared `default` pool and profile
stay as they are."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pylxd.exceptions import NotFound

from ghost_buildpackd.lxd import Lxd, retry_lxd

ROOT = Path(__file__).resolve().parents[2]
LXD_DIR = "/var/lib/lxd"
GIB = 1 << 30
# The rule scripts/lib.sh states: a fifth of the free disk, 5 to 50 GiB, dir under 10 GiB free.
MIN_GIB, MAX_GIB, MIN_FREE_GIB = 5, 50, 10


@dataclass(frozen=True)
class PoolRun:
    returncode: int
    log: str  # what the function logged (stderr)


def run_storage_pool(*args: str, timeout: float = 600, **env: str) -> PoolRun:
    """`ensure_storage_pool ARGS` sourced from scripts/lib.sh, with `env` added (GBP_STORAGE_POOL, ...)."""
    script = 'set -euo pipefail; . scripts/lib.sh; ensure_storage_pool "$@"'
    done = subprocess.run(
        ["bash", "-c", script, "ensure_storage_pool", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return PoolRun(done.returncode, done.stderr)


def kernel_has_btrfs() -> bool:
    if re.search(r"\bbtrfs\b", Path("/proc/filesystems").read_text()):
        return True
    modprobe = shutil.which("modprobe")
    return bool(modprobe) and subprocess.run([modprobe, "-n", "btrfs"], capture_output=True).returncode == 0


def expected_btrfs_size(free: int) -> str | None:
    """The loop file's size for `free` bytes free ("20GiB"), None when that is too little for one."""
    if free // GIB < MIN_FREE_GIB:
        return None
    return f"{min(max(free // 5 // GIB, MIN_GIB), MAX_GIB)}GiB"


def scratch_pool_name() -> str:
    return f"gbp-test-{uuid.uuid4().hex[:8]}"


@retry_lxd
def delete_pool(lxd: Lxd, name: str) -> bool:
    """Delete storage pool `name`; False when there was nothing to delete."""
    try:
        lxd.client.storage_pools.get(name).delete()
    except NotFound:
        return False
    return True


@contextmanager
def scratch_storage_pool(lxd: Lxd) -> Iterator[tuple[str, PoolRun, tuple[int, int]]]:
    """A pool made by ensure_storage_pool under a scratch name: (name, its run, free bytes before and after);
    always deleted."""
    name = scratch_pool_name()
    try:
        before = shutil.disk_usage(LXD_DIR).free
        run = run_storage_pool(GBP_STORAGE_POOL=name)
        yield name, run, (before, shutil.disk_usage(LXD_DIR).free)
    finally:
        delete_pool(lxd, name)
