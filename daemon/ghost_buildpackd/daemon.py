"""`ghost-buildpackd run`: wires config, MongoDB, LXD, event intake, runner and upkeep.

Fails fast at start (MongoDB, LXD, event mode); at run time it rides out
outages: the event source and the runner retry with backoff. Every long-lived
loop runs supervised (supervise.py): a crash is logged and the loop restarted.
The main thread only feeds systemd's watchdog (while the event loop and the
dispatcher make progress and no loop has crash-looped past the stall limit or
ended) and updates the STATUS line; it never waits on MongoDB, so an outage
cannot starve the watchdog. Heartbeats, the server-clock measurement and the
lag figure run in their own thread; with `metrics.listen` set, LXD's health is
probed in another (each probe bounded on its own), so neither heartbeats nor
/readyz ever wait on LXD.

A stop (SIGTERM) rides a restart: heartbeats go on until the process ends (a
waiting Ghost command sees a live daemon while running steps finish), and the
instance record is then marked stopped, not removed, so a waiting command
gives the next instance `restart_grace` to start. The stop is bounded: past
`stop_bound` the process leaves with os._exit, whatever a worker is stuck in;
the leases of the steps it held expire and the next instance resumes them.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from bson import ObjectId
from pymongo.errors import PyMongoError

from . import __version__
from .config import Config
from .events import COMMANDS, ChangeStreamSource, Intake, PollSource, StartupError, choose_event_mode
from .logs import get_logger
from .lxd import Lxd
from .metrics import start_metrics
from .notify import SystemdNotifier
from .policy import LIMITS
from .runner import Bodies, Runner
from .steps.warm import idle_launcher, warm_candidates
from .store import Store, next_change, redacted_uri, short_error, utcnow
from .supervise import Supervised
from .upkeep.loop import Upkeep
from .upkeep.retention import Reconciler
from .upkeep.warm_pool import WarmPool

log = get_logger(__name__)

STATUS_EVERY = 1.0  # how often the STATUS line is refreshed (sent only when it changed)
# Ghost offers the base image list while it is younger than this many refresh intervals: one missed
# refresh (LXD slow, MongoDB blip) keeps the selector, a stopped daemon loses it soon.
REQUEST_POLL = 0.2  # poll mode: how often to look for a client's buildpack request
EXIT_STOP_BOUND = 3  # the stop outlasted LIMITS.stop_bound: the process left with steps still held


def connect_store(config: Config) -> Store:
    store = Store.from_uri(config.mongodb.uri, config.mongodb.database, config.mongodb.timeout)
    store.ping()
    return store


def log_containers_off(config: Config) -> None:
    """Once at start: Ghost's container.enabled is off, so this daemon makes no step (19.08's lxd_is_available)."""
    where = config.ghost_settings.path
    log.warning(
        "containers_off_in_ghost_config",
        ghost_config=str(where) if where else None,
        reason=(
            f"container.enabled is not true in {where}" if where else "no Ghost config.yml was read (ghost.config)"
        ),
        consequence="no container step is made for builds or deploys; Ghost runs module scripts on its host",
        fix="set container.enabled: true in Ghost's config.yml (ghost.config), then restart ghost-buildpackd",
    )


class Daemon:
    def __init__(
        self, config: Config, store: Store, lxd: Lxd, bodies: Bodies | None = None, owns_process: bool = False
    ):
        self.config = config
        # The process is this daemon's (`run`): a stop past the stop bound ends it. Never for a daemon run
        # inside another program (tests), which must outlive it.
        self.owns_process = owns_process
        self.store = store
        self.lxd = lxd
        self.stop = threading.Event()
        self.heartbeats_end = threading.Event()  # set once the stop is done: heartbeats go on until then
        self.phase = "starting"  # then "running", then "stopping": what /readyz says before and after
        self.metrics = start_metrics(config.metrics, log, health=self)
        self.reconciler = Reconciler(config, store, lxd, self.metrics)
        self.upkeep = Upkeep(config, store, lxd, self.reconciler, self.stop)
        self.warm_pool = WarmPool(
            config,
            store,
            lxd,
            self.stop,
            candidates=lambda: warm_candidates(config, store, lxd),
            launch=idle_launcher(config, lxd, self.stop),
        )
        self.runner = Runner(config, store, lxd, bodies, self.metrics, on_image_built=self._image_built)
        self.intake = Intake(
            store,
            on_new_steps=self.runner.wake,
            on_job_ended=self._job_ended,
            containers_enabled=config.ghost_settings.container_enabled,
            on_deploy_started=self.warm_pool.kick,  # the app's next deploy may find an idle container waiting
        )
        self.mode, self.mode_reason = choose_event_mode(config, store)
        source_class = ChangeStreamSource if self.mode == "change_stream" else PollSource
        self.source = source_class(config, store, self.intake, self.stop, self.metrics)
        self.notifier = SystemdNotifier()
        self.started_at = utcnow()
        watch = self._watch_requests if self.mode == "change_stream" else self._poll_requests
        self.loops = [  # the daemon's own (the runner has its own), heartbeats last: started after the first one
            Supervised("events", self.source.run, self.stop, progress=lambda: self.source.last_tick),
            Supervised("requests", watch, self.stop),
            self.upkeep.loop,
            self.warm_pool.loop,
            Supervised("heartbeat", self._heartbeat_loop, self.heartbeats_end),
        ]
        self.lxd_up = True  # LXD's last answer to the health probe (it answered at start)
        if config.metrics.listen is not None:  # what /metrics and /readyz say about LXD
            self.loops.insert(-1, Supervised("lxd-probe", self._probe_lxd_loop, self.stop))
        self._main_wake = threading.Event()  # a signal arrived: the main loop acts on it at once
        self._hangups = 0  # SIGHUPs received and not yet logged
        self.event_lag: float | None = None  # seconds, as last measured by the heartbeat thread
        self.mongodb_problem = ""  # why the last heartbeat failed, while it fails
        self.stall_after = LIMITS.stall_after(config)  # a loop without progress for this long starves the watchdog

    def run(self) -> int:
        self.store.ensure_indexes()
        self.runner.start()
        *loops, heartbeats = self.loops
        for loop in loops:
            loop.start()
        self.heartbeat()
        self._forget_stopped_instances()
        heartbeats.start()
        self.phase = "running"
        self.notifier.ready()
        self.notifier.status(self.status_line())
        log.info(
            "daemon_ready",
            instance=self.config.instance_id,
            version=__version__,
            event_mode=self.mode,
            mode_reason=self.mode_reason,
            workers=self.config.workers,
            host=self.config.host_name,
        )
        if not self.config.ghost_settings.container_enabled:
            log_containers_off(self.config)
        self._main_loop()
        return self.shutdown()

    def _image_built(self, app_id: ObjectId) -> None:
        self.upkeep.image_built(app_id)
        self.warm_pool.kick()  # the app's idle containers are of its old image now

    def _job_ended(self, job_id: ObjectId) -> None:
        self.upkeep.job_ended(job_id)
        self.warm_pool.kick()

    def request_stop(self) -> None:
        """SIGTERM, SIGINT: stop (safe in a signal handler: it only sets events)."""
        self.stop.set()
        self._main_wake.set()

    def hang_up(self) -> None:
        """SIGHUP: noted here, logged by the main loop (logging inside a signal handler could deadlock)."""
        self._hangups += 1
        self._main_wake.set()

    def _main_loop(self) -> None:
        """Feed the watchdog and refresh STATUS; nothing here waits on MongoDB or LXD."""
        watchdog = self.notifier.watchdog_interval()
        tick = min(STATUS_EVERY, watchdog) if watchdog else STATUS_EVERY
        status = ""
        while not self.stop.is_set():
            self._main_wake.wait(tick)
            self._main_wake.clear()
            if self.stop.is_set():
                break
            if self._hangups:
                self._hangups = 0
                log.warning(
                    "sighup_ignored",
                    consequence="configuration changes apply at the next start: systemctl restart ghost-buildpackd",
                )
            stalled = self.stalled_loops()
            if stalled:
                log.error("loop_stalled_watchdog_not_fed", loops=stalled)
            else:
                self.notifier.watchdog()
            line = self.status_line()
            if line != status:
                status = line
                self.notifier.status(line)

    def status_line(self) -> str:
        """systemd's STATUS=: event mode, busy workers, event lag (or why MongoDB is not answering)."""
        busy = len(self.runner.in_flight())
        line = f"events: {self.mode}; workers busy: {busy}/{self.config.workers}; "
        if self.mongodb_problem:
            return line + f"MongoDB unreachable: {self.mongodb_problem[:120]}"
        lag = "unknown" if self.event_lag is None else f"{self.event_lag:.1f}s"
        return line + f"event lag: {lag}"

    def _heartbeat_loop(self) -> None:
        """Every heartbeat interval: the instance record, a reading of the server's clock, the event lag."""
        while not self.heartbeats_end.wait(LIMITS.heartbeat_every):
            try:
                self.heartbeat()
                self.store.measure_server_clock()
                self.mongodb_problem = ""
                self.metrics.set_up("mongodb", True)
            except PyMongoError as error:
                self.mongodb_problem = short_error(error)
                self.metrics.set_up("mongodb", False)
                log.warning("heartbeat_failed", error=self.mongodb_problem)

    def _probe_lxd_loop(self) -> None:
        """Every lxd_health_every: whether LXD answers, within a wait of its own (LXD may take lxd.timeout, longer
        than a heartbeat may be late); the health answers read the last answer."""
        within = LIMITS.lxd_health_probe_wait(self.config)
        while True:
            self.lxd_up = self.lxd.answers(within)
            self.metrics.set_up("lxd", self.lxd_up)
            if self.stop.wait(LIMITS.lxd_health_every):
                return

    def all_loops(self) -> list[Supervised]:
        return self.loops + self.runner.loops

    def stalls(self) -> list[str]:
        """Why loops count as stalled: without progress, crash-looping or ended past `stall_after` seconds."""
        now = time.monotonic()
        return [stall for loop in self.all_loops() if (stall := loop.stall(now, self.stall_after))]

    def stalled_loops(self) -> list[str]:
        """The names of the loops that starve the watchdog (see `stalls`)."""
        now = time.monotonic()
        return [loop.name for loop in self.all_loops() if loop.stall(now, self.stall_after)]

    def loop_problems(self) -> list[str]:
        """Loops crash-looping, stalled or ended: what readiness and the heartbeat record say."""
        now = time.monotonic()
        return [problem for loop in self.all_loops() if (problem := loop.problem(now, self.stall_after))]

    # --- /healthz and /readyz (metrics.listen) ----------------------------------------------

    def liveness(self) -> list[str]:
        """Problems that a restart would cure: a loop without progress, crash-looping past the limit, or ended."""
        if self.phase == "starting":  # the endpoint answers before the loops exist
            return []
        return self.stalls()

    def readiness(self) -> list[str]:
        """Problems that keep steps from running now: not started yet, stopping, a loop crash-looping, stalled
        or ended, MongoDB not answering, or LXD not answering its last health probe."""
        problems = [] if self.phase == "running" else [f"daemon {self.phase}"]
        problems += self.loop_problems()
        try:
            self.store.ping()
            self.metrics.set_up("mongodb", True)
        except PyMongoError as error:
            self.metrics.set_up("mongodb", False)
            problems.append(f"mongodb does not answer: {short_error(error)}")
        if not self.lxd_up:  # the probe's last answer: a request to /readyz never waits on LXD
            problems.append(f"lxd does not answer at {self.config.lxd.endpoint}")
        return problems

    def _watch_requests(self) -> None:
        """Wake the dispatcher as soon as a client requests a buildpack run (change-stream mode)."""
        while not self.stop.is_set():
            try:
                with self.store.watch_steps(max_await=1.0) as stream:
                    while not self.stop.is_set():
                        if next_change(stream, self.stop) is not None:
                            self.runner.wake()
            except PyMongoError as error:
                log.warning("request_watch_failed", error=str(error))
                self.stop.wait(1.0)

    def _poll_requests(self) -> None:
        """Poll mode: look for a client's request every REQUEST_POLL seconds, so it never waits a whole idle tick."""
        while not self.stop.wait(REQUEST_POLL):
            try:
                if self.store.requested_step_waiting(self.config.host_name):
                    self.runner.wake()
            except PyMongoError as error:
                log.warning("request_poll_failed", error=str(error))
                self.stop.wait(1.0)

    def heartbeat(self) -> None:
        self._measure_event_lag()
        self.store.heartbeat(
            self.config.instance_id or "",
            {
                "host": self.config.host_name,
                "pid": os.getpid(),
                "version": __version__,
                "event_mode": self.mode,
                "mode_reason": self.mode_reason,
                "last_event_at": self.source.last_event_at,
                "started_at": self.started_at,
                "steps_in_flight": self.runner.in_flight(),
                "workers": self.config.workers,
                "phase": self.phase,
                # Stopping, the loops end one by one: that is no problem to report.
                "loop_problems": self.loop_problems() if self.phase != "stopping" else [],
            },
        )

    def _measure_event_lag(self) -> None:
        """Newest change of a buildimage or deploy job in the database vs the newest this instance has seen."""
        seen = self.source.last_event_at
        newest = self.store.newest_job_update(COMMANDS)  # one read per command on its index
        if newest is None:
            self.event_lag = 0.0
            return
        if seen is None:
            return
        self.event_lag = max(0.0, (newest - seen).total_seconds())
        if self.metrics.enabled:
            self.metrics.set_event_lag(self.event_lag)

    def _forget_stopped_instances(self) -> None:
        """The records of instances on this host that stopped (a restart) are no longer needed."""
        try:
            self.store.forget_stopped_instances(self.config.host_name)
        except PyMongoError as error:  # harmless: they are only read within restart_grace of their stop
            log.warning("stopped_instances_not_forgotten", error=short_error(error))

    def shutdown(self) -> int:
        self.phase = "stopping"
        bound = LIMITS.stop_bound(self.config)
        log.info(
            "daemon_stopping",
            grace_s=self.config.shutdown_grace,
            stop_bound_s=bound,
            steps_in_flight=self.runner.in_flight(),
        )
        if self.owns_process:
            self._leave_after(bound)
        self.notifier.stopping()
        self.runner.stop(self.config.shutdown_grace)
        self.warm_pool.close(within=LIMITS.warm_pool_stop / 2)
        self._mark_stopped()
        log.info("daemon_stopped")
        return 0

    def _mark_stopped(self) -> None:
        """Heartbeats end; the record says the process ended (a waiting client then allows for a restart)."""
        self.heartbeats_end.set()
        try:
            self.store.mark_instance_stopped(self.config.instance_id or "", within=self.config.mongodb.timeout)
        except PyMongoError as error:
            log.warning(
                "instance_record_not_marked_stopped",
                error=short_error(error),
                consequence="waiting clients count it dead once its heartbeat ages out",
            )

    def _leave_after(self, bound: float) -> None:
        """From now on, the process ends within `bound` seconds: Python joins the step workers at exit, and one
        stuck in a retried MongoDB or LXD call would otherwise hold it until systemd's SIGKILL."""
        started = time.monotonic()

        def leave() -> None:
            threading.Event().wait(bound)  # never set: a sleep
            log.error(
                "stop_bound_reached_exiting",
                stop_bound_s=bound,
                stopping_for_s=round(time.monotonic() - started, 1),
                steps_in_flight=self.runner.in_flight(),
                threads=sorted(t.name for t in threading.enumerate() if t.is_alive() and not t.daemon),
                consequence="the leases of the steps still held expire; the next instance resumes them",
            )
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_STOP_BOUND)

        threading.Thread(target=leave, name="stop-bound", daemon=True).start()


def run_daemon(config: Config) -> int:
    """Start, serve until SIGTERM/SIGINT, shut down cleanly. Exit 1 when it cannot start."""
    config = config.with_instance_id()
    try:
        store = connect_store(config)
    except PyMongoError as error:
        log.error("startup_failed_mongodb", uri=redacted_uri(config.mongodb.uri), error=short_error(error))
        return 1
    try:
        lxd = Lxd(config.lxd)
        lxd.server_info()
    except Exception as error:
        log.error("startup_failed_lxd", endpoint=config.lxd.endpoint, error=str(error))
        return 1
    try:
        daemon = Daemon(config, store, lxd, owns_process=True)
    except StartupError as error:
        log.error("startup_failed_event_mode", reason=str(error))
        return 1
    install_signal_handlers(daemon)
    return daemon.run()


def install_signal_handlers(daemon: Daemon) -> None:
    """SIGTERM/SIGINT stop the daemon cleanly; SIGHUP (systemctl reload) is logged and survived."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: daemon.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: daemon.hang_up())
