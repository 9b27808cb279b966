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
    BOTH_KINDS,
    BUILD_PACK,
    BUILDIMAGE,
    PENDING,
    REQUESTED,
    RUNNING,
    TERMINAL,
    Actor,
    Script,
    Step,
    StepKind,
    StepState,
    Transition,
    check_creation,
    check_move,
    known,
    move_rule,
    step_id,
)
from .clock import Clock
from .connection import retry_transient, utcnow

# A step nobody holds carries a lease that expired long ago rather than none, so
# "free" is one comparison (`lease.expires_at < now`) for every query and index.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FREE_LEASE = {"owner": None, "token": None, "expires_at": EPOCH}
# When a step entered these states, kept in `times` (any finished state: `times.finished`).
ENTERED = {RUNNING: "times.started", REQUESTED: "times.requested"}


def stamps(state: str, actor: Actor) -> dict[str, bool]:
    """The `$currentDate` of `actor`'s move into `state`: `updated_at`, and when the step entered it where that is
    kept. `times.requested` is when Ghost asked: a holder handing a script back at shutdown does not move it."""
    stamped = {"updated_at": True}
    if state in TERMINAL:
        stamped["times.finished"] = True
    elif state in ENTERED and (state != REQUESTED or actor == Actor.CLIENT):
        stamped[ENTERED[StepState(state)]] = True
    return stamped


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
        inputs=doc.get("inputs") or "",
    )


def new_step_doc(
    job_id: ObjectId,
    kind: str,
    module: str | None,
    app_id: ObjectId | None,
    state: str,
    message: str,
    script: str = BUILD_PACK,
    actor: Actor = Actor.INTAKE,
) -> dict[str, Any]:
    """A step record as `actor` first writes it (`script` only on a deploy step of another script than
    build_pack); ValueError when the table has no row for `actor` creating it in `state`."""
    check_creation(actor, state, kind)
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
        actor: Actor = Actor.INTAKE,
    ) -> bool:
        """Insert the step record as `actor` makes it; False when it already exists (a replayed event is harmless)."""
        doc = new_step_doc(job_id, kind, module, app_id, state, message, script, actor)  # checked first
        try:
            self.steps.insert_one(doc)
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
        """The app's container build whose AMI is built and whose image is not published yet (requested or
        running), if any: one still waiting for Packer may never publish, so nothing waits for it."""
        doc = self.steps.find_one({"app_id": app_id, "kind": BUILDIMAGE, "state": {"$in": [REQUESTED, RUNNING]}})
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

    # --- state writes: every one is built from the transition table ------------------------

    def _moving(
        self,
        actor: Actor,
        to_state: StepState,
        kind: str | None,
        fields: Mapping[str, Any],
        from_states: Iterable[str] | None = None,
        now: datetime | None = None,
    ) -> tuple[Transition, dict[str, Any], dict[str, Any]]:
        """The move's row, and the filter and update that make it (the caller adds which step, and the lease
        token of a fenced move): ValueError, before any MongoDB call, for a move `model.TRANSITIONS` lacks.

        `from_states` narrows the row's from-states (each must be one of them);
        the filter then takes a step only in one of those. `kind` None: a
        query over steps of either kind, which takes only the row's kinds.
        """
        if "state" in fields or "lease" in fields:
            raise ValueError("a move sets the state and the lease itself")
        rule = move_rule(actor, to_state, kind)
        states = tuple(rule.from_states if from_states is None else from_states)
        for state in states:
            check_move(actor, state, to_state, kind)
        query: dict[str, Any] = {"state": {"$in": list(states)}}
        if kind is None and set(rule.kinds) != set(BOTH_KINDS):
            query["kind"] = {"$in": list(rule.kinds)}
        if rule.only_free:
            query["lease.expires_at"] = {"$lt": now or self.server_now()}
        if rule.unless_cancel_requested:
            query["cancel_requested"] = {"$ne": True}
        changes = {**fields, "state": to_state, **({"lease": FREE_LEASE} if rule.releases else {})}
        return rule, query, {"$set": changes, "$currentDate": stamps(to_state, actor)}

    @retry_transient
    def move(
        self, step: Step, actor: Actor, to_state: StepState, expect_state: str | None = None, **fields: Any
    ) -> Step | None:
        """Move `step` into `to_state` as `actor`, writing `fields` with it, along its row of the table.

        The write applies only while the record is in one of the row's
        from-states (in `expect_state`, when given: the state the caller read,
        which another actor may have changed meanwhile), under `step`'s lease
        token for the holder's moves, and only if nobody asked for the step's
        cancellation where the row says so. Running stamps `times.started`,
        finished states `times.finished`; moves that free the lease free it.
        Returns the new record, or None when the lease was lost, the state
        moved or a cancellation was asked for. A move the table lacks (from
        `expect_state`, else the state `step` was read in) raises ValueError
        before any MongoDB call.

        A move that frees the lease is idempotent: retried after an outage that
        lost its acknowledgement, it finds the token gone because it applied,
        and reports success when the record holds what it wrote (`_written_by`).
        """
        read = expect_state or step.state
        check_move(actor, read, to_state, step.kind)
        rule, query, update = self._moving(actor, to_state, step.kind, fields, (read,) if expect_state else None)
        query["_id"] = step.id
        if rule.fenced:
            query["lease.token"] = step.lease_token
        doc = self.steps.find_one_and_update(query, update, return_document=ReturnDocument.AFTER)
        if doc is None and rule.fenced and rule.releases:
            return self._written_by(step, to_state, fields)
        return step_from_doc(doc) if doc else None

    @retry_transient
    def update_step(self, step: Step, release: bool = False, **fields: Any) -> Step | None:
        """A fenced write that changes no state (progress fields, or a release with the state kept): applies
        only while `step`'s lease token is still the record's. Returns the new record, or None if the lease
        was lost. A state is written only by `move`."""
        if "state" in fields:
            raise ValueError("update_step writes no state: a state is written by move(), along model.TRANSITIONS")
        if fields.keys() & {"expect_state", "unless_cancel_requested", "lease"}:
            raise ValueError("update_step filters on the lease token only: a conditional write is a move()")
        changes: dict[str, Any] = dict(fields)
        if release:
            changes["lease"] = FREE_LEASE
        doc = self.steps.find_one_and_update(
            {"_id": step.id, "lease.token": step.lease_token},
            {"$set": changes, "$currentDate": {"updated_at": True}},
            return_document=ReturnDocument.AFTER,
        )
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
