"""The step lifecycle: kinds, states, scripts, the step record, and who moves a step from X to Y.

A step is one container task the daemon runs for a Ghost job: the image build
after a `buildimage` job, or one module script of a `deploy` job. Its record
(`container_steps`, written by the `store` package) moves through the states below;
`TRANSITIONS` is the one table saying which actor makes each move and when,
and how the write is made (fenced on the lease, only on a free step, freeing
the lease, never once a cancellation was asked). Every state write the store
makes is built from it (`store.steps`: `move` for a held step, the same
builder for the cancel, request, expiry and replay queries), and a move the
table lacks raises ValueError before MongoDB is asked (`check_move`); the
runner's shutdown release looks its move up here (`next_state`), and claims
take only states the runner's rows move from (`claims.CLAIM_CANDIDATES`, checked
at import). tests/test_model.py drives each actor over every state and checks.

The enums are `StrEnum`s whose values are the strings stored in MongoDB, so a
member compares equal to, and is written as, the plain string.
"""

from __future__ import annotations

import dataclasses
import enum
from datetime import datetime
from typing import TypeVar

from bson import ObjectId


class StepKind(enum.StrEnum):
    """What a step does; the value is the command of the Ghost job that made it."""

    BUILDIMAGE = "buildimage"  # build the app's container image while Packer runs; publish it once the AMI is built
    DEPLOY = "deploy"  # run one module script of a deploy in a container


class StepState(enum.StrEnum):
    PENDING = "pending"  # recorded, waiting for a runner to claim it
    PREPARING = "preparing"  # a runner launches the container ahead of Ghost's request (a build: runs it ahead)
    READY = "ready"  # prepared, no lease held, waiting for Ghost's request
    REQUESTED = "requested"  # Ghost asked for the run (deploy: on its host; build: its AMI is built)
    RUNNING = "running"  # the build is finished and published, or the script runs
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"  # deploy: the module has no such script


class Script(enum.StrEnum):
    """The module scripts Ghost runs on its host during deploy (and redeploy), which a deploy step may run instead."""

    BUILD_PACK = "build_pack"
    AFTER_ALL_DEPLOY = "after_all_deploy"


class Actor(enum.StrEnum):
    """Who writes a step's state."""

    INTAKE = "intake"  # events/: reacts to Ghost's jobs
    CLIENT = "client"  # ghost/client.py: Ghost's worker, through `ghost-buildpackd buildpack` or `buildimage`
    RUNNER = "runner"  # runner/: the holder of the step's lease
    SHUTDOWN = "shutdown"  # runner/shutdown.py: the holder, when the daemon stops before the step ends
    SWEEP = "sweep"  # upkeep/sweep.py: upkeep of prepared containers nobody asked for (yet)
    REPLAY = "replay"  # `ghost-buildpackd replay JOB_ID`


# Short names for the members, as the rest of the code uses them.
BUILDIMAGE, DEPLOY = StepKind.BUILDIMAGE, StepKind.DEPLOY
PENDING, PREPARING, READY = StepState.PENDING, StepState.PREPARING, StepState.READY
REQUESTED, RUNNING = StepState.REQUESTED, StepState.RUNNING
SUCCEEDED, FAILED, CANCELLED, SKIPPED = StepState.SUCCEEDED, StepState.FAILED, StepState.CANCELLED, StepState.SKIPPED
BUILD_PACK, AFTER_ALL_DEPLOY = Script.BUILD_PACK, Script.AFTER_ALL_DEPLOY
REDEPLOY = "redeploy"  # a Ghost job command, never a step kind: its after_all_deploy runs in a deploy step

TERMINAL = (SUCCEEDED, FAILED, CANCELLED, SKIPPED)
ACTIVE = (PENDING, PREPARING, READY, REQUESTED, RUNNING)
MODULE_SCRIPTS = tuple(Script)
# The states of a step a runner may hold: every state it moves a step from (a `ready` step is never held).
HELD = (PENDING, PREPARING, REQUESTED, RUNNING)
NEW = ()  # from-states of a move that creates the record
BOTH_KINDS = tuple(StepKind)


