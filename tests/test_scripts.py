"""The set-up scripts: a first run on a machine without the base image, no SIGPIPE races, and the demo."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ghost_buildpackd.config import ENV_MONGODB_URI
from ghost_buildpackd.lxd import Lxd

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(path for path in (ROOT / "scripts").iterdir() if path.is_file())

# A reader that stops before the end of its input: under `set -o pipefail` the writer may die of
# SIGPIPE (exit 141) and fail the script, depending on which process runs first.
EARLY_QUITTING_READER = re.compile(r"\|\s*(head\b|grep\s+(-\w*[qm]\w*|--quiet|--max-count))")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_no_pipe_into_a_reader_that_quits_early(script: Path) -> None:
    offending = [
        f"{script.name}:{number}: {line.strip()}"
        for number, line in enumerate(script.read_text().splitlines(), 1)
        if not line.lstrip().startswith("#") and EARLY_QUITTING_READER.search(line)
    ]
    assert not offending, "pipes that may race SIGPIPE under pipefail:\n" + "\n".join(offending)


@pytest.mark.lxd
def test_build_base_image_first_run_then_idempotent(lxd: Lxd) -> None:
    """The first run on a machine without the image, under a scratch alias (the shared one stays)."""
    alias = f"gbp-test/busybox-{os.getpid()}"
    assert lxd.image_by_alias(alias) is None
    try:
        for _attempt in range(3):  # the race was intermittent: several first runs, each from scratch
            first = subprocess.run([ROOT / "scripts/build-base-image", alias], capture_output=True, text=True)
            assert first.returncode == 0, first.stderr
            assert f"imported '{alias}'" in first.stderr
            image = lxd.image_by_alias(alias)
            assert image is not None
            assert image.properties["os"] == "busybox"
            assert re.fullmatch(r"\d+\.\d+(\.\d+)?", image.properties["release"])
            again = subprocess.run([ROOT / "scripts/build-base-image", alias], capture_output=True, text=True)
            assert again.returncode == 0, again.stderr
            assert "already present" in again.stderr
            assert lxd.image_by_alias(alias).fingerprint == image.fingerprint  # type: ignore[union-attr]
            _delete(lxd, alias)
    finally:
        _delete(lxd, alias)


@pytest.mark.lxd
def test_demo_runs_the_whole_flow_on_its_embedded_default(lxd: Lxd, base_image: str) -> None:
    """What scripts/demo runs after scripts/setup: its own mongod, the daemon, Ghost's part, the clean-up."""
    env = {key: value for key, value in os.environ.items() if key != ENV_MONGODB_URI}
    env["PYTHONPATH"] = str(ROOT)
    demo = subprocess.run(
        [sys.executable, ROOT / "scripts/demo.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr[-4000:]
    assert "MongoDB: embedded mongod 6.0.5, 1-node replica set" in demo.stdout
    assert "-> succeeded (exit code 0)" in demo.stdout
    assert "owned by 1001:1002 on the host" in demo.stdout
    assert "containers left in LXD: none" in demo.stdout
    assert "secret value in any log: no" in demo.stdout
    assert demo.stdout.rstrip().splitlines()[-1].startswith("demo OK")
    built = re.search(r"LXD image alias '(\w+)' -> \w+", demo.stdout)
    assert built is not None, demo.stdout
    assert lxd.image_by_alias(built.group(1)) is None  # the image it built is removed with the rest
    assert "kept by design (container.templates" in demo.stdout
    made = re.findall(r"template (gbp-tpl-\S+) of image \w+ \([^;]+; made by this run\)", demo.stdout)
    assert made, demo.stdout  # the deploy's container was copied from a template of the image the build published
    assert not {name for name in made if lxd.container_status(name) is not None}  # removed with what the demo made


def _delete(lxd: Lxd, alias: str) -> None:
    """Delete the scratch image, never one that other aliases (the shared base image) point at."""
    image = lxd.image_by_alias(alias)
    if image is not None:
        lxd.delete_alias(alias)
        if set(image.aliases) <= {alias}:
            lxd.delete_image(image.fingerprint)
