"""Soak: mixed Ghost traffic against two daemon instances for hours, with a MongoDB primary change and an LXD restart
every `--restart-every`; then what must hold.

    scripts/soak                                   2 hours, a step-down and an LXD restart every 20 minutes
    scripts/soak --duration 5m --restart-every 150s
    scripts/soak --duration 2m --no-lxd-restart    (LXD restarts disturb everything else using this LXD)

Set-up: a three-node replica set of real `mongod` on loopback (tests/support/mongo.py), the real LXD, two
`ghost-buildpackd run` processes (production bodies, the production 30 s lease, change streams) against
one Ghost database, on one host. Ghost's side is played by `--ghost-workers` threads (3), each running
one job after another on an app no other thread is using (4 apps, modules `api` and `worker`; `api` has
an `after_all_deploy`), as Ghost 19.08's RQ workers run them, writing `jobs` as Ghost does
(tests/support/ghost.py) and running the daemon's `buildpack` and `buildimage` commands as subprocesses
whose output goes to the job's log, as Ghost's `gcall` runs them:
- deploy (55%): job `started`; per module a fresh working copy (Ghost's clone, which takes a moment),
  then `buildpack -- JOB MODULE`; then `buildpack --script after_all_deploy -- JOB api`; job `done`;
- deploy whose `worker` script fails (8%): exit 3, the job `failed` at the first failure, as Ghost's
  `GCallException` makes it;
- deploy aborted (10%): the `api` script runs 30 s; once it has started the job ends (`failed` with
  RQ's `JobTimeoutException`, or `aborted`), and for a third of them Ghost's worker dies with the
  command (SIGKILL) first;
- deploy cancelled while `init` (7%), as Ghost's cancel writes it (`_updated` in local time);
- buildimage (15%): job `started`, the AMI (a moment), then `buildimage -- JOB`; `done` with
  `Build image OK: [ami-...]`, or `failed` when the command failed;
- buildimage aborted (5%): the command is SIGKILLed while the build runs and the job ends `failed`.
Each module script appends `start` to `.soak-runs` in the working copy, sleeps 0.2-3 s, appends `done`;
`after_all_deploy` appends `after` to `.soak-after`. Working copies are moved aside when their job
ends (Ghost deletes them at the next deploy) and read at the end.

Every `--restart-every` (from its first multiple on): the primary steps down (`replSetStepDown`); half
a period later LXD is stopped as its service manager stops it and started again
(tests/support/lxd_service.py). Both are skipped when they would fall past `--duration`. Ghost's own
writes are retried through an election (its worker would fail and a user retry).

After `--duration` no job starts; running ones finish (at most `--drain`). Then:
- steps run: step records by kind and state;
- lost: a request (a command Ghost ran and did not kill) that gave no outcome line or no known exit
  code, a step record not terminal once every job ended, a deploy module with a script and no step;
- duplicated: a working copy with `done` (or `after`) twice, a build with two `image_recorded` log
  lines or two images in LXD. `start` twice is a rerun (after an LXD restart cut a script off, as
  README says may happen), counted apart;
- unexpected outcomes: a request whose outcome is not the one its scenario makes (0 succeeded, 3 for
  the failing script, 66 cancelled for an aborted deploy);
- containers left: containers of the soak's jobs (by tag or name) once every step ended, and
  temporary templates of its images; complete templates of its images are kept by design (counted);
- RSS and open descriptors of each daemon, sampled through the run: "first" is the mean of the
  samples of the run's second tenth (after warm-up), "last" the mean of its last tenth, both under
  traffic. Flat: last <= first + max(RSS_TOLERANCE_MIB, RSS_TOLERANCE_SHARE) for RSS and
  last <= first + FDS_TOLERANCE for descriptors;
- daemons: both alive throughout, and exit 0 on SIGTERM at the end.
The exit code is 1 when lost, duplicated, unexpected outcomes or containers left are not 0, a
daemon died, or RSS or descriptors grew past the tolerance. The figures go to bench-results/<date>-soak.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from bson import ObjectId
from pymongo.database import Database
from pymongo.errors import PyMongoError
from tests.conftest import BASE_IMAGE, WORKING_COPY_IDS, leftover_containers, raw_config, remove_job_images
from tests.support import lxd_service
from tests.support.daemon import DaemonProcess
from tests.support.ghost import b64, make_app, make_job, module_doc, set_status
from tests.support.mongo import Mongod, MongoServers, ReplicaSetMongo
from tests.support.waiting import wait_until

from ghost_buildpackd.config import LxdConfig
from ghost_buildpackd.logs import configure_logging
from ghost_buildpackd.lxd import IMAGE_PROP_JOB, TAG_JOB, Lxd
from ghost_buildpackd.model import BUILDIMAGE, DEPLOY, TERMINAL, step_id
from ghost_buildpackd.upkeep.templates import TAG_TEMPLATE, TEMPLATE_NAME
from ghost_buildpackd.value_parsers import parse_duration

from .common import REPO, make_ghost_dirs, open_fds, rss_mib, table, to_json

RSS_TOLERANCE_MIB = 10.0
RSS_TOLERANCE_SHARE = 0.15
FDS_TOLERANCE = 10
LXD_STOP_GRACE = 8.0  # SIGTERM to SIGKILL, as tests/test_faults.py (Debian's lxd.service waits 30 s)
APPS = ("shop", "blog", "wiki", "shop2")
MODULES = ("api", "worker")
# Each module script: its visible effect is one `done` line per complete run in the working copy.
BUILD_PACK = (
    'echo start >> .soak-runs; sleep "$(cat .soak-sleep)"; echo done >> .soak-runs; '
    'echo "build_pack of $GHOST_MODULE_NAME done"; exit "$(cat .soak-exit)"'
)
AFTER_ALL_DEPLOY = "echo after >> .soak-after; echo after_all_deploy done"
PRE_BUILDIMAGE = "echo pre hook; mkdir -p /opt/soak"
POST_BUILDIMAGE = "echo post hook; echo built > /opt/soak/marker"
SCENARIOS = {
    "deploy": 55,
    "deploy_failing": 8,
    "deploy_aborted": 10,
    "deploy_cancelled_in_init": 7,
    "buildimage": 15,
    "buildimage_aborted": 5,
}
RQ_TIMEOUT_MESSAGE = "JobTimeoutException: Task exceeded maximum timeout value (600 seconds)"
COMMAND_TIMEOUT = "10m"  # the commands' --timeout: well past any step here, so an outcome is never a timeout
OUTCOME_PREFIX = "ghost-buildpackd: "
EXIT_STATES = {0: "succeeded", 66: "cancelled", 67: "timed out", 69: "no daemon", 65: "refused", 2: "usage"}


@dataclasses.dataclass(frozen=True)
class SoakPlan:
    """How long, how often the faults come, and how much traffic."""

    duration: float = 7200.0
    restart_every: float = 1200.0
    step_downs: bool = True
    lxd_restarts: bool = True
    ghost_workers: int = 3
    daemon_workers: int = 2
    drain: float = 300.0
    seed: int = 23


@dataclasses.dataclass
class Request:
    """One command Ghost's worker ran and waited for: `buildpack` for a module's script, or `buildimage`."""

    job: ObjectId
    scenario: str
    command: str  # buildpack | buildimage
    module: str | None = None
    script: str | None = None  # build_pack | after_all_deploy
    expected: str = "succeeded"  # succeeded | failed | cancelled | any
    exit_code: int | None = None
    outcome_lines: int = 0
    killed: bool = False  # Ghost's worker died with it: no outcome line is owed
    seconds: float = 0.0

    @property
    def step(self) -> str:
        if self.command == "buildimage":
            return step_id(self.job, BUILDIMAGE)
        return step_id(self.job, DEPLOY, self.module, self.script or "build_pack")

    @property
    def subject(self) -> str:
        if self.command == "buildimage":
            return f"container build of job {self.job}"
        return f"{self.script} of module {self.module}"


@dataclasses.dataclass
class SoakApp:
    id: ObjectId
    name: str
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


@dataclasses.dataclass
class Fault:
    kind: str  # step_down | lxd_restart
    at_s: float  # since the start of traffic
    seconds: float  # until a new primary answered / LXD answered again
    detail: str = ""


@dataclasses.dataclass
class Site:
    """Where the soak runs: the replica set, LXD, a scratch directory, the Ghost database, the base image."""

    mongo: ReplicaSetMongo
    lxd: Lxd
    scratch: Path
    db: Database
    base_image: str = BASE_IMAGE


# --- Ghost's side ------------------------------------------------------------------------------------


def ghost_write(action: Callable[[], Any], what: str) -> Any:
    """Ghost's own write, retried through an election (Ghost's worker would fail, and a user try again)."""
    result: list[Any] = []

    def attempt() -> bool:
        try:
            result.append(action())
        except PyMongoError:
            return False
        return True

    wait_until(attempt, 120, what, interval=0.2)
    return result[0]


class Ghost:
    """Ghost 19.08's workers, as far as the daemon can tell: job writes, clones, and the commands they run."""

    def __init__(self, site: Site, dirs: dict[str, Path], config: Path, plan: SoakPlan):
        self.site = site
        self.db = site.db
        self.dirs = dirs
        self.config = config
        self.plan = plan
        self.archive = dirs["root"].parent / "copies"
        self.archive.mkdir()
        self.apps = [self._make_app(name) for name in APPS]
        self.requests: list[Request] = []
        self.jobs: dict[ObjectId, str] = {}  # job -> scenario
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def _make_app(self, name: str) -> SoakApp:
        modules = [
            module_doc("api", "/srv/api", BUILD_PACK, after_all_deploy=b64(AFTER_ALL_DEPLOY)),
            module_doc("worker", "/srv/worker", BUILD_PACK),
        ]
        # The base image stands for the app's last built image until its first build.
        app = make_app(
            self.db,
            name=name,
            source_container_image=self.site.base_image,
            container_image=self.site.base_image,
            modules=modules,
            pre_buildimage=PRE_BUILDIMAGE,
            post_buildimage=POST_BUILDIMAGE,
        )
        return SoakApp(app, name)

    # --- the workers

    def run_worker(self, index: int, stop: threading.Event) -> None:
        rng = random.Random(self.plan.seed * 100 + index)
        names, weights = list(SCENARIOS), list(SCENARIOS.values())
        while not stop.is_set():
            app = self._free_app(rng)
            if app is None:
                stop.wait(0.2)
                continue
            scenario = rng.choices(names, weights)[0]
            try:
                getattr(self, scenario)(app, rng, scenario)
            except Exception as error:  # the soak goes on; the error is a figure
                with self._lock:
                    self.errors.append(f"{scenario} on {app.name}: {type(error).__name__}: {error}")
            finally:
                app.lock.release()
            stop.wait(rng.uniform(0, 1.5))  # between jobs

    def _free_app(self, rng: random.Random) -> SoakApp | None:
        for app in rng.sample(self.apps, len(self.apps)):
            if app.lock.acquire(blocking=False):
                return app
        return None

    def _new_job(self, app: SoakApp, scenario: str, command: str, **extra: Any) -> ObjectId:
        job = ghost_write(lambda: make_job(self.db, app.id, command=command, **extra), "Ghost's job insert")
        with self._lock:
            self.jobs[job] = scenario
        return job

    def _status(self, job: ObjectId, status: str, message: str = "") -> None:
        ghost_write(lambda: set_status(self.db, job, status, message), f"Ghost's status write {status}")

    # --- scenarios

    def deploy(self, app: SoakApp, rng: random.Random, scenario: str, failing: str | None = None) -> None:
        job = self._new_job(app, scenario, "deploy", modules=list(MODULES))
        self._status(job, "started")
        try:
            for module in MODULES:
                code = 3 if module == failing else 0
                self._clone(app, module, job, sleep=rng.uniform(0.2, 3.0), exit_code=code, rng=rng)
                request = self._run(job, scenario, "buildpack", module, "build_pack", "failed" if code else "succeeded")
                if request.exit_code != 0:
                    self._status(job, "failed", f"GCallException: build_pack of module {module} failed")
                    return
            self._run(job, scenario, "buildpack", "api", "after_all_deploy", "succeeded")
            self._status(job, "done", "Deployment OK")
        finally:
            self._archive(app, job)

    def deploy_failing(self, app: SoakApp, rng: random.Random, scenario: str) -> None:
        self.deploy(app, rng, scenario, failing="worker")

    def deploy_aborted(self, app: SoakApp, rng: random.Random, scenario: str) -> None:
        job = self._new_job(app, scenario, "deploy", modules=list(MODULES))
        self._status(job, "started")
        try:
            copy = self._clone(app, "api", job, sleep=30, exit_code=0, rng=rng)
            request = Request(job, scenario, "buildpack", "api", "build_pack", expected="cancelled")
            started = time.monotonic()
            with self._command(request) as process:
                # Until the script has started (a fault may hold it up: then the job ends before it runs).
                with contextlib.suppress(AssertionError):
                    wait_until(lambda: (copy / ".soak-runs").exists() or process.poll() is not None, 120, "start")
                if rng.random() < 1 / 3:
                    process.kill()  # Ghost's worker dies, its command with it
                    request.killed = True
                end = rng.choice([("failed", RQ_TIMEOUT_MESSAGE), ("aborted", "")])
                self._status(job, *end)
                self._finish(request, process, started)
        finally:
            self._archive(app, job)

    def deploy_cancelled_in_init(self, app: SoakApp, rng: random.Random, scenario: str) -> None:
        job = self._new_job(app, scenario, "deploy", modules=list(MODULES))
        # Ghost's run.py cancels a job still `init`, writing `_updated` from the local clock.
        ghost_write(
            lambda: self.db.jobs.update_one(
                {"_id": job}, {"$set": {"status": "cancelled", "message": "", "_updated": datetime.now()}}
            ),
            "Ghost's cancel",
        )

    def buildimage(self, app: SoakApp, rng: random.Random, scenario: str) -> None:
        job = self._new_job(app, scenario, "buildimage")
        self._status(job, "started")
        time.sleep(rng.uniform(0.2, 1.0))  # the AMI build, before the container build
        ami = f"ami-{rng.getrandbits(32):08x}"
        request = self._run(job, scenario, "buildimage", expected="succeeded")
        if request.exit_code == 0:
            self._status(job, "done", f"Build image OK: [{ami}]")
        else:
            self._status(job, "failed", f"An error occured during container process ({request.exit_code})")

    def buildimage_aborted(self, app: SoakApp, rng: random.Random, scenario: str) -> None:
        job = self._new_job(app, scenario, "buildimage")
        self._status(job, "started")
        request = Request(job, scenario, "buildimage", expected="any")
        started = time.monotonic()
        with self._command(request) as process:
            sid = request.step
            with contextlib.suppress(AssertionError):
                wait_until(lambda: self._step_state(sid) == "running" or process.poll() is not None, 120, "running")
            process.kill()
            request.killed = True
            self._finish(request, process, started)
        self._status(job, "failed", RQ_TIMEOUT_MESSAGE)

    # --- Ghost's clone and gcall

    def _copy_path(self, app: SoakApp, module: str) -> Path:
        return self.dirs["root"] / app.name / "prod" / "web" / module

    def _clone(
        self, app: SoakApp, module: str, job: ObjectId, sleep: float, exit_code: int, rng: random.Random
    ) -> Path:
        """A fresh working copy, as Ghost's clone makes one; the script reads how long to sleep and how to exit.

        Made aside and renamed into place: Ghost's user makes its clones, so the daemon must never see one
        owned by root (it would prepare the container for that owner, and make it again when asked).
        """
        path = self._copy_path(app, module)
        if path.exists():
            shutil.rmtree(path)
        making = path.with_name(f".{module}.cloning")
        making.mkdir(parents=True)
        files = {".soak-sleep": f"{sleep:.2f}", ".soak-exit": str(exit_code), ".soak-job": str(job)}
        for name, value in files.items():
            (making / name).write_text(value + "\n")
        for item in (making, *(making / name for name in files)):
            os.chown(item, *WORKING_COPY_IDS)
        time.sleep(rng.uniform(0.2, 1.0))  # the clone itself: what the container's preparation hides behind
        making.rename(path)
        return path

    def _archive(self, app: SoakApp, job: ObjectId) -> None:
        """The job's working copies, moved aside for the final count (Ghost deletes them at the next deploy)."""
        for module in MODULES:
            path = self._copy_path(app, module)
            if path.exists() and (path / ".soak-job").read_text().strip() == str(job):
                path.rename(self.archive / f"{job}-{module}")

    def _run(
        self,
        job: ObjectId,
        scenario: str,
        command: str,
        module: str | None = None,
        script: str | None = None,
        expected: str = "succeeded",
    ) -> Request:
        request = Request(job, scenario, command, module, script, expected)
        started = time.monotonic()
        with self._command(request) as process:
            self._finish(request, process, started)
        return request

    @contextlib.contextmanager
    def _command(self, request: Request) -> Iterator[subprocess.Popen[bytes]]:
        """The command as Ghost's gcall runs it: stdout and stderr appended to the job's log."""
        argv = [sys.executable, "-m", "ghost_buildpackd", request.command, "--config", str(self.config)]
        argv += ["--timeout", COMMAND_TIMEOUT]
        if request.script and request.script != "build_pack":
            argv += ["--script", request.script]
        argv += ["--", str(request.job)] + ([request.module] if request.module else [])
        with self._job_log(request.job).open("ab") as log:
            process = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        with self._lock:
            self.requests.append(request)
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    def _finish(self, request: Request, process: subprocess.Popen[bytes], started: float) -> None:
        try:
            request.exit_code = process.wait(timeout=parse_duration(COMMAND_TIMEOUT) + 120)
        except subprocess.TimeoutExpired:
            request.exit_code = None
        request.seconds = time.monotonic() - started
        lines = self._job_log(request.job).read_text(errors="replace").splitlines()
        request.outcome_lines = sum(1 for line in lines if line.startswith(f"{OUTCOME_PREFIX}{request.subject}: "))

    def _job_log(self, job: ObjectId) -> Path:
        return self.dirs["log_dir"] / f"{job}.txt"

    def _step_state(self, sid: str) -> str | None:
        with contextlib.suppress(PyMongoError):
            doc = self.db.container_steps.find_one({"_id": sid}, {"state": 1})
            return doc["state"] if doc else None
        return None


