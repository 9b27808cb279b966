"""Faults against the real daemon process and the real LXD: kills, outages, hostile buildpacks, a broken log disk.

Every test runs `ghost-buildpackd run` (production step bodies) and checks
what must hold afterwards, whatever moment a fault landed on: no container
of the test's jobs left, no alias without its `container_images` record, no
step record stuck in a non-terminal state, one image per build, and the job's
outcome (succeeded after a takeover, or failed with a reason a person can act on).

Kills are aimed at phases made observable on purpose: a hook or buildpack that
waits for a file the test creates, the structured log events of the step
(`command_started`, `image_publishing`, ...) and the LXD state.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from pymongo.database import Database

from ghost_buildpackd.ghost.client import BuildpackResult, run_buildpack
from ghost_buildpackd.lxd import IMAGE_PROP_JOB, TAG_JOB, Lxd
from ghost_buildpackd.model import FAILED, SUCCEEDED, TERMINAL, step_id
from ghost_buildpackd.store import Store
from tests.conftest import WORKING_COPY_IDS, leftover_containers
from tests.support import lxd_service
from tests.support.daemon import DaemonProcess, Daemons
from tests.support.faketime import SteppedClock
from tests.support.ghost import finish_buildimage, make_app, make_job, module_doc, set_status
from tests.support.mongo import skip_unless_restartable
from tests.support.steps import state_of, terminal_step
from tests.support.waiting import wait_until

pytestmark = pytest.mark.lxd

LEASE_TTL = "3s"
FAULT_DEFAULTS = {"lease_ttl": LEASE_TTL, "workers": 2}
WAIT_FOR_GO = 'while [ ! -e "{path}" ]; do sleep 0.1; done'  # blocks until the test creates the file
BUILDPACK_LABEL = "buildpack of module api"


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def daemons(daemons):
    """The shared fixture with the fault tests' defaults (short leases, two workers)."""
    return lambda **overrides: daemons(**{**FAULT_DEFAULTS, **overrides})


def event_of(process: DaemonProcess, event: str, job: ObjectId, **fields: Any) -> dict[str, Any] | None:
    return process.saw(event, job_id=str(job), **fields)


def freeze(process: DaemonProcess) -> None:
    """SIGSTOP: the daemon stops exactly where it is (LXD carries on with what it was asked)."""
    os.kill(process.pid, signal.SIGSTOP)


def thaw(process: DaemonProcess) -> None:
    os.kill(process.pid, signal.SIGCONT)


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def assert_nothing_left(lxd: Lxd, db: Database, store: Store) -> None:
    """The invariants every fault must leave intact."""
    # The daemon deletes a finished step's stopped container right after recording the outcome.
    wait_until(lambda: leftover_containers(lxd, db) == [], 30, "no container of this test's jobs left behind")
    jobs = all_job_ids(db)
    stuck = [(doc["_id"], doc["state"]) for doc in store.steps.find() if doc["state"] not in TERMINAL]
    assert stuck == [], "a step record is stuck in a non-terminal state"
    records = {record.alias: record for record in store.image_records(state=None)}
    for image in lxd.list_images():
        job = image.properties.get(IMAGE_PROP_JOB)
        if job in {str(j) for j in jobs}:
            assert records.get(job) is not None, f"image {image.fingerprint[:12]} of job {job} has no record"
            assert records[job].fingerprint == image.fingerprint, f"a second image of job {job}"
            assert image.aliases == (job,), f"image of job {job} has aliases {image.aliases}"
    for job in jobs:
        aliased = lxd.image_by_alias(str(job))
        if aliased is not None:
            assert str(job) in records, f"stale alias {job}: no container_images record"


def containers_of_job(lxd: Lxd, job: ObjectId) -> list[str]:
    """Containers tagged with `job` (asks LXD only, so it works while MongoDB is down)."""
    return [c.name for c in lxd.list_containers() if c.tags.get(TAG_JOB) == str(job)]


def all_job_ids(db: Database) -> list[ObjectId]:
    return [job["_id"] for job in db.jobs.find({}, {"_id": 1})]


def images_of_job(lxd: Lxd, job: ObjectId) -> list[str]:
    return [i.fingerprint for i in lxd.list_images() if i.properties.get(IMAGE_PROP_JOB) == str(job)]


# --- buildimage: SIGKILL in each phase ----------------------------------------------------------


