"""Running a step body directly, as the runner would: record created, lease taken, state `running`."""

from __future__ import annotations

import threading
from datetime import timedelta

import structlog
from bson import ObjectId
from pymongo import ReturnDocument

from ghost_buildpackd.config import Config
from ghost_buildpackd.lxd import Lxd
from ghost_buildpackd.model import (
    BUILDIMAGE,
    DEPLOY,
    PENDING,
    PREPARING,
    READY,
    REQUESTED,
    RUNNING,
    TERMINAL,
    Actor,
    Step,
    step_id,
)
from ghost_buildpackd.steps import StepContext
from ghost_buildpackd.store import FREE_LEASE, Store, new_step_doc, retry_transient, step_from_doc, utcnow

TEST_OWNER = "test-instance"
TEST_LEASE_TTL = 600.0  # nothing renews the lease in these tests; long enough for any one step


def step_context(
    config: Config,
    store: Store,
    lxd: Lxd,
    job_id: ObjectId,
    kind: str,
    module: str | None = None,
) -> StepContext:
    """Create (or reuse) the step record of `job_id` (a build: requested, as once its AMI is built), take its
    lease and mark it running.

    A finished step is asked for again first, as `ghost-buildpackd replay` does,
    so calling this again for the same job makes a new attempt.
    """
    job = store.get_job(job_id)
    assert job is not None, f"no job {job_id} in the test database"
    sid = step_id(job_id, kind, module)
    initial = REQUESTED if kind == BUILDIMAGE else PENDING
    if not store.create_step(job_id, kind, module, app_id=job.get("app_id"), state=initial):
        store.reset_step_for_replay(sid)
    # The test's database holds no other step of this kind that needs work, so the claim takes this one.
    step = store.claim_step(_owner(config), TEST_LEASE_TTL, config.host_name, kinds=(kind,))
    assert step is not None and step.id == sid and step.state == initial, f"could not take the lease on step {sid}"
    return _taken(config, store, lxd, step, RUNNING)


@retry_transient
def claim_named_step(store: Store, sid: str, owner: str, ttl: float, states: tuple[str, ...]) -> Step | None:
    """Take the lease on one named step if it is free and in one of `states` (the runner claims by priority instead)."""
    doc = store.steps.find_one_and_update(
        {
            "_id": sid,
            "state": {"$in": list(states)},
            "lease.expires_at": {"$lt": store.server_now()},
        },
        store._claim_update(owner, ttl),
        return_document=ReturnDocument.AFTER,
    )
    return step_from_doc(doc) if doc else None


def _owner(config: Config) -> str:
    return config.instance_id or TEST_OWNER


def _taken(config: Config, store: Store, lxd: Lxd, step: Step, state: str) -> StepContext:
    """The context of a step whose lease this test holds, saved in `state` as the runner does."""
    ctx = StepContext(
        step=step,
        config=config,
        store=store,
        lxd=lxd,
        log=structlog.get_logger("test").bind(step=step.id, job_id=str(step.job_id)),
        abort=threading.Event(),
        instance_id=_owner(config),
    )
    ctx.save(state)
    return ctx


def take_over_after_crash(
    config: Config,
    store: Store,
    lxd: Lxd,
    job_id: ObjectId,
    kind: str,
    module: str | None = None,
    ever_finished: bool = False,
) -> StepContext:
    """The step's owner died mid-run: its record says running with an expired lease; another instance takes it.

    `ever_finished=False` also forgets the finish time, as for a crash during the first run of the step.
    """
    sid = step_id(job_id, kind, module)
    expired = {"owner": "dead-instance", "token": "dead", "expires_at": utcnow() - timedelta(hours=1)}
    update: dict = {"$set": {"state": RUNNING, "lease": expired}}
    if not ever_finished:
        update["$unset"] = {"times.finished": ""}
    store.steps.update_one({"_id": sid}, update)
    step = store.claim_step(_owner(config), TEST_LEASE_TTL, config.host_name, kinds=(kind,))
    assert step is not None and step.id == sid, f"could not take over step {sid}"
    return _taken(config, store, lxd, step, RUNNING)


def deploy_context(config: Config, store: Store, lxd: Lxd, job_id: ObjectId, module: str, phase: str) -> StepContext:
    """A deploy step taken as the runner takes it, for `deploy.prepare` or `deploy.run`.

    `prepare`: the pending record (created if missing) is claimed and saved `preparing`.
    `run`: the client's request is made if it was not yet (`requested`, bound to
    this host), then the step is claimed and saved `running`.
    """
    job = store.get_job(job_id)
    assert job is not None, f"no job {job_id} in the test database"
    sid = step_id(job_id, DEPLOY, module)
    store.create_step(job_id, DEPLOY, module, app_id=job.get("app_id"))
    if phase == "prepare":
        wanted, state = (PENDING,), PREPARING
    else:
        store.request_step(job_id, module, config.host_name, job.get("app_id"))
        wanted, state = (REQUESTED,), RUNNING
    step = claim_named_step(store, sid, _owner(config), TEST_LEASE_TTL, wanted)
    assert step is not None, f"could not take the lease on step {sid} in {wanted}"
    return _taken(config, store, lxd, step, state)


def terminal_step(store: Store, sid: str) -> Step | None:
    """The step's record once it is finished, else None (a condition to wait on)."""
    step = store.get_step(sid)
    return step if step is not None and step.terminal else None


def state_of(store: Store, sid: str) -> str | None:
    step = store.get_step(sid)
    return step.state if step is not None else None


def seed_step(
    store: Store,
    job_id: ObjectId,
    kind: str,
    module: str | None = None,
    app_id: ObjectId | None = None,
    state: str = PENDING,
    message: str = "",
) -> None:
    """A step record in any `state`, nobody holding it, as if moves had brought it there (the transition table
    lets nobody create a record running or finished: `Store.create_step` refuses)."""
    doc = new_step_doc(job_id, kind, module, app_id, PENDING, message)
    doc.update(state=state, times={"finished": doc["created_at"]} if state in TERMINAL else {})
    store.steps.insert_one(doc)


def back_to_pending(store: Store, sid: str) -> None:
    """Put a finished deploy step back to pending, free, for a test's next phase (replay is for builds only)."""
    store.steps.update_one({"_id": sid}, {"$set": {"state": PENDING, "lease": FREE_LEASE, "attempts": 0}})


def finish_preparation(ctx: StepContext) -> None:
    """What the runner does after `prepare` returned `ready`: record it and release the lease."""
    assert ctx.store.move(ctx.step, Actor.RUNNER, READY) is not None
