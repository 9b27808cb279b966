"""Event intake: see every job change and turn it into step records, exactly once.

Two sources feed one `Intake`:
- `ChangeStreamSource` watches `jobs` (replica sets, sharded clusters) and
  persists the resume token only after the event became step records;
- `PollSource` queries jobs by `_updated` behind a persisted high-water mark
  (standalone servers, like Ghost's own docker-compose).
Both run a catch-up scan when they start, and the change-stream source again
whenever its token is no longer usable, so no job is lost to an outage, a
restart or a lost oplog position. Step ids are deterministic and handling a
job is idempotent: reading the same job twice is harmless.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, Protocol

from bson import ObjectId
from pymongo.errors import OperationFailure, PyMongoError

from .config import Config
from .ghost.documents import Job, built_image, containers_off, parse_app, parse_job
from .ghost.fields import BadDocument
from .logs import get_logger
from .metrics import MetricsRecorder
from .model import BUILDIMAGE, DEPLOY, FAILED, REDEPLOY, Step, step_id
from .policy import Pacer
from .store import TRANSIENT_ERRORS, Store, in_transition, next_change, utcnow

log = get_logger(__name__)

# redeploy: the `buildpack` command takes its after_all_deploy (Ghost 19.08 never asks: its redeploy module is
# `{path, name}` only), so such steps are cancelled when the job ends.
COMMANDS = (BUILDIMAGE, DEPLOY, REDEPLOY)
DEPLOY_ENDED = ("done", "failed", "aborted", "cancelled")
# The server no longer has the history the token points into, or the token cannot resume.
TOKEN_UNUSABLE = {286, 280, 260, 9}
STREAM_ENDING = ("invalidate", "drop", "rename", "dropDatabase")
CHECKPOINT_EVERY = 5.0  # seconds between saves of the post-batch token on a quiet collection


class StartupError(Exception):
    """The daemon cannot start as configured; the message says how to fix it."""


def choose_event_mode(config: Config, store: Store) -> tuple[str, str]:
    """Which source to run, and why (logged at start and shown by `status`)."""
    if config.events.mode == "poll":
        return "poll", "events.mode is poll"
    supported, why = store.change_streams_supported()
    if supported:
        return "change_stream", f"{why} (events.mode {config.events.mode})"
    if config.events.mode == "change_stream":
        raise StartupError(
            f"events.mode is change_stream but {why}. Convert the server to a single-node replica set "
            "(start mongod with --replSet rs0, then run rs.initiate() once) or set events.mode: poll"
        )
    return "poll", f"{why}; polling jobs every {config.events.poll_interval:g}s"


# How rq ends a job at its timeout (rq_worker_job_timeout): Ghost records the exception's class as the message.
RQ_TIMEOUT = "JobTimeoutException"


def job_end_reason(job: Job) -> str:
    """Why a deploy's steps are cancelled: the job ended, and how, as far as its record says."""
    reason = f"{job.command} job ended ({job.status})"
    if RQ_TIMEOUT in job.message:
        reason += " at Ghost's RQ job timeout (rq_worker_job_timeout killed it)"
    return reason


class JobRecords(Protocol):
    """What deciding a job reads and writes: the store, or a catch-up batch answering from what it read in bulk."""

    def get_job(self, job_id: ObjectId) -> dict[str, Any] | None: ...
    def get_app(self, app_id: ObjectId) -> dict[str, Any] | None: ...
    def get_step(self, sid: str) -> Step | None: ...
    def steps_for_job(self, job_id: ObjectId) -> list[Step]: ...
    def cancel_job_steps(self, job_id: ObjectId, reason: str) -> int: ...
    def create_step(
        self,
        job_id: ObjectId,
        kind: str,
        module: str | None = None,
        app_id: ObjectId | None = None,
        state: str = ...,
        message: str = "",
        script: str = ...,
    ) -> bool: ...


