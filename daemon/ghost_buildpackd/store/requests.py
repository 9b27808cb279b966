"""What others ask of a step: Ghost's requests (a deploy script, a build), the cancel protocol, the sweep's
expiry of prepared containers, and an operator's replay.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any

from bson import ObjectId
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from ..model import (
    BUILD_PACK,
    BUILDIMAGE,
    CANCELLED,
    DEPLOY,
    PENDING,
    READY,
    REQUESTED,
    Actor,
    Step,
    StepState,
    cancellation,
    move_rule,
    step_id,
)
from .connection import retry_transient
from .steps import StepRecords, new_step_doc, step_from_doc


class StepRequests(StepRecords):
    """Moves of a step made by others than its holder: intake, Ghost's worker, the sweep, replay."""

    @retry_transient
    def cancel_job_steps(self, job_id: ObjectId, reason: str, kind: str = DEPLOY) -> int:
        """Intake: cancel a job's unfinished steps of `kind`: free ones at once, held ones by asking their owner.

        Returns how many were cancelled outright; held ones get `cancel_requested`
        and their owner ends them (it checks at each lease renewal).
        """
        return self._cancel_active(Actor.INTAKE, {"job_id": job_id, "kind": kind}, reason)

    def _cancel_active(self, actor: Actor, query: dict[str, Any], reason: str) -> int:
        """Cancel the steps matching `query` that `actor` may cancel and nobody holds; ask the holders of the others.

        The request comes first: a holder that releases its step in between
        (a preparation done, writing `ready` only if nobody asked) either saw
        the request and ends the step itself, or released it before, and the
        step is free for the cancellation that follows. Either way the end wins.
        """
        kind = query.get("kind")
        states = move_rule(actor, CANCELLED, kind).from_states  # the states the table lets `actor` cancel from
        self.steps.update_many(
            {**query, "state": {"$in": list(states)}},
            {"$set": {"cancel_requested": True, "cancel_reason": reason}, "$currentDate": {"updated_at": True}},
        )
        # The message says whether the script had started (a running one is stopped): one write per message.
        by_message: dict[str, list[StepState]] = {}
        for state in states:
            by_message.setdefault(cancellation(reason, state), []).append(state)
        now = self.server_now()
        cancelled = 0
        for message, which in by_message.items():
            _, free, update = self._moving(actor, CANCELLED, kind, {"message": message}, which, now)
            cancelled += self.steps.update_many({**query, **free}, update).modified_count
        return cancelled

    @retry_transient
    def request_step(
        self, job_id: ObjectId, module: str, host: str, app_id: ObjectId | None, script: str = BUILD_PACK
    ) -> Step:
        """Ghost's side of the deploy handshake: ask for the module's script to run now, on `host`.

        Creates the record when the daemon has not yet (always, for after_all_deploy:
        nothing prepares it); an already finished step is returned as it is (the
        client then reports its outcome).
        """
        sid = step_id(job_id, DEPLOY, module, script)
        _, waiting, request = self._moving(Actor.CLIENT, REQUESTED, DEPLOY, {"requested_host": host})
        waiting["_id"] = sid
        # Usually the daemon made the record at job start: one round trip.
        doc = self.steps.find_one_and_update(waiting, request, return_document=ReturnDocument.AFTER)
        if doc is None:
            self.create_step(job_id, DEPLOY, module, app_id=app_id, script=script, actor=Actor.CLIENT)
            doc = self.steps.find_one_and_update(waiting, request, return_document=ReturnDocument.AFTER)
            doc = doc or self.steps.find_one({"_id": sid})
        if doc is None:  # removed between our insert and read: nothing to wait on, and Ghost must hear it
            raise LookupError(f"step {sid} was removed while it was being requested")
        return step_from_doc(doc)

    @retry_transient
    def request_build(
        self, job_id: ObjectId, app_id: ObjectId | None, host: str | None, actor: Actor = Actor.CLIENT
    ) -> Step:
        """The job's AMI is built: ask for its container build now, built ahead or not.

        Ghost's buildimage job asks on its `host` (the job is still `started`);
        the intake asks for any host when the job ended built without asking (a
        Ghost without the patch). The step is made when nobody made it yet; one
        already asked for, running or finished is returned as it is (one build
        per job, whoever asked first).
        """
        sid = step_id(job_id, BUILDIMAGE)
        _, waiting, request = self._moving(actor, REQUESTED, BUILDIMAGE, {"requested_host": host})
        waiting["_id"] = sid
        doc = self.steps.find_one_and_update(waiting, request, return_document=ReturnDocument.AFTER)
        if doc is None and self.steps.find_one({"_id": sid}, {"_id": 1}) is None:
            made = new_step_doc(
                job_id, BUILDIMAGE, None, app_id, PENDING, "requested once its AMI was built", actor=actor
            )
            with contextlib.suppress(DuplicateKeyError):  # made meanwhile: the move below asks for it all the same
                self.steps.insert_one(made)
            doc = self.steps.find_one_and_update(waiting, request, return_document=ReturnDocument.AFTER)
        doc = doc or self.steps.find_one({"_id": sid})
        if doc is None:  # removed between our insert and read: nothing to wait on, and Ghost must hear it
            raise LookupError(f"step {sid} was removed while it was being requested")
        return step_from_doc(doc)

    @retry_transient
    def expire_stale_ready(self, max_age: float, reason: str) -> list[Step]:
        """Forget the container of steps `ready` for longer than `max_age` seconds (a deploy's launched ahead, a
        build's built ahead of its AMI); those steps as they were.

        The step stays requestable (the sweep's row of the transition table):
        Ghost may still ask for it late in a long deploy, and the run then
        launches a new container. Each is changed only if it is still `ready`,
        unheld and unchanged, so a request arriving meanwhile wins; the caller
        deletes the containers returned (a run that launches one first removes
        them too: `remove_leftovers`).
        """
        now = self.server_now()  # updated_at and lease expiry are on the server's clock
        fields = {"container": None, "inputs": "", "message": reason}
        _, free, update = self._moving(Actor.SWEEP, READY, None, fields, now=now)
        stale = {
            "state": free["state"],
            "container": {"$type": "string"},
            "updated_at": {"$lt": now - timedelta(seconds=max_age)},
        }
        expired = []
        for found in self.steps.find(stale, {"_id": 1}):
            doc = self.steps.find_one_and_update(
                {**stale, **free, "_id": found["_id"]}, update, return_document=ReturnDocument.BEFORE
            )
            if doc:
                expired.append(step_from_doc(doc))
        return expired

    @retry_transient
    def abandon_step(self, sid: str, reason: str) -> None:
        """The client gave up waiting: cancel the step whether or not a worker holds it."""
        self._cancel_active(Actor.CLIENT, {"_id": sid}, reason)

    @retry_transient
    def reset_step_for_replay(self, sid: str) -> bool:
        """`replay`: ask again for a finished build (a new attempt, same id), on any host."""
        fields = {
            "message": "replay requested",
            "attempts": 0,
            "cancel_requested": False,
            "exit_code": None,
            "requested_host": None,
            "container": None,
            "inputs": "",
        }
        _, finished, update = self._moving(Actor.REPLAY, REQUESTED, BUILDIMAGE, fields)
        return self.steps.update_one({**finished, "_id": sid}, update).modified_count == 1