@dataclasses.dataclass(frozen=True)
class Transition:
    """One row of the table: `actor` moves a step of one of `kinds` from one of `from_states` to `to_state`."""

    actor: Actor
    from_states: tuple[StepState, ...]  # NEW: the move creates the record in `to_state`
    to_state: StepState
    kinds: tuple[StepKind, ...]
    when: str
    # How the write is made (the store turns these into the move's filter and update, `store.steps.move`):
    fenced: bool = False  # the holder's move: only while the record still carries its lease token
    only_free: bool = False  # only a step nobody holds (its lease expired)
    releases: bool = False  # the lease is freed with the move
    unless_cancel_requested: bool = False  # never once a cancellation was asked for (the holder ends it instead)


TRANSITIONS: tuple[Transition, ...] = (
    # --- intake: Ghost's jobs ---
    Transition(
        Actor.INTAKE, NEW, PENDING, BOTH_KINDS,
        "a buildimage job started for an app using containers (its build runs while Packer runs), or a deploy job "
        "started for an app with a container image (a deploy step per module with a build_pack)",
    ),
    Transition(
        Actor.INTAKE, NEW, REQUESTED, (BUILDIMAGE,),
        "a buildimage job built its AMI and its build was never recorded (its start was not seen): built now",
    ),
    Transition(
        Actor.INTAKE, (PENDING, PREPARING, READY), REQUESTED, (BUILDIMAGE,),
        "a buildimage job built its AMI and Ghost's command did not ask for the build (a Ghost without the patch)",
    ),
    Transition(
        Actor.INTAKE, NEW, FAILED, BOTH_KINDS,
        "such a job, its app or its module list is malformed: recorded failed, nothing runs",
    ),
    Transition(
        Actor.INTAKE, ACTIVE, CANCELLED, BOTH_KINDS,
        "the deploy (or redeploy) job ended first, or the buildimage job ended without an AMI; only a step nobody "
        "holds: every one is asked first (cancel_requested), so a held one its runner releases meanwhile is "
        "cancelled here or by its runner",
        only_free=True, releases=True,
    ),
    # --- client: Ghost's worker ---
    Transition(
        Actor.CLIENT, NEW, PENDING, BOTH_KINDS,
        "the worker asks for a script the daemon has not recorded (always so for after_all_deploy), and "
        "requests it at once; or Ghost's buildimage job asks for its container build, bound to its host",
    ),
    Transition(
        Actor.CLIENT, (PENDING, PREPARING, READY), REQUESTED, BOTH_KINDS,
        "the worker asks for the script to run now, on its host (whether or not a runner prepares it); or Ghost's "
        "buildimage job, its AMI built, asks for the build, on its host (whether or not it was built ahead)",
    ),
    Transition(
        Actor.CLIENT, ACTIVE, CANCELLED, BOTH_KINDS,
        "the worker gave up waiting (its timeout, or no live daemon on its host); only a step nobody holds, as above",
        only_free=True, releases=True,
    ),
    # --- runner: the lease holder ---
    Transition(
        Actor.RUNNER, (PENDING, PREPARING), PREPARING, BOTH_KINDS,
        "claimed before Ghost's request: the container is launched ahead, a build runs ahead of the AMI once "
        "Ghost's inputs exist (unless the request came meanwhile)",
        fenced=True,
    ),
    Transition(
        Actor.RUNNER, (PREPARING,), READY, BOTH_KINDS,
        "prepared, or left for the run to launch (nothing to launch ahead, container.max_prepared, LXD failed "
        "the launch or stayed away, a build's inputs never came or its run ahead failed): the lease is released "
        "until Ghost's request; never once a cancellation was asked",
        fenced=True, releases=True, unless_cancel_requested=True,
    ),
    Transition(
        Actor.RUNNER, (REQUESTED, RUNNING), RUNNING, (DEPLOY,),
        "claimed on the requested host: the script runs (a running step whose holder died runs again)",
        fenced=True,
    ),
    Transition(
        Actor.RUNNER, (PENDING, PREPARING, REQUESTED, RUNNING), RUNNING, (BUILDIMAGE,),
        "claimed once the AMI is built: the container built ahead is published, or the build runs now (a running "
        "build whose holder died starts over; a build ahead whose job has built its AMI already runs to the end; "
        "an earlier version recorded a build Ghost asked for pending, bound to its host)",
        fenced=True,
    ),
    Transition(
        Actor.RUNNER, (RUNNING,), SUCCEEDED, BOTH_KINDS, "the build or the script succeeded",
        fenced=True, releases=True,
    ),
    Transition(
        Actor.RUNNER, HELD, FAILED, BOTH_KINDS,
        "the body failed, LXD stayed away, or the step used up its attempts",
        fenced=True, releases=True,
    ),
    Transition(
        Actor.RUNNER, HELD, CANCELLED, BOTH_KINDS,
        "its holder was asked to cancel it (cancel_requested: seen at a renewal, or instead of releasing it ready)",
        fenced=True, releases=True,
    ),
    Transition(
        Actor.RUNNER, (PREPARING, REQUESTED, RUNNING), SKIPPED, (DEPLOY,), "the module has no such script",
        fenced=True, releases=True,
    ),
    # --- shutdown: the holder, out of time (a step whose move has no row keeps its state) ---
    Transition(
        Actor.SHUTDOWN, (PREPARING,), PENDING, BOTH_KINDS, "the preparation was interrupted: the next start prepares",
        fenced=True, releases=True,
    ),
    Transition(
        Actor.SHUTDOWN, (RUNNING,), REQUESTED, BOTH_KINDS,
        "the script or the build was interrupted: the next start on the requested host runs it again",
        fenced=True, releases=True,
    ),
    # --- upkeep and operators ---
    Transition(
        Actor.SWEEP, (READY,), READY, BOTH_KINDS,
        "prepared longer than container.prepared_max_age and not asked for yet: its container is removed, the step "
        "stays requestable (a long deploy may reach the module later, a Packer run may end late: the run launches or "
        "builds anew), and the job's end cancels it (a worker killed without a word leaves no end: the container "
        "still goes)",
        only_free=True, releases=True,
    ),
    Transition(Actor.REPLAY, NEW, REQUESTED, (BUILDIMAGE,), "replay of a buildimage job the daemon never recorded"),
    Transition(
        Actor.REPLAY, TERMINAL, REQUESTED, (BUILDIMAGE,), "replay of a finished build: a new attempt, same id",
        releases=True,
    ),
)  # fmt: skip


