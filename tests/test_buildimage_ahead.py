"""The container build run while Packer runs: a daemon process on the real LXD builds it once Ghost's Packer
definition of the job exists, and Ghost's `buildimage` command, once the AMI is recorded, only publishes it;
changed inputs build it again; a job ending without an AMI discards it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from collections.abc import Iterator
from pathlib import Path

from bson import ObjectId

from ghost_buildpackd.lxd import ImageInfo
from ghost_buildpackd.model import BUILDIMAGE, CANCELLED, PENDING, PREPARING, READY, SUCCEEDED, Actor, Step, step_id
from ghost_buildpackd.steps.buildimage_ahead import inputs_digest, tree_listing
from ghost_buildpackd.steps.buildimage_plan import load_job_app, make_plan
from ghost_buildpackd.steps.containers import container_spec
from ghost_buildpackd.store import Store, new_step_doc
from tests.support.daemon import DaemonProcess
from tests.support.ghost import b64, make_app, make_job, set_status
from tests.support.steps import step_context, terminal_step
from tests.support.waiting import wait_until
from tests.test_buildimage_command import gcall, log_of

HOOK = "echo ahead-hook-ran-$GHOST_APP; echo baked > /baked-ahead\n"


def packer_started(ghost_dirs: dict[str, Path], job: ObjectId) -> None:
    """What Ghost 19.08's AWSImageBuilder.start_builder writes once the job's provisioner trees exist, before
    Packer runs: the job's Packer definition."""
    directory = ghost_dirs["packer_dir"] / str(job)
    directory.mkdir()
    (directory / "aws_builder.json").write_text('{"builders": [], "provisioners": []}\n')


def built_ahead(store: Store, sid: str):
    step = store.get_step(sid)
    return step if step is not None and step.state == READY and step.inputs else None


def containers_of(lxd, sid: str) -> list[str]:
    return [container.name for container in lxd.list_containers() if container.step_id == sid]


@dataclasses.dataclass
class BuiltAhead:
    app: ObjectId
    job: ObjectId
    step: Step  # as the build ahead left it: ready, its container kept
    config: Path


@contextlib.contextmanager
def built_ahead_of_the_ami(
    db, store: Store, image_alias: str, write_config, ghost_dirs, tmp_path
) -> Iterator[BuiltAhead]:
    """A daemon process; a buildimage job started; no build before Ghost's Packer definition exists; once it
    does, the build ahead of the AMI, waited for. The daemon stops cleanly at the end."""
    app = make_app(db, source_container_image=image_alias, pre_buildimage=HOOK)
    config = write_config()
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready()
        job = make_job(db, app)
        set_status(db, job, "started")
        sid = step_id(job, BUILDIMAGE)
        step = wait_until(lambda: store.get_step(sid), 30, "the build recorded as the job starts")
        assert not step.inputs and "ahead-hook-ran" not in log_of(ghost_dirs["log_dir"], job)  # no inputs yet
        packer_started(ghost_dirs, job)
        step = wait_until(lambda: built_ahead(store, sid), 120, "the build ahead of the AMI")
        yield BuiltAhead(app, job, step, config)
        assert daemon.terminate() == 0


def test_the_build_runs_while_packer_runs_and_the_ami_only_publishes_it(
    db, store: Store, lxd, image_alias, write_config, ghost_dirs, tmp_path, lxd_cleanup
):
    with built_ahead_of_the_ami(db, store, image_alias, write_config, ghost_dirs, tmp_path) as ahead:
        assert ahead.step.container and ahead.step.owner is None  # the lease released, the container kept
        assert lxd.container_status(ahead.step.container) == "Stopped"
        assert lxd.image_by_alias(str(ahead.job)) is None  # nothing published before the AMI

        db.apps.update_one({"_id": ahead.app}, {"$set": {"ami": "ami-0fresh"}})
        code, outcome, text = gcall(ahead.config, ghost_dirs["log_dir"], ahead.job)
        assert code == 0, text
        assert outcome == [f"ghost-buildpackd: container build of job {ahead.job}: succeeded in a container, exit 0"]
        assert text.count("ahead-hook-ran-shop") == 1, text  # built once, before the AMI
        assert text.index("while Packer builds the AMI") < text.index(f"{ahead.step.container} was built ahead")
        assert store.get_step(ahead.step.id).state == SUCCEEDED
        assert db.apps.find_one({"_id": ahead.app})["build_infos"]["container_image"] == str(ahead.job)
        assert lxd.image_by_alias(str(ahead.job)) is not None


def test_changed_inputs_build_again_once_the_ami_is_built(
    db, store: Store, lxd, image_alias, write_config, ghost_dirs, tmp_path, lxd_cleanup
):
    with built_ahead_of_the_ami(db, store, image_alias, write_config, ghost_dirs, tmp_path) as ahead:
        # The app's hook is edited while Packer runs: the build must bake the new one.
        hook = b64("echo second-hook-ran\n")
        db.apps.update_one({"_id": ahead.app}, {"$set": {"lifecycle_hooks.pre_buildimage": hook}})
        code, _, text = gcall(ahead.config, ghost_dirs["log_dir"], ahead.job)
        assert code == 0, text
        assert "inputs changed since it was built ahead: building again" in text
        assert text.count("second-hook-ran") == 1, text
        assert store.get_step(ahead.step.id).state == SUCCEEDED
        assert ahead.step.container not in containers_of(lxd, ahead.step.id)  # the stale container is gone