# --- faults and samples --------------------------------------------------------------------------------


class Faults:
    """A primary step-down at every multiple of `restart_every`, an LXD restart half a period later."""

    def __init__(self, site: Site, plan: SoakPlan):
        self.site = site
        self.plan = plan
        self.done: list[Fault] = []
        self.errors: list[str] = []

    def schedule(self) -> list[tuple[float, str]]:
        """(seconds since the start, kind), in order, within the run."""
        plan, events = self.plan, []
        at = plan.restart_every
        while at < plan.duration:
            if plan.step_downs:
                events.append((at, "step_down"))
            if plan.lxd_restarts and at + plan.restart_every / 2 < plan.duration:
                events.append((at + plan.restart_every / 2, "lxd_restart"))
            at += plan.restart_every
        return sorted(events)

    def run(self, started: float, stop: threading.Event) -> None:
        for at, kind in self.schedule():
            if stop.wait(max(0.0, started + at - time.monotonic())):
                return
            try:
                self.done.append(getattr(self, kind)(time.monotonic() - started))
            except Exception as error:
                self.errors.append(f"{kind}: {type(error).__name__}: {error}")

    def step_down(self, at: float) -> Fault:
        began = time.monotonic()
        old = self.site.mongo.step_down()
        new = wait_until(lambda: self._new_primary(old), 90, "a new primary", interval=0.1)
        assert new is not None  # wait_until returns only a truthy value
        return Fault("step_down", at, time.monotonic() - began, f"{old.host} -> {new.host}")

    def _new_primary(self, old: Mongod) -> Mongod | None:
        primary = self.site.mongo.primary()
        return primary if primary is not None and primary is not old else None

    def lxd_restart(self, at: float) -> Fault:
        began = time.monotonic()
        # Someone else on this machine may be restarting LXD right now: stop the one that comes back.
        wait_until(lxd_service.lxd_daemon_pid, 120, "an LXD daemon to stop", interval=0.5)
        try:
            lxd_service.stop(LXD_STOP_GRACE)
        finally:
            lxd_service.start()
        wait_until(lambda: _lxd_answers(self.site.lxd), 120, "LXD to answer again", interval=0.5)
        return Fault("lxd_restart", at, time.monotonic() - began)