def buildimage_app(db: Database, base_image: str, pre_hook: str = "") -> ObjectId:
    """An app whose salt feature mounts the job's provisioner tree at /srv/salt (the hooks can wait on it)."""
    return make_app(
        db,
        source_container_image=base_image,
        pre_buildimage=pre_hook or "echo pre hook ran",
        post_buildimage="echo post hook ran; mkdir -p /opt/app; echo built > /opt/app/marker",
        features=[{"name": "nginx", "version": "1", "provisioner": "salt"}],
    )


def buildimage_job(db: Database, app: ObjectId, provisioner_tree: Path) -> ObjectId:
    job = make_job(db, app)
    (provisioner_tree / f"salt-{job}").mkdir()
    return job


def features_config(**container: Any) -> dict[str, Any]:
    """The salt features install is a shell command here (the base image has no salt)."""
    return {"provisioner_commands": {"salt": ["sh", "-c", "echo features installed"]}, **container}


def kill_buildimage(phase: str, process: DaemonProcess, lxd: Lxd, store: Store, mongo: Any, job: ObjectId) -> bool:
    """Kill the daemon in `phase` of the build of `job`; returns whether the image record existed then."""
    alias = str(job)
    if phase == "creating":
        wait_until(lambda: event_of(process, "container_creating", job), 60, "the container being created")
    elif phase == "hooks":
        wait_until(
            lambda: event_of(process, "command_started", job, label="pre_buildimage hook"), 60, "the pre hook running"
        )
    elif phase == "publishing":
        wait_until(lambda: event_of(process, "image_publishing", job), 60, "the publication starting")
    elif phase == "cleaning":
        # The alias is set right after the publication; the container is deleted next, then the records.
        wait_until(lambda: lxd.image_by_alias(alias), 60, "the alias of the published image", interval=0.01)
    elif phase == "recording":
        wait_until(lambda: lxd.image_by_alias(alias), 60, "the alias of the published image", interval=0.01)
        freeze(process)
        mongo.stop()  # the record writes cannot happen now
        thaw(process)
        wait_until(lambda: not containers_of_job(lxd, job), 60, "the container to be cleaned up")
    process.kill()
    if phase == "recording":
        mongo.start()
    return store.get_image_record(alias) is not None


def build_held_in_pre_hook(
    db: Database, base_image: str, tree: Path, group: Daemons
) -> tuple[ObjectId, DaemonProcess, ObjectId]:
    """A daemon of `group` building an image, its pre hook running and waiting for `go` in the job's tree."""
    app = buildimage_app(db, base_image, WAIT_FOR_GO.format(path="/srv/salt/go"))
    process = group.start()
    job = buildimage_job(db, app, tree)
    finish_buildimage(db, job)
    wait_until(lambda: event_of(process, "command_started", job, label="pre_buildimage hook"), 60, "the pre hook")
    return app, process, job


PHASES = ["creating", "hooks", "publishing", "cleaning", "recording"]


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_sigkill_during_buildimage_then_takeover_builds_exactly_one_image(
    phase, mongo, db, store, lxd, base_image, ghost_dirs, daemons, lxd_cleanup
):
    if phase == "recording":
        skip_unless_restartable(mongo)
    tree = ghost_dirs["provisioner_tree"]
    go = "/srv/salt/go"
    # The hooks phase blocks on a file in the mounted provisioner tree; publishing gets a payload that takes a while.
    hooks = {
        "hooks": WAIT_FOR_GO.format(path=go) + "; echo released",
        "publishing": "mkdir -p /opt && head -c 6000000 /dev/urandom > /opt/payload",
    }
    app = buildimage_app(db, base_image, hooks.get(phase, ""))
    group = daemons(container=features_config(publish_compression="xz" if phase == "publishing" else "none"))
    first = group.start()
    job = buildimage_job(db, app, tree)
    finish_buildimage(db, job, ami_id="ami-0fa17")
    recorded_at_kill = kill_buildimage(phase, first, lxd, store, mongo, job)

    if phase == "hooks":
        (tree / f"salt-{job}" / "go").touch()
    second = group.start()
    step = wait_until(lambda: terminal_step(store, step_id(job, "buildimage")), 120, "the step after the takeover")

    assert step.state == SUCCEEDED, step.message
    assert step.attempts >= 2, "the step was not taken over"
    if phase == "recording":
        assert not recorded_at_kill, "the kill was meant to land before the records were written"
    if recorded_at_kill:
        assert "published by an earlier attempt" in step.message
    images = images_of_job(lxd, job)
    assert len(images) == 1, f"expected one image of the job, got {images}"
    record = store.get_image_record(str(job))
    assert record is not None and record.fingerprint == images[0]
    assert store.steps.find_one({"_id": step.id})["fingerprint"] == images[0]
    assert db.apps.find_one({"_id": app})["build_infos"]["container_image"] == str(job)
    assert second.alive()
    assert second.terminate() == 0
    assert_nothing_left(lxd, db, store)


