"""The transition table against what the code does, and idempotent releasing writes.

Every state write goes through the table (`Store.move` and the builder it shares
with the store's queries): a move the table lacks raises before MongoDB is
asked, and a write without a move cannot set a state. Each store query that
moves steps is driven over a step in every state: it must move exactly those the
table lets its actor move. The runner is run with trivial bodies and every move
it makes is checked against the runner's and shutdown's rows. Then a fenced
outcome retried after a lost acknowledgement.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import pytest
from pymongo.errors import AutoReconnect

from ghost_buildpackd.claims import CLAIM_CANDIDATES, claimable
from ghost_buildpackd.events import Intake
from ghost_buildpackd.model import (
    ACTIVE,
    BUILDIMAGE,
    DEPLOY,
    FAILED,
    HELD,
    NEW,
    READY,
    REQUESTED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    TRANSITIONS,
    Actor,
    Step,
    StepKind,
    StepState,
    from_states,
    next_state,
    step_id,
    transitions,
)
from ghost_buildpackd.runner import Bodies, Runner
from ghost_buildpackd.steps import Outcome, StepContext, StepFailed
from ghost_buildpackd.store import FREE_LEASE, Store, step_from_doc
from tests.support.ghost import make_app, make_job, set_status
from tests.support.waiting import wait_until

HOST = "host-a"
MODULE = "app"

# --- the table itself -------------------------------------------------------------------------


def may_move(actor: Actor, from_state: str | None, to_state: str, kind: str) -> bool:
    """Whether a row lets `actor` move a step of `kind` from `from_state` (None: no record yet) to `to_state`."""
    return any(
        row.to_state == to_state and (row.from_states == NEW if from_state is None else from_state in row.from_states)
        for row in transitions(actor, kind=kind)
    )


def test_every_state_is_reached_and_every_unfinished_state_is_left():
    reached = {row.to_state for row in TRANSITIONS}
    left = {state for row in TRANSITIONS for state in row.from_states}
    assert reached == set(StepState)
    assert left >= set(ACTIVE), "a step would be stuck in a state nobody moves it from"
    assert {row.to_state for row in TRANSITIONS if row.from_states == NEW} == {StepState.PENDING, REQUESTED, FAILED}


def test_only_replay_moves_a_finished_step():
    for row in TRANSITIONS:
        if set(row.from_states) & set(TERMINAL):
            assert row.actor == Actor.REPLAY, row


def test_a_runner_holds_exactly_the_states_it_moves_steps_from():
    moved_from = {state for row in TRANSITIONS if row.actor == Actor.RUNNER for state in row.from_states}
    assert set(HELD) == moved_from
    assert READY not in HELD  # a prepared step waits without a lease


@pytest.mark.parametrize("kind", list(StepKind))
def test_shutdown_has_at_most_one_move_from_each_state(kind):
    for state in StepState:
        next_state(Actor.SHUTDOWN, state, kind)  # raises when two rows disagree


def test_claims_take_exactly_the_states_the_runner_moves_steps_from():
    for kind in StepKind:
        candidates = {c.state for c in CLAIM_CANDIDATES if c.kind in (None, kind)}
        assert candidates == set(claimable(kind)) == set(HELD), kind


# --- a move the table lacks cannot be written ----------------------------------------------------


class NoMongoDB:
    """A steps collection that fails the test on any use."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"MongoDB was asked ({name}) for a move the table lacks")


def record(kind: StepKind, state: StepState) -> Step:
    """A held step of `kind` in `state`, as read (never written)."""
    doc = {"_id": f"job:{kind}", "job_id": "job", "kind": kind, "state": state, "lease": {"token": "t"}}
    return step_from_doc(doc)


@pytest.mark.parametrize("kind", list(StepKind))
def test_every_move_not_in_the_table_raises_before_mongodb_is_asked(store, monkeypatch, kind):
    monkeypatch.setattr(store, "steps", NoMongoDB())
    refused = 0
    for actor in Actor:
        for from_state in StepState:
            for to_state in StepState:
                if may_move(actor, from_state, to_state, kind):
                    continue
                with pytest.raises(ValueError) as error:
                    store.move(record(kind, from_state), actor, to_state)
                for name in (actor, from_state, to_state, kind):
                    assert str(name) in str(error.value), error.value
                refused += 1
    assert refused > 100