def _lxd_answers(lxd: Lxd) -> bool:
    try:
        lxd.server_info()
    except Exception:
        return False
    return True


class Sampler:
    """RSS and open descriptors of the daemon processes, every `interval` seconds."""

    def __init__(self, processes: dict[str, DaemonProcess], interval: float):
        self.processes = processes
        self.interval = interval
        self.samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in processes}

    def sample(self, at: float) -> None:
        for name, process in self.processes.items():
            if process.alive():
                with contextlib.suppress(OSError):
                    self.samples[name].append((at, rss_mib(process.pid), open_fds(process.pid)))

    def run(self, started: float, stop: threading.Event) -> None:
        while not stop.is_set():
            self.sample(time.monotonic() - started)
            stop.wait(self.interval)


def flatness(samples: list[tuple[float, float, int]], duration: float) -> dict[str, Any]:
    """First (mean of the run's second tenth) and last (mean of its last tenth) RSS and descriptors."""
    first = [s for s in samples if duration * 0.1 <= s[0] < duration * 0.2]
    last = [s for s in samples if duration * 0.9 <= s[0] <= duration]
    if not first or not last:
        return {"samples": len(samples), "flat": False, "why": "too few samples"}
    mean = lambda rows, i: sum(row[i] for row in rows) / len(rows)  # noqa: E731
    rss_first, rss_last = mean(first, 1), mean(last, 1)
    fds_first, fds_last = mean(first, 2), mean(last, 2)
    rss_allowed = rss_first + max(RSS_TOLERANCE_MIB, rss_first * RSS_TOLERANCE_SHARE)
    fds_allowed = fds_first + FDS_TOLERANCE
    return {
        "samples": len(samples),
        "rss_first_mib": rss_first,
        "rss_last_mib": rss_last,
        "rss_max_mib": max(s[1] for s in samples),
        "rss_allowed_mib": rss_allowed,
        "fds_first": fds_first,
        "fds_last": fds_last,
        "fds_max": max(s[2] for s in samples),
        "fds_allowed": fds_allowed,
        "flat": rss_last <= rss_allowed and fds_last <= fds_allowed,
    }


