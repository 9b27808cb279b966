"""Step records (`container_steps`): how a document reads as a `Step`, creating and reading records,
the change streams on them, and the fenced writes of their holder.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import pymongo
from bson import ObjectId
from pymongo import ReturnDocument, UpdateOne
from pymongo.errors import DuplicateKeyError

from ..model import (
    ACTIVE,
    BUILD_PACK,
    BUILDIMAGE,
    PENDING,
    RUNNING,
    TERMINAL,
    Script,
    Step,
    StepKind,
    StepState,
    known,
    step_id,
)
from .clock import Clock
from .connection import retry_transient, utcnow

# A step nobody holds carries a lease that expired long ago rather than none, so
# "free" is one comparison (`lease.expires_at < now`) for every query and index.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FREE_LEASE = {"owner": None, "token": None, "expires_at": EPOCH}


def step_from_doc(doc: Mapping[str, Any]) -> Step:
    """The step record a `container_steps` document holds."""
    lease = doc.get("lease") or {}
    return Step(
        id=doc["_id"],
        job_id=doc["job_id"],
        app_id=doc.get("app_id"),
        kind=known(StepKind, doc["kind"]),
        module=doc.get("module"),
        state=known(StepState, doc["state"]),
        attempts=doc.get("attempts", 0),
        message=doc.get("message", ""),
        owner=lease.get("owner"),
        lease_token=lease.get("token"),
        lease_expires_at=lease.get("expires_at"),
        requested_host=doc.get("requested_host"),
        cancel_requested=bool(doc.get("cancel_requested")),
        exit_code=doc.get("exit_code"),
        container=doc.get("container"),
        created_at=doc.get("created_at"),
        updated_at=doc.get("updated_at"),
        started_at=(doc.get("times") or {}).get("started"),
        finished_at=(doc.get("times") or {}).get("finished"),
        output_tail=doc.get("output_tail", ""),
        cancel_reason=doc.get("cancel_reason", ""),
        image=doc.get("image", ""),
        claim=doc.get("claims", 0),
        script=known(Script, doc.get("script") or BUILD_PACK),
        timed_out=bool(doc.get("timed_out")),
    )


def new_step_doc(
    job_id: ObjectId,
    kind: str,
    module: str | None,
    app_id: ObjectId | None,
    state: str,
    message: str,
    script: str = BUILD_PACK,
) -> dict[str, Any]:
    """A step record as it is first written (`script` only on a deploy step of another script than build_pack)."""
    now = utcnow()
    doc = {
        "_id": step_id(job_id, kind, module, script),
        "job_id": job_id,
        "app_id": app_id,
        "kind": kind,
        "module": module,
        "state": state,
        "attempts": 0,
        "message": message,
        "lease": FREE_LEASE,
        "created_at": now,
        "updated_at": now,
        "times": {"finished": now} if state in TERMINAL else {},
    }
    if script != BUILD_PACK:
        doc["script"] = script
    return doc


class StepRecords(Clock):
    """The step records: created, read, watched, and written under their lease."""

    @retry_transient
    def create_step(
        self,
        job_id: ObjectId,
        kind: str,
        module: str | None = None,
        app_id: ObjectId | None = None,
        state: str = PENDING,
        message: str = "",
        script: str = BUILD_PACK,
    ) -> bool:
        """Insert the step record; False when it already exists (a replayed event is harmless)."""
        try:
            self.steps.insert_one(new_step_doc(job_id, kind, module, app_id, state, message, script))
        except DuplicateKeyError:
            return False
        return True

    @retry_transient
    def get_step(self, sid: str) -> Step | None:
        doc = self.steps.find_one({"_id": sid})
        return step_from_doc(doc) if doc else None

    @retry_transient
    def steps_for_job(self, job_id: ObjectId) -> list[Step]:
        return [step_from_doc(doc) for doc in self.steps.find({"job_id": job_id})]

    @retry_transient
    def steps_in_states(self, states: tuple[str, ...]) -> list[Step]:
        cursor = self.steps.find({"state": {"$in": list(states)}}).sort("created_at", pymongo.ASCENDING)
        return [step_from_doc(doc) for doc in cursor]

    @retry_transient
    def newest_app_build(self, app_id: ObjectId) -> Step | None:
        """The app's newest buildimage step (a deploy reports when it failed)."""
        query = {"app_id": app_id, "kind": BUILDIMAGE}
        doc = self.steps.find_one(query, sort=[("created_at", pymongo.DESCENDING)])
        return step_from_doc(doc) if doc else None

    @retry_transient
    def app_build_in_flight(self, app_id: ObjectId) -> Step | None:
        """The app's container build that has not finished yet (pending or running), if any."""
        doc = self.steps.find_one({"app_id": app_id, "kind": BUILDIMAGE, "state": {"$in": list(ACTIVE)}})
        return step_from_doc(doc) if doc else None

    @retry_transient
    def recent_finished_steps(self, limit: int, since: datetime | None = None) -> list[Step]:
        """The newest finished steps, at most `limit`, only those updated at or after `since` if given."""
        query: dict[str, Any] = {"state": {"$in": list(TERMINAL)}}
        if since is not None:
            query["updated_at"] = {"$gte": since}
        cursor = self.steps.find(query).sort("updated_at", pymongo.DESCENDING)
        return [step_from_doc(doc) for doc in cursor.limit(limit)]

    @retry_transient
    def insert_new_steps(self, docs: Iterable[dict[str, Any]]) -> set[str]:
        """One bulk upsert of step records that must exist; returns the ids that were not there before.

        `$setOnInsert` leaves a record another instance made meanwhile as it is,
        so retrying the whole batch after an outage is harmless.
        """
        ordered = list(docs)
        if not ordered:
            return set()
        result = self.steps.bulk_write(
            [UpdateOne({"_id": doc["_id"]}, {"$setOnInsert": doc}, upsert=True) for doc in ordered], ordered=False
        )
        return {ordered[index]["_id"] for index in result.upserted_ids or {}}

    def watch_steps(self, max_await: float) -> Any:
        """A change stream on step records, to wake the dispatcher when a request arrives."""
        pipeline = [{"$match": {"operationType": {"$in": ["insert", "update", "replace"]}}}]
        return self.steps.watch(pipeline, max_await_time_ms=int(max_await * 1000))

    def watch_step(self, sid: str, max_await: float) -> Any:
        """A change stream on one step record (Ghost's client waits on it for the outcome)."""
        pipeline = [{"$match": {"documentKey._id": sid, "operationType": {"$in": ["insert", "update", "replace"]}}}]
        return self.steps.watch(pipeline, max_await_time_ms=int(max_await * 1000))

    @retry_transient
    def update_step(
        self,
        step: Step,
        state: str | None = None,
        release: bool = False,
        expect_state: str | None = None,
        unless_cancel_requested: bool = False,
        **fields: Any,
    ) -> Step | None:
        """A fenced write: applies only while `step`'s lease token is still the record's.

        Terminal states release the lease and stamp `times.finished`; `running`
        stamps `times.started`. With `expect_state`, it also applies only if the
        state is still that one (the client may have moved it meanwhile); with
        `unless_cancel_requested`, only if nobody asked for the step's
        cancellation (the holder then ends it instead).
        Returns the new record, or None if the lease was lost, the state moved
        or a cancellation was asked for.

        A write that sets a state and releases the lease (an outcome, `ready`,
        a release at shutdown) is idempotent: retried after an outage that lost
        its acknowledgement, it finds the token gone because it applied, and
        reports success when the record holds what it wrote (`_written_by`).
        """
        changes: dict[str, Any] = dict(fields)
        stamps: dict[str, bool] = {"updated_at": True}
        if state:
            changes["state"] = state
            if state in TERMINAL:
                release = True
                stamps["times.finished"] = True
            elif state == RUNNING:
                stamps["times.started"] = True
        if release:
            changes["lease"] = FREE_LEASE
        query: dict[str, Any] = {"_id": step.id, "lease.token": step.lease_token}
        if expect_state:
            query["state"] = expect_state
        if unless_cancel_requested:
            query["cancel_requested"] = {"$ne": True}
        doc = self.steps.find_one_and_update(
            query, {"$set": changes, "$currentDate": stamps}, return_document=ReturnDocument.AFTER
        )
        if doc is None and state and release:
            return self._written_by(step, state, fields)
        return step_from_doc(doc) if doc else None

    def _written_by(self, step: Step, state: str, fields: Mapping[str, Any]) -> Step | None:
        """The record, if it holds `state` and `fields` with its lease released and no claim since `step`'s.

        Then the releasing write already applied under our claim: nobody
        claimed the step since, and what it holds is exactly what we write.
        """
        doc = self.steps.find_one({"_id": step.id})
        written = (
            doc is not None
            and doc.get("state") == state
            and doc.get("claims", 0) == step.claim
            and (doc.get("lease") or {}).get("token") is None
            and all(doc.get(key) == value for key, value in fields.items())
        )
        return step_from_doc(doc) if written and doc is not None else None