def test_a_move_from_a_state_the_caller_expects_is_checked_against_the_table_too(store, monkeypatch):
    monkeypatch.setattr(store, "steps", NoMongoDB())
    with pytest.raises(ValueError, match="from running to ready"):
        store.move(record(DEPLOY, StepState.PREPARING), Actor.RUNNER, READY, expect_state=RUNNING)


def test_a_write_without_a_move_cannot_set_a_state(store, monkeypatch):
    monkeypatch.setattr(store, "steps", NoMongoDB())
    with pytest.raises(ValueError, match="move"):
        store.update_step(record(BUILDIMAGE, RUNNING), state=SUCCEEDED)
    with pytest.raises(ValueError, match="a conditional write is a move"):
        store.update_step(record(DEPLOY, StepState.PREPARING), expect_state=StepState.PREPARING)
    with pytest.raises(ValueError, match="state and the lease"):
        store.move(record(BUILDIMAGE, RUNNING), Actor.RUNNER, SUCCEEDED, state=FAILED)


def test_a_record_the_table_does_not_let_its_actor_create_is_refused(store, monkeypatch):
    monkeypatch.setattr(store, "steps", NoMongoDB())
    with pytest.raises(ValueError, match="replay creating a deploy step in pending"):
        store.create_step("job", DEPLOY, MODULE, actor=Actor.REPLAY)
    with pytest.raises(ValueError, match="client creating a buildimage step in failed"):
        store.create_step("job", BUILDIMAGE, state=FAILED, actor=Actor.CLIENT)


# --- store queries move steps along the table ---------------------------------------------------


def step_in(store: Store, db, kind: StepKind, state: StepState, **fields: Any) -> str:
    """A fresh step of `kind` recorded in `state`, nobody holding it."""
    app = make_app(db)
    job = make_job(db, app, command=kind, modules=[MODULE])
    module = MODULE if kind == DEPLOY else None
    assert store.create_step(job, kind, module, app_id=app)
    sid = step_id(job, kind, module)
    store.steps.update_one({"_id": sid}, {"$set": {"state": state, **fields}})
    return sid


def moves(store: Store, db, kind: StepKind, act: Callable[[Step], object]) -> dict[StepState, StepState]:
    """For a step of `kind` in each state: the state `act` left it in."""
    after = {}
    for state in StepState:
        sid = step_in(store, db, kind, state)
        act(store.get_step(sid))
        after[state] = store.get_step(sid).state
    return after


def assert_moves_along(actor: Actor, to_state: StepState, kind: StepKind, after: dict[StepState, StepState]) -> None:
    moved = {state for state, now in after.items() if now != state}
    assert moved == set(from_states(actor, to_state, kind)) - {to_state}, after
    assert all(after[state] == to_state for state in moved), after
    assert all(may_move(actor, state, to_state, kind) for state in moved)


def test_intake_cancels_deploy_steps_in_the_states_of_its_row(db, store):
    after = moves(store, db, DEPLOY, lambda step: store.cancel_job_steps(step.job_id, "job ended"))
    assert_moves_along(Actor.INTAKE, StepState.CANCELLED, DEPLOY, after)


def test_the_client_requests_deploy_steps_in_the_states_of_its_row(db, store):
    after = moves(store, db, DEPLOY, lambda step: store.request_step(step.job_id, MODULE, HOST, step.app_id))
    assert_moves_along(Actor.CLIENT, REQUESTED, DEPLOY, after)


def test_the_client_abandons_deploy_steps_in_the_states_of_its_row(db, store):
    after = moves(store, db, DEPLOY, lambda step: store.abandon_step(step.id, "gave up"))
    assert_moves_along(Actor.CLIENT, StepState.CANCELLED, DEPLOY, after)


