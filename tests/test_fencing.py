"""Fencing on the real LXD: an earlier attempt of a step never touches what a later one made, and a step
Ghost requested on one host never runs on another."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest

from ghost_buildpackd.ghost.client import run_buildpack
from ghost_buildpackd.lxd import IMAGE_PROP_CLAIM, IMAGE_PROP_JOB, TAG_CLAIM, ContainerSpec, ImageInfo, Lxd
from ghost_buildpackd.model import BUILDIMAGE, DEPLOY, SUCCEEDED, step_id
from ghost_buildpackd.steps import LeaseLost, StepContext, clean_up_container, container_name, container_spec, launch
from ghost_buildpackd.steps import remove_leftovers as remove_step_leftovers
from ghost_buildpackd.steps.buildimage import BuildPlan, load_job_app, recover_earlier_attempt
from tests.conftest import leftover_containers
from tests.support.daemon import DaemonProcess
from tests.support.ghost import make_app, make_job, module_doc, set_status
from tests.support.steps import step_context, take_over_after_crash
from tests.support.waiting import wait_until

pytestmark = pytest.mark.lxd


def test_a_paused_holder_cannot_touch_its_successors_container(make_config, store, lxd, db, base_image, lxd_cleanup):
    config = make_config()
    job = make_job(db, make_app(db))
    base = lxd.image_by_alias(base_image).fingerprint
    paused = step_context(config, store, lxd, job, BUILDIMAGE)
    mine = launch(paused, container_spec(paused, base))

    # The holder pauses past its lease; a successor takes the step over and starts its own container.
    successor = take_over_after_crash(config, store, lxd, job, BUILDIMAGE)
    theirs = launch(successor, container_spec(successor, base))

    assert mine != theirs and (paused.step.claim, successor.step.claim) == (1, 2)
    assert theirs == container_name(successor.step)
    assert lxd.describe_container(theirs).config[TAG_CLAIM] == "2"
    assert lxd.container_status(mine) is None, "the takeover did not remove the earlier attempt's container"

    # The paused holder resumes: its clean-up, by name or by tag, and a new launch all leave the successor alone.
    assert remove_step_leftovers(paused) == []
    clean_up_container(paused, mine)
    with pytest.raises(LeaseLost):
        launch(paused, container_spec(paused, base))
    assert lxd.container_status(theirs) == "Running"
    assert leftover_containers(lxd, db) == [theirs]

    assert remove_step_leftovers(successor) == [theirs]  # its own clean-up still works


@pytest.mark.slow
def test_a_step_ghost_requests_on_one_host_never_runs_on_another_that_claimed_it_first(
    write_config, store, db, tmp_path
):
    app = make_app(db, container_image="an-image", modules=[module_doc("api", "/srv/api", "echo built")])
    # Host B claims the deploy step while it is pending (any host may, to prepare it) and, held there by the
    # test harness, makes its next move only once Ghost's request for host A has landed.
    host_b = DaemonProcess(
        write_config("b.yml", host="host-b", lease_ttl="30s"),
        tmp_path / "b.log",
        {"TEST_HOLD_CLAIM_UNTIL_REQUESTED": "1"},
        trivial_bodies=True,
    )
    config_a = write_config("a.yml", host="host-a", lease_ttl="30s")
    host_a = DaemonProcess(config_a, tmp_path / "a.log", trivial_bodies=True)
    job = make_job(db, app, command="deploy", modules=["api"])
    sid = step_id(job, DEPLOY, "api")
    try:
        host_b.start().wait_ready()
        set_status(db, job, "started")
        wait_until(lambda: host_b.saw("test_claim_held", step=sid), 60, "host B to claim the pending step")
        host_a.start().wait_ready()

        result = run_buildpack(db, job, "api", host="host-a", timeout=90, poll_interval=0.2)
    finally:
        for daemon in (host_b, host_a):
            daemon.terminate(60)

    effects = db["test_effects"].find_one({"_id": sid}) or {}
    ran_on = [instance.split(":")[0] for instance in effects.get("instances", [])]
    assert ran_on == ["host-a"], f"the script Ghost requested on host-a ran on {ran_on}"
    assert result.state == SUCCEEDED, result
    assert host_b.saw("step_left_to_requested_host", step=sid, requested_host="host-a")
    assert store.get_step(sid).attempts == 1, "host B's claim counted as an attempt of the step"


def publish_job_image(lxd: Lxd, base: str, alias: str, claim: int) -> str:
    """An image of the job `alias` as the attempt `claim` publishes it (its alias not pointed yet)."""
    source = f"gbp-fencing-{uuid.uuid4().hex[:8]}"
    lxd.create_container(ContainerSpec(name=source, image=base, tags={}))
    try:
        properties = {IMAGE_PROP_JOB: alias, IMAGE_PROP_CLAIM: str(claim), "description": f"fencing test {source}"}
        return lxd.publish(source, properties, "none").fingerprint
    finally:
        lxd.delete_container(source)


class PausedAfterSnapshot(Lxd):
    """The holder's LXD: right after its recovery reads its snapshot of images, the holder pauses (`pause`)."""

    def __init__(self, lxd: Lxd):
        super().__init__(lxd.config)
        self.pause: Callable[[], None] | None = None

    def list_images(self) -> list[ImageInfo]:
        snapshot = super().list_images()
        pause, self.pause = self.pause, None
        if pause is not None:
            pause()
        return snapshot


