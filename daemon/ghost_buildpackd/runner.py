"""The step runner: claims steps under leases and runs their bodies in a bounded pool.

- A dispatcher thread claims work while a worker slot is free (so other
  instances get the rest) and wakes up at once when told new work exists.
- A renewer thread extends the lease of every step held here; a lost lease or
  a cancellation request sets the step's `abort` event, which stops its
  command (Lxd.execute force-stops the container).
- Self-fencing: each holder keeps a local deadline, `lease_ttl` minus a margin
  after it last sent a renewal that succeeded. A guard thread aborts the step
  when the deadline passes (MongoDB unreachable, or this process paused), so
  the holder stops acting before the lease expires on the server and a
  successor may take it. The renewer makes one bounded attempt per round.
- Every write about a step is fenced on its lease token (StepContext.save); what
  an attempt makes in LXD carries its claim number and is never touched by an
  earlier attempt. The states it writes are the runner's rows of the
  transition table (model.py).
- Host binding: a deploy script runs only on the host Ghost's worker asked
  on (`requested_host`, where its working copy is). A step still pending or
  preparing may be claimed by any host; when Ghost's request for another host
  lands meanwhile, the holder finds it at its next move and hands the step
  back (lease released, state kept) before anything of the script runs.
- Shutdown: stop claiming, let running steps finish within the grace period,
  then abort them; an aborted step goes back along the table's shutdown rows,
  where another start resumes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import structlog
from bson import ObjectId
from pymongo.errors import PyMongoError

from .config import Config
from .ghost.fields import BadDocument
from .logs import get_logger
from .lxd import Lxd, LxdUnavailable, is_unavailable, raised_by_lxd
from .lxd_outages import wait_until_back
from .metrics import MetricsRecorder
from .model import (
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
    cancellation,
    next_state,
)
from .policy import LIMITS, Pacer
from .steps import (
    LeaseLost,
    Outcome,
    StepContext,
    StepFailed,
    clean_up_container,
    remove_leftovers,
    run_after_outcome,
)
from .store import TRANSIENT_ERRORS, Store, short_error
from .supervise import Supervised

log = get_logger(__name__)

MAX_ATTEMPTS = 5  # claims of one step (a deploy takes two: prepare, run); past it, the step fails

StepBody = Callable[[StepContext], Outcome]


@dataclasses.dataclass(frozen=True)
class Bodies:
    """What runs for each kind of step (tests may give trivial ones)."""

    buildimage: StepBody
    prepare_deploy: StepBody
    run_deploy: StepBody

    @classmethod
    def default(cls) -> Bodies:
        from .steps import buildimage, deploy

        return cls(buildimage=buildimage.run, prepare_deploy=deploy.prepare, run_deploy=deploy.run)


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
    """Whether the step is a deploy step being prepared ahead of Ghost's request."""
    return ctx.step.kind == DEPLOY and ctx.step.state == PREPARING


def with_job_log_problem(ctx: StepContext, message: str) -> str:
    """The outcome's message, plus why Ghost's job log could not be written (the step went on without it)."""
    problem = ctx._job_log.problem if ctx._job_log is not None else ""
    return f"{message} ({problem})" if message and problem else message or problem


def cancelled_message(step: Step, reason: str) -> str:
    """A cancelled step's message: for a deploy step, whether its script had started."""
    return cancellation(reason, step.state) if step.kind == DEPLOY else reason