# --- deploy: SIGKILL in each phase ----------------------------------------------------------------


def deploy_app(db: Database, base_image: str, build_pack: str) -> ObjectId:
    # The base image stands for the app's last built image: a deploy needs no build first.
    return make_app(db, container_image=base_image, modules=[module_doc("api", "/srv/api", build_pack)])


def working_copy(root: Path) -> Path:
    path = root / "shop" / "prod" / "web" / "api"
    path.mkdir(parents=True)
    os.chown(path, *WORKING_COPY_IDS)
    return path


class Client:
    """Ghost's deploy worker asking for the buildpack, in a thread (it blocks until the outcome)."""

    def __init__(self, db: Database, job: ObjectId, timeout: float = 120, ghost_root: Path | None = None):
        self.result: BuildpackResult | None = None
        self.error: BaseException | None = None
        self.ghost_root = ghost_root
        self.thread = threading.Thread(target=self._run, args=(db, job, timeout), daemon=True)
        self.thread.start()

    def _run(self, db: Database, job: ObjectId, timeout: float) -> None:
        try:
            extra = {"ghost_root": self.ghost_root} if self.ghost_root else {}
            self.result = run_buildpack(db, job, "api", timeout=timeout, poll_interval=0.2, **extra)
        except BaseException as error:
            self.error = error

    def outcome(self, timeout: float = 150) -> BuildpackResult:
        self.thread.join(timeout)
        assert self.error is None, f"the client raised {self.error!r}"
        assert self.result is not None, "the client did not return"
        return self.result


BUILDPACK = "echo start >> runs.log; " + WAIT_FOR_GO.format(path="go") + "; echo end >> runs.log; echo buildpack done"


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["preparing", "buildpack", "recording", "cleaning"])
def test_sigkill_during_deploy_then_takeover_runs_the_buildpack(
    phase, mongo, db, store, lxd, base_image, ghost_dirs, daemons, lxd_cleanup
):
    if phase == "recording":
        skip_unless_restartable(mongo)
    app = deploy_app(db, base_image, BUILDPACK)
    group = daemons()
    first = group.start()
    job = make_job(db, app, command="deploy", modules=["api"])
    sid = step_id(job, "deploy", "api")
    copy = working_copy(ghost_dirs["root"])
    if phase not in ("buildpack", "recording"):
        (copy / "go").touch()
    set_status(db, job, "started")
    if phase == "preparing":
        wait_until(lambda: event_of(first, "container_creating", job), 60, "the container being prepared")
        first.kill()
        group.start()
        wait_until(lambda: state_of(store, sid) == "ready", 60, "the step prepared after the takeover")
        client = Client(db, job)
    else:
        wait_until(lambda: state_of(store, sid) == "ready", 60, "the step prepared")
        client = Client(db, job)
        if phase in ("buildpack", "recording"):  # the command runs once its first line wrote
            wait_until(lambda: event_of(first, "command_started", job, label=BUILDPACK_LABEL), 60, "the buildpack")
            wait_until(lambda: (copy / "runs.log").exists(), 60, "the buildpack to start")
        if phase == "recording":  # the buildpack ends while MongoDB is down: its outcome cannot be recorded
            mongo.stop()
            (copy / "go").touch()
            wait_until(lambda: event_of(first, "mongodb_unavailable_retrying", job), 60, "the outcome's record")
        elif phase == "cleaning":  # the outcome is recorded; the container's stop and deletion follow
            wait_until(lambda: terminal_step(store, sid), 60, "the outcome recorded", interval=0.01)
        first.kill()
        if phase == "recording":
            mongo.start()
        second = group.start()
        if phase == "buildpack":
            wait_until(lambda: event_of(second, "command_started", job, label=BUILDPACK_LABEL), 60, "the rerun")
            (copy / "go").touch()

    result = client.outcome()
    assert result.state == SUCCEEDED, result
    assert "buildpack done" in result.output_tail
    runs = (copy / "runs.log").read_text().split()
    if phase == "preparing":
        assert runs == ["start", "end"]
    elif phase == "buildpack":
        # The killed attempt's buildpack must not carry on beside the new one.
        assert runs == ["start", "start", "end"], runs
    elif phase == "recording":
        # Its outcome never reached the record: the successor runs the buildpack again, in a new container.
        assert runs == ["start", "end", "start", "end"], runs
        assert second.saw("deploy_run_taken_over", job_id=str(job)), "the used container was not replaced"
    else:
        # Killed while deleting the container of a recorded outcome: the buildpack does not run again.
        assert runs == ["start", "end"], runs
    set_status(db, job, "done")
    assert_nothing_left(lxd, db, store)


