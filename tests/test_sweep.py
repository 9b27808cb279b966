"""The orphan sweep on the real LXD: which tagged containers go, which stay; profiles are never touched.

Containers are created stopped (the sweep only reads tags and deletes), and
every one of them carries a job of this test's database, so the sweep never
touches what other tests on this LXD server own.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import pytest
from bson import ObjectId

from ghost_buildpackd.lxd import TAG_APP, TAG_JOB, TAG_KIND, TAG_OWNER, TAG_STEP, ContainerInfo, ContainerSpec, Lxd
from ghost_buildpackd.model import BUILDIMAGE, FAILED, RUNNING, SUCCEEDED, step_id
from ghost_buildpackd.store import Store, utcnow
from ghost_buildpackd.upkeep.sweep import sweep_orphans
from ghost_buildpackd.upkeep.templates import (
    ABANDONED_AFTER,
    TAG_TEMPLATE,
    adopt,
    remove_stale_templates,
    template_name,
)
from tests.support.ghost import make_app, make_job
from tests.support.profiles import delete_profile, profile_names
from tests.support.steps import seed_step

pytestmark = [pytest.mark.lxd, pytest.mark.mongodb]


class RecordingLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.events.append((event, fields))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for name, fields in self.events if name == event]


def tagged_container(lxd: Lxd, image: str, job_id: ObjectId, profiles: tuple[str, ...] = ()) -> str:
    name = f"gbp-{job_id}-b"
    tags = {
        TAG_STEP: step_id(job_id, BUILDIMAGE),
        TAG_JOB: str(job_id),
        TAG_APP: "",
        TAG_KIND: BUILDIMAGE,
        TAG_OWNER: "test-sweep",
    }
    lxd.create_container(ContainerSpec(name=name, image=image, tags=tags, profiles=profiles))
    return name


def hold_lease(store: Store, sid: str, ttl: int) -> None:
    """A lease of an instance that crashed (expired) or still works (live), written as the runner does."""
    lease = {"owner": "crashed-instance", "token": uuid.uuid4().hex, "expires_at": utcnow() + timedelta(seconds=ttl)}
    assert store.steps.update_one({"_id": sid}, {"$set": {"lease": lease}}).modified_count == 1


def remaining(lxd: Lxd, names: dict[str, str]) -> set[str]:
    existing = {container.name for container in lxd.list_containers()}
    return {role for role, name in names.items() if name in existing}


def test_sweep_removes_containers_of_missing_and_finished_steps_only(store: Store, lxd: Lxd, base_image: str) -> None:
    fingerprint = lxd.image_by_alias(base_image).fingerprint  # type: ignore[union-attr]
    app_id = make_app(store.db)
    jobs = {role: make_job(store.db, app_id) for role in ("missing", "succeeded", "failed", "live", "expired")}
    seed_step(store, jobs["succeeded"], BUILDIMAGE, app_id=app_id, state=SUCCEEDED)
    store.create_step(jobs["failed"], BUILDIMAGE, app_id=app_id, state=FAILED)
    for role, ttl in (("live", 300), ("expired", -60)):
        seed_step(store, jobs[role], BUILDIMAGE, app_id=app_id, state=RUNNING)
        hold_lease(store, step_id(jobs[role], BUILDIMAGE), ttl)
    foreign_job = ObjectId()  # a job of another Ghost database sharing this LXD server
    used_profile, unused_profile = (f"gbp-test-{uuid.uuid4().hex[:8]}" for _ in range(2))
    lxd.client.profiles.create(used_profile, config={}, devices={})
    lxd.client.profiles.create(unused_profile, config={}, devices={})
    names: dict[str, str] = {}
    try:
        for role, job_id in jobs.items():
            names[role] = tagged_container(lxd, fingerprint, job_id, (used_profile,) if role == "live" else ())
        names["foreign"] = tagged_container(lxd, fingerprint, foreign_job)

        # Debug mode keeps finished steps' containers on purpose; a missing record still goes.
        log = RecordingLog()
        assert sweep_orphans(store, lxd, keep_debug=True, log=log) == [names["missing"]]
        assert remaining(lxd, names) == {"succeeded", "failed", "live", "expired", "foreign"}
        assert log.named("orphan_container_removed") == [
            {"container": names["missing"], "step": step_id(jobs["missing"], BUILDIMAGE), "reason": "no step record"}
        ]
        # Profiles are the operator's: even an unused one named like the daemon's containers stays.
        profiles = profile_names(lxd)
        assert used_profile in profiles
        assert unused_profile in profiles

        log = RecordingLog()
        removed = sweep_orphans(store, lxd, keep_debug=False, log=log)
        assert sorted(removed) == sorted([names["succeeded"], names["failed"]])
        assert remaining(lxd, names) == {"live", "expired", "foreign"}
        reasons = {fields["container"]: fields["reason"] for fields in log.named("orphan_container_removed")}
        assert reasons == {names["succeeded"]: "step succeeded", names["failed"]: "step failed"}

    finally:
        for name in names.values():
            lxd.delete_container(name)
        for profile in (used_profile, unused_profile):
            delete_profile(lxd, profile)


class ScopedLxd(Lxd):
    """This LXD, listing only the named containers: the sweeps below judge this test's containers alone."""

    def __init__(self, lxd: Lxd, names: set[str]):
        super().__init__(lxd.config)
        self.names = names

    def list_containers(self) -> list[ContainerInfo]:
        return [c for c in super().list_containers() if c.name in self.names]