class Intake:
    """Decides, from a job as it is now, which step records must exist."""

    def __init__(
        self,
        store: Store,
        on_new_steps: Callable[[], None],
        on_job_ended: Callable[[ObjectId], None],
        containers_enabled: bool = True,
    ):
        self.store = store
        self.records: JobRecords = store
        self.on_new_steps = on_new_steps
        self.on_job_ended = on_job_ended
        self.containers_enabled = containers_enabled  # Ghost's container.enabled: off, no step is made

    def handle_job_id(self, job_id: Any) -> None:
        doc = self.records.get_job(job_id)
        if doc is not None:
            self.handle_job(doc)

    def handle_job(self, doc: Mapping[str, Any]) -> None:
        if doc.get("command") not in COMMANDS:
            return
        try:
            self._handle_job(doc)
        except PyMongoError:
            raise  # outages: the source retries the job
        except Exception as error:  # one poisonous job must not stop the intake of every later job
            log.exception("job_handling_failed", job_id=str(doc.get("_id")), error=f"{type(error).__name__}: {error}")

    def _handle_job(self, doc: Mapping[str, Any]) -> None:
        try:
            job = parse_job(doc)
        except BadDocument as error:
            self._record_bad_job(doc, error)
            return
        if job.built_image:
            self._buildimage_done(job)
        elif job.command == DEPLOY and job.status == "started":
            self._deploy_started(job)
        elif job.command in (DEPLOY, REDEPLOY) and job.status in DEPLOY_ENDED:
            self._deploy_ended(job)

    def _record_bad_job(self, doc: Mapping[str, Any], error: BadDocument) -> None:
        job_id = doc.get("_id")
        command, status = doc.get("command"), doc.get("status")
        relevant = (command == BUILDIMAGE and built_image(status, doc.get("message"))) or (
            command == DEPLOY and status == "started"
        )
        if not relevant or not isinstance(job_id, ObjectId):
            log.warning("job_ignored_malformed", job_id=str(job_id), reason=str(error))
            return
        kind = BUILDIMAGE if command == BUILDIMAGE else DEPLOY
        if self.records.create_step(job_id, kind, state=FAILED, message=f"malformed job: {error}"):
            log.error("step_failed_malformed_job", job_id=str(job_id), kind=kind, reason=str(error))

    def _buildimage_done(self, job: Job) -> None:
        if self.records.get_step(step_id(job.id, BUILDIMAGE)) is not None:
            return  # seen before: a replayed event, a catch-up overlap, another instance
        try:
            app = parse_app(self.records.get_app(job.app_id), job.app_id)
        except BadDocument as error:
            self._create_failed(job, BUILDIMAGE, None, f"malformed app: {error}")
            return
        off = containers_off(app, self.containers_enabled, BUILDIMAGE)
        if off:
            log.debug("buildimage_without_containers", job_id=str(job.id), app=app.label, reason=off)
            return
        if self.records.create_step(job.id, BUILDIMAGE, app_id=app.id):
            log.info("step_created", job_id=str(job.id), step=step_id(job.id, BUILDIMAGE), app=app.label)
            self.on_new_steps()

    def _deploy_started(self, job: Job) -> None:
        try:
            app = parse_app(self.records.get_app(job.app_id), job.app_id)
            with_build_pack = app.module_names_with_build_pack()
            known = {m.get("name") for m in app.raw.get("modules") or [] if isinstance(m, Mapping)}
        except BadDocument as error:
            for module in job.module_names:
                self._create_failed(job, DEPLOY, module, f"malformed app: {error}")
            return
        off = containers_off(app, self.containers_enabled, DEPLOY)
        if off:  # Ghost runs the scripts on its host: nothing to prepare
            log.debug("deploy_without_containers", job_id=str(job.id), app=app.label, reason=off)
            return
        created = 0
        for module in job.module_names:
            if module not in known:
                self._create_failed(job, DEPLOY, module, f"job.modules: the app has no module named {module!r}")
            elif module in with_build_pack and self.records.create_step(job.id, DEPLOY, module, app_id=app.id):
                log.info("step_created", job_id=str(job.id), step=step_id(job.id, DEPLOY, module), app=app.label)
                created += 1
        if created:
            self.on_new_steps()

    def _deploy_ended(self, job: Job) -> None:
        if not any(not step.terminal for step in self.records.steps_for_job(job.id)):
            return  # nothing to cancel or clean (most ended deploys a catch-up scan reads)
        cancelled = self.records.cancel_job_steps(job.id, job_end_reason(job))
        if cancelled:
            log.info("deploy_steps_cancelled", job_id=str(job.id), count=cancelled, job_status=job.status)
        self.on_job_ended(job.id)

    def _create_failed(self, job: Job, kind: str, module: str | None, message: str) -> None:
        if self.records.create_step(job.id, kind, module, app_id=job.app_id, state=FAILED, message=message):
            log.error("step_failed_bad_input", job_id=str(job.id), kind=kind, module=module, reason=message)

    def catch_up(
        self,
        since: datetime,
        on_handled: Callable[[Mapping[str, Any]], None] | None = None,
        progress: Callable[[], None] = lambda: None,
    ) -> int:
        """Handle every buildimage/deploy job changed since `since`; returns how many were read.

        Jobs are decided a batch at a time: the batch's steps and apps are read
        in two queries and its new records written in one bulk upsert (instead
        of one to three round trips per job). `step_created` is logged as a
        record is queued; one that another instance wrote meanwhile is named in
        `steps_created_by_another_instance`. `on_handled` sees each job once
        its records are written. `progress` is called after each job decided
        and each batch written: a scan of many jobs may outlast the watchdog's
        stall limit, and its checkpoint is saved only once it ends, so a
        restart would start the same scan over.
        """
        count = 0
        for batch in self.store.job_batches(since, COMMANDS):
            deciding = copy.copy(self)  # the same rules, reading and writing through the batch
            deciding.records = batch
            deciding.on_new_steps = lambda: None
            for doc in batch.jobs:
                deciding.handle_job(doc)
                progress()
            created, raced = batch.flush()
            progress()
            if raced:
                log.info("steps_created_by_another_instance", steps=sorted(raced))
            if created:
                self.on_new_steps()
            if on_handled is not None:
                for doc in batch.jobs:
                    on_handled(doc)
            count += len(batch.jobs)
        return count