@pytest.mark.slow
def test_a_committed_build_pack_whose_outcome_was_not_recorded_runs_again_not_the_stored_one(
    mongo, db, store, lxd, base_image, ghost_dirs, daemons, lxd_cleanup
):
    """Killed after the committed script ran, before its outcome was recorded: the successor runs the same file."""
    skip_unless_restartable(mongo)
    app = deploy_app(db, base_image, "echo stored >> runs.log; echo stored build_pack ran")
    group = daemons()
    first = group.start()
    job = make_job(db, app, command="deploy", modules=["api"])
    sid = step_id(job, "deploy", "api")
    copy = working_copy(ghost_dirs["root"])
    committed = copy / "build_pack"
    committed.write_text(BUILDPACK.replace("start", "committed"))
    os.chown(committed, *WORKING_COPY_IDS)
    set_status(db, job, "started")
    wait_until(lambda: state_of(store, sid) == "ready", 60, "the step prepared")
    client = Client(db, job, ghost_root=ghost_dirs["root"])
    wait_until(lambda: (copy / "runs.log").exists(), 60, "the committed build_pack to start")
    mongo.stop()  # the build_pack ends while MongoDB is down: its outcome cannot be recorded
    (copy / "go").touch()
    wait_until(lambda: event_of(first, "mongodb_unavailable_retrying", job), 60, "the outcome's record")
    first.kill()
    mongo.start()
    second = group.start()

    result = client.outcome()
    assert result.state == SUCCEEDED, result
    assert (copy / "runs.log").read_text().split() == ["committed", "end", "committed", "end"]
    assert second.saw("deploy_run_taken_over", job_id=str(job))
    # Removed as Ghost does (`rm -vf`), once the outcome is known: never before a run that may be repeated.
    assert not committed.exists()
    set_status(db, job, "done")
    assert_nothing_left(lxd, db, store)


# --- a holder paused past its lease (SIGSTOP, a VM pause, heavy swapping) ----------------------------

PAUSE_TTL = 6.0


@pytest.mark.slow
def test_a_holder_paused_past_its_lease_leaves_the_successor_alone(db, store, lxd, base_image, ghost_dirs, daemons):
    """Frozen for three times the TTL during a buildpack; the successor's run is the one that counts."""
    app = deploy_app(db, base_image, BUILDPACK)
    copy = working_copy(ghost_dirs["root"])
    group = daemons(lease_ttl=f"{PAUSE_TTL:g}s")
    holder = group.start()
    job = make_job(db, app, command="deploy", modules=["api"])
    sid = step_id(job, "deploy", "api")
    set_status(db, job, "started")
    wait_until(lambda: state_of(store, sid) == "ready", 60, "the step prepared")
    client = Client(db, job, timeout=240)
    wait_until(lambda: event_of(holder, "command_started", job, label=BUILDPACK_LABEL), 60, "the buildpack")
    wait_until(lambda: (copy / "runs.log").exists(), 60, "the buildpack to start")
    successor = group.start()

    freeze(holder)
    frozen_at = time.monotonic()
    try:
        wait_until(lambda: event_of(successor, "command_started", job, label=BUILDPACK_LABEL), 60, "the takeover")
        theirs = store.get_step(sid).container
        wait_until(lambda: time.monotonic() >= frozen_at + 3 * PAUSE_TTL, 60, "three times the TTL", interval=0.2)
    finally:
        thaw(holder)
    thawed_at = len(holder.events())
    wait_until(lambda: holder.saw("step_abandoned_lease_lost", since=thawed_at), 60, "the holder to give up")

    assert lxd.container_status(theirs) == "Running", "the resumed holder touched its successor's container"
    assert (copy / "runs.log").read_text().split() == ["start", "start"]
    (copy / "go").touch()
    result = client.outcome(200)

    assert result.state == SUCCEEDED, result
    assert "buildpack done" in result.output_tail
    # The holder's run was cut off with its container; the successor's ran to its end.
    assert (copy / "runs.log").read_text().split() == ["start", "start", "end"]
    wait_until(lambda: event_of(successor, "step_succeeded", job), 30, "the successor's outcome in its log")
    assert not successor.saw("lease_lost", step=sid) and not successor.saw("lease_expired_locally", step=sid)
    assert not event_of(holder, "step_succeeded", job) and not event_of(holder, "step_failed", job)
    stopped_acting = holder.saw("lease_expired_locally", since=thawed_at) or holder.saw("lease_lost", since=thawed_at)
    assert stopped_acting, "the holder did not notice it had lost its lease"
    assert holder.alive() and successor.alive()
    set_status(db, job, "done")
    assert_nothing_left(lxd, db, store)


