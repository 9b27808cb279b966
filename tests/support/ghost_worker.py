"""Ghost 19.08's own worker code, patched with ghost/ghost-19.08.patch, running one job against this project.

`GhostWorker.run(job_id)` runs `python2.7 ghost_driver.py run JOB_ID` (tests/support/ghost_driver.py)
with the Python 2.7 runtime of scripts/build-ghost-runtime, as production runs Ghost's worker:
- as Ghost's user (uid 1001, gid 1002) with no supplementary group (no `lxd`);
- in a private mount namespace where `/ghost`, `/var/log/ghost` and `/opt/ghost-buildpackd` are the
  test's ghost root, the test's log directory, and a directory whose `current/bin/ghost-buildpackd`
  runs this checkout's command (the path the patch calls);
- with `GHOST_BUILDPACKD_CONFIG` naming the test daemon's config and `MONGO_HOST` the MongoDB
  (Ghost hard-codes port 27017 and database `apitest`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from bson import ObjectId, json_util
from pymongo.database import Database

REPO = Path(__file__).resolve().parents[2]
PATCH = REPO / "ghost" / "ghost-19.08.patch"
DRIVER = Path(__file__).resolve().with_name("ghost_driver.py")
GHOST_IDS = (1001, 1002)  # Ghost's user and group; tests/conftest.py WORKING_COPY_IDS
GHOST_DATABASE = "apitest"  # hard-coded in Ghost's settings.py, as is port 27017
# Ghost's config.yml (read from its tree by ghost_tools and command.py): what the worker needs.
GHOST_CONFIG: dict[str, Any] = {
    "ghost_root_path": "/ghost",
    "ghost_base_url": "http://ghost.invalid",
    "ses_settings": {"aws_access_key": "none", "aws_secret_key": "none", "region": "eu-west-1"},
    "bucket_s3": "ghost-packages-test",
    "bucket_region": "eu-west-1",
    "container": {"enabled": True, "endpoint": "localhost"},
    "rq_worker_job_timeout": 600,
}


def ghost_config(**overrides: Any) -> dict[str, Any]:
    """Ghost's config.yml for a test: GHOST_CONFIG with these top-level keys replaced."""
    return {**GHOST_CONFIG, **overrides}


class GhostUnavailable(Exception):
    """Ghost's sources or the Python 2.7 runtime are missing on this machine: the reason, for a skip."""


def ghost_sources() -> Path:
    """Ghost 19.08's sources: $GHOST_BUILDPACKD_TEST_GHOST_SRC (directory or .tar.gz), else beside the checkout."""
    given = os.environ.get("GHOST_BUILDPACKD_TEST_GHOST_SRC")
    path = Path(given) if given else REPO.parent / "shared" / "ghost" / "cloud-deploy-v19.08.tar.gz"
    if not path.exists():
        raise GhostUnavailable(f"Ghost 19.08's sources not found at {path} (set GHOST_BUILDPACKD_TEST_GHOST_SRC)")
    return path


def ghost_runtime() -> Path:
    """The runtime's directory, if scripts/build-ghost-runtime built it (this does not build it)."""
    done = subprocess.run(
        [str(REPO / "scripts" / "build-ghost-runtime"), "--path"], capture_output=True, text=True, check=False
    )
    if done.returncode == 3:
        raise GhostUnavailable("the Ghost test runtime is not built: run scripts/build-ghost-runtime")
    if done.returncode != 0:
        raise GhostUnavailable(done.stderr.strip() or f"scripts/build-ghost-runtime --path exited {done.returncode}")
    return Path(done.stdout.strip())


def runtime_python2() -> Path | None:
    """The runtime's python2.7, if it is built."""
    try:
        return ghost_runtime() / "bin" / "python2.7"
    except GhostUnavailable:
        return None


def patched_ghost_tree(sources: Path, dest: Path) -> Path:
    """A copy of Ghost's tree with the project's patch applied (`patch -p1`, as docs/ghost.md says to install it)."""
    if sources.is_dir():
        shutil.copytree(sources, dest)
    else:
        with tempfile.TemporaryDirectory() as unpacked, tarfile.open(sources) as archive:
            archive.extractall(unpacked, filter="data")
            (top,) = Path(unpacked).iterdir()
            shutil.copytree(top, dest)
    subprocess.run(["patch", "-p1", "-i", str(PATCH)], cwd=dest, check=True, capture_output=True)
    return dest


@dataclass
class GhostJobRun:
    exit_code: int  # the driver's: 0 when Ghost's job body returned, 1 when it raised
    job: dict[str, Any]
    log: str  # /var/log/ghost/<job id>.txt
    output: str  # the driver's own stdout and stderr (a traceback when Ghost's job body raised)


