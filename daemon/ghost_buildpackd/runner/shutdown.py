"""Shutdown: stop claiming, give the steps held here a grace period, then abort them; an aborted step
goes back along the table's shutdown rows, where another start resumes it.
"""

from __future__ import annotations

import time

from ..logs import get_logger
from ..model import BUILDIMAGE, PREPARING, Actor, next_state
from ..policy import LIMITS
from ..steps import StepContext
from .pool import Pool

log = get_logger(__package__)  # one logger for the runner, as before its split


class Shutdown(Pool):
    """Stopping: no more claims, a grace period for the steps held here, then their abort."""

    def stop(self, grace: float) -> None:
        """Stop claiming; give running steps `grace` seconds, then abort them and wait for cleanup."""
        self._accepting.clear()
        self._wake.set()
        self._end_builds_ahead()
        deadline = time.monotonic() + grace
        while self.in_flight() and time.monotonic() < deadline:
            self._wait_for_any(deadline - time.monotonic())
        with self._lock:
            remaining = list(self.held.values())
        for held in remaining:
            held.shutting_down = True
            held.ctx.abort.set()
            log.warning("step_aborted_by_shutdown", step=held.ctx.step.id, grace_s=grace)
        cleanup_deadline = time.monotonic() + LIMITS.cleanup_wait(self.config)
        while self.in_flight() and time.monotonic() < cleanup_deadline:
            self._wait_for_any(cleanup_deadline - time.monotonic())
        self._stopped.set()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _end_builds_ahead(self) -> None:
        """Builds running ahead of their AMI end at once: they only save time, and the next start (or the
        build after the AMI) makes them again; a grace period would only delay the stop."""
        with self._lock:
            ahead = [h for h in self.held.values() if h.ctx.step.kind == BUILDIMAGE and h.ctx.step.state == PREPARING]
        for held in ahead:
            held.shutting_down = True
            held.ctx.abort.set()
            log.info("build_ahead_ended_by_shutdown", step=held.ctx.step.id)


def release_for_restart(ctx: StepContext) -> None:
    """Shutdown interrupted the step: put it back so the next start (or another instance) resumes it.

    Where it goes back to is the shutdown's row of the transition table; a
    step the client requested meanwhile keeps its request.
    """
    back = next_state(Actor.SHUTDOWN, ctx.step.state, ctx.step.kind)
    message = "interrupted by daemon shutdown; resumes"
    released = None
    if back is not None:
        released = ctx.store.move(ctx.step, Actor.SHUTDOWN, back, expect_state=ctx.step.state, message=message)
    # No row, or the state moved meanwhile (a request): the state is kept, the lease released.
    released = released or ctx.store.update_step(ctx.step, release=True, message=message)
    log.warning("step_released_for_restart", state=released.state if released else back or ctx.step.state)
