"""Fencing on the real LXD: an earlier attempt of a step never touches what a later one made, and a step
Ghost requested on one host never runs on another."""

from __future__ import annotations

import pytest

from ghost_buildpackd.client import run_buildpack
from ghost_buildpackd.lxd import TAG_CLAIM
from ghost_buildpackd.model import BUILDIMAGE, DEPLOY, SUCCEEDED, step_id
from ghost_buildpackd.steps import LeaseLost, clean_up_container, container_name, container_spec, launch
from ghost_buildpackd.steps import remove_leftovers as remove_step_leftovers
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