@pytest.mark.parametrize("kind", list(StepKind))
def test_the_sweep_expires_the_containers_of_steps_in_the_states_of_its_row(db, store, kind):
    # A negative age makes every step stale, however recent its last write.
    expired_from = set()
    for state in StepState:
        sid = step_in(store, db, kind, state, container=f"gbp-{state}", inputs="digest")
        if store.expire_stale_ready(-3600, "expired"):
            expired_from.add(state)
        step = store.get_step(sid)
        assert step.state == state, step  # the step stays where it was: still requestable
        assert (step.container is None, step.inputs == "") == ((state in expired_from),) * 2, step
    assert expired_from == set(from_states(Actor.SWEEP, READY, kind)) == {READY}
    assert all(may_move(Actor.SWEEP, state, READY, kind) for state in expired_from)


def test_replay_resets_buildimage_steps_in_the_states_of_its_row(db, store):
    after = moves(store, db, BUILDIMAGE, lambda step: store.reset_step_for_replay(step.id))
    assert_moves_along(Actor.REPLAY, REQUESTED, BUILDIMAGE, after)


def test_intake_cancels_buildimage_steps_in_the_states_of_its_row(db, store):
    after = moves(store, db, BUILDIMAGE, lambda step: store.cancel_job_steps(step.job_id, "no AMI", BUILDIMAGE))
    assert_moves_along(Actor.INTAKE, StepState.CANCELLED, BUILDIMAGE, after)


@pytest.mark.parametrize("actor", [Actor.INTAKE, Actor.CLIENT])
def test_the_ami_asks_for_buildimage_steps_in_the_states_of_its_row(db, store, actor):
    host = HOST if actor == Actor.CLIENT else None
    after = moves(store, db, BUILDIMAGE, lambda step: store.request_build(step.job_id, step.app_id, host, actor))
    assert_moves_along(actor, REQUESTED, BUILDIMAGE, after)


def test_the_client_abandons_buildimage_steps_in_the_states_of_its_row(db, store):
    after = moves(store, db, BUILDIMAGE, lambda step: store.abandon_step(step.id, "gave up"))
    assert_moves_along(Actor.CLIENT, StepState.CANCELLED, BUILDIMAGE, after)


def test_a_buildimage_job_makes_its_build_at_once_bound_to_its_host_and_only_once(db, store):
    app = make_app(db)
    job = make_job(db, app, command=BUILDIMAGE, status="started")
    assert may_move(Actor.CLIENT, None, StepState.PENDING, BUILDIMAGE)
    made = store.request_build(job, app, HOST)
    assert (made.id, made.state, made.requested_host) == (step_id(job, BUILDIMAGE), REQUESTED, HOST)
    assert store.claim_step("elsewhere", 30, "other-host", kinds=(BUILDIMAGE,)) is None  # the trees are on HOST
    claimed = store.claim_step("me", 30, HOST, kinds=(BUILDIMAGE,))
    assert claimed is not None and claimed.id == made.id
    again = store.request_build(job, app, "other-host")  # a second request finds the same build, as it is
    assert (again.id, again.requested_host, again.lease_token) == (made.id, HOST, claimed.lease_token)


def test_the_client_creates_a_step_the_daemon_never_recorded_and_requests_it(db, store):
    app = make_app(db)
    job = make_job(db, app, command=DEPLOY, modules=[MODULE])
    assert may_move(Actor.CLIENT, None, StepState.PENDING, DEPLOY)
    assert store.request_step(job, MODULE, HOST, app).state == REQUESTED


@pytest.mark.parametrize("kind", list(StepKind))
def test_a_runner_claims_a_free_step_exactly_in_the_held_states(db, store, kind):
    claimed = set()
    for state in StepState:
        sid = step_in(store, db, kind, state, requested_host=HOST)
        step = store.claim_step("me", 30, HOST, kinds=(kind,))
        if step is not None:
            assert step.id == sid and step.state == state  # a claim takes the lease, not a move
            claimed.add(state)
            store.update_step(step, release=True)
            store.steps.update_one({"_id": sid}, {"$set": {"state": FAILED}})  # out of the next claims
    assert claimed == set(HELD)


# --- the runner's writes follow the runner's and shutdown's rows ----------------------------------