# --- the run -------------------------------------------------------------------------------------------


def soak_config(site: Site, dirs: dict[str, Path], plan: SoakPlan) -> Path:
    """One config both instances read (the Ghost commands too): production lease, change streams."""
    raw = raw_config(
        site.mongo,
        site.db,
        dirs,
        lease_ttl="30s",  # the production default: a primary change must fit in it
        workers=plan.daemon_workers,
        log={"format": "json", "level": "info"},
        events={"mode": "change_stream", "poll_interval": "1s"},
        # This LXD is shared: a bound above the templates anyone makes here, so the soak's daemons never
        # evict a template they did not make (retention bounds the soak's own, ami_retention per app).
        container={"exec_timeout": "5m", "templates": 64},
        mongodb={"timeout": "10s"},
    )
    path = dirs["root"].parent / "soak.yml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_soak(site: Site, plan: SoakPlan, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the soak at `site`; the figures (see the module's docstring), with `passed`."""
    dirs = make_ghost_dirs(site.scratch / "ghost")
    config = soak_config(site, dirs, plan)
    daemons = {name: DaemonProcess(config, site.scratch / f"daemon-{name}.log") for name in ("a", "b")}
    ghost = Ghost(site, dirs, config, plan)
    faults = Faults(site, plan)
    sampler = Sampler(daemons, interval=max(2.0, plan.duration / 300))
    stop_traffic, stop_sampling = threading.Event(), threading.Event()
    exit_codes: dict[str, int | None] = {}
    try:
        for process in daemons.values():
            process.start()
        for process in daemons.values():
            process.wait_ready(120)
        progress(f"soak: two daemons ready, traffic for {plan.duration:g}s; faults at {faults.schedule()}")
        started = time.monotonic()
        threads = [threading.Thread(target=sampler.run, args=(started, stop_sampling), daemon=True)]
        threads.append(threading.Thread(target=faults.run, args=(started, stop_traffic), daemon=True))
        workers = [
            threading.Thread(target=ghost.run_worker, args=(index, stop_traffic), daemon=True)
            for index in range(plan.ghost_workers)
        ]
        for thread in threads + workers:
            thread.start()
        _wait_for_end(started, plan.duration, daemons, ghost, progress)
        stop_traffic.set()
        drained = _join_all(workers, plan.drain)
        stop_sampling.set()
        for thread in threads:
            thread.join(60)
        settled = _wait_settled(site, ghost)
        sampler.sample(time.monotonic() - started)  # after the drain, traffic over
        alive = {name: process.alive() for name, process in daemons.items()}
        for name, process in daemons.items():
            exit_codes[name] = process.terminate(90) if process.alive() else process.process.returncode  # type: ignore[union-attr]
        result = figures(site, daemons, ghost, faults, sampler, time.monotonic() - started)
        result.update(drained=drained, settled=settled, daemons_alive_at_end=alive, daemon_exit_codes=exit_codes)
        result["daemon_event_counts"] = _event_counts(daemons)
        result["passed"] = _passed(result)
        return result
    finally:
        stop_traffic.set()
        stop_sampling.set()
        for process in daemons.values():
            if process.alive():
                process.kill()
        _clean_up(site)