class Source:
    """Common loop plumbing: stop event, progress ticks (for the watchdog), last event time."""

    name = "source"

    def __init__(
        self,
        config: Config,
        store: Store,
        intake: Intake,
        stop: threading.Event,
        metrics: MetricsRecorder | None = None,
    ):
        self.config = config
        self.store = store
        self.intake = intake
        self.stop = stop
        self.metrics = metrics
        self.last_tick = time.monotonic()
        self.last_event_at: datetime | None = None

    def tick(self) -> None:
        self.last_tick = time.monotonic()

    def seen(self, job_time: Any) -> None:
        if isinstance(job_time, datetime):
            self.last_event_at = job_time
        if self.metrics is not None:
            self.metrics.event_received(self.name)

    def catch_up_since(self, caught_up_at: datetime | None) -> datetime:
        if caught_up_at is None:
            return utcnow() - timedelta(seconds=self.config.events.initial_lookback)
        return caught_up_at - timedelta(seconds=self.config.events.overlap)

    def run(self) -> None:
        """Run until `stop` is set, riding out MongoDB outages with the loops' backoff."""
        pacer = Pacer()
        while not self.stop.is_set():
            try:
                self.run_once()
                pacer.succeeded()
            except TRANSIENT_ERRORS as error:
                log.warning(
                    "event_source_mongodb_unavailable", source=self.name, error=str(error), retry_in_s=pacer.delay
                )
            except PyMongoError as error:
                log.error("event_source_error", source=self.name, error=str(error), retry_in_s=pacer.delay)
            self.tick()
            pacer.pause(self.stop)

    def run_once(self) -> None:
        raise NotImplementedError


