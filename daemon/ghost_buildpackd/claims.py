"""Which step a runner takes next: the claim candidates in order, the hosts each may run on, and who takes
the last place among prepared containers (`container.max_prepared`).

The store turns each candidate into a query (`store.leases`); every candidate is a state the runner's rows
of the transition table (`model.TRANSITIONS`) move its kind from, checked at import.
"""

from __future__ import annotations

import dataclasses
import enum

from .model import (
    BOTH_KINDS,
    BUILDIMAGE,
    DEPLOY,
    PENDING,
    PREPARING,
    READY,
    REQUESTED,
    RUNNING,
    Actor,
    StepKind,
    StepState,
    transitions,
)


class HostBinding(enum.StrEnum):
    """Which hosts may claim a step, by its `requested_host`."""

    REQUESTED_HERE = "requested here"  # only the host Ghost's worker asked on (its working copy is there)
    HERE_OR_UNBOUND = "here or unbound"  # the host asked on, or any host when nobody asked on one
    ANY = "any host"


@dataclasses.dataclass(frozen=True)
class ClaimCandidate:
    """One kind of work a claim looks for: a free step (its lease expired) in `state`, of `kind` (None: either),
    on a host `host` allows. `asked`: Ghost's worker waits for it on that host."""

    state: StepState
    kind: StepKind | None
    host: HostBinding
    asked: bool
    why: str


# In the order a claim looks: the first that finds a step wins, oldest step first within one.
CLAIM_CANDIDATES: tuple[ClaimCandidate, ...] = (
    ClaimCandidate(REQUESTED, DEPLOY, HostBinding.REQUESTED_HERE, True, "Ghost's worker waits for it on this host"),
    ClaimCandidate(
        REQUESTED, BUILDIMAGE, HostBinding.HERE_OR_UNBOUND, True,
        "a build whose AMI is built: Ghost's buildimage job waits for it on its host (the provisioner trees are "
        "there); one the intake requested (a Ghost without the patch) runs anywhere",
    ),
    ClaimCandidate(
        PENDING, None, HostBinding.HERE_OR_UNBOUND, False,
        "a step to prepare ahead of Ghost's request (a build an earlier version recorded pending once Ghost asked "
        "for it is bound to that host)",
    ),
    ClaimCandidate(PREPARING, None, HostBinding.ANY, False, "a preparation whose holder died"),
    ClaimCandidate(
        RUNNING, BUILDIMAGE, HostBinding.HERE_OR_UNBOUND, False, "a build whose holder died: it starts over"
    ),
    ClaimCandidate(
        RUNNING, DEPLOY, HostBinding.REQUESTED_HERE, False,
        "a script whose holder died: it runs again on the requested host",
    ),
)  # fmt: skip


def claimable(kind: str) -> tuple[StepState, ...]:
    """The states a runner may claim a step of `kind` in: those the runner's rows move such a step from."""
    found = {state for row in transitions(Actor.RUNNER, kind=kind) for state in row.from_states}
    return tuple(state for state in StepState if state in found)


# container.max_prepared: who takes the last place.
# Deploy steps in these states hold a place among the prepared containers when their container is recorded
# (launched, or about to be: the name is recorded before the launch; absent when the run is to launch it).
PREPARED_STATES = (PREPARING, READY)
# Of steps deciding at the same moment (in this state, nothing recorded yet), those with a smaller id count
# first, so two of them never both take the last place.
DECIDING_STATE = PREPARING


def _check_candidates() -> None:
    """Raise unless every claim candidate is a state the runner's rows move its kind(s) from."""
    for candidate in CLAIM_CANDIDATES:
        for kind in (candidate.kind,) if candidate.kind else BOTH_KINDS:
            if candidate.state not in claimable(kind):
                raise ValueError(f"claim candidate {candidate.state} {kind}: the runner has no move from it")


_check_candidates()