# --- a step of one instance's wall clock (an NTP step, `date -s`) ------------------------------------

CLOCK_STEP = 45.0  # seconds, far more than the lease's TTL
CLOCK_TTL = 6.0


def instance_record(store: Store, process: DaemonProcess) -> dict[str, Any] | None:
    return store.instances.find_one({"info.pid": process.pid})


def heartbeats_after(store: Store, process: DaemonProcess, count: int) -> None:
    """Wait for `count` more heartbeats of `process` (each is followed by its measurement of MongoDB's clock)."""
    for _ in range(count):
        last = (instance_record(store, process) or {}).get("seen_at")
        wait_until(
            lambda last=last: (instance_record(store, process) or {}).get("seen_at") != last,
            30,
            "the next heartbeat",
            interval=0.2,
        )


@pytest.mark.slow
@pytest.mark.parametrize(("stepped", "step"), [("other", CLOCK_STEP), ("holder", -CLOCK_STEP)])
def test_a_step_of_one_instances_wall_clock_leaves_a_healthy_lease_alone(
    stepped, step, db, store, lxd, base_image, ghost_dirs, daemons, tmp_path
):
    """During a buildpack, the other instance's clock jumps ahead, or the holder's jumps back, three times:
    the lease is never taken, the buildpack runs once."""
    app = deploy_app(db, base_image, BUILDPACK)
    copy = working_copy(ghost_dirs["root"])
    clocks = {name: SteppedClock(tmp_path / f"clock-{name}") for name in ("holder", "other")}
    group = daemons(lease_ttl=f"{CLOCK_TTL:g}s")
    holder = group.start(env=clocks["holder"].env())
    job = make_job(db, app, command="deploy", modules=["api"])
    sid = step_id(job, "deploy", "api")
    set_status(db, job, "started")
    wait_until(lambda: state_of(store, sid) == "ready", 60, "the step prepared")
    client = Client(db, job, timeout=240)
    wait_until(lambda: event_of(holder, "command_started", job, label=BUILDPACK_LABEL), 60, "the buildpack")
    wait_until(lambda: (copy / "runs.log").exists(), 60, "the buildpack to start")
    other = group.start(env=clocks["other"].env())
    held = store.get_step(sid)
    for process in (holder, other):  # the clock each reads is the one the test steps
        assert "libfaketime" in Path(f"/proc/{process.pid}/maps").read_text()

    for _ in range(3):  # each step, until the instance measures MongoDB's clock again, was a window for a takeover
        clocks[stepped].step(step)
        heartbeats_after(store, holder if stepped == "holder" else other, 2)

    assert not event_of(other, "step_claimed", job), "the other instance took a healthy lease"
    now = store.get_step(sid)
    assert (now.claim, now.lease_token) == (held.claim, held.lease_token), "the lease changed hands"
    assert (copy / "runs.log").read_text().split() == ["start"], "the buildpack was started again"
    (copy / "go").touch()
    result = client.outcome(200)

    assert result.state == SUCCEEDED, result
    assert (copy / "runs.log").read_text().split() == ["start", "end"]
    assert store.get_step(sid).claim == held.claim
    assert not holder.saw("lease_lost", step=sid) and not holder.saw("lease_expired_locally", step=sid)
    assert holder.alive() and other.alive()
    set_status(db, job, "done")
    assert_nothing_left(lxd, db, store)


# --- hostile buildpacks: bounded by the container limits and the exec timeout ------------------------


def run_one_deploy(
    group: Daemons, db: Database, store: Store, base_image: str, root: Path, build_pack: str
) -> tuple[DaemonProcess, ObjectId, BuildpackResult, int]:
    """Start a daemon, prepare the deploy step of module `api`, ask for it as Ghost does; also the RSS before."""
    app = deploy_app(db, base_image, build_pack)
    working_copy(root)
    process = group.start()
    job = make_job(db, app, command="deploy", modules=["api"])
    set_status(db, job, "started")
    wait_until(lambda: state_of(store, step_id(job, "deploy", "api")) == "ready", 60, "the step prepared")
    rss_before = vm_rss_kib(process.pid)
    result = run_buildpack(db, job, "api", timeout=150, poll_interval=0.2)
    return process, job, result, rss_before


