"""`ghost-buildpackd demo`: the whole flow on an embedded default, for a new user.

Starts a MongoDB stand-in (nx-27017) unless GHOST_BUILDPACKD_MONGODB_URI is
given, runs the daemon as a process exactly as the service would, plays
Ghost's part (an app, a buildimage job that finishes, a deploy job, Ghost's
client asking for the buildpack), prints what happened, and removes
everything it made. Needs LXD and the base image (scripts/demo sets them up).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from bson import ObjectId

from .client import run_buildpack
from .config import ENV_MONGODB_URI, LxdConfig
from .ghost import BadDocument
from .lxd import TAG_JOB, Lxd
from .model import step_id
from .store import Store

BASE_IMAGE = "ghost-buildpackd/busybox"
OWNER = (1001, 1002)  # the working copy's owner; scripts/setup-lxd lets LXD map these ids
APP = {"name": "demo", "env": "prod", "role": "webfront", "region": "eu-west-1"}
PRE_HOOK = 'echo "pre-buildimage hook of $GHOST_APP/$GHOST_ENV/$GHOST_ROLE"; mkdir -p /opt/demo; date > /opt/demo/built'
POST_HOOK = 'echo "post-buildimage hook: the image was built on $(cat /opt/demo/built)"'
BUILD_PACK = """echo "buildpack of $GHOST_MODULE_NAME running in $(pwd) as $(id -u)"
echo "the app's secret is $(printf %s "$DEMO_TOKEN" | wc -c) characters long (its value never reaches a log)"
mkdir -p build && echo "compiled from $(cat app.src)" > build/app.bin
ls -ln build
"""


def say(text: str = "") -> None:
    print(text, flush=True)


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)  # polling interval of the condition
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")


class EmbeddedMongo:
    """nx-27017, a MongoDB wire-protocol server on SQLite, as a child process."""

    def __init__(self, workdir: Path):
        executable = shutil.which("nx-27017", path=str(Path(sys.executable).parent)) or shutil.which("nx-27017")
        if not executable:
            raise RuntimeError(f"no MongoDB: set {ENV_MONGODB_URI} or install nx-27017 (pip install nx-27017)")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.uri = f"mongodb://127.0.0.1:{port}/?directConnection=true"
        self.process = subprocess.Popen(
            [executable, "--data-dir", str(workdir / "mongo"), "-p", str(port),
             "--pid-file", str(workdir / "nx.pid"), "--log-file", str(workdir / "nx.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


class Demo:
    def __init__(self, workdir: Path, uri: str):
        self.workdir = workdir
        self.root = workdir / "ghost"
        self.log_dir = workdir / "log"
        for path in (self.root, self.log_dir, workdir / "provisioners"):
            path.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o755)  # LXD mounts the working copy from below it
        self.database = "ghost_demo"
        self.config_path = workdir / "config.yml"
        self.config_path.write_text(
            yaml.safe_dump(
                {
                    "mongodb": {"uri": uri, "database": self.database},
                    "ghost": {"root": str(self.root), "log_dir": str(self.log_dir),
                              "provisioner_tree": str(workdir / "provisioners")},
                    "container": {"idmap_user": f"{OWNER[0]}:{OWNER[1]}", "exec_timeout": "2m"},
                    "events": {"poll_interval": "1s"},
                    "log": {"format": "json"},
                }
            )
        )  # fmt: skip
        self.store = Store.from_uri(uri, self.database, timeout=20)
        self.db = self.store.db  # the demo plays Ghost: it writes Ghost's own documents
        self.lxd = Lxd(LxdConfig())
        self.daemon: subprocess.Popen[bytes] | None = None
        self.aliases: list[str] = []

    # --- Ghost's part -------------------------------------------------------------------

    def create_app(self) -> ObjectId:
        from base64 import b64encode

        def b64(text: str) -> str:
            return b64encode(text.encode()).decode()

        doc = {
            **APP,
            "build_infos": {"source_container_image": BASE_IMAGE, "ami_name": "ami.prod.eu-west-1.webfront.demo.1"},
            "env_vars": [{"var_key": "DEMO_TOKEN", "var_value": "s3cr3t-demo-token"}],
            "lifecycle_hooks": {"pre_buildimage": b64(PRE_HOOK), "post_buildimage": b64(POST_HOOK)},
            "features": [],
            "modules": [{"name": "site", "path": "/var/www/site", "scope": "code",
                         "git_repo": "git@example.invalid:site", "build_pack": b64(BUILD_PACK)}],
        }  # fmt: skip
        return self.db.apps.insert_one(doc).inserted_id

    def create_job(self, app_id: ObjectId, command: str, **extra: Any) -> ObjectId:
        job = {"command": command, "app_id": app_id, "status": "init", "message": "", "user": "demo", **extra}
        job_id = self.db.jobs.insert_one(job).inserted_id
        self.set_status(job_id, "init")
        return job_id

    def set_status(self, job_id: ObjectId, status: str, message: str = "") -> None:
        # As Ghost's worker does; `_updated` from the server clock.
        self.db.jobs.update_one(
            {"_id": job_id}, {"$set": {"status": status, "message": message}, "$currentDate": {"_updated": True}}
        )

    # --- the daemon ------------------------------------------------------------------------

    def start_daemon(self) -> None:
        log = (self.workdir / "daemon.log").open("ab")
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "ghost_buildpackd", "run", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        wait_for(lambda: self.daemon_alive() and "daemon_ready" in self.daemon_log(), 60, "the daemon to start")
        mode = next(line for line in self.daemon_log().splitlines() if "daemon_ready" in line)
        say(f"daemon started (pid {self.daemon.pid}); {_field(mode, 'mode_reason')}")

    def daemon_alive(self) -> bool:
        if self.daemon is None or self.daemon.poll() is not None:
            raise RuntimeError("the daemon exited:\n" + self.daemon_log()[-3000:])
        return True

    def daemon_log(self) -> str:
        path = self.workdir / "daemon.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_daemon(self) -> int | None:
        if self.daemon is None or self.daemon.poll() is not None:
            return None
        self.daemon.send_signal(signal.SIGTERM)
        return self.daemon.wait(120)

    def finished_step(self, sid: str) -> Any:
        step = self.store.get_step(sid)
        self.daemon_alive()
        return step if step is not None and step.terminal else None

    # --- the flow ---------------------------------------------------------------------------

    def run(self) -> bool:
        say("== ghost-buildpackd demo")
        say(f"working directory {self.workdir}")
        self.start_daemon()
        app_id = self.create_app()
        ok = self.build_image(app_id) and self.deploy(app_id)
        self.report()
        return ok

    def build_image(self, app_id: ObjectId) -> bool:
        say("\n== 1. Ghost builds an AMI; the buildimage job ends")
        job = self.create_job(app_id, "buildimage")
        self.aliases.append(str(job))
        self.set_status(job, "started")
        self.set_status(job, "done", "Build image OK: [ami-0123abcd]")
        step = wait_for(lambda: self.finished_step(step_id(job, "buildimage")), 180, "the image build")
        say(f"step {step.id}: {step.state} ({step.message})")
        if step.state != "succeeded":
            return False
        image = self.lxd.image_by_alias(str(job))
        app = self.db.apps.find_one({"_id": app_id})
        say(f"LXD image alias {str(job)!r} -> {image.fingerprint[:12] if image else 'MISSING'}")
        say(f"apps.build_infos.container_image = {app['build_infos'].get('container_image')!r}")
        say(f"Ghost job log {self.log_dir / f'{job}.txt'}:")
        for line in (self.log_dir / f"{job}.txt").read_text().splitlines():
            say(f"  | {line}")
        return image is not None

    def deploy(self, app_id: ObjectId) -> bool:
        say("\n== 2. Ghost deploys; the daemon prepares a container while Ghost clones the module")
        job = self.create_job(app_id, "deploy", modules=[{"name": "site", "rev": "main"}])
        self.set_status(job, "started")
        sid = step_id(job, "deploy", "site")
        wait_for(lambda: (step := self.store.get_step(sid)) and step.state in ("ready", "failed"), 120, "preparation")
        say(f"step {sid}: {self.store.get_step(sid).state}")
        working_copy = self.root / "demo" / "prod" / "webfront" / "site"
        working_copy.mkdir(parents=True)
        (working_copy / "app.src").write_text("demo sources\n")
        for path in (working_copy, working_copy / "app.src"):
            os.chown(path, *OWNER)
        say(f"Ghost cloned the module into {working_copy} (owner {OWNER[0]}:{OWNER[1]})")
        say("Ghost's worker calls ghost_buildpackd.client.run_buildpack(db, job_id, 'site') ...")
        started = time.monotonic()
        result = run_buildpack(self.db, job, "site", timeout=180, poll_interval=0.5)
        say(f"-> {result.state} (exit code {result.exit_code}) in {time.monotonic() - started:.2f}s")
        for line in result.output_tail.splitlines():
            say(f"  | {line}")
        built = working_copy / "build" / "app.bin"
        if built.exists():
            stat = built.stat()
            say(f"{built}: {built.read_text().strip()!r}, owned by {stat.st_uid}:{stat.st_gid} on the host")
        self.set_status(job, "done")
        return result.ok and built.exists() and (built.stat().st_uid, built.stat().st_gid) == OWNER

    def report(self) -> None:
        say("\n== 3. Step records (container_steps)")
        for step in self.store.steps.find().sort("created_at", 1):
            say(f"  {step['_id']:<45} {step['state']:<10} {step.get('message', '')[:70]}")
        code = self.stop_daemon()
        say(f"\ndaemon stopped (exit code {code})")
        job_ids = {str(job["_id"]) for job in self.db.jobs.find({}, {"_id": 1})}
        leftovers = [c.name for c in self.lxd.list_containers() if c.tags.get(TAG_JOB) in job_ids]
        say(f"containers left in LXD: {leftovers or 'none'}")
        secret_seen = "s3cr3t-demo-token" in self.daemon_log() + "".join(
            path.read_text() for path in self.log_dir.iterdir()
        )
        say(f"secret value in any log: {'YES (bug)' if secret_seen else 'no'}")

    def clean_up(self) -> None:
        self.stop_daemon()
        for alias in self.aliases:
            image = self.lxd.image_by_alias(alias)
            self.lxd.delete_alias(alias)
            if image is not None:
                self.lxd.delete_image(image.fingerprint)
        for container in self.lxd.list_containers():
            if container.tags.get(TAG_JOB) in self.aliases:
                self.lxd.delete_container(container.name)
        self.db.client.drop_database(self.database)


def _field(line: str, name: str) -> str:
    import json

    try:
        return str(json.loads(line).get(name, ""))
    except ValueError:
        return ""


def run_demo() -> int:
    """Entry point of `ghost-buildpackd demo` (the embedded default needs no configuration)."""
    workdir = Path(tempfile.mkdtemp(prefix="ghost-buildpackd-demo-"))
    mongo = None
    demo = None
    try:
        uri = os.environ.get(ENV_MONGODB_URI)
        if not uri:
            mongo = EmbeddedMongo(workdir)
            uri = mongo.uri
            say(f"MongoDB: embedded nx-27017 stand-in at {uri} ({ENV_MONGODB_URI} to use a real one)")
        else:
            say("MongoDB: from " + ENV_MONGODB_URI)
        demo = Demo(workdir, uri)
        wait_for(lambda: _ping(demo.store), 30, "MongoDB")
        ok = demo.run()
    except (RuntimeError, TimeoutError, BadDocument) as error:
        say(f"demo failed: {error}")
        ok = False
    finally:
        if demo is not None:
            demo.clean_up()
        if mongo is not None:
            mongo.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    say("\n" + ("demo OK: image built, buildpack run in a container, files owned by the working copy's owner, "
                "nothing left behind" if ok else "demo FAILED"))  # fmt: skip
    return 0 if ok else 1


def _ping(store: Store) -> bool:
    try:
        store.ping()
        return True
    except Exception:
        return False