def test_a_job_ending_without_an_ami_discards_the_build_ahead(
    db, store: Store, lxd, image_alias, write_config, ghost_dirs, tmp_path, lxd_cleanup
):
    with built_ahead_of_the_ami(db, store, image_alias, write_config, ghost_dirs, tmp_path) as ahead:
        set_status(db, ahead.job, "failed", "ERROR: ami_id not found. The packer process may have failed.")
        ended = wait_until(lambda: terminal_step(store, ahead.step.id), 60, "the build cancelled")
        assert ended.state == CANCELLED and "buildimage job ended (failed)" in ended.message, ended
        wait_until(lambda: not containers_of(lxd, ahead.step.id), 60, f"container {ahead.step.container} removed")
        assert lxd.image_by_alias(str(ahead.job)) is None
        assert db.apps.find_one({"_id": ahead.app})["build_infos"].get("container_image") is None


def test_the_digest_of_a_provisioner_tree_changes_with_any_of_its_files(tmp_path: Path):
    tree = tmp_path / "salt-job"
    (tree / "formulas" / "nginx").mkdir(parents=True)
    (tree / "formulas" / "nginx" / "init.sls").write_text("nginx: pkg.installed\n")
    (tree / "top.sls").write_text("base: {'*': [nginx]}\n")
    before = tree_listing(tree)
    assert tree_listing(tree) == before  # read twice, unchanged
    (tree / "formulas" / "nginx" / "init.sls").write_text("nginx: pkg.latest\n")  # edited in place
    edited = tree_listing(tree)
    assert edited != before
    (tree / "formulas" / "nginx" / "extra.sls").write_text("")
    assert tree_listing(tree) != edited


def test_a_build_an_earlier_version_recorded_pending_for_ghosts_request_is_built_at_once(
    db, store: Store, lxd, image_alias, write_config, ghost_dirs, tmp_path, lxd_cleanup
):
    """Before builds ran ahead, Ghost's request recorded the build `pending` on its host, and a stop put a running
    build back to `pending`: after an upgrade it is built at once, though Packer's definition never comes."""
    app = make_app(db, source_container_image=image_alias, pre_buildimage=HOOK)
    job = make_job(db, app)
    set_status(db, job, "started")
    doc = new_step_doc(job, BUILDIMAGE, None, app, PENDING, "requested by Ghost's buildimage job", actor=Actor.CLIENT)
    db.container_steps.insert_one({**doc, "requested_host": socket.gethostname()})
    with DaemonProcess(write_config(), tmp_path / "daemon.log") as daemon:
        daemon.wait_ready()
        built = wait_until(lambda: terminal_step(store, doc["_id"]), 120, "the build")
        assert built.state == SUCCEEDED, built
        assert lxd.image_by_alias(str(job)) is not None
        assert daemon.terminate() == 0


def test_builds_ahead_leave_a_worker_free_and_a_stop_ends_them_at_once(db, store: Store, write_config, tmp_path):
    apps = [make_app(db, name=f"app{n}", source_container_image="busybox") for n in range(2)]
    jobs = [make_job(db, app) for app in apps]
    with DaemonProcess(write_config(workers=2), tmp_path / "daemon.log") as daemon:
        daemon.wait_ready()
        for job in jobs:
            set_status(db, job, "started")  # no Packer definition ever comes: both would wait for one
        steps = [step_id(job, BUILDIMAGE) for job in jobs]
        waiting = wait_until(lambda: [s for s in map(store.get_step, steps) if s and s.state == PREPARING], 30, "one")
        spared = wait_until(lambda: [s for s in map(store.get_step, steps) if s and s.state == READY], 30, "the other")
        assert (len(waiting), len(spared)) == (1, 1)
        assert "builds ahead hold workers already (at most workers - 1" in spared[0].message, spared[0]
        assert daemon.terminate() == 0
        assert daemon.saw("build_ahead_ended_by_shutdown", step=waiting[0].id)
        assert store.get_step(waiting[0].id).state == PENDING  # the next start builds it ahead again


def test_the_digest_follows_the_commands_the_build_runs(db, store: Store, make_config, ghost_dirs):
    app = make_app(db, features=[{"name": "nginx", "provisioner": "salt"}])
    digests = set()
    for commands in ({}, {"salt": ["salt-call", "--local", "state.highstate", "-l", "debug"]}):
        config = make_config(container={"provisioner_commands": commands})
        job = make_job(db, app)  # each its own step; the same app, an identical tree
        (ghost_dirs["provisioner_tree"] / f"salt-{job}").mkdir()
        ctx = step_context(config, store, None, job, BUILDIMAGE)
        plan = make_plan(ctx, *load_job_app(ctx))
        base = ImageInfo(fingerprint="f" * 64, aliases=(), properties={}, size=0, created_at="")
        spec = container_spec(ctx, base.fingerprint, plan.mounts)
        digests.add(inputs_digest(config, plan, base, spec))
    assert len(digests) == 2