def _wait_for_end(
    started: float, duration: float, daemons: dict[str, DaemonProcess], ghost: Ghost, progress: Callable
) -> None:
    next_report = started + 60
    while time.monotonic() < started + duration:
        time.sleep(1)  # a clock tick of the run, not a wait for a result
        if time.monotonic() >= next_report:
            next_report += 60
            dead = [name for name, process in daemons.items() if not process.alive()]
            progress(
                f"soak: {time.monotonic() - started:.0f}s, {len(ghost.jobs)} jobs, {len(ghost.requests)} requests"
                + (f", daemon(s) {dead} exited" if dead else "")
            )


def _join_all(threads: list[threading.Thread], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return not any(thread.is_alive() for thread in threads)


def _wait_settled(site: Site, ghost: Ghost) -> bool:
    """Every step terminal and no container of the soak's jobs left, within deadlines; False when not."""
    ids = list(ghost.jobs)
    try:
        wait_until(
            lambda: (
                site.db.container_steps.count_documents({"job_id": {"$in": ids}, "state": {"$nin": list(TERMINAL)}})
                == 0
            ),
            240,
            "every step of the soak terminal",
            interval=1,
        )
        wait_until(lambda: not _containers_left(site, ghost), 120, "no container of the soak's jobs", interval=1)
    except AssertionError:
        return False
    return True


def _containers_left(site: Site, ghost: Ghost) -> list[str]:
    """Containers of the soak's jobs (tagged, or named after one), and temporary templates of its images."""
    jobs = {str(job) for job in ghost.jobs}
    ours = {image.fingerprint for image in site.lxd.list_images() if image.properties.get(IMAGE_PROP_JOB) in jobs}
    left = []
    for container in site.lxd.list_containers():
        named = any(job in container.name for job in jobs)
        temporary_template = container.tags.get(TAG_TEMPLATE) in ours and not TEMPLATE_NAME.fullmatch(container.name)
        if container.tags.get(TAG_JOB) in jobs or named or temporary_template:
            left.append(container.name)
    return left


def _templates_kept(site: Site, ghost: Ghost) -> list[str]:
    jobs = {str(job) for job in ghost.jobs}
    ours = {image.fingerprint for image in site.lxd.list_images() if image.properties.get(IMAGE_PROP_JOB) in jobs}
    return [c.name for c in site.lxd.list_containers() if c.tags.get(TAG_TEMPLATE) in ours]


# --- figures -------------------------------------------------------------------------------------------


def figures(
    site: Site, daemons: dict[str, DaemonProcess], ghost: Ghost, faults: Faults, sampler: Sampler, ran: float
) -> dict[str, Any]:
    db, plan = site.db, ghost.plan
    jobs = list(ghost.jobs)
    steps = {doc["_id"]: doc for doc in db.container_steps.find({"job_id": {"$in": jobs}})}
    by_kind_state = Counter(f"{doc.get('script', doc['kind'])}:{doc['state']}" for doc in steps.values())
    lost = _lost(ghost, steps)
    duplicated, reruns = _duplicates(site, daemons, ghost)
    unexpected = _unexpected(ghost, steps)
    left = _containers_left(site, ghost)
    memory = {name: flatness(samples, plan.duration) for name, samples in sampler.samples.items()}
    return {
        "plan": dataclasses.asdict(plan),
        "ran_s": ran,
        "jobs": dict(Counter(ghost.jobs.values())),
        "requests": len(ghost.requests),
        "requests_killed_on_purpose": sum(1 for r in ghost.requests if r.killed),
        "steps": len(steps),
        "steps_by_kind_and_state": dict(sorted(by_kind_state.items())),
        "steps_run": sum(1 for doc in steps.values() if doc["state"] in ("succeeded", "failed")),
        "exit_codes": dict(sorted(Counter(str(r.exit_code) for r in ghost.requests if not r.killed).items())),
        "lost": lost,
        "duplicated": duplicated,
        "reruns": reruns,
        "unexpected_outcomes": unexpected,
        "containers_left": left,
        "templates_kept": _templates_kept(site, ghost),
        "faults": [dataclasses.asdict(fault) for fault in faults.done],
        "fault_errors": faults.errors,
        "ghost_errors": ghost.errors,
        "memory": memory,
        "samples": {name: [list(sample) for sample in samples] for name, samples in sampler.samples.items()},
        "request_seconds": _request_seconds(ghost),
    }


def _lost(ghost: Ghost, steps: dict[str, dict[str, Any]]) -> list[str]:
    lost = []
    for request in ghost.requests:
        if request.killed:
            continue
        if request.exit_code is None or request.outcome_lines != 1:
            lost.append(f"{request.step}: exit {request.exit_code}, {request.outcome_lines} outcome line(s)")
        elif request.step not in steps:
            lost.append(f"{request.step}: the command answered exit {request.exit_code} without a step record")
    for sid, doc in steps.items():
        if doc["state"] not in TERMINAL:
            lost.append(f"{sid}: still {doc['state']}")
    started_deploys = {r.job for r in ghost.requests if r.command == "buildpack"}
    for job in started_deploys:
        for module in MODULES:
            if step_id(job, DEPLOY, module) not in steps:
                lost.append(f"{step_id(job, DEPLOY, module)}: the deploy started and no step was made")
    return lost


def _duplicates(site: Site, daemons: dict[str, DaemonProcess], ghost: Ghost) -> tuple[list[str], list[str]]:
    """Visible effects twice (duplicated), and scripts started again after being cut off (reruns)."""
    duplicated, reruns = working_copy_effects(ghost.archive)
    recorded = Counter(
        item.get("job_id")
        for process in daemons.values()
        for item in process.events()
        if item.get("event") == "image_recorded"
    )
    duplicated += [f"{job}: image recorded {count} times" for job, count in recorded.items() if count > 1]
    images = Counter(image.properties.get(IMAGE_PROP_JOB) for image in site.lxd.list_images())
    jobs = {str(job) for job in ghost.jobs}
    duplicated += [f"{job}: {count} images in LXD" for job, count in images.items() if job in jobs and count > 1]
    return duplicated, reruns


def working_copy_effects(archive: Path) -> tuple[list[str], list[str]]:
    """In the working copies moved aside: a script's `done` (or `after`) twice, and `start` twice (a rerun)."""
    duplicated, reruns = [], []
    for copy in sorted(archive.iterdir()):
        runs, after = _lines(copy / ".soak-runs"), _lines(copy / ".soak-after")
        if runs.count("done") > 1:
            duplicated.append(f"{copy.name}: build_pack done {runs.count('done')} times")
        if len(after) > 1:
            duplicated.append(f"{copy.name}: after_all_deploy ran {len(after)} times")
        if runs.count("start") > 1:
            reruns.append(f"{copy.name}: build_pack started {runs.count('start')} times")
    return duplicated, reruns


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _unexpected(ghost: Ghost, steps: dict[str, dict[str, Any]]) -> list[str]:
    """Outcomes other than the scenario's, and a script's effect after Ghost heard `cancelled`."""
    found = []
    for copy in sorted(ghost.archive.iterdir()):
        job = ObjectId(copy.name.split("-")[0])
        if ghost.jobs.get(job) == "deploy_aborted" and "done" in _lines(copy / ".soak-runs"):
            found.append(f"{copy.name}: the script ran to its end after its deploy was aborted")
    for request in ghost.requests:
        if request.killed or request.expected == "any":
            continue
        state = (steps.get(request.step) or {}).get("state")
        wanted_code = {"succeeded": 0, "failed": 3, "cancelled": 66}[request.expected]
        if request.exit_code != wanted_code or state != request.expected:
            found.append(f"{request.step} ({request.scenario}): exit {request.exit_code}, step {state}")
    return found


def _request_seconds(ghost: Ghost) -> dict[str, float]:
    done = sorted(r.seconds for r in ghost.requests if r.expected == "succeeded" and r.exit_code == 0)
    if not done:
        return {}
    return {"n": len(done), "p50": done[len(done) // 2], "max": done[-1]}


def _event_counts(daemons: dict[str, DaemonProcess]) -> dict[str, dict[str, Any]]:
    """What each daemon met, from its log: steps claimed, and its warnings and errors by event."""
    counts = {}
    for name, process in daemons.items():
        events = process.events()
        counts[name] = {
            "steps_claimed": sum(1 for item in events if item.get("event") == "step_claimed"),
            "warnings": dict(Counter(_event_name(i) for i in events if i.get("level") == "warning").most_common()),
            "errors": dict(
                Counter(_event_name(i) for i in events if i.get("level") in ("error", "critical")).most_common()
            ),
        }
    return counts


def _event_name(item: dict[str, Any]) -> str:
    """A library's record (pylxd, urllib3) carries its message as the event: its logger names it shorter."""
    return f"{item['logger']}: ..." if item.get("logger") else str(item.get("event"))


def _passed(result: dict[str, Any]) -> bool:
    return (
        not result["lost"]
        and not result["duplicated"]
        and not result["unexpected_outcomes"]
        and not result["containers_left"]
        and not result["ghost_errors"]
        and not result["fault_errors"]
        and all(result["daemons_alive_at_end"].values())
        and all(code == 0 for code in result["daemon_exit_codes"].values())
        and all(memory.get("flat") for memory in result["memory"].values())
    )


def _clean_up(site: Site) -> None:
    """Delete what the soak's jobs left in LXD (containers, images, their aliases and templates)."""
    with contextlib.suppress(Exception):
        for name in leftover_containers(site.lxd, site.db):
            site.lxd.delete_container(name)
        remove_job_images(site.lxd, site.db)


# --- report --------------------------------------------------------------------------------------------


def report(result: dict[str, Any]) -> str:
    """The figures as tables for the terminal."""
    counts = [
        ["jobs", sum(result["jobs"].values()), ", ".join(f"{k} {v}" for k, v in sorted(result["jobs"].items()))],
        ["requests", result["requests"], f"{result['requests_killed_on_purpose']} killed with Ghost's worker"],
        ["steps", result["steps"], ", ".join(f"{k} {v}" for k, v in result["steps_by_kind_and_state"].items())],
        ["steps run (succeeded or failed)", result["steps_run"], f"exit codes of the requests: {result['exit_codes']}"],
        ["scripts started again", len(result["reruns"]), "; ".join(result["reruns"][:5])],
        ["lost", len(result["lost"]), "; ".join(result["lost"][:5])],
        ["duplicated", len(result["duplicated"]), "; ".join(result["duplicated"][:5])],
        ["unexpected outcomes", len(result["unexpected_outcomes"]), "; ".join(result["unexpected_outcomes"][:5])],
        ["containers left", len(result["containers_left"]), " ".join(result["containers_left"][:5])],
        ["templates kept (by design)", len(result["templates_kept"]), ""],
        ["Ghost-side errors", len(result["ghost_errors"]), "; ".join(result["ghost_errors"][:3])],
    ]
    faults = [[f["kind"], f"{f['at_s']:.0f} s", f"{f['seconds']:.1f} s", f["detail"]] for f in result["faults"]]
    memory = [
        [
            name,
            m.get("samples"),
            f"{m.get('rss_first_mib', 0):.1f} -> {m.get('rss_last_mib', 0):.1f} MiB",
            f"{m.get('rss_max_mib', 0):.1f}",
            f"<= {m.get('rss_allowed_mib', 0):.1f}",
            f"{m.get('fds_first', 0):.1f} -> {m.get('fds_last', 0):.1f} (max {m.get('fds_max', 0)})",
            f"<= {m.get('fds_allowed', 0):.1f}",
            "yes" if m.get("flat") else f"NO {m.get('why', '')}",
        ]
        for name, m in result["memory"].items()
    ]
    return "\n\n".join(
        [
            table(f"Soak: {result['ran_s']:.0f} s, two daemons", ["figure", "count", "detail"], counts),
            table("   faults", ["fault", "at", "took", ""], faults or [["none", "", "", ""]]),
            table(
                "   daemons: RSS and descriptors, first (second tenth) -> last (last tenth)",
                ["daemon", "samples", "RSS", "max", "allowed", "descriptors", "allowed", "flat"],
                memory,
            ),
            f"   daemons alive at the end: {result['daemons_alive_at_end']}, exit codes {result['daemon_exit_codes']}",
            *(
                f"   daemon {name}: {counts['steps_claimed']} claims; warnings {counts['warnings']}; "
                f"errors {counts['errors']}"
                for name, counts in result["daemon_event_counts"].items()
            ),
            f"   soak {'PASSED' if result['passed'] else 'FAILED'}",
        ]
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=parse_duration, default=7200.0, help="traffic time (default 2h)")
    parser.add_argument(
        "--restart-every", type=parse_duration, default=1200.0, help="period of the faults (default 20m)"
    )
    parser.add_argument("--no-lxd-restart", action="store_true", help="no LXD restarts (LXD is shared)")
    parser.add_argument("--no-step-down", action="store_true", help="no MongoDB primary step-downs")
    parser.add_argument("--ghost-workers", type=int, default=3, help="Ghost workers running jobs (default 3)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the daemons' logs (kept anyway on failure)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging("console", "warning")
    plan = SoakPlan(
        duration=args.duration,
        restart_every=args.restart_every,
        step_downs=not args.no_step_down,
        lxd_restarts=not args.no_lxd_restart,
        ghost_workers=args.ghost_workers,
    )
    started = datetime.now(UTC)
    servers = MongoServers()
    scratch = Path(tempfile.mkdtemp(prefix="gbp-soak-"))
    client = None
    result: dict[str, Any] = {}
    try:
        mongo = servers.get("three_node")
        if not isinstance(mongo, ReplicaSetMongo):
            raise SystemExit(f"the soak steps a primary down: it needs its own replica set, not {mongo.kind}")
        client = mongo.client()
        db = client[f"soak_{os.getpid()}"]
        site = Site(mongo, Lxd(LxdConfig(timeout=60)), scratch, db)
        if site.lxd.image_by_alias(site.base_image) is None:
            raise SystemExit(f"base image {site.base_image!r} is missing: run scripts/build-base-image")
        result = {"started": started.isoformat(), "mongodb": mongo.kind, **run_soak(site, plan)}
    finally:
        if client is not None:
            client.close()
        servers.close()
        keep = args.keep_logs or not result.get("passed")
        if keep:
            print(f"daemon logs, working copies and configs kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(report(result))
    out = REPO / "bench-results" / (started.strftime("%Y-%m-%dT%H%M%SZ") + "-soak.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(to_json(result))
    print(f"\nresults: {out.relative_to(REPO)}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stopped soak still cleans up
    sys.exit(main())