def transitions(actor: Actor, to_state: str | None = None, kind: str | None = None) -> list[Transition]:
    """The rows of `actor` (into `to_state`, for `kind`, when given)."""
    return [
        row
        for row in TRANSITIONS
        if row.actor == actor and (to_state is None or row.to_state == to_state) and (kind is None or kind in row.kinds)
    ]


def from_states(actor: Actor, to_state: StepState, kind: str | None = None) -> tuple[StepState, ...]:
    """The states `actor` moves a step (of `kind`, when given) from into `to_state`, in lifecycle order."""
    found = {state for row in transitions(actor, to_state, kind) for state in row.from_states}
    return tuple(state for state in StepState if state in found)


def next_state(actor: Actor, state: str, kind: str) -> StepState | None:
    """Where `actor` moves a step of `kind` in `state`; None when the table has no such move."""
    targets = {row.to_state for row in transitions(actor, kind=kind) if state in row.from_states}
    if len(targets) > 1:
        raise ValueError(f"{actor} has several moves from {state} for {kind}: {sorted(targets)}")
    return targets.pop() if targets else None


def _check_table() -> None:
    """Raise unless the table's rows agree with each other: every move into a finished state frees the lease,
    and only the holder's moves are fenced (claims.py checks its candidates against the table)."""
    for row in TRANSITIONS:
        if row.from_states != NEW and row.to_state in TERMINAL and not row.releases:
            raise ValueError(f"{row}: a move into a finished state frees the lease")
        if row.fenced != (row.actor in (Actor.RUNNER, Actor.SHUTDOWN)):
            raise ValueError(f"{row}: exactly the holder's moves (runner, shutdown) are fenced")


_check_table()


def _named(kind: str | None) -> str:
    return f"{kind} step" if kind else "step"


