"""Executing one held step: its body run (again from its start when LXD went away and came back),
a step Ghost asked for on another host handed over, and the outcome recorded along the transition table.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import structlog

from ..ghost.fields import BadDocument
from ..logs import get_logger
from ..lxd import LxdUnavailable, is_unavailable, raised_by_lxd
from ..lxd_outages import wait_until_back
from ..model import (
    BUILDIMAGE,
    CANCELLED,
    DEPLOY,
    FAILED,
    PENDING,
    PREPARING,
    READY,
    REQUESTED,
    RUNNING,
    SUCCEEDED,
    Actor,
    Step,
    StepState,
)
from ..policy import LIMITS
from ..steps import LeaseLost, Outcome, StepContext, StepFailed, clean_up_container, remove_leftovers, run_after_outcome
from ..store import TRANSIENT_ERRORS
from .outcomes import (
    MAX_ATTEMPTS,
    Held,
    RequestedElsewhere,
    cancelled_message,
    failure_outcome,
    preparing,
    unprepared,
    with_job_log_problem,
)
from .pool import Pool
from .shutdown import release_for_restart

log = get_logger(__package__)  # one logger for the runner, as before its split


class Execution(Pool):
    """One held step: its body, LXD outages ridden out, the hand-over to the requested host, its outcome."""

    def _execute(self, held: Held) -> None:
        ctx = held.ctx
        step = ctx.step
        with structlog.contextvars.bound_contextvars(
            job_id=str(step.job_id), step=step.id, kind=step.kind, module=step.module, app_id=str(step.app_id)
        ):
            log.info("step_claimed", state=step.state, attempt=step.attempts)
            try:
                outcome = self._run_riding_lxd_outages(held)
                self._finish(held, outcome)
            except LeaseLost:
                log.warning("step_abandoned_lease_lost", consequence="the instance holding it now carries on")
            except RequestedElsewhere as elsewhere:
                self._hand_over(held, elsewhere.host)
            except Exception:  # never let one step take the daemon down
                log.exception("step_bookkeeping_failed")
            finally:
                held.finishing = True  # the lease is given up: no renewal, no guard during the chores
                run_after_outcome(ctx)
                with self._lock:
                    self.held.pop(step.id, None)

    def _run_riding_lxd_outages(self, held: Held) -> Outcome:
        """Run the body; when LXD goes away, keep the lease, wait for LXD and start the body over.

        What ran when LXD went away has an unknown outcome (its exec stream was
        cut), so the step's containers are deleted, ending anything still
        running in them, and the body runs again from its start, as a takeover
        would. The lease is renewed meanwhile, so no other instance steps in.
        """
        ctx = held.ctx
        outages = 0
        while True:
            try:
                return self._run_body(held, start_over=outages > 0)
            except LxdUnavailable as error:
                outages += 1
                if outages == LIMITS.max_lxd_outages:
                    return self._lxd_gone(ctx, f"LXD went away {outages} times while this step ran ({error})")
                ctx.log.warning(
                    "lxd_unavailable_step_waits",
                    error=str(error),
                    outage=outages,
                    consequence="the step starts over in a new container when LXD is back",
                )
                ctx.job_log.write(f"LXD went away ({error}); the step starts over when it is back")
                with contextlib.suppress(*TRANSIENT_ERRORS):  # only what `status` shows meanwhile
                    ctx.save(message=f"waiting for LXD to come back: {error}")
                if not wait_until_back(self.lxd, error, ctx.abort, LIMITS.lxd_outage_wait):
                    if ctx.abort.is_set():  # shutdown, cancellation or a lost lease: _finish says which
                        return Outcome(FAILED, f"LXD unavailable: {error}")
                    return self._lxd_gone(ctx, f"LXD did not come back within {LIMITS.lxd_outage_wait:g}s: {error}")
                ctx.save(message="LXD is back; the step starts over")  # fenced: LeaseLost before touching LXD

    @staticmethod
    def _lxd_gone(ctx: StepContext, reason: str) -> Outcome:
        """The outcome when LXD stayed away: a preparation leaves the step to the run, anything else fails."""
        return unprepared(reason) if preparing(ctx) else Outcome(FAILED, reason)

    def _run_body(self, held: Held, start_over: bool = False) -> Outcome:
        """The step's outcome; LxdUnavailable when LXD went away, whatever the body made of that."""
        ctx = held.ctx
        try:
            if start_over or ctx.step.cancel_requested or ctx.step.attempts > MAX_ATTEMPTS:
                remove_leftovers(ctx)
            if ctx.step.cancel_requested:
                return Outcome(CANCELLED, cancelled_message(ctx.step, ctx.step.cancel_reason or "cancelled"))
            if ctx.step.attempts > MAX_ATTEMPTS:
                return Outcome(
                    FAILED, f"gave up after {MAX_ATTEMPTS} attempts: the daemon running it stopped each time"
                )
            return self._dispatch_body(ctx, start_over)
        except (LeaseLost, RequestedElsewhere):
            raise
        except Exception as error:
            if is_unavailable(error):
                raise LxdUnavailable(str(error)) from error
            # LXD's own error, not a verdict of the body (StepFailed: no such image, a readiness probe that hangs).
            if preparing(ctx) and not isinstance(error, StepFailed | BadDocument) and raised_by_lxd(error):
                ctx.log.warning("deploy_preparation_failed_in_lxd", error=str(error), consequence="launched when asked")
                return unprepared(f"LXD failed the launch ({error})")
            return failure_outcome(error)

    def _dispatch_body(self, ctx: StepContext, start_over: bool) -> Outcome:
        step = ctx.step
        if step.kind == BUILDIMAGE:
            return self._dispatch_build(ctx)
        if step.kind != DEPLOY:
            raise StepFailed(f"unknown step kind {step.kind!r}")
        if step.state in (PENDING, PREPARING) and self._save_unless_requested(
            ctx, PREPARING, message="launching the container"
        ):
            return self.bodies.prepare_deploy(ctx)
        if ctx.step.state in (REQUESTED, RUNNING):
            self._only_on_requested_host(ctx.step)
            # Taken over (a start-over has just removed them): what the last run left must go.
            if ctx.step.state == RUNNING and not start_over and remove_leftovers(ctx):
                log.warning("deploy_run_taken_over", consequence="the buildpack runs again in a new container")
            ctx.save(RUNNING, message="running the buildpack")
            return self.bodies.run_deploy(ctx)
        raise StepFailed(f"deploy step in unexpected state '{ctx.step.state}'")

    def _dispatch_build(self, ctx: StepContext) -> Outcome:
        """Build ahead of the AMI until it is asked for; then publish (or build) on the host that asked, if any."""
        # Only a request binds a build to a host: an earlier version's record Ghost asked for may be pending.
        asked = ctx.step.requested_host is not None
        if (
            ctx.step.state in (PENDING, PREPARING)
            and not asked
            and self._save_unless_requested(
                ctx, PREPARING, message="building ahead of the AMI once Ghost's inputs exist"
            )
        ):
            return self.bodies.prepare_buildimage(ctx)
        if ctx.step.requested_host not in (None, self.host):  # Ghost's job asked on its own host meanwhile
            raise RequestedElsewhere(ctx.step.requested_host)
        ctx.save(RUNNING, message="building the container image")
        return self.bodies.buildimage(ctx)

    def _only_on_requested_host(self, step: Step) -> None:
        """RequestedElsewhere unless `step` was requested on this host.

        Claims of a requested or running deploy step are bound to its host
        (`Store.claim_step`); a claim of a pending or preparing one is not, and
        Ghost's request may land just after it. The record read under our lease
        is final on this point: `requested_host` is written only with the move
        to `requested`, never once the step is requested or running.
        """
        if step.requested_host != self.host:
            raise RequestedElsewhere(step.requested_host)

    def _hand_over(self, held: Held, host: str | None) -> None:
        """Release a step Ghost requested on another host, its state kept, for the daemon there to run."""
        ctx = held.ctx
        held.finishing = True
        message = f"claimed on host {self.host} before Ghost's request for host {host} landed; left to {host}"
        # Nothing was attempted: the claim gives its attempt back (MAX_ATTEMPTS counts attempts that ran).
        attempts = max(ctx.step.attempts - 1, 0)
        if self.store.update_step(ctx.step, release=True, message=message, attempts=attempts) is None:
            log.warning("step_abandoned_lease_lost", consequence="the instance holding it now carries on")
            return
        log.warning("step_left_to_requested_host", requested_host=host, host=self.host, state=ctx.step.state)

    def _save_unless_requested(self, ctx: StepContext, state: StepState, **fields: Any) -> bool:
        """Move to `state` unless the client requested the run meanwhile (then ctx.step says so)."""
        updated = self.store.move(ctx.step, Actor.RUNNER, state, expect_state=ctx.step.state, **fields)
        if updated is not None:
            ctx.step = updated
            return True
        fresh = self.store.get_step(ctx.step.id)
        if fresh is None or fresh.lease_token != ctx.step.lease_token:
            raise LeaseLost(ctx.step.id)
        ctx.step = fresh
        return False

    def _finish(self, held: Held, outcome: Outcome) -> None:
        ctx = held.ctx
        if held.lost:
            raise LeaseLost(ctx.step.id)
        held.finishing = True
        if held.shutting_down and outcome.state != SUCCEEDED:
            release_for_restart(ctx)
            return
        if outcome.state == READY:
            if not held.cancelled and self._finish_preparation(ctx, outcome):
                return
            outcome = self._cancelled_while_preparing(ctx, held.cancelled)
        elif held.cancelled and outcome.state != SUCCEEDED:
            outcome = Outcome(CANCELLED, cancelled_message(ctx.step, held.cancelled))
        ctx.save(
            outcome.state,
            message=with_job_log_problem(ctx, outcome.message),
            exit_code=outcome.exit_code,
            output_tail=outcome.output_tail,
            **dict(outcome.fields),
        )
        seconds = time.monotonic() - held.started
        event = "step_succeeded" if outcome.state == SUCCEEDED else f"step_{outcome.state}"
        level = log.info if outcome.state in (SUCCEEDED, CANCELLED) else log.error
        level(
            event,
            outcome=outcome.state,
            reason=outcome.message,
            exit_code=outcome.exit_code,
            duration_s=round(seconds, 3),
        )
        ctx.job_log.write(f"{ctx.step.kind} step {outcome.state}: {outcome.message}")
        if self.metrics is not None:
            self.metrics.step_finished(ctx.step.kind, outcome.state, seconds)
        if ctx.step.kind == BUILDIMAGE and outcome.state == SUCCEEDED and self.on_image_built and ctx.step.app_id:
            self.on_image_built(ctx.step.app_id)

    def _finish_preparation(self, ctx: StepContext, outcome: Outcome) -> bool:
        """Prepared: `ready` and release; if the client asked meanwhile, leave `requested` for a worker.

        False, with nothing written, when a cancellation was asked for meanwhile
        (the job ended while the container was launched): the caller ends the
        step. `ready` is written only if nobody asked, so a request the renewer
        has not seen yet cannot be lost in a released step nobody claims.
        """
        prepared = self.store.move(
            ctx.step, Actor.RUNNER, READY, expect_state=PREPARING, message=outcome.message, **dict(outcome.fields)
        )
        if prepared is not None:
            ctx.step = prepared
        else:
            fresh = self.store.get_step(ctx.step.id)
            if fresh is None or fresh.lease_token != ctx.step.lease_token:
                raise LeaseLost(ctx.step.id)
            ctx.step = fresh
            if fresh.cancel_requested:
                return False
            # What the preparation made stays recorded for the run (a build ahead: its container and inputs).
            if self.store.update_step(ctx.step, release=True, **dict(outcome.fields)) is None:
                raise LeaseLost(ctx.step.id)
            self.wake()
        log.info("step_prepared", container=ctx.step.container, message=outcome.message)
        return True

    def _cancelled_while_preparing(self, ctx: StepContext, seen: str) -> Outcome:
        """The outcome of a step whose cancellation came while it was prepared (`seen` at a renewal, else found
        when `ready` was refused); the container launched for it goes once the outcome is recorded."""
        container = ctx.step.container
        if container:
            ctx.after_outcome.append(lambda: clean_up_container(ctx, container))
        if seen:
            return Outcome(CANCELLED, cancelled_message(ctx.step, seen))
        reason = ctx.step.cancel_reason or "cancellation requested"
        log.warning("step_cancel_requested", step=ctx.step.id, reason=reason, while_state=ctx.step.state)
        return Outcome(CANCELLED, cancelled_message(ctx.step, reason))
