"""Claims and the worker pool: the dispatcher claims a step while a slot is free, the renewer extends
the leases held here, the guard aborts a step whose lease this process can no longer count on.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from bson import ObjectId
from pymongo.errors import PyMongoError

from ..config import Config
from ..logs import get_logger
from ..lxd import Lxd
from ..metrics import MetricsRecorder
from ..model import Step
from ..policy import LIMITS, Pacer
from ..steps import StepContext
from ..store import TRANSIENT_ERRORS, Store, short_error
from ..supervise import Supervised
from .outcomes import Bodies, Held

log = get_logger(__package__)  # one logger for the runner, as before its split


class Pool:
    """The claim loop and the worker pool: claims work while a slot is free, and keeps the leases of the
    steps held here (renewals, and the guard that gives a lease up when its deadline passes)."""

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

    def _execute(self, held: Held) -> None:
        """Run one held step to its outcome (`execute.Execution`)."""
        raise NotImplementedError