def move_rule(actor: Actor, to_state: str, kind: str | None = None) -> Transition:
    """How `actor` moves a step of `kind` (None: of either kind) into `to_state` that exists already: its rows,
    merged into one (their kinds joined). ValueError when the table has no such move, or when the rows disagree
    on the from-states or on how the write is made (then the caller must say the kind).

    A kind this version does not know (a record written by a newer one) moves only along rows for every kind.
    """
    if kind is None:
        rows = transitions(actor, to_state)
    elif kind in BOTH_KINDS:
        rows = transitions(actor, to_state, kind)
    else:
        rows = [row for row in transitions(actor, to_state) if set(row.kinds) == set(BOTH_KINDS)]
    rows = [row for row in rows if row.from_states != NEW]
    if not rows:
        raise ValueError(f"model.TRANSITIONS has no move by {actor} of a {_named(kind)} into {to_state}")
    if len({dataclasses.replace(row, kinds=(), when="") for row in rows}) > 1:
        raise ValueError(f"{actor} moves steps into {to_state} along several rows: name the kind")
    kinds = tuple(each for each in StepKind if any(each in row.kinds for row in rows))
    return dataclasses.replace(rows[0], kinds=kinds, when="; ".join(row.when for row in rows))


def check_move(actor: Actor, from_state: str, to_state: str, kind: str | None = None) -> Transition:
    """`move_rule`, and ValueError unless it moves a step from `from_state`: the message names the move."""
    try:
        rule = move_rule(actor, to_state, kind)
    except ValueError as error:
        raise ValueError(f"no move by {actor} of a {_named(kind)} from {from_state} to {to_state}: {error}") from None
    if from_state not in rule.from_states:
        raise ValueError(
            f"no move by {actor} of a {_named(kind)} from {from_state} to {to_state} in model.TRANSITIONS "
            f"(from {', '.join(rule.from_states)} only)"
        )
    return rule


def check_creation(actor: Actor, state: str, kind: str) -> None:
    """ValueError unless a row lets `actor` create a record of `kind` in `state`."""
    if not any(row.from_states == NEW for row in transitions(actor, state, kind)):
        raise ValueError(f"no move by {actor} creating a {_named(kind)} in {state} in model.TRANSITIONS")


Member = TypeVar("Member", bound=enum.StrEnum)


def known(vocabulary: type[Member], value: str) -> Member | str:
    """`value` as a member of `vocabulary`, or as it is when unknown (a record edited by hand or written by a
    newer version): the runner then fails that step by name instead of every read of it failing."""
    try:
        return vocabulary(value)
    except ValueError:
        return value


def cancellation(reason: str, state: str) -> str:
    """A cancelled deploy step's message: `reason`, and whether its script had started (then it was stopped)."""
    if state == RUNNING:
        return f"{reason}, while the script was running (stopped)"
    return f"{reason}, before the script ran"


def step_id(job_id: ObjectId | str, kind: str, module: str | None = None, script: str = BUILD_PACK) -> str:
    """Deterministic step id: `<job_id>:buildimage`, `<job_id>:deploy:<module>` (its build_pack), or
    `<job_id>:deploy.<script>:<module>` for another module script (`after_all_deploy`).

    The script sits before the module name, so no module name can make two steps share an id.
    """
    if not module:
        return f"{job_id}:{kind}"
    return f"{job_id}:{kind}:{module}" if script == BUILD_PACK else f"{job_id}:{kind}.{script}:{module}"


@dataclasses.dataclass(frozen=True)
class Step:
    """A step's record, as the `store` package reads it from `container_steps`."""

    id: str
    job_id: ObjectId
    app_id: ObjectId | None
    kind: StepKind | str  # a plain string only when unknown (`known`)
    module: str | None
    state: StepState | str
    attempts: int
    message: str
    owner: str | None
    lease_token: str | None
    lease_expires_at: datetime | None
    requested_host: str | None
    cancel_requested: bool
    exit_code: int | None
    container: str | None
    created_at: datetime | None
    updated_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    output_tail: str
    cancel_reason: str = ""
    image: str = ""  # alias a deploy step's container was made from
    # Number of the claim that took the current lease: grows with every claim and is never reset,
    # so it orders attempts; what an attempt makes in LXD carries it (fencing by attempt).
    claim: int = 0
    script: Script | str = BUILD_PACK  # the module script a deploy step runs
    timed_out: bool = False  # the command was killed at container.exec_timeout
    inputs: str = ""  # a build run ahead: the digest of what its container was built from (`steps.buildimage_ahead`)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL
