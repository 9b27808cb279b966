"""What both kinds of step body share: the context the runner hands them, their outcome, and how they fail.

A step body (`buildimage.run`, `deploy.prepare`, `deploy.run`) receives a
`StepContext` while the runner holds the step's lease, and returns an
`Outcome`. It fails by raising `StepFailed` (or `BadDocument` for bad Ghost
data); the runner records the outcome, so bodies never write terminal states.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..config import Config
from ..joblog import JobLog, OutputCollector
from ..logs import Logger
from ..lxd import Lxd
from ..model import Actor, Step
from ..store import Store


class StepFailed(Exception):
    """The step cannot succeed; `message` says why in words a Ghost user can act on."""

    def __init__(self, message: str, exit_code: int | None = None, output_tail: str = "", timed_out: bool = False):
        self.message = message
        self.exit_code = exit_code
        self.output_tail = output_tail  # the end of the failed command's output
        self.timed_out = timed_out  # killed at container.exec_timeout
        super().__init__(message)


class LeaseLost(Exception):
    """Another instance holds the step now: stop without writing anything."""


@dataclasses.dataclass(frozen=True)
class Outcome:
    state: str
    message: str = ""
    exit_code: int | None = None
    output_tail: str = ""
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StepContext:
    step: Step
    config: Config
    store: Store
    lxd: Lxd
    log: Logger  # bound with the step's context
    abort: threading.Event  # set when the lease is lost, the step is cancelled, or shutdown ran out of time
    instance_id: str
    # Monotonic time past which this holder no longer counts on its lease: set by the runner at each
    # claim and renewal, ahead of the lease's expiry by a margin, so it stops before a successor may start.
    lease_valid_until: float = math.inf
    _job_log: JobLog | None = None
    # Chores the runner does after recording the outcome (so nobody waits for them).
    after_outcome: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    # A module script's verdict (its output, or its failure) once it ended: kept for this claim, so a start-over
    # after LXD went away during the chores that follow (hand-back, release) redoes those, not the script.
    script_verdict: OutputCollector | StepFailed | None = None

    @property
    def job_log(self) -> JobLog:
        if self._job_log is None:
            marker = f"container {self.step.kind}" + (f" {self.step.module}" if self.step.module else "")
            self._job_log = JobLog(self.config.ghost.log_dir, str(self.step.job_id), marker)
        return self._job_log

    def save(self, state: str | None = None, **fields: Any) -> Step:
        """Fenced write to the step record; raises LeaseLost when another instance holds it."""
        updated = (
            self.store.move(self.step, Actor.RUNNER, state, **fields)
            if state
            else self.store.update_step(self.step, **fields)
        )
        if updated is None:
            self.abort.set()
            raise LeaseLost(self.step.id)
        self.step = updated
        return updated

    def confirm_lease(self) -> None:
        """Before an act a successor's work could conflict with: LeaseLost unless the lease is still ours.

        Ours while the local deadline has not passed: the runner sets it ahead
        of the lease's expiry on the server, and no one may take the step
        before that expiry. A local check, so it needs no MongoDB round trip
        (a step carries on through a short outage); it cannot change before
        the act unless this process pauses past the margin in between.
        """
        if time.monotonic() >= self.lease_valid_until:
            self.abort.set()
            raise LeaseLost(self.step.id)

    def say(self, event: str, text: str, **fields: Any) -> None:
        """Tell both audiences: a line in Ghost's job log and a structured log event."""
        self.job_log.write(text)
        self.log.info(event, **fields)


def run_after_outcome(ctx: StepContext) -> None:
    """The chores a body left for after its outcome was recorded; failures are logged, never raised."""
    for chore in ctx.after_outcome:
        try:
            chore()
        except Exception:  # the orphan sweep catches what this misses
            ctx.log.exception("after_outcome_chore_failed")
    ctx.after_outcome.clear()