class GhostWorker:
    """Runs Ghost jobs of one test; `insert_app` / `insert_job` write documents as Ghost's API does."""

    def __init__(
        self,
        runtime: Path,
        tree: Path,
        work: Path,
        ghost_root: Path,
        log_dir: Path,
        mongo_host: str,
        database: Database,
        daemon_config: Path | None = None,
        config: dict[str, Any] | None = None,
        packer: Path | None = None,
    ):
        self.python = runtime / "bin" / "python2.7"
        self.tree = tree
        self.work = work
        self.ghost_root = ghost_root
        self.log_dir = log_dir
        self.mongo_host = mongo_host
        self.db = database
        self.daemon_config = daemon_config
        self.config = ghost_config(**(config or {}))
        self.s3 = work / "s3"
        self.home = work / "home"
        self.opt = work / "opt-ghost-buildpackd"
        self.packer = packer or work / "packer"  # Ghost's /tmp/packer: the daemon's ghost.packer_dir
        for path in (self.s3, self.home, self.packer, ghost_root, log_dir):
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, *GHOST_IDS)
        self._install_command()
        self.runs = 0
        self.packer_seconds = 0.0  # how long the stand-in of Packer's run takes (ghost_driver.py)

    def _install_command(self) -> None:
        """`/opt/ghost-buildpackd/current/bin/ghost-buildpackd`, as scripts/install lays it out: this checkout's."""
        command = self.opt / "current" / "bin" / "ghost-buildpackd"
        command.parent.mkdir(parents=True)
        command.write_text(f'#!/bin/sh\nexec {Path(sys.executable).parent / "ghost-buildpackd"} "$@"\n')
        command.chmod(0o755)

    def config_tree(self, **config: Any) -> Path:
        """A copy of the patched tree with its config.yml (Ghost reads it next to command.py)."""
        self.runs += 1
        tree = self.work / f"ghost-{self.runs}"
        shutil.copytree(self.tree, tree, symlinks=True)
        (tree / "config.yml").write_text(yaml.safe_dump({**self.config, **config}))
        return tree

    def _environment(self) -> dict[str, str]:
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "MONGO_HOST": self.mongo_host,
            "GHOST_TEST_S3_DIR": str(self.s3),
            "PYTHONDONTWRITEBYTECODE": "1",
            "GHOST_TEST_PACKER_SECONDS": str(self.packer_seconds),
        }
        if self.daemon_config is not None:
            env["GHOST_BUILDPACKD_CONFIG"] = str(self.daemon_config)
        return env

    def _as_ghost(self, tree: Path, argv: list[str]) -> list[str]:
        """argv run as Ghost's user in a mount namespace showing the test's directories at Ghost's paths."""
        mounts = [
            (self.ghost_root, "/ghost"),
            (self.log_dir, "/var/log/ghost"),
            (self.opt, "/opt/ghost-buildpackd"),
            (self.packer, "/tmp/packer"),  # Ghost's ImageBuilder makes its Packer directory there
        ]
        script = ["set -e", "mount --make-rprivate /"]
        for source, target in mounts:
            # A namespace cannot add a directory to the host's /: the mount points are made on the
            # host (empty) the first time, and stay empty there.
            script.append(f"mkdir -p {target} && mount --bind {shlex.quote(str(source))} {target}")
        script += self._reachable_interpreter()
        script.append(
            f"cd {shlex.quote(str(tree))} && exec setpriv --reuid {GHOST_IDS[0]} --regid {GHOST_IDS[1]} "
            f"--clear-groups -- {shlex.join(argv)}"
        )
        return ["unshare", "-m", "--", "sh", "-c", "\n".join(script)]

    def _reachable_interpreter(self) -> list[str]:
        """Mounts letting Ghost's user run this checkout's interpreter when it lives below a closed directory.

        The checkout's venv may use an interpreter below e.g. /root (mode 0700); in the namespace that
        directory shows only the interpreter's tree, so the command runs as Ghost's user as installed.
        """
        base = Path(os.path.realpath(sys.base_prefix))
        for closed in reversed(base.parents):
            if closed != Path("/") and not closed.stat().st_mode & stat.S_IXOTH:
                break
        else:
            return []
        child = base.relative_to(closed).parts[0]
        shown = self.work / "interpreter-parent"
        (shown / child).mkdir(parents=True, exist_ok=True)
        return [
            f"mount --bind {shlex.quote(str(closed / child))} {shlex.quote(str(shown / child))}",
            f"mount --rbind {shlex.quote(str(shown))} {shlex.quote(str(closed))}",
        ]

    def run(self, job_id: ObjectId | str, timeout: float = 900, **config: Any) -> GhostJobRun:
        """Run one Ghost job to its end; `config` overrides keys of Ghost's config.yml.

        `timeout` bounds the process; Ghost's own job timeout (`rq_worker_job_timeout`) comes first.
        """
        tree = self.config_tree(**config)
        argv = self._as_ghost(tree, [str(self.python), str(DRIVER), "run", str(job_id)])
        done = subprocess.run(
            argv, env=self._environment(), capture_output=True, text=True, timeout=timeout, check=False
        )
        log_path = self.log_dir / f"{job_id}.txt"
        return GhostJobRun(
            exit_code=done.returncode,
            job=self.db.jobs.find_one({"_id": ObjectId(str(job_id))}) or {},
            log=log_path.read_text(errors="replace") if log_path.exists() else "",
            output=done.stdout + done.stderr,
        )

    def _insert(self, collection: str, document: dict[str, Any]) -> ObjectId:
        tree = self.config_tree()
        done = subprocess.run(
            [str(self.python), str(DRIVER), "insert", collection],
            cwd=tree,
            input=json_util.dumps(document),
            env=self._environment(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        shutil.rmtree(tree)
        if done.returncode != 0:
            raise AssertionError(f"Ghost's API refused the {collection} document:\n{done.stdout}{done.stderr}")
        return ObjectId(done.stdout.strip().splitlines()[-1])

    def insert_app(self, app: dict[str, Any]) -> ObjectId:
        """The app as Ghost's API stores a POST (its pre_insert_app, then Eve's fields)."""
        return self._insert("apps", app)

    def insert_job(self, app_id: ObjectId, command: str, **fields: Any) -> ObjectId:
        """The job as Ghost's API stores a POST (its pre_insert_job, Eve's defaults and fields)."""
        return self._insert("jobs", {"app_id": str(app_id), "command": command, "options": [], **fields})
