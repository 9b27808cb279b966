"""The intake: from a job as it is now, which step records must exist.

Handling a job is idempotent (step ids are deterministic), so the sources may
hand the same job over twice: a replayed event, a catch-up overlap, another
instance. A catch-up scan decides jobs a batch at a time (`Intake.catch_up`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Protocol

from bson import ObjectId
from pymongo.errors import PyMongoError

from ..ghost.documents import Job, built_image, containers_off, parse_app, parse_job
from ..ghost.fields import BadDocument
from ..logs import get_logger
from ..model import BUILDIMAGE, DEPLOY, FAILED, PENDING, PREPARING, READY, REDEPLOY, REQUESTED, Actor, Step, step_id
from ..store import Store

log = get_logger(__name__)

# redeploy: the `buildpack` command takes its after_all_deploy (Ghost 19.08 never asks: its redeploy module is
# `{path, name}` only), so such steps are cancelled when the job ends.
COMMANDS = (BUILDIMAGE, DEPLOY, REDEPLOY)
JOB_ENDED = ("done", "failed", "aborted", "cancelled")
# A build not asked for yet (waiting for Packer, built ahead, or building ahead): the job's AMI asks for it.
BUILD_NOT_ASKED = (PENDING, PREPARING, READY)

# How rq ends a job at its timeout (rq_worker_job_timeout): Ghost records the exception's class as the message.
RQ_TIMEOUT = "JobTimeoutException"


def job_end_reason(job: Job) -> str:
    """Why a job's steps are cancelled: the job ended (a buildimage job: without an AMI), and how, as far as its
    record says."""
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
    def cancel_job_steps(self, job_id: ObjectId, reason: str, kind: str = ...) -> int: ...
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
        on_deploy_started: Callable[[], None] = lambda: None,
    ):
        self.store = store
        self.records: JobRecords = store
        self.on_new_steps = on_new_steps
        self.on_job_ended = on_job_ended
        self.on_deploy_started = on_deploy_started  # an app with steps in containers deploys (the warm pool)
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
            self._buildimage_built(job)
        elif job.command == BUILDIMAGE and job.status == "started":
            self._buildimage_started(job)
        elif job.command == BUILDIMAGE and job.status in JOB_ENDED:
            self._job_ended(job, BUILDIMAGE)
        elif job.command == DEPLOY and job.status == "started":
            self._deploy_started(job)
        elif job.command in (DEPLOY, REDEPLOY) and job.status in JOB_ENDED:
            self._job_ended(job, DEPLOY)

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

    def _buildimage_started(self, job: Job) -> None:
        """The build runs while Packer runs: a runner builds it ahead once Ghost's inputs exist."""
        try:
            app = parse_app(self.records.get_app(job.app_id), job.app_id)
        except BadDocument:
            return  # refused once the AMI is built, where Ghost's job hears why
        if containers_off(app, self.containers_enabled, BUILDIMAGE):
            return
        if self.records.create_step(job.id, BUILDIMAGE, app_id=app.id):
            log.info("step_created", job_id=str(job.id), step=step_id(job.id, BUILDIMAGE), app=app.label, ahead=True)
            self.on_new_steps()

    def _buildimage_built(self, job: Job) -> None:
        """The job ended with its AMI: its build is asked for, unless Ghost's command asked already."""
        step = self.records.get_step(step_id(job.id, BUILDIMAGE))
        if step is not None:
            if step.state in BUILD_NOT_ASKED:  # a Ghost without the patch: nobody else asks
                self.store.request_build(job.id, step.app_id, None, Actor.INTAKE)
                log.info("build_requested", job_id=str(job.id), step=step.id, was=step.state)
                self.on_new_steps()
            return  # else asked, running or finished: seen before, or Ghost's command asked
        try:
            app = parse_app(self.records.get_app(job.app_id), job.app_id)
        except BadDocument as error:
            self._create_failed(job, BUILDIMAGE, None, f"malformed app: {error}")
            return
        off = containers_off(app, self.containers_enabled, BUILDIMAGE)
        if off:
            log.debug("buildimage_without_containers", job_id=str(job.id), app=app.label, reason=off)
            return
        if self.records.create_step(job.id, BUILDIMAGE, app_id=app.id, state=REQUESTED):
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
        if with_build_pack:  # whoever recorded its steps (Ghost's request may come first)
            self.on_deploy_started()

    def _job_ended(self, job: Job, kind: str) -> None:
        if not any(not step.terminal for step in self.records.steps_for_job(job.id)):
            return  # nothing to cancel or clean (most ended jobs a catch-up scan reads)
        cancelled = self.records.cancel_job_steps(job.id, job_end_reason(job), kind)
        if cancelled:
            log.info(f"{kind}_steps_cancelled", job_id=str(job.id), count=cancelled, job_status=job.status)
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