class Recorder:
    """Wraps Store.move, noting each move it writes, as (kind, from, to) and the actor's."""

    def __init__(self, store: Store):
        self.store = store
        self.move = store.move
        self.moves: list[tuple[str, str, str]] = []
        self.actors: list[Actor] = []

    def __call__(self, step: Step, actor: Actor, to_state: StepState, **kwargs: Any) -> Step | None:
        before = self.store.get_step(step.id)
        updated = self.move(step, actor, to_state, **kwargs)
        if updated is not None:
            self.moves.append((updated.kind, before.state, updated.state))
            self.actors.append(actor)
        return updated


class Blocking:
    """A body that runs until aborted, then fails (as a command stopped by its abort would)."""

    def __init__(self) -> None:
        self.started = threading.Event()

    def __call__(self, ctx: StepContext) -> Outcome:
        self.started.set()
        ctx.abort.wait(60)
        raise StepFailed("interrupted")


def runner(make_config, store: Store, **bodies: Any) -> Runner:
    config = make_config(lease_ttl="3s", workers=1).with_instance_id()
    default = {
        "buildimage": lambda ctx: Outcome(SUCCEEDED, "built"),
        "prepare_deploy": lambda ctx: Outcome(READY, "prepared"),
        "run_deploy": lambda ctx: Outcome(SUCCEEDED, "ran", exit_code=0),
    }
    return Runner(config, store, lxd=None, bodies=Bodies(**{**default, **bodies}))


def new_step(store: Store, db, kind: StepKind) -> str:
    app = make_app(db)
    job = make_job(db, app, command=kind, modules=[MODULE])
    module = MODULE if kind == DEPLOY else None
    store.create_step(job, kind, module, app_id=app)
    return step_id(job, kind, module)


def terminal(store: Store, sid: str) -> Callable[[], bool]:
    return lambda: store.get_step(sid).terminal


def request_when_ready(store: Store, running: Runner, sid: str) -> None:
    """Play Ghost's worker once the runner prepared the step: request the run (the build) on the runner's host."""
    wait_until(lambda: store.get_step(sid).state == READY, 30, "the step to be prepared")
    step = store.get_step(sid)
    if step.kind == DEPLOY:
        store.request_step(step.job_id, MODULE, running.host, step.app_id)
    else:
        store.request_build(step.job_id, step.app_id, running.host)
    running.wake()


def test_the_runner_moves_steps_only_along_its_rows(db, store, make_config, monkeypatch):
    recorder = Recorder(store)
    monkeypatch.setattr(store, "move", recorder)

    def broken(ctx: StepContext) -> Outcome:
        raise StepFailed("broken")

    failing = {"buildimage": broken}
    for bodies, kind in (({}, BUILDIMAGE), (failing, BUILDIMAGE), ({}, DEPLOY)):
        running = runner(make_config, store, **bodies)
        running.start()
        try:
            sid = new_step(store, db, kind)
            request_when_ready(store, running, sid)
            wait_until(terminal(store, sid), 30, "the step to finish")
        finally:
            running.stop(grace=5)
    seen = {(kind, before, after) for kind, before, after in recorder.moves}
    assert {(BUILDIMAGE, StepState.PENDING, StepState.PREPARING), (BUILDIMAGE, StepState.PREPARING, READY)} <= seen
    assert (BUILDIMAGE, REQUESTED, RUNNING) in seen and (BUILDIMAGE, RUNNING, FAILED) in seen
    assert {(DEPLOY, StepState.PREPARING, READY), (DEPLOY, RUNNING, SUCCEEDED)} <= seen
    assert set(recorder.actors) == {Actor.RUNNER}
    for kind, before, after in seen:
        assert may_move(Actor.RUNNER, before, after, kind), f"runner moved a {kind} step {before} -> {after}"


@pytest.mark.parametrize("kind", list(StepKind))
def test_shutdown_puts_a_running_step_back_along_its_row(db, store, make_config, monkeypatch, kind):
    recorder = Recorder(store)
    monkeypatch.setattr(store, "move", recorder)
    body = Blocking()
    running = runner(make_config, store, buildimage=body, run_deploy=body)
    running.start()
    sid = new_step(store, db, kind)
    try:
        request_when_ready(store, running, sid)
        assert body.started.wait(30), "the step did not start"
    finally:
        running.stop(grace=0)
    back = next_state(Actor.SHUTDOWN, RUNNING, kind)
    assert back is not None and store.get_step(sid).state == back
    assert recorder.moves[-1] == (kind, RUNNING, back) and recorder.actors[-1] == Actor.SHUTDOWN