def build_plan(ctx: StepContext) -> BuildPlan:
    job, app = load_job_app(ctx)
    return BuildPlan(job, app, str(job.id), "", {}, [], {}, False, [])


def test_a_paused_holders_recovery_leaves_its_successors_alias(make_config, store, lxd, db, base_image, lxd_cleanup):
    config = make_config()
    job = make_job(db, make_app(db))
    alias, base = str(job), lxd.image_by_alias(base_image).fingerprint
    # An earlier run of the job left an image under the alias that no record names: recovery removes the alias.
    lxd.point_alias(alias, publish_job_image(lxd, base, alias, 0))
    paused_lxd = PausedAfterSnapshot(lxd)
    paused = step_context(config, store, paused_lxd, job, BUILDIMAGE)
    published: list[str] = []

    def pause_past_the_lease() -> None:
        successor = take_over_after_crash(config, store, lxd, job, BUILDIMAGE)
        published.append(publish_job_image(lxd, base, alias, successor.step.claim))
        lxd.point_alias(alias, published[0])
        paused.lease_valid_until = time.monotonic()  # the pause outlasted the lease: the successor could take over

    paused_lxd.pause = pause_past_the_lease
    try:
        recover_earlier_attempt(paused, build_plan(paused))
        outcome = "went on"
    except LeaseLost:
        outcome = "stopped: lease lost"

    current = lxd.image_by_alias(alias)
    assert published and current is not None, "the paused holder deleted its successor's alias"
    assert current.fingerprint == published[0], "the paused holder moved its successor's alias"
    assert outcome == "stopped: lease lost"


def test_an_alias_is_deleted_or_moved_only_from_the_image_the_caller_saw(lxd, db, base_image, lxd_cleanup):
    job = make_job(db, make_app(db))
    alias, base = str(job), lxd.image_by_alias(base_image).fingerprint
    seen, successors, recorded = (publish_job_image(lxd, base, alias, claim) for claim in (1, 2, 1))
    lxd.point_alias(alias, successors)  # moved by a successor after the caller's snapshot showed `seen`

    assert lxd.delete_alias_if(alias, seen) is False
    assert lxd.move_alias_if(alias, recorded, expected=seen) is False
    assert lxd.image_by_alias(alias).fingerprint == successors

    assert lxd.move_alias_if(alias, recorded, expected=successors) is True
    assert lxd.image_by_alias(alias).fingerprint == recorded
    assert lxd.delete_alias_if(alias, recorded) is True and lxd.image_by_alias(alias) is None
