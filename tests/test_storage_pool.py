"""The storage pool a new LXD gets (scripts/lib.sh: ensure_storage_pool, run by scripts/setup-lxd and
scripts/install): btrfs on a loop file sized from the free disk when the kernel has btrfs, dir when the
operator says so or the disk is short, and nothing changed when the pool exists.

The plans run with the real kernel and df; the pool really made is a scratch one (`gbp-test-<random>`),
deleted at the end; the shared `default` pool and profile are never changed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ghost_buildpackd.lxd import Lxd
from tests.support.pools import (
    GIB,
    LXD_DIR,
    ROOT,
    PoolRun,
    expected_btrfs_size,
    kernel_has_btrfs,
    run_storage_pool,
    scratch_pool_name,
    scratch_storage_pool,
)

pytestmark = pytest.mark.lxd


def pool_names(lxd: Lxd) -> set[str]:
    return set(lxd.storage_pools())


def test_plan_picks_btrfs_sized_from_the_free_disk(lxd: Lxd) -> None:
    name = scratch_pool_name()
    before = shutil.disk_usage(LXD_DIR).free
    plan = run_storage_pool("--plan", GBP_STORAGE_POOL=name)
    after = shutil.disk_usage(LXD_DIR).free
    assert plan.returncode == 0, plan.log
    assert name not in pool_names(lxd)
    if not kernel_has_btrfs():
        assert f"would create storage pool '{name}' (dir: the kernel has no btrfs" in plan.log
        return
    expected = {
        f"({'btrfs on a ' + size + ' loop file' if size else 'dir: free disk'}"
        for size in (expected_btrfs_size(before), expected_btrfs_size(after))
    }
    made = re.search(rf"would create storage pool '{name}' (\((btrfs on a \d+GiB loop file|dir: free disk))", plan.log)
    assert made is not None, plan.log
    assert made.group(1) in expected, (plan.log, before, after)
    free = re.search(r"free disk (\d+)GiB", plan.log)
    assert free is not None and int(free.group(1)) in {before // GIB, after // GIB}, plan.log


def test_plan_says_dir_when_the_operator_asks(lxd: Lxd) -> None:
    name = scratch_pool_name()
    plan = run_storage_pool("--plan", GBP_STORAGE_POOL=name, GBP_STORAGE_DRIVER="dir")
    assert plan.returncode == 0, plan.log
    assert f"would create storage pool '{name}' (dir: GBP_STORAGE_DRIVER=dir)" in plan.log
    unknown = run_storage_pool("--plan", GBP_STORAGE_POOL=name, GBP_STORAGE_DRIVER="zfs")
    assert unknown.returncode == 2
    assert "GBP_STORAGE_DRIVER=zfs: unknown storage driver (dir or btrfs" in unknown.log
    assert name not in pool_names(lxd)


def test_plan_says_dir_when_the_free_disk_is_short(lxd: Lxd, tmp_path: Path) -> None:
    """LXD's directory on a 1 GiB tmpfs, mounted in a mount namespace of the plan's own (the host sees none)."""
    if not kernel_has_btrfs():
        pytest.skip("the kernel has no btrfs: the plan says dir whatever the disk")
    name = scratch_pool_name()
    script = (
        'set -euo pipefail; mount -t tmpfs -o size=1g gbp-test "$1"; . scripts/lib.sh; '
        'GBP_LXD_DIR="$1/lxd" ensure_storage_pool --plan; GBP_STORAGE_DRIVER=btrfs GBP_LXD_DIR="$1/lxd" '
        "ensure_storage_pool --plan"
    )
    run = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", script, "plan", str(tmp_path)],
        cwd=ROOT,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "GBP_STORAGE_POOL": name},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"would create storage pool '{name}' (dir: free disk 1GiB, under the 10GiB a btrfs loop file needs)" in (
        run.stderr
    )
    # Asked for btrfs, it refuses rather than fall back.
    assert run.returncode == 2, run.stderr
    assert "GBP_STORAGE_DRIVER=btrfs, but free disk 1GiB, under the 10GiB" in run.stderr
    assert name not in pool_names(lxd)


def test_an_existing_pool_is_kept(lxd: Lxd) -> None:
    pools = pool_names(lxd)
    profile = lxd.profile_devices(["default"])
    driver = lxd.client.storage_pools.get("default").driver
    setup_lxd = subprocess.run([ROOT / "scripts/setup-lxd", "--plan"], capture_output=True, text=True, timeout=120)
    for plan in (run_storage_pool("--plan"), PoolRun(setup_lxd.returncode, setup_lxd.stderr)):
        assert plan.returncode == 0, plan.log
        assert f"storage pool 'default' exists ({driver}): kept" in plan.log
        assert "would create" not in plan.log
    # Not in plan mode either: what scripts/setup-lxd does on every run here.
    kept = run_storage_pool()
    assert kept.returncode == 0 and kept.log == "", kept.log
    assert pool_names(lxd) == pools
    assert lxd.profile_devices(["default"]) == profile


def test_a_new_pool_is_btrfs_on_a_loop_file_of_the_planned_size(lxd: Lxd) -> None:
    if not kernel_has_btrfs():
        pytest.skip("the kernel has no btrfs")
    profile = lxd.profile_devices(["default"])
    with scratch_storage_pool(lxd) as (name, run, (before, after)):
        assert run.returncode == 0, run.log
        sizes = {expected_btrfs_size(before), expected_btrfs_size(after)}
        assert None not in sizes, f"this disk has under 10 GiB free: {before}"
        shown = subprocess.run(["lxc", "storage", "show", name], capture_output=True, text=True, check=True).stdout
        assert "\ndriver: btrfs\n" in shown, shown
        size = re.search(r"^  size: (\S+)$", shown, re.MULTILINE)
        assert size is not None and size.group(1) in sizes, shown
        assert f"creating storage pool '{name}' (btrfs on a {size.group(1)} loop file; free disk " in run.log
        assert re.search(rf"^  source: /var/lib/lxd/disks/{name}\.img$", shown, re.MULTILINE), shown
        # Made once: the next run keeps it.
        again = run_storage_pool("--plan", GBP_STORAGE_POOL=name)
        assert f"storage pool '{name}' exists (btrfs): kept" in again.log
    assert name not in pool_names(lxd)
    assert lxd.profile_devices(["default"]) == profile  # its root disk stayed where it was


def test_install_refuses_an_unknown_storage_driver_before_doing_anything() -> None:
    """scripts/install --storage: checked before anything is installed (the same rule as GBP_STORAGE_DRIVER)."""
    for args, env in ((["--storage", "zfs"], {}), ([], {"GBP_STORAGE_DRIVER": "lvm"})):
        run = subprocess.run(
            [ROOT / "scripts/install", *args],
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 2, run.stderr
        wrong = env.get("GBP_STORAGE_DRIVER", "zfs")
        assert run.stderr == f"install: --storage (or GBP_STORAGE_DRIVER) is '{wrong}': dir or btrfs\n"
