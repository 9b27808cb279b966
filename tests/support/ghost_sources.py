"""Ghost 19.08's own files for tests that run them: its sources with this project's patch applied, and Python 2.7.

The sources are the archive in shared/ (beside the repository's clone, in a developer's work tree as in CI),
or GHOST_BUILDPACKD_TEST_GHOST_SRC; the interpreter is GHOST_BUILDPACKD_TEST_PYTHON2, else the Ghost runtime's
(scripts/build-ghost-runtime: Ghost's pinned dependencies, pymongo 3.7.2 among them), else python2.7 on PATH.
Tests skip, saying which, when either is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from .ghost_worker import runtime_python2

REPO = Path(__file__).resolve().parents[2]
PATCH = REPO / "ghost" / "ghost-19.08.patch"
SHARED_SOURCES = REPO.parent / "shared" / "ghost" / "cloud-deploy-v19.08.tar.gz"
GHOST_SOURCES = Path(os.environ.get("GHOST_BUILDPACKD_TEST_GHOST_SRC", SHARED_SOURCES))
PYTHON_2_7 = "import sys; sys.exit(sys.version_info[:2] != (2, 7))"


def python2(probe: str = PYTHON_2_7) -> str | None:
    """A Python 2.7 interpreter that runs `probe` successfully (by default: is 2.7), if this machine has one."""
    candidate = (
        os.environ.get("GHOST_BUILDPACKD_TEST_PYTHON2") or str(runtime_python2() or "") or shutil.which("python2.7")
    )
    if not candidate:
        return None
    return candidate if subprocess.run([candidate, "-c", probe], check=False).returncode == 0 else None


def ghost_file(name: str) -> bytes:
    """One file of Ghost's sources, by its path inside the tree (`ghost_log.py`)."""
    with tarfile.open(GHOST_SOURCES) as archive:
        member = next(m for m in archive.getmembers() if m.name.split("/", 1)[1:] == [name])
        handle = archive.extractfile(member)
        assert handle is not None, name
        return handle.read()


def patched_ghost(root: Path) -> Path:
    """Ghost 19.08's libs/ and commands/ under `root`, with the patch applied as docs/ghost.md says; skips the test
    when the sources are not at hand."""
    if not GHOST_SOURCES.is_file():
        pytest.skip(f"Ghost 19.08's sources are not at {GHOST_SOURCES} (GHOST_BUILDPACKD_TEST_GHOST_SRC)")
    with tarfile.open(GHOST_SOURCES) as archive:
        top = archive.getnames()[0].split("/")[0]
        wanted = [m for m in archive.getmembers() if m.name.split("/")[1:2] in (["libs"], ["commands"])]
        archive.extractall(root, members=wanted, filter="data")
    tree = root / top
    subprocess.run(["patch", "-p1", "-s", "-i", str(PATCH)], cwd=tree, check=True)
    return tree
