"""Fencing by attempt on the real LXD: an earlier attempt of a step never touches what a later one made."""

from __future__ import annotations

import pytest

from ghost_buildpackd.lxd import TAG_CLAIM
from ghost_buildpackd.model import BUILDIMAGE
from ghost_buildpackd.steps import LeaseLost, clean_up_container, container_name, container_spec, launch
from ghost_buildpackd.steps import remove_leftovers as remove_step_leftovers
from tests.conftest import leftover_containers
from tests.support.ghost import make_app, make_job
from tests.support.steps import step_context, take_over_after_crash

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
