"""The whole flow once on an embedded default, for a new user (run by scripts/demo).

Starts a real MongoDB (a one-node replica set of the mongod that
scripts/setup-mongodb installs) unless GHOST_BUILDPACKD_MONGODB_URI is
given, runs the daemon as a process exactly as the service would, plays
Ghost's part (an app, a buildimage job that finishes, a deploy job, Ghost's
client asking for the buildpack), prints what happened, and removes
everything it made: the image it built and the template containers made
during the run, which the daemon keeps by design (`scripts/demo --keep`
leaves both, and says how to remove them). Needs LXD and the base image
(scripts/demo sets them up).

This is harness, not product: it lives beside the scripts and reuses the test
harness for the MongoDB server, the daemon process, waiting on conditions,
Ghost's own writes (tests/support) and the clean-up of what a job left in LXD
(tests/conftest.py). The daemon's records are read through the Store, as the
daemon's CLI reads them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import structlog
import yaml
from bson import ObjectId
from pymongo.database import Database
from pymongo.errors import PyMongoError
from tests.conftest import idle_containers_of_apps, leftover_containers, remove_job_images
from tests.support import ghost as ghost_writes  # Ghost's own writes to its collections
from tests.support.daemon import DaemonProcess
from tests.support.mongo import ExternalMongo, MongoServer, ReplicaSetMongo, mongod_build
from tests.support.waiting import wait_until

from ghost_buildpackd.config import ENV_MONGODB_URI, LxdConfig
from ghost_buildpackd.ghost.client import run_buildpack
from ghost_buildpackd.ghost.fields import BadDocument
from ghost_buildpackd.logs import configure_logging
from ghost_buildpackd.lxd import Lxd
from ghost_buildpackd.model import Step, step_id
from ghost_buildpackd.store import Store
from ghost_buildpackd.upkeep.templates import kept_templates, remove_template

BASE_IMAGE = "ghost-buildpackd/busybox"
DATABASE = "ghost_demo"
OWNER = (1001, 1002)  # the working copy's owner; scripts/setup-lxd lets LXD map these ids
SECRET = "s3cr3t-demo-token"
PRE_HOOK = 'echo "pre-buildimage hook of $GHOST_APP/$GHOST_ENV/$GHOST_ROLE"; mkdir -p /opt/demo; date > /opt/demo/built'
POST_HOOK = 'echo "post-buildimage hook: the image was built on $(cat /opt/demo/built)"'
BUILD_PACK = """echo "buildpack of $GHOST_MODULE_NAME running in $(pwd) as $(id -u)"
echo "the app's secret is $(printf %s "$DEMO_TOKEN" | wc -c) characters long (its value never reaches a log)"
mkdir -p build && echo "compiled from $(cat app.src)" > build/app.bin
ls -ln build
"""


def say(text: str = "") -> None:
    print(text, flush=True)


class Demo:
    def __init__(self, workdir: Path, mongo: MongoServer, keep: bool):
        self.workdir = workdir
        self.keep = keep
        self.root = workdir / "ghost"
        self.log_dir = workdir / "log"
        for path in (self.root, self.log_dir, workdir / "provisioners"):
            path.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o755)  # LXD mounts the working copy from below it
        ghost_config = workdir / "ghost-config.yml"  # Ghost's config.yml, as a Ghost with containers has it
        ghost_config.write_text("container:\n  enabled: true\n  endpoint: localhost\n")
        config_path = workdir / "config.yml"
        config_path.write_text(
            yaml.safe_dump(
                {
                    "mongodb": {"uri": mongo.uri, "database": DATABASE},
                    "ghost": {"root": str(self.root), "log_dir": str(self.log_dir),
                              "provisioner_tree": str(workdir / "provisioners"), "config": str(ghost_config)},
                    "container": {"idmap_user": f"{OWNER[0]}:{OWNER[1]}", "exec_timeout": "2m"},
                    "events": {"poll_interval": "1s"},
                    "log": {"format": "json"},
                }
            )
        )  # fmt: skip
        self.client = mongo.client()
        self.ghost_db: Database = self.client[DATABASE]  # Ghost's side: its documents and its client call
        self.store = Store(self.ghost_db)  # the daemon's side: step records through the daemon's adapter
        self.lxd = Lxd(LxdConfig())
        self.templates_before = {template.name for template in kept_templates(self.lxd)}
        self.daemon = DaemonProcess(config_path, workdir / "daemon.log")
        self.jobs: list[ObjectId] = []

    # --- the daemon ------------------------------------------------------------------------

    def start_daemon(self) -> None:
        self.daemon.start().wait_ready(60)
        ready = self.daemon.saw("daemon_ready") or {}
        say(f"daemon started (pid {self.daemon.pid}); {ready.get('mode_reason', '')}")

    def daemon_log(self) -> str:
        return self.daemon.log_path.read_text(errors="replace") if self.daemon.log_path.exists() else ""

    def step_when(self, sid: str, states: tuple[str, ...] | None, timeout: float, what: str) -> Step:
        """The step once it reaches one of `states` (any terminal state when None); fails if the daemon exits."""

        def reached() -> Step | None:
            self.daemon.assert_alive()
            step = self.store.get_step(sid)
            if step is None:
                return None
            return step if (step.state in states if states else step.terminal) else None

        return wait_until(reached, timeout, what, interval=0.1)

    # --- the flow ---------------------------------------------------------------------------

    def run(self) -> bool:
        say("== ghost-buildpackd demo")
        say(f"working directory {self.workdir}")
        self.start_daemon()
        app_id = ghost_writes.make_app(
            self.ghost_db,
            name="demo",
            role="webfront",
            source_container_image=BASE_IMAGE,
            env_vars=[{"var_key": "DEMO_TOKEN", "var_value": SECRET}],
            pre_buildimage=PRE_HOOK,
            post_buildimage=POST_HOOK,
            modules=[ghost_writes.module_doc("site", "/var/www/site", BUILD_PACK)],
        )
        ok = self.build_image(app_id) and self.deploy(app_id)
        self.report()
        return ok

    def new_job(self, app_id: ObjectId, command: str) -> ObjectId:
        job = ghost_writes.make_job(self.ghost_db, app_id, command, modules=["site"], user="demo")
        self.jobs.append(job)
        return job

    def build_image(self, app_id: ObjectId) -> bool:
        say("\n== 1. Ghost builds an AMI; the buildimage job ends")
        job = self.new_job(app_id, "buildimage")
        ghost_writes.set_status(self.ghost_db, job, "started")
        ghost_writes.finish_buildimage(self.ghost_db, job)
        step = self.step_when(step_id(job, "buildimage"), None, 180, "the image build")
        say(f"step {step.id}: {step.state} ({step.message})")
        if step.state != "succeeded":
            return False
        image = self.lxd.image_by_alias(str(job))
        say(f"LXD image alias {str(job)!r} -> {image.fingerprint[:12] if image else 'MISSING'}")
        say(f"apps.build_infos.container_image = {self.store.app_container_image(app_id)!r}")
        say(f"Ghost job log {self.log_dir / f'{job}.txt'}:")
        for line in (self.log_dir / f"{job}.txt").read_text().splitlines():
            say(f"  | {line}")
        return image is not None

    def deploy(self, app_id: ObjectId) -> bool:
        say("\n== 2. Ghost deploys; the daemon prepares a container while Ghost clones the module")
        job = self.new_job(app_id, "deploy")
        ghost_writes.set_status(self.ghost_db, job, "started")
        sid = step_id(job, "deploy", "site")
        step = self.step_when(sid, ("ready", "failed"), 120, "preparation")
        say(f"step {sid}: {step.state}")
        working_copy = self.root / "demo" / "prod" / "webfront" / "site"
        working_copy.mkdir(parents=True)
        (working_copy / "app.src").write_text("demo sources\n")
        for path in (working_copy, working_copy / "app.src"):
            os.chown(path, *OWNER)
        say(f"Ghost cloned the module into {working_copy} (owner {OWNER[0]}:{OWNER[1]})")
        say("Ghost's worker calls ghost_buildpackd.ghost.client.run_buildpack(db, job_id, 'site') ...")
        started = time.monotonic()
        result = run_buildpack(self.ghost_db, job, "site", timeout=180, poll_interval=0.5)
        say(f"-> {result.state} (exit code {result.exit_code}) in {time.monotonic() - started:.2f}s")
        for line in result.output_tail.splitlines():
            say(f"  | {line}")
        built = working_copy / "build" / "app.bin"
        if built.exists():
            stat = built.stat()
            say(f"{built}: {built.read_text().strip()!r}, owned by {stat.st_uid}:{stat.st_gid} on the host")
        ghost_writes.set_status(self.ghost_db, job, "done")
        return result.ok and built.exists() and (built.stat().st_uid, built.stat().st_gid) == OWNER

    def report(self) -> None:
        say("\n== 3. Step records (container_steps)")
        for job in self.jobs:
            for step in self.store.steps_for_job(job):
                say(f"  {step.id:<45} {step.state:<10} {step.message[:70]}")
        code = self.daemon.terminate(120) if self.daemon.alive() else None
        say(f"\ndaemon stopped (exit code {code})")
        say(f"containers left in LXD: {leftover_containers(self.lxd, self.ghost_db) or 'none'}")
        idle = idle_containers_of_apps(self.lxd, self.ghost_db)
        say(f"warm pool's idle containers left (container.warm_pool: a clean stop removes them): {idle or 'none'}")
        say("kept by design (container.templates: copied for the next containers, not leftovers):")
        for template in kept_templates(self.lxd):
            made = "made by this run" if template.name not in self.templates_before else "there before this run"
            size = "its image gone" if template.image_size is None else f"image {template.image_size / 2**20:.1f} MiB"
            say(f"  template {template.name} of image {template.image[:12]} ({size}; {made})")
        secret_seen = SECRET in self.daemon_log() + "".join(path.read_text() for path in self.log_dir.iterdir())
        say(f"secret value in any log: {'YES (bug)' if secret_seen else 'no'}")

    def clean_up(self) -> None:
        if self.daemon.alive():
            self.daemon.terminate(120)
        for name in leftover_containers(self.lxd, self.ghost_db) + idle_containers_of_apps(self.lxd, self.ghost_db):
            self.lxd.delete_container(name)
        made = [t.name for t in kept_templates(self.lxd) if t.name not in self.templates_before]
        if self.keep:
            say(f"\nkept (--keep): the images of jobs {', '.join(map(str, self.jobs))} and templates {made}; "
                "remove them with `lxc image delete <alias>` and `lxc config unset <template> "
                "security.protection.delete && lxc delete <template>`")  # fmt: skip
        else:
            remove_job_images(self.lxd, self.ghost_db)  # with their templates
            for name in made:
                remove_template(self.lxd, name, "the demo made it", structlog.get_logger("demo"))
        self.client.drop_database(DATABASE)  # the demo's own database, made for this run
        self.client.close()


def start_mongo() -> MongoServer:
    uri = os.environ.get(ENV_MONGODB_URI)
    if uri:
        say("MongoDB: from " + ENV_MONGODB_URI)
        return ExternalMongo(uri)
    mongo = ReplicaSetMongo(mongod_build(), Path(tempfile.mkdtemp(prefix="ghost-buildpackd-demo-mongodb-")))
    say(f"MongoDB: embedded {mongo.kind} at {mongo.uri} ({ENV_MONGODB_URI} to use another)")
    return mongo


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description="The whole flow once, then cleans up.")
    parser.add_argument("--keep", action="store_true", help="keep the image built and the templates made")
    keep = parser.parse_args(argv).keep
    configure_logging("console", "info")
    workdir = Path(tempfile.mkdtemp(prefix="ghost-buildpackd-demo-"))
    mongo = None
    demo = None
    try:
        mongo = start_mongo()
        demo = Demo(workdir, mongo, keep)
        demo.store.ping()
        ok = demo.run()
    except (RuntimeError, AssertionError, BadDocument, PyMongoError) as error:  # a timeout, the daemon's exit
        say(f"demo failed: {error}")
        ok = False
    finally:
        if demo is not None:
            demo.clean_up()
        if mongo is not None:
            mongo.close()
        shutil.rmtree(workdir, ignore_errors=True)
    say("\n" + ("demo OK: image built, buildpack run in a container, files owned by the working copy's owner, "
                "nothing left behind" if ok else "demo FAILED"))  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