class ChangeStreamSource(Source):
    name = "change_stream"

    def run_once(self) -> None:
        checkpoint = self.store.load_checkpoint()
        token = checkpoint.resume_token
        stream = self._open(token)
        if stream is None:
            token = None
            stream = self._open(None)
        opened_at = utcnow()
        # The stream is open before the scan: whatever changes during the scan is in the stream too.
        since = self.catch_up_since(checkpoint.caught_up_at)
        try:
            read = self.intake.catch_up(since, progress=self.tick)
        except BaseException:
            stream.close()  # the source runs again: no cursor left open on the server per attempt
            raise
        log.info("catch_up_done", source=self.name, since=since.isoformat(), jobs_read=read)
        if token is None:
            self.store.save_stream_checkpoint(stream.resume_token, opened_at)
        self._consume(stream, opened_at)

    def _open(self, token: Mapping[str, Any] | None) -> Any:
        try:
            stream = self.store.watch_jobs(token, max_await=1.0)
            # Some servers only reject a token on the first getMore: surface that now, keep the change.
            first = stream.try_next() if token is not None else None
            return _Prefetched(stream, first)
        except OperationFailure as error:
            if token is not None and self._token_is_the_problem(error):
                log.error(
                    "resume_token_unusable_catching_up",
                    code=error.code,
                    error=str(error),
                    consequence="history lost; a catch-up scan from the last checkpoint finds the jobs missed",
                )
                return None
            raise

    def _token_is_the_problem(self, error: OperationFailure) -> bool:
        """Whether a stream the server refused with our token would open without it.

        Known codes say so at once; otherwise the server is asked (a garbled token
        gives whatever its parser hit, e.g. 15 Overflow on MongoDB 6.0).
        """
        if error.code in TOKEN_UNUSABLE or "resume" in str(error).lower():
            return True
        if in_transition(error):  # a primary change or a shutdown: the token is fine, the server is not yet
            return False
        try:
            self.store.watch_jobs(None, max_await=0.01).close()
        except PyMongoError:
            return False
        return True

    def _consume(self, stream: _Prefetched, scanned_at: datetime) -> None:
        """Handle changes as they come; every `rescan_interval`, a safety scan of recent jobs.

        The checkpoint's `caught_up_at` only ever says what a scan has read (the
        stream's start, then each safety scan), so a stream that stalls without
        an error (it happens on some servers after a failover) costs at most one
        interval, never a job.
        """
        last_save = time.monotonic()
        next_scan = time.monotonic() + self.config.events.rescan_interval
        saved_token = stream.resume_token
        with stream:
            while not self.stop.is_set():
                self.tick()
                if time.monotonic() >= next_scan:
                    scanned_at = self._safety_scan(scanned_at)
                    next_scan = time.monotonic() + self.config.events.rescan_interval
                    self.store.save_stream_checkpoint(stream.resume_token, scanned_at)
                    saved_token, last_save = stream.resume_token, time.monotonic()
                try:
                    change = next_change(stream, self.stop)
                except OperationFailure as error:
                    self._fall_back_to_scan(error, scanned_at)
                    return
                if change is None:
                    if stream.resume_token != saved_token and time.monotonic() - last_save >= CHECKPOINT_EVERY:
                        self.store.save_stream_checkpoint(stream.resume_token, scanned_at)
                        saved_token, last_save = stream.resume_token, time.monotonic()
                    continue
                operation = change.get("operationType")
                if operation in STREAM_ENDING:
                    log.error("change_stream_ended", operation=operation, consequence="reopening with a catch-up scan")
                    self.store.save_stream_checkpoint(None, scanned_at)
                    return
                job_id = (change.get("documentKey") or {}).get("_id")
                self.intake.handle_job_id(job_id)
                self.seen(change.get("wallTime") or utcnow())
                # Durable step records first, then the token that says "done up to here".
                self.store.save_stream_checkpoint(stream.resume_token, scanned_at)
                saved_token, last_save = stream.resume_token, time.monotonic()

    def _fall_back_to_scan(self, error: OperationFailure, scanned_at: datetime) -> None:
        """A stream error intake does not know (an event too large, say): drop the token, scan instead.

        Resuming at the same token would meet the same error forever; the
        reopened stream starts now and the catch-up scan from the last scan
        reads what lay between, jobs included whatever their size.
        """
        log.error(
            "change_stream_failed_catching_up",
            code=error.code,
            error=str(error)[:500],
            consequence="reopening the stream without its token, with a catch-up scan",
        )
        self.store.save_stream_checkpoint(None, scanned_at)

    def _safety_scan(self, scanned_at: datetime) -> datetime:
        started = utcnow()
        read = self.intake.catch_up(scanned_at - timedelta(seconds=self.config.events.overlap), progress=self.tick)
        log.debug("safety_scan_done", jobs_read=read)
        return started


