"""What runs for a step and what its outcome is: the bodies, the record of a held step, and the
outcomes the runner makes of what a body did.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..ghost.fields import BadDocument
from ..logs import get_logger
from ..model import DEPLOY, FAILED, PREPARING, READY, Step, cancellation
from ..steps import Outcome, StepContext, StepFailed

log = get_logger(__package__)  # one logger for the runner, as before its split


MAX_ATTEMPTS = 5  # claims of one step (a deploy takes two: prepare, run); past it, the step fails

StepBody = Callable[[StepContext], Outcome]


@dataclasses.dataclass(frozen=True)
class Bodies:
    """What runs for each kind of step (tests may give trivial ones)."""

    buildimage: StepBody
    prepare_deploy: StepBody
    run_deploy: StepBody
    prepare_buildimage: StepBody = lambda ctx: Outcome(READY, "not built ahead", fields={"inputs": ""})

    @classmethod
    def default(cls) -> Bodies:
        from ..steps import buildimage, buildimage_ahead, deploy

        return cls(
            buildimage=buildimage.run,
            prepare_deploy=deploy.prepare,
            run_deploy=deploy.run,
            prepare_buildimage=buildimage_ahead.prepare,
        )


class RequestedElsewhere(Exception):
    """Ghost asked for this deploy step on another host while this one held it: it is that host's to run."""

    def __init__(self, host: str | None):
        self.host = host
        super().__init__(f"requested on host {host}")


@dataclasses.dataclass
class Held:
    """A step this process holds the lease of."""

    ctx: StepContext
    started: float
    cancelled: str = ""  # why, when a cancellation was requested
    lost: bool = False
    shutting_down: bool = False
    finishing: bool = False  # its outcome is being recorded, which releases the lease: renewals stop


def preparing(ctx: StepContext) -> bool:
    """Whether the step is being prepared ahead of Ghost's request (a container launched, a build run ahead)."""
    return ctx.step.state == PREPARING


def with_job_log_problem(ctx: StepContext, message: str) -> str:
    """The outcome's message, plus why Ghost's job log could not be written (the step went on without it)."""
    problem = ctx._job_log.problem if ctx._job_log is not None else ""
    return f"{message} ({problem})" if message and problem else message or problem


def cancelled_message(step: Step, reason: str) -> str:
    """A cancelled step's message: for a deploy step, whether its script had started."""
    return cancellation(reason, step.state) if step.kind == DEPLOY else reason


def unprepared(reason: str) -> Outcome:
    """A preparation LXD failed: the step waits for Ghost's request without a container, which the run launches
    (and reports on, if LXD still fails then). Launching ahead only saves time: it never decides the step."""
    return Outcome(
        READY,
        f"no container prepared: {reason}; the run launches one when Ghost asks",
        fields={"container": None, "inputs": ""},
    )


def failure_outcome(error: Exception) -> Outcome:
    """The failed outcome a body's exception stands for: its own message when it is one for people."""
    if isinstance(error, StepFailed):
        fields = {"timed_out": True} if error.timed_out else {}
        return Outcome(FAILED, error.message, error.exit_code, error.output_tail, fields)
    if isinstance(error, BadDocument):
        return Outcome(FAILED, f"bad input: {error}")
    log.exception("step_crashed")
    return Outcome(FAILED, f"internal error: {type(error).__name__}: {error}")