def unprepared(reason: str) -> Outcome:
    """A preparation LXD failed: the step waits for Ghost's request without a container, which the run launches
    (and reports on, if LXD still fails then). Launching ahead only saves time: it never decides the deploy."""
    return Outcome(
        READY, f"no container prepared: {reason}; the run launches one when Ghost asks", fields={"container": None}
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


class Runner:
    def __init__(
        self,
        config: Config,
        store: Store,
        lxd: Lxd,
        bodies: Bodies | None = None,
        metrics: MetricsRecorder | None = None,
        on_image_built: Callable[[ObjectId], None] | None = None,
    ):
        assert config.instance_id, "Config.with_instance_id() first"
        self.config = config
        self.store = store
        self.lxd = lxd
        self.bodies = bodies or Bodies.default()
        self.metrics = metrics
        self.on_image_built = on_image_built
        self.owner = config.instance_id
        self.host = config.host_name
        self.ttl = config.lease_ttl
        self.pool = ThreadPoolExecutor(config.workers, thread_name_prefix="step")
        self.slots = threading.Semaphore(config.workers)
        self.held: dict[str, Held] = {}
        self.futures: set[Future[None]] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._accepting = threading.Event()
        self._stopped = threading.Event()
        self.last_tick = time.monotonic()
        self.loops = [
            Supervised("dispatcher", self._dispatch_loop, self._stopped, progress=lambda: self.last_tick),
            Supervised("lease-renewer", self._renew_loop, self._stopped),
            Supervised("lease-guard", self._guard_loop, self._stopped),
        ]

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._accepting.set()
        for loop in self.loops:
            loop.start()

    def wake(self) -> None:
        """New work may exist: look now instead of at the next idle tick."""
        self._wake.set()

    def in_flight(self) -> list[str]:
        with self._lock:
            return list(self.held)

    def stop(self, grace: float) -> None:
        """Stop claiming; give running steps `grace` seconds, then abort them and wait for cleanup."""
        self._accepting.clear()
        self._wake.set()
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

    def _wait_for_any(self, timeout: float) -> None:
        with self._lock:
            futures = list(self.futures)
        if not futures:
            return
        from concurrent.futures import FIRST_COMPLETED, wait

        wait(futures, timeout=max(0.0, timeout), return_when=FIRST_COMPLETED)

    # --- dispatching --------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        pacer = Pacer()
        while self._accepting.is_set():
            self.last_tick = time.monotonic()
            if not self.slots.acquire(timeout=LIMITS.idle_wait):
                continue
            sent = time.monotonic()
            try:
                step = self.store.claim_step(self.owner, self.ttl, self.host, exclude=tuple(self.in_flight()))
                pacer.succeeded()
            except TRANSIENT_ERRORS as error:
                self.slots.release()
                log.warning("claim_failed_mongodb_unavailable", error=str(error), retry_in_s=pacer.delay)
                pacer.pause(self._wake)
                continue
            except Exception:
                self.slots.release()
                log.exception("claim_failed")
                self._wake.wait(pacer.delay)  # not an outage: the wait does not lengthen
                continue
            if step is None or not self._accepting.is_set():
                self.slots.release()
                if step is not None:
                    self.store.update_step(step, release=True)
                self._wake.wait(LIMITS.idle_wait)
                self._wake.clear()
                continue
            self._submit(step, valid_until=self._lease_deadline(sent))

    def _lease_deadline(self, sent: float) -> float:
        """Local deadline of a lease granted or renewed by a request sent at monotonic time `sent`.

        The expiry written is the server's time when the request was made
        (as estimated by the store) plus `ttl`: no earlier than `sent + ttl`
        on this host's clock, give or take the estimate's error, which the
        margin covers.
        """
        return sent + self.ttl - LIMITS.lease_margin(self.ttl)

    def _submit(self, step: Step, valid_until: float) -> None:
        ctx = StepContext(
            step=step,
            config=self.config,
            store=self.store,
            lxd=self.lxd,
            log=log,
            abort=threading.Event(),
            instance_id=self.owner,
            lease_valid_until=valid_until,
        )
        held = Held(ctx=ctx, started=time.monotonic())
        with self._lock:
            self.held[step.id] = held
            future = self.pool.submit(self._execute, held)
            self.futures.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: Future[None]) -> None:
        with self._lock:
            self.futures.discard(future)
        self.slots.release()
        self._wake.set()  # a slot is free: look for more work

    # --- lease renewal -----------------------------------------------------------------------

    def _renew_loop(self) -> None:
        interval = LIMITS.renew_every(self.ttl)
        while not self._stopped.wait(interval):
            with self._lock:
                held_steps = list(self.held.values())
            for held in held_steps:
                if not held.lost and not held.finishing:
                    self._renew(held, within=interval)

    def _guard_loop(self) -> None:
        """Abort every step whose lease this process can no longer count on (never blocked by MongoDB)."""
        while not self._stopped.wait(LIMITS.guard_every):
            now = time.monotonic()
            with self._lock:
                held_steps = list(self.held.values())
            for held in held_steps:
                if not held.lost and not held.finishing and now >= held.ctx.lease_valid_until:
                    overdue = now - held.ctx.lease_valid_until
                    self._lose(held, "lease_expired_locally", renewal_overdue_s=round(overdue, 1))

    def _lose(self, held: Held, event: str, **fields: Any) -> None:
        held.lost = True
        held.ctx.lease_valid_until = -math.inf  # confirm_lease refuses from now on
        held.ctx.abort.set()
        log.error(event, step=held.ctx.step.id, consequence="stopped acting on it; another holder carries on", **fields)

    def _renew(self, held: Held, within: float) -> None:
        sent = time.monotonic()
        try:
            renewed = self.store.renew_lease(held.ctx.step, self.ttl, within=within)
        except PyMongoError as error:  # the guard gives the lease up once its deadline passes
            log.warning("lease_renewal_failed", step=held.ctx.step.id, error=short_error(error))
            return
        if renewed is None:
            if held.ctx.step.id in self.in_flight() and not held.lost:
                self._lose(held, "lease_lost")
            return
        if not held.lost:
            held.ctx.lease_valid_until = self._lease_deadline(sent)
        if renewed.cancel_requested and not held.cancelled:
            held.cancelled = renewed.cancel_reason or "cancellation requested"
            held.ctx.abort.set()
            log.warning("step_cancel_requested", step=renewed.id, reason=held.cancelled)

    # --- running one step ----------------------------------------------------------------------

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
            ctx.save(RUNNING, message="building the container image")
            return self.bodies.buildimage(ctx)
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

    def _save_unless_requested(self, ctx: StepContext, state: str, **fields: Any) -> bool:
        """Move to `state` unless the client requested the run meanwhile (then ctx.step says so)."""
        updated = self.store.update_step(ctx.step, state=state, expect_state=ctx.step.state, **fields)
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
            self._release_for_restart(ctx)
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
        prepared = self.store.update_step(
            ctx.step,
            state=READY,
            release=True,
            expect_state=PREPARING,
            unless_cancel_requested=True,
            message=outcome.message,
            **dict(outcome.fields),
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
            if self.store.update_step(ctx.step, release=True) is None:
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

    def _release_for_restart(self, ctx: StepContext) -> None:
        """Shutdown interrupted the step: put it back so the next start (or another instance) resumes it.

        Where it goes back to is the shutdown's row of the transition table; a
        step the client requested meanwhile keeps its request.
        """
        state = next_state(Actor.SHUTDOWN, ctx.step.state, ctx.step.kind) or ctx.step.state
        message = "interrupted by daemon shutdown; resumes"
        released = ctx.store.update_step(
            ctx.step, state=state, release=True, expect_state=ctx.step.state, message=message
        ) or ctx.store.update_step(ctx.step, release=True, message=message)
        log.warning("step_released_for_restart", state=released.state if released else state)