def test_shutdown_leaves_a_request_made_during_preparation(db, store, make_config):
    preparing = threading.Event()
    requested = threading.Event()

    def prepare(ctx: StepContext) -> Outcome:
        preparing.set()
        assert requested.wait(30)
        return Outcome(READY, "prepared")

    running = runner(make_config, store, prepare_deploy=prepare)
    running.start()
    sid = new_step(store, db, DEPLOY)
    try:
        assert preparing.wait(30), "the preparation did not start"
        step = store.get_step(sid)
        store.request_step(step.job_id, MODULE, running.host, step.app_id)
    finally:
        stopping = threading.Thread(target=running.stop, kwargs={"grace": 0})
        stopping.start()
        wait_until(lambda: running.held and all(h.shutting_down for h in running.held.values()), 10, "the abort")
        requested.set()
        stopping.join(30)
    # The dispatcher may still claim the step once as it stops, and then releases it.
    step = wait_until(lambda: (found := store.get_step(sid)).owner is None and found, 10, "the lease released")
    assert step.state == REQUESTED, "the request must survive the shutdown"


# --- a job's end wins over a preparation in flight ---------------------------------------------


class FinishesPreparationAfter:
    """The steps collection, except that once the intake made `writes` multi-step writes (cancel_job_steps makes
    them), `finish` runs: the held preparation ends, its writes landing between the intake's."""

    def __init__(self, collection: Any, writes: int, finish: Callable[[], None]):
        self.collection = collection
        self.writes = writes
        self.finish = finish
        self.intake = threading.get_ident()  # the test's thread plays the intake; the runner has its own
        self.made = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.collection, name)

    def update_many(self, *args: Any, **kwargs: Any) -> Any:
        result = self.collection.update_many(*args, **kwargs)
        if threading.get_ident() == self.intake:
            self.made += 1
            if self.made == self.writes:
                self.finish()
        return result


@pytest.mark.parametrize("writes_before", [0, 1, 2, 3])
def test_a_job_end_wins_over_a_preparation_released_between_the_intakes_writes(
    db, store, make_config, monkeypatch, writes_before
):
    """The deploy job ends while its step is prepared; the preparation's `ready` lands before the intake's
    writes, between them, or after them (before the renewer could tell its holder): the step ends cancelled."""
    recorder = Recorder(store)
    monkeypatch.setattr(store, "move", recorder)
    preparing, go_on = threading.Event(), threading.Event()

    def prepare(ctx: StepContext) -> Outcome:
        preparing.set()
        assert go_on.wait(30)
        return Outcome(READY, "prepared")

    config = make_config(lease_ttl="300s", workers=1).with_instance_id()  # no renewal within the test
    defaults = runner(make_config, store).bodies
    running = Runner(config, store, lxd=None, bodies=dataclasses.replace(defaults, prepare_deploy=prepare))
    sid = new_step(store, db, DEPLOY)
    job = store.get_step(sid).job_id

    def finish_preparation() -> None:
        go_on.set()
        wait_until(lambda: sid not in running.in_flight(), 30, "the preparation's writes")

    running.start()
    try:
        assert preparing.wait(30), "the preparation did not start"
        intake = Intake(store, on_new_steps=lambda: None, on_job_ended=lambda _job: None)
        monkeypatch.setattr(store, "steps", FinishesPreparationAfter(store.steps, writes_before, finish_preparation))
        if writes_before == 0:
            finish_preparation()
        set_status(db, job, "failed")
        intake.handle_job_id(job)
        step = wait_until(lambda: (found := store.get_step(sid)).terminal and found, 30, "the step to end")
    finally:
        go_on.set()
        running.stop(grace=5)
    assert (step.state, step.message) == (StepState.CANCELLED, "deploy job ended (failed), before the script ran")
    assert step.owner is None
    for kind, before, after in recorder.moves:
        assert may_move(Actor.RUNNER, before, after, kind), f"runner moved a {kind} step {before} -> {after}"