def test_fork_bomb_is_bounded_by_the_process_limit(db, store, lxd, base_image, ghost_dirs, daemons):
    fork_bomb = (
        'i=0; while [ $i -lt 300 ]; do sleep 60 </dev/null >/dev/null 2>&1 & i=$((i+1)); done; echo "all forked"'
    )
    group = daemons(container={"limits": {"processes": 30}})
    process, _job, result, _ = run_one_deploy(group, db, store, base_image, ghost_dirs["root"], fork_bomb)

    assert result.state == FAILED, result
    assert "can't fork" in result.output_tail or "Resource temporarily unavailable" in result.output_tail
    assert "all forked" not in result.output_tail
    assert process.alive()
    assert_nothing_left(lxd, db, store)


def test_memory_hog_is_bounded_by_the_memory_limit(db, store, lxd, base_image, ghost_dirs, daemons):
    hog = "x=$(head -c 400000000 /dev/zero | tr '\\0' a); echo \"survived with ${#x} bytes\""
    group = daemons(container={"limits": {"memory": "64MiB"}})
    process, _job, result, _ = run_one_deploy(group, db, store, base_image, ghost_dirs["root"], hog)

    assert result.state == FAILED, result
    assert "survived" not in result.output_tail
    assert result.exit_code == 137, result.message  # SIGKILLed by the kernel OOM killer of the container
    assert "out of memory under container.limits.memory" in result.message
    assert process.alive()
    assert_nothing_left(lxd, db, store)


def test_100mb_of_output_keeps_the_daemon_memory_flat_and_the_job_log_bounded(
    db, store, lxd, base_image, ghost_dirs, daemons
):
    line = "0123456789" * 9  # 91 bytes a line with its newline
    noisy = f"echo FIRST-LINE; yes {line} | head -c 100000000; echo; echo LAST-LINE"
    group = daemons(container={"output_head": "64KiB", "output_tail": "16KiB", "exec_timeout": "150s"})
    process, job, result, rss_before = run_one_deploy(group, db, store, base_image, ghost_dirs["root"], noisy)
    rss_after = vm_rss_kib(process.pid)

    assert result.state == SUCCEEDED, result
    assert "LAST-LINE" in result.output_tail
    assert rss_after - rss_before < 40 * 1024, f"daemon RSS grew from {rss_before} to {rss_after} KiB"
    job_log = ghost_dirs["log_dir"] / f"{job}.txt"
    assert job_log.stat().st_size < 256 * 1024
    text = job_log.read_text()
    assert "FIRST-LINE" in text and "LAST-LINE" in text
    assert "bytes of output omitted (kept the first and last part)" in text
    assert process.saw("output_truncated", job_id=str(job))
    assert_nothing_left(lxd, db, store)


def test_buildpack_that_never_exits_is_killed_at_the_exec_timeout(db, store, lxd, base_image, ghost_dirs, daemons):
    group = daemons(container={"exec_timeout": "3s"})
    process, _job, result, _ = run_one_deploy(
        group, db, store, base_image, ghost_dirs["root"], "echo waiting forever; sleep 100000"
    )

    assert result.state == FAILED, result
    assert "did not finish within 3s (killed)" in result.message
    assert result.exit_code is None
    assert "waiting forever" in result.output_tail
    assert process.alive()
    assert_nothing_left(lxd, db, store)


# --- the disk under ghost.log_dir ---------------------------------------------------------------------


def test_unwritable_job_log_does_not_stop_the_step_and_the_problem_is_recorded(
    db, store, lxd, base_image, ghost_dirs, daemons
):
    app = deploy_app(db, base_image, "echo buildpack ran; touch made")
    copy = working_copy(ghost_dirs["root"])
    process = daemons().start()
    job = make_job(db, app, command="deploy", modules=["api"])
    # Tests run as root, so permissions would not stop the write: a directory where the log file goes does.
    (ghost_dirs["log_dir"] / f"{job}.txt").mkdir()
    set_status(db, job, "started")
    wait_until(lambda: state_of(store, step_id(job, "deploy", "api")) == "ready", 60, "the step prepared")
    result = run_buildpack(db, job, "api", timeout=120, poll_interval=0.2)

    assert result.state == SUCCEEDED, result
    assert (copy / "made").exists()
    assert "cannot write Ghost job log" in result.message
    assert process.saw("job_log_unwritable")
    assert_nothing_left(lxd, db, store)


# --- MongoDB stopped and started again during steps --------------------------------------------------

# An outage shorter than the lease is ridden out; past the lease's margin the holder gives the step up
# (it cannot tell a successor is not taking it over), and the step runs again once MongoDB is back.
OUTAGE_TTL = "90s"