class SweptDuringAdoption(Lxd):
    """This LXD; right after adoption's first change to the container (retag or rename), the upkeep runs."""

    def __init__(self, lxd: Lxd, sweep: Callable[[], None]):
        super().__init__(lxd.config)
        self.sweep: Callable[[], None] | None = sweep

    def _after_change(self) -> None:
        sweep, self.sweep = self.sweep, None
        if sweep is not None:
            sweep()

    def retag_container(self, name: str, tags: Mapping[str, str], protect: bool = False) -> None:
        super().retag_container(name, tags, protect)
        self._after_change()

    def rename_container(self, name: str, new_name: str) -> None:
        super().rename_container(name, new_name)
        self._after_change()


def test_the_upkeep_leaves_a_build_container_being_adopted_as_template(store: Store, lxd: Lxd, base_image: str) -> None:
    fingerprint = lxd.image_by_alias(base_image).fingerprint  # type: ignore[union-attr]
    app_id = make_app(store.db)
    job = make_job(store.db, app_id)
    seed_step(store, job, BUILDIMAGE, app_id=app_id, state=RUNNING)  # the build keeps its container as it ends
    hold_lease(store, step_id(job, BUILDIMAGE), 300)
    profile = f"gbp-test-{uuid.uuid4().hex[:8]}"  # a template name of this test's own
    lxd.client.profiles.create(profile, config={}, devices={})
    container = tagged_container(lxd, fingerprint, job, (profile,))
    spec = ContainerSpec(name=container, image=fingerprint, tags={}, profiles=(profile,))
    template = template_name(spec)
    ours = ScopedLxd(lxd, {container, template})
    log = RecordingLog()

    def upkeep() -> None:
        # The build ran longer than a half-made template may live (ABANDONED_AFTER): its container is that old.
        remove_stale_templates(ours, log, now=utcnow() + ABANDONED_AFTER + timedelta(minutes=1))
        sweep_orphans(store, ours, keep_debug=False, log=log)

    try:
        # A bound no test reaches: adoption evicts no other test's template.
        assert adopt(SweptDuringAdoption(lxd, upkeep), container, spec, 1000, log) is True

        assert log.named("container_template_removed") == [] and log.named("orphan_container_removed") == []
        adopted = lxd.describe_container(template)
        assert adopted is not None and adopted.config.get(TAG_TEMPLATE) == fingerprint
        assert TAG_STEP not in adopted.config and lxd.container_status(container) is None
    finally:
        for name in (container, template):
            lxd.delete_container(name, unprotect=True)
        delete_profile(lxd, profile)