class _Prefetched:
    """A change stream whose first `try_next` already happened (to validate the token)."""

    def __init__(self, stream: Any, first: Any):
        self.stream = stream
        self._first = first

    def try_next(self) -> Any:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return self.stream.try_next()

    @property
    def resume_token(self) -> Any:
        return self.stream.resume_token

    def __enter__(self) -> _Prefetched:
        return self

    def close(self) -> None:
        self.stream.close()

    def __exit__(self, *exc: object) -> None:
        self.close()


def clamp_to_clock(updated: Any, now: datetime) -> datetime | None:
    """A job's `_updated` as a high-water candidate, never later than `now` (MongoDB's clock when the
    query started, as the store estimates it). Ghost's cancel (`run.py`) writes `_updated` in local
    time: on a host ahead of UTC that is hours in the future, and a mark there would skip every job
    changed until then."""
    if not isinstance(updated, datetime):
        return None
    if updated.tzinfo is None:
        now = now.replace(tzinfo=None)
    return min(updated, now)


class PollSource(Source):
    name = "poll"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._future_jobs: set[Any] = set()  # jobs already warned about (job_updated_in_the_future)

    def _warn_future(self, doc: Mapping[str, Any]) -> None:
        """Once per job: its `_updated` is ahead of MongoDB's clock (re-read each poll until it is not)."""
        if doc.get("_id") in self._future_jobs:
            return
        self._future_jobs.add(doc.get("_id"))
        log.warning(
            "job_updated_in_the_future",
            job_id=str(doc.get("_id")),
            updated=str(doc.get("_updated")),
            consequence="the high-water mark stays at MongoDB's clock (Ghost's cancel writes local time)",
        )

    def run_once(self) -> None:
        checkpoint = self.store.load_checkpoint()
        high_water = checkpoint.poll_high_water
        first = True
        while not self.stop.is_set():
            self.tick()
            started = utcnow()
            since = (
                self.catch_up_since(checkpoint.caught_up_at)
                if first and high_water is None
                else (high_water or started) - timedelta(seconds=self.config.events.overlap)
            )
            clock = self.store.server_now()  # no mark past the server's clock (see clamp_to_clock)

            def handled(doc: Mapping[str, Any], clock: datetime = clock) -> None:
                nonlocal high_water
                updated = clamp_to_clock(doc.get("_updated"), clock)
                if updated is not None and updated != doc.get("_updated"):
                    self._warn_future(doc)
                if updated is not None and (high_water is None or updated > high_water):
                    high_water = updated
                    self.seen(updated)

            read = self.intake.catch_up(since, handled, progress=self.tick)
            if first:
                log.info("catch_up_done", source=self.name, since=since.isoformat(), jobs_read=read)
                first = False
            self.store.save_poll_checkpoint(high_water or started, started)
            self._wait_for_a_change(high_water or started)

    def _wait_for_a_change(self, mark: datetime) -> None:
        """Until the next read of the overlap window, or sooner when a probe sees a job changed past the mark.

        The probe only brings a read forward (a deploy's `started` then prepares its containers
        within about `probe_interval`); the window's reads still catch late and same-time writes.
        Jobs dated past MongoDB's clock are left to those reads, or they would trigger every probe.
        """
        deadline = time.monotonic() + self.config.events.poll_interval
        while not self.stop.wait(min(self.config.events.probe_interval, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                return
            if self.store.job_changed_between(mark, self.store.server_now(), COMMANDS):  # BSON dates: UTC either way
                return