@pytest.mark.slow
def test_mongodb_outage_during_a_buildimage_step_is_ridden_out(mongo, db, store, lxd, base_image, ghost_dirs, daemons):
    skip_unless_restartable(mongo)
    tree = ghost_dirs["provisioner_tree"]
    group = daemons(lease_ttl=OUTAGE_TTL, container=features_config())
    app, process, job = build_held_in_pre_hook(db, base_image, tree, group)
    mongo.stop()
    try:
        wait_until(lambda: process.saw("mongodb_unavailable_retrying"), 30, "the daemon to notice the outage")
        (tree / f"salt-{job}" / "go").touch()  # the build goes on without MongoDB up to its records
        wait_until(lambda: lxd.image_by_alias(str(job)), 60, "the image published during the outage")
    finally:
        mongo.start()
    step = wait_until(lambda: terminal_step(store, step_id(job, "buildimage")), 90, "the step after the outage")

    assert step.state == SUCCEEDED, step.message
    assert step.attempts == 1, "the step was run again instead of ridden through the outage"
    assert len(images_of_job(lxd, job)) == 1
    assert db.apps.find_one({"_id": app})["build_infos"]["container_image"] == str(job)
    assert process.alive()
    assert_nothing_left(lxd, db, store)


@pytest.mark.slow
def test_mongodb_outage_during_a_buildpack_is_ridden_out_by_daemon_and_client(
    mongo, db, store, lxd, base_image, ghost_dirs, daemons
):
    skip_unless_restartable(mongo)
    app = deploy_app(db, base_image, BUILDPACK)
    copy = working_copy(ghost_dirs["root"])
    process = daemons(lease_ttl=OUTAGE_TTL).start()
    job = make_job(db, app, command="deploy", modules=["api"])
    set_status(db, job, "started")
    wait_until(lambda: state_of(store, step_id(job, "deploy", "api")) == "ready", 60, "the step prepared")
    client = Client(db, job)
    wait_until(lambda: (copy / "runs.log").exists(), 60, "the buildpack to start")
    mongo.stop()
    try:
        wait_until(lambda: process.saw("mongodb_unavailable_retrying"), 30, "the daemon to notice the outage")
        (copy / "go").touch()
        wait_until(
            lambda: event_of(process, "command_succeeded", job, label=BUILDPACK_LABEL), 60, "the buildpack to end"
        )
    finally:
        mongo.start()
    result = client.outcome()

    assert result.state == SUCCEEDED, result
    assert (copy / "runs.log").read_text().split() == ["start", "end"]
    assert process.alive()
    set_status(db, job, "done")
    assert_nothing_left(lxd, db, store)


@pytest.mark.slow
def test_takeover_that_cannot_succeed_fails_with_the_reason_and_leaves_nothing(
    db, store, lxd, base_image, ghost_dirs, daemons
):
    """Killed during the hooks; meanwhile Ghost removed the job's provisioner tree: the successor fails, cleanly."""
    tree = ghost_dirs["provisioner_tree"]
    group = daemons(container=features_config())
    app, first, job = build_held_in_pre_hook(db, base_image, tree, group)
    first.kill()
    (tree / f"salt-{job}").rmdir()  # Ghost cleans its provisioner trees up after the job
    group.start()
    step = wait_until(lambda: terminal_step(store, step_id(job, "buildimage")), 90, "the step after the takeover")

    assert step.state == FAILED
    assert f"provisioner tree {tree / f'salt-{job}'} does not exist" in step.message
    assert images_of_job(lxd, job) == []
    assert lxd.image_by_alias(str(job)) is None
    assert "container_image" not in db.apps.find_one({"_id": app})["build_infos"]
    assert_nothing_left(lxd, db, store)


# --- LXD stopped and started again during steps ------------------------------------------------------

LXD_STOP_GRACE = 8.0  # SIGTERM to SIGKILL, as systemd's TimeoutStopSec (30 s for Debian's lxd.service)


def restart_lxd_during(process: DaemonProcess, job: ObjectId, while_stopping: Callable[[], Any] | None = None) -> None:
    """Stop LXD as its service manager does, see the step wait for it, start LXD again."""
    try:
        lxd_service.stop(LXD_STOP_GRACE, while_stopping)
        wait_until(lambda: event_of(process, "lxd_unavailable_step_waits", job), 60, "the step to wait for LXD")
    finally:
        lxd_service.start()
    wait_until(lambda: event_of(process, "lxd_available_again", job), 60, "the step to see LXD back")


def count_events(process: DaemonProcess, event: str, job: ObjectId, **fields: Any) -> int:
    wanted = {"event": event, "job_id": str(job), **fields}
    return sum(1 for item in process.events() if all(item.get(k) == v for k, v in wanted.items()))