# --- releasing writes are idempotent -------------------------------------------------------------


class LosesOneAcknowledgement:
    """The steps collection, except that the first write of `state` applies and then its reply is lost."""

    def __init__(self, collection: Any, state: str):
        self.collection = collection
        self.state = state
        self.lost = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.collection, name)

    def find_one_and_update(self, query: Any, update: Any, **kwargs: Any) -> Any:
        doc = self.collection.find_one_and_update(query, update, **kwargs)
        if not self.lost and update.get("$set", {}).get("state") == self.state:
            self.lost += 1
            raise AutoReconnect("connection closed before the reply (test)")
        return doc


def held_step(store: Store, db) -> Step:
    sid = new_step(store, db, BUILDIMAGE)
    step = store.get_step(sid)
    store.request_build(step.job_id, step.app_id, HOST)
    step = store.claim_step("me", 30, HOST)
    return store.move(step, Actor.RUNNER, RUNNING)


def test_an_outcome_retried_after_a_lost_acknowledgement_reports_success(db, store, monkeypatch):
    step = held_step(store, db)
    lossy = LosesOneAcknowledgement(store.steps, FAILED)
    monkeypatch.setattr(store, "steps", lossy)
    written = store.move(step, Actor.RUNNER, FAILED, message="exit 2", exit_code=2, output_tail="boom")
    assert lossy.lost == 1, "the write's reply was not lost: the test proves nothing"
    assert written is not None, "a retried outcome reported a lost lease"
    assert (written.state, written.message, written.exit_code, written.owner) == (FAILED, "exit 2", 2, None)


def test_ready_retried_after_a_lost_acknowledgement_reports_success(db, store, monkeypatch):
    new_step(store, db, DEPLOY)
    step = store.move(store.claim_step("me", 30, HOST), Actor.RUNNER, StepState.PREPARING)
    lossy = LosesOneAcknowledgement(store.steps, READY)
    monkeypatch.setattr(store, "steps", lossy)
    written = store.move(step, Actor.RUNNER, READY, expect_state=StepState.PREPARING)
    assert lossy.lost == 1 and written is not None and written.state == READY


def test_an_outcome_is_not_taken_for_ours_after_a_successor_claimed(db, store):
    step = held_step(store, db)
    assert store.move(step, Actor.RUNNER, FAILED, message="exit 2") is not None
    assert store.reset_step_for_replay(step.id)
    successor = store.move(store.claim_step("other", 30, HOST), Actor.RUNNER, RUNNING)
    assert store.move(successor, Actor.RUNNER, FAILED, message="exit 2") is not None
    assert store.move(step, Actor.RUNNER, FAILED, message="exit 2") is None, "a write under an old claim was accepted"


def test_another_outcome_already_recorded_is_not_taken_for_ours(db, store):
    step = held_step(store, db)
    cancelled = {"state": StepState.CANCELLED, "message": "deploy job ended", "lease": FREE_LEASE}
    store.steps.update_one({"_id": step.id}, {"$set": cancelled})
    assert store.move(step, Actor.RUNNER, FAILED, message="exit 2") is None
    assert store.move(step, Actor.RUNNER, StepState.CANCELLED, message="another reason") is None
    assert store.get_step(step.id).message == "deploy job ended"


def test_a_record_of_an_unknown_kind_fails_by_name_instead_of_wedging_the_runner(db, store, make_config):
    sid = new_step(store, db, BUILDIMAGE)
    store.steps.update_one({"_id": sid}, {"$set": {"kind": "rebuild"}})  # written by a newer version, say
    assert store.get_step(sid).kind == "rebuild"
    running = runner(make_config, store)
    running.start()
    try:
        step = wait_until(lambda: (found := store.get_step(sid)).terminal and found, 30, "the step to finish")
    finally:
        running.stop(grace=5)
    assert (step.state, step.message) == (FAILED, "unknown step kind 'rebuild'")