@pytest.mark.slow
def test_lxd_restart_during_a_buildpack_runs_it_again_in_a_new_container(
    db, store, lxd, base_image, ghost_dirs, daemons
):
    app = deploy_app(db, base_image, BUILDPACK)
    copy = working_copy(ghost_dirs["root"])
    process = daemons().start()
    job = make_job(db, app, command="deploy", modules=["api"])
    sid = step_id(job, "deploy", "api")
    set_status(db, job, "started")
    wait_until(lambda: state_of(store, sid) == "ready", 60, "the step prepared")
    client = Client(db, job)
    wait_until(lambda: (copy / "runs.log").exists(), 60, "the buildpack to start")
    # Another deploy starts while LXD is shutting down: it refuses the new container but still answers reads.
    late = make_job(db, app, command="deploy", modules=["api"])
    restart_lxd_during(process, job, while_stopping=lambda: set_status(db, late, "started"))
    wait_until(lambda: (copy / "runs.log").read_text().split() == ["start", "start"], 60, "the buildpack run again")
    (copy / "go").touch()
    result = client.outcome()
    late_step = wait_until(lambda: state_of(store, step_id(late, "deploy", "api")) == "ready", 60, "the late prepare")

    assert result.state == SUCCEEDED, result
    assert "buildpack done" in result.output_tail
    # The cut-off run must not carry on beside the new one: its container was deleted first.
    assert (copy / "runs.log").read_text().split() == ["start", "start", "end"]
    assert event_of(process, "leftover_container_removed", job), "the cut-off run's container was not deleted"
    assert store.get_step(sid).attempts == 2, "the step was released and claimed again instead of ridden through"
    # The late step waited for the new LXD, not for the first answer of the one shutting down.
    assert late_step and event_of(process, "lxd_unavailable_step_waits", late), "the late step met no outage"
    outages = count_events(process, "lxd_unavailable_step_waits", late)
    assert outages == 1, "the late step started over while LXD was still shutting down"
    assert process.alive()
    set_status(db, job, "done")
    set_status(db, late, "done")
    assert_nothing_left(lxd, db, store)


@pytest.mark.slow
def test_lxd_restart_while_a_deploy_step_is_prepared_leaves_it_requestable_and_the_run_succeeds(
    db, store, lxd, base_image, ghost_dirs, daemons
):
    """LXD is restarted once the module's container launched ahead exists in LXD (made from the image: no
    template, the longest launch): whatever LXD made of the launch, the step waits for Ghost's request, and the
    run succeeds."""
    app = deploy_app(db, base_image, "echo buildpack done")
    working_copy(ghost_dirs["root"])
    process = daemons(container={"templates": 0}).start()
    job = make_job(db, app, command="deploy", modules=["api"])
    sid = step_id(job, "deploy", "api")
    set_status(db, job, "started")
    wait_until(lambda: leftover_containers(lxd, db), 60, "the container's launch under way", interval=0.01)
    try:
        lxd_service.stop(LXD_STOP_GRACE)
    finally:
        lxd_service.start()
    prepared = wait_until(
        lambda: (step := store.get_step(sid)).owner is None and step.state not in ("pending", "preparing") and step,
        180,
        "the preparation to end",
    )
    assert prepared.state == "ready", prepared.message
    result = Client(db, job).outcome()

    assert result.state == SUCCEEDED, result
    assert "buildpack done" in result.output_tail
    assert process.alive()
    set_status(db, job, "done")
    assert_nothing_left(lxd, db, store)


@pytest.mark.slow
def test_lxd_restart_during_a_buildimage_hook_builds_exactly_one_image(db, store, lxd, base_image, ghost_dirs, daemons):
    tree = ghost_dirs["provisioner_tree"]
    app, process, job = build_held_in_pre_hook(db, base_image, tree, daemons(container=features_config()))
    restart_lxd_during(process, job)
    (tree / f"salt-{job}" / "go").touch()
    step = wait_until(lambda: terminal_step(store, step_id(job, "buildimage")), 120, "the step after the restart")

    assert step.state == SUCCEEDED, step.message
    assert step.attempts == 1, "the step was released and claimed again instead of ridden through"
    hooks_started = count_events(process, "command_started", job, label="pre_buildimage hook")
    assert hooks_started == 2, "the build did not start over after LXD came back"
    assert len(images_of_job(lxd, job)) == 1
    assert db.apps.find_one({"_id": app})["build_infos"]["container_image"] == str(job)
    assert process.alive()
    assert_nothing_left(lxd, db, store)
