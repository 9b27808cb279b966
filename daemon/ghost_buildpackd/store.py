"""MongoDB adapter: the only module that talks to MongoDB.

Ghost's collections (`jobs`, `apps`) are read; the one Ghost field written is
`apps.build_infos.container_image`. The daemon's own state lives beside them:
`container_steps` (one record per step, with its lease), `container_images`
(what each published image is), `buildpackd_state` (event checkpoints) and
`buildpackd_instances` (heartbeats).

Datetimes the daemon writes are set on insert, inside a sub-document, or with
`$currentDate` (server time), never as a bare `$set` of a top-level datetime:
all three are plain MongoDB and keep the BSON date type on every server.
"""

from __future__ import annotations

import dataclasses
import heapq
import re
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pymongo
from bson import ObjectId
from pymongo import ReturnDocument
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import (
    AutoReconnect,
    ConnectionFailure,
    DuplicateKeyError,
    NetworkTimeout,
    OperationFailure,
    ServerSelectionTimeoutError,
)

from .logs import get_logger
from .retries import retrying

log = get_logger(__name__)

# Step states
PENDING, PREPARING, READY, REQUESTED, RUNNING = "pending", "preparing", "ready", "requested", "running"
SUCCEEDED, FAILED, CANCELLED, SKIPPED = "succeeded", "failed", "cancelled", "skipped"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED, SKIPPED)
ACTIVE = (PENDING, PREPARING, READY, REQUESTED, RUNNING)
BUILDIMAGE, DEPLOY, REDEPLOY = "buildimage", "deploy", "redeploy"
# The module scripts Ghost runs on its host during deploy (and redeploy), which a deploy step may run instead.
BUILD_PACK, AFTER_ALL_DEPLOY = "build_pack", "after_all_deploy"
MODULE_SCRIPTS = (BUILD_PACK, AFTER_ALL_DEPLOY)

STEPS, IMAGES, STATE, INSTANCES = "container_steps", "container_images", "buildpackd_state", "buildpackd_instances"
NO_CHANGE_STREAMS = 40573  # "The $changeStream stage is only supported on replica sets"
TRANSIENT_ERRORS = (AutoReconnect, ConnectionFailure, NetworkTimeout, ServerSelectionTimeoutError)
# A step nobody holds carries a lease that expired long ago rather than none, so
# "free" is one comparison (`lease.expires_at < now`) for every query and index.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FREE_LEASE = {"owner": None, "token": None, "expires_at": EPOCH}


def utcnow() -> datetime:
    return datetime.now(UTC)


def same_id(value: ObjectId) -> dict[str, list[ObjectId]]:
    """Equality filter on an ObjectId field other than `_id`, written as a one-element `$in`.

    Identical in MongoDB; the nx-27017 stand-in used by tests only matches
    ObjectIds in non-`_id` fields through `$in`.
    """
    return {"$in": [value]}


def step_id(job_id: ObjectId | str, kind: str, module: str | None = None, script: str = BUILD_PACK) -> str:
    """Deterministic step id: `<job_id>:buildimage`, `<job_id>:deploy:<module>` (its build_pack), or
    `<job_id>:deploy.<script>:<module>` for another module script (`after_all_deploy`).

    The script sits before the module name, so no module name can make two steps share an id.
    """
    if not module:
        return f"{job_id}:{kind}"
    return f"{job_id}:{kind}:{module}" if script == BUILD_PACK else f"{job_id}:{kind}.{script}:{module}"


# Retries a MongoDB call through outages: exponential backoff, ~2 minutes in all.
retry_transient = retrying(
    lambda error: isinstance(error, TRANSIENT_ERRORS),
    "mongodb_unavailable_retrying",
    attempts=8,
    multiplier=0.25,
    max_wait=30,
)


@dataclasses.dataclass(frozen=True)
class Step:
    """A `container_steps` record."""

    id: str
    job_id: ObjectId
    app_id: ObjectId | None
    kind: str
    module: str | None
    state: str
    attempts: int
    message: str
    owner: str | None
    lease_token: str | None
    lease_expires_at: datetime | None
    requested_host: str | None
    cancel_requested: bool
    exit_code: int | None
    container: str | None
    created_at: datetime | None
    updated_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    output_tail: str
    cancel_reason: str = ""
    image: str = ""  # alias a deploy step's container was made from
    script: str = BUILD_PACK  # the module script a deploy step runs
    timed_out: bool = False  # the command was killed at container.exec_timeout

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Step:
        lease = doc.get("lease") or {}
        return cls(
            id=doc["_id"],
            job_id=doc["job_id"],
            app_id=doc.get("app_id"),
            kind=doc["kind"],
            module=doc.get("module"),
            state=doc["state"],
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
            script=doc.get("script") or BUILD_PACK,
            timed_out=bool(doc.get("timed_out")),
        )


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Where event intake stands: change-stream token and the time up to which jobs were seen."""

    resume_token: Mapping[str, Any] | None
    caught_up_at: datetime | None
    poll_high_water: datetime | None


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """A `container_images` record: one image the daemon published."""

    alias: str
    fingerprint: str
    job_id: ObjectId
    app_id: ObjectId
    app_identity: str
    app_label: str
    region: str
    ami_id: str
    ami_name: str
    base_image: str
    size: int
    created_at: datetime
    state: str = "live"  # live | pruned
    pruned_reason: str = ""

    def to_doc(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["_id"] = doc.pop("alias")
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> ImageRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in doc.items() if key in names}
        return cls(alias=doc["_id"], **values)


QUIET_STREAM_PAUSE = 0.05  # shortest wait between two empty reads of a change stream


def next_change(stream: Any, pause: threading.Event | None = None) -> Any:
    """The next change of `stream`, or None when there is none yet.

    The server normally holds an empty read for the stream's maxAwaitTimeMS;
    one that answers at once (some stand-ins do) would make a quiet stream a
    busy loop, so an empty answer takes at least QUIET_STREAM_PAUSE.
    """
    started = time.monotonic()
    change = stream.try_next()
    if change is None:
        rest = QUIET_STREAM_PAUSE - (time.monotonic() - started)
        if rest > 0:
            (pause or threading.Event()).wait(rest)
    return change


def redacted_uri(uri: str) -> str:
    """The MongoDB URI without its password, fit for output."""
    return re.sub(r"^([a-z0-9+.-]+://[^:@/]*:)[^@/]*@", r"\1***@", uri, flags=re.IGNORECASE)


def short_error(error: Exception) -> str:
    """pymongo's server-selection errors end with a long topology dump; keep the reason."""
    return str(error).split(", Timeout:", 1)[0]


def connect(uri: str, timeout: float) -> pymongo.MongoClient:
    """A client with bounded waits; nothing is sent until first use."""
    return pymongo.MongoClient(
        uri,
        tz_aware=True,
        appname="ghost-buildpackd",
        serverSelectionTimeoutMS=int(timeout * 1000),
        connectTimeoutMS=int(timeout * 1000),
        socketTimeoutMS=int(max(timeout, 30) * 1000),
    )


class Store:
    """Every MongoDB read and write the daemon, its CLI and the Ghost-side client make."""

    def __init__(self, db: Database):
        self.db = db
        self.jobs: Collection = db["jobs"]
        self.apps: Collection = db["apps"]
        self.steps: Collection = db[STEPS]
        self.images: Collection = db[IMAGES]
        self.state: Collection = db[STATE]
        self.instances: Collection = db[INSTANCES]

    @classmethod
    def from_uri(cls, uri: str, database: str, timeout: float = 10.0) -> Store:
        return cls(connect(uri, timeout)[database])

    # --- server ------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        """Round trip to the server (raises when unreachable or unauthenticated)."""
        return self.db.command("ping")

    def server_info(self) -> dict[str, Any]:
        hello = self.db.client.admin.command("hello")
        return {
            "version": self.db.client.server_info().get("version", "unknown"),
            "replica_set": hello.get("setName"),
            "sharded": hello.get("msg") == "isdbgrid",
            "max_wire_version": hello.get("maxWireVersion"),
        }

    def change_streams_supported(self) -> tuple[bool, str]:
        """Ask the server itself: a standalone answers `watch` with error 40573."""
        try:
            with self.jobs.watch(max_await_time_ms=1) as stream:
                stream.try_next()
        except OperationFailure as error:
            if error.code == NO_CHANGE_STREAMS:
                return False, "the server is a standalone (change streams need a replica set)"
            return False, f"watch failed: {error}"
        return True, "the server offers change streams"

    def collection_names(self) -> list[str]:
        return self.db.list_collection_names()

    def ensure_indexes(self) -> None:
        """Indexes for the daemon's queries; the one on Ghost's jobs makes catch-up scans cheap."""
        self.jobs.create_index(
            [("command", pymongo.ASCENDING), ("_updated", pymongo.ASCENDING)], name="buildpackd_command_updated"
        )
        self.steps.create_index([("state", pymongo.ASCENDING), ("created_at", pymongo.ASCENDING)])
        self.steps.create_index([("job_id", pymongo.ASCENDING)])
        self.steps.create_index([("app_id", pymongo.ASCENDING), ("state", pymongo.ASCENDING)])
        self.images.create_index([("app_id", pymongo.ASCENDING), ("created_at", pymongo.DESCENDING)])

    # --- Ghost's documents ----------------------------------------------------------

    @retry_transient
    def get_job(self, job_id: ObjectId) -> dict[str, Any] | None:
        return self.jobs.find_one({"_id": job_id})

    @retry_transient
    def get_app(self, app_id: ObjectId) -> dict[str, Any] | None:
        return self.apps.find_one({"_id": app_id})

    @retry_transient
    def all_apps(self) -> list[dict[str, Any]]:
        return list(self.apps.find({}))

    def jobs_changed_since(self, since: datetime, commands: tuple[str, ...]) -> Iterator[dict[str, Any]]:
        """Jobs of the given commands whose `_updated` is at or after `since`, oldest first.

        One range scan per command on the (command, _updated) index, merged in order.
        """
        scans = [
            self.jobs.find({"command": command, "_updated": {"$gte": since}}).sort("_updated", pymongo.ASCENDING)
            for command in commands
        ]
        return heapq.merge(*scans, key=lambda doc: doc["_updated"])

    @retry_transient
    def newest_job_update(self) -> datetime | None:
        """The newest `_updated` of any job (BSON orders dates above strings and numbers)."""
        doc = self.jobs.find_one({"_updated": {"$exists": True}}, sort=[("_updated", pymongo.DESCENDING)])
        updated = doc["_updated"] if doc else None
        return updated if isinstance(updated, datetime) else None

    def watch_jobs(self, resume_token: Mapping[str, Any] | None, max_await: float) -> Any:
        """A change stream on jobs: writes only (and the events that end a stream)."""
        pipeline = [
            {
                "$match": {
                    "operationType": {
                        "$in": [
                            "insert",
                            "update",
                            "replace",
                            "drop",
                            "rename",
                            "dropDatabase",
                            "invalidate",
                        ]
                    }
                }
            }
        ]
        return self.jobs.watch(pipeline, resume_after=resume_token, max_await_time_ms=int(max_await * 1000))

    def watch_steps(self, max_await: float) -> Any:
        """A change stream on step records, to wake the dispatcher when a request arrives."""
        pipeline = [{"$match": {"operationType": {"$in": ["insert", "update", "replace"]}}}]
        return self.steps.watch(pipeline, max_await_time_ms=int(max_await * 1000))

    def watch_step(self, sid: str, max_await: float) -> Any:
        """A change stream on one step record (Ghost's client waits on it for the outcome)."""
        pipeline = [{"$match": {"documentKey._id": sid, "operationType": {"$in": ["insert", "update", "replace"]}}}]
        return self.steps.watch(pipeline, max_await_time_ms=int(max_await * 1000))

    @retry_transient
    def set_app_container_image(self, app_id: ObjectId, alias: str) -> None:
        self.apps.update_one({"_id": app_id}, {"$set": {"build_infos.container_image": alias}})

    # --- steps ---------------------------------------------------------------------

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
        try:
            self.steps.insert_one(doc)
        except DuplicateKeyError:
            return False
        return True

    @retry_transient
    def get_step(self, sid: str) -> Step | None:
        doc = self.steps.find_one({"_id": sid})
        return Step.from_doc(doc) if doc else None

    @retry_transient
    def steps_for_job(self, job_id: ObjectId) -> list[Step]:
        return [Step.from_doc(doc) for doc in self.steps.find({"job_id": same_id(job_id)})]

    @retry_transient
    def steps_in_states(self, states: tuple[str, ...]) -> list[Step]:
        cursor = self.steps.find({"state": {"$in": list(states)}}).sort("created_at", pymongo.ASCENDING)
        return [Step.from_doc(doc) for doc in cursor]

    @retry_transient
    def newest_app_build(self, app_id: ObjectId) -> Step | None:
        """The app's newest buildimage step (a deploy reports when it failed)."""
        query = {"app_id": same_id(app_id), "kind": BUILDIMAGE}
        doc = self.steps.find_one(query, sort=[("created_at", pymongo.DESCENDING)])
        return Step.from_doc(doc) if doc else None

    @retry_transient
    def app_build_in_flight(self, app_id: ObjectId) -> Step | None:
        """The app's container build that has not finished yet (pending or running), if any."""
        doc = self.steps.find_one({"app_id": same_id(app_id), "kind": BUILDIMAGE, "state": {"$in": list(ACTIVE)}})
        return Step.from_doc(doc) if doc else None

    @retry_transient
    def recent_finished_steps(self, limit: int) -> list[Step]:
        cursor = self.steps.find({"state": {"$in": list(TERMINAL)}}).sort("updated_at", pymongo.DESCENDING)
        return [Step.from_doc(doc) for doc in cursor.limit(limit)]

    def _lease(self, owner: str, ttl: float) -> dict[str, Any]:
        return {"owner": owner, "token": uuid.uuid4().hex, "expires_at": utcnow() + timedelta(seconds=ttl)}

    @retry_transient
    def claim_step(
        self, owner: str, ttl: float, host: str, exclude: tuple[str, ...] = (), kinds: tuple[str, ...] | None = None
    ) -> Step | None:
        """Atomically take the lease on one step that needs work, oldest first.

        Work is: a `pending` step, a `requested` deploy step bound to this host,
        or an active step whose lease expired (its owner died); a deploy step
        that was running is bound to its host too. The state is left as it was:
        the caller decides what the step needs next. `exclude` holds the ids
        this process already works on (its own leases may lapse in an outage).
        """
        now = utcnow()
        expired = {"lease.expires_at": {"$lt": now}}
        candidates: list[dict[str, Any]] = [
            {"state": PENDING, **expired},
            {"state": REQUESTED, "requested_host": host, **expired},
            {"state": PREPARING, **expired},
            {"state": RUNNING, "kind": BUILDIMAGE, **expired},
            {"state": RUNNING, "kind": DEPLOY, "requested_host": host, **expired},
        ]
        for query in candidates:
            if exclude:
                query["_id"] = {"$nin": list(exclude)}
            if kinds and query.get("kind", kinds[0]) not in kinds:
                continue
            if kinds and "kind" not in query:
                query["kind"] = {"$in": list(kinds)}
            doc = self.steps.find_one_and_update(
                query,
                {
                    "$set": {"lease": self._lease(owner, ttl)},
                    "$inc": {"attempts": 1},
                    "$currentDate": {"updated_at": True},
                },
                sort=[("created_at", pymongo.ASCENDING)],
                return_document=ReturnDocument.AFTER,
            )
            if doc:
                return Step.from_doc(doc)
        return None

    def requested_step_waiting(self, host: str) -> bool:
        """Whether a deploy step requested on `host` waits for a worker (a cheap read on the state index)."""
        now = utcnow()
        query = {"state": REQUESTED, "requested_host": host, "lease.expires_at": {"$lt": now}}
        return self.steps.find_one(query, {"_id": 1}) is not None

    @retry_transient
    def claim_specific(self, sid: str, owner: str, ttl: float, states: tuple[str, ...]) -> Step | None:
        """Take the lease on one named step if it is free and in one of `states`."""
        now = utcnow()
        doc = self.steps.find_one_and_update(
            {
                "_id": sid,
                "state": {"$in": list(states)},
                "lease.expires_at": {"$lt": now},
            },
            {"$set": {"lease": self._lease(owner, ttl)}, "$inc": {"attempts": 1}, "$currentDate": {"updated_at": True}},
            return_document=ReturnDocument.AFTER,
        )
        return Step.from_doc(doc) if doc else None

    @retry_transient
    def renew_lease(self, step: Step, ttl: float) -> Step | None:
        """Extend the lease; None when it was lost (fencing: a successor may hold it now)."""
        doc = self.steps.find_one_and_update(
            {"_id": step.id, "lease.token": step.lease_token},
            {
                "$set": {
                    "lease": {
                        "owner": step.owner,
                        "token": step.lease_token,
                        "expires_at": utcnow() + timedelta(seconds=ttl),
                    }
                }
            },
            return_document=ReturnDocument.AFTER,
        )
        return Step.from_doc(doc) if doc else None

    @retry_transient
    def update_step(
        self,
        step: Step,
        state: str | None = None,
        release: bool = False,
        expect_state: str | None = None,
        **fields: Any,
    ) -> Step | None:
        """A fenced write: applies only while `step`'s lease token is still the record's.

        Terminal states release the lease and stamp `times.finished`; `running`
        stamps `times.started`. With `expect_state`, it also applies only if the
        state is still that one (the client may have moved it meanwhile).
        Returns the new record, or None if the lease was lost or the state moved.
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
        doc = self.steps.find_one_and_update(
            query, {"$set": changes, "$currentDate": stamps}, return_document=ReturnDocument.AFTER
        )
        return Step.from_doc(doc) if doc else None

    @retry_transient
    def cancel_job_steps(self, job_id: ObjectId, reason: str, kind: str = DEPLOY) -> int:
        """Cancel a job's unfinished steps: free ones at once, held ones by asking their owner.

        Returns how many were cancelled outright; held ones get `cancel_requested`
        and their owner ends them (it checks at each lease renewal).
        """
        return self._cancel_active({"job_id": same_id(job_id), "kind": kind}, reason)

    def _cancel_active(self, query: dict[str, Any], reason: str) -> int:
        """Cancel the unfinished steps matching `query` that nobody holds; ask the holders of the others."""
        active = {**query, "state": {"$in": list(ACTIVE)}}
        cancelled = self.steps.update_many(
            {**active, "lease.expires_at": {"$lt": utcnow()}},
            {
                "$set": {"state": CANCELLED, "message": reason, "lease": FREE_LEASE},
                "$currentDate": {"updated_at": True, "times.finished": True},
            },
        ).modified_count
        self.steps.update_many(
            active,
            {"$set": {"cancel_requested": True, "cancel_reason": reason}, "$currentDate": {"updated_at": True}},
        )
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
        waiting = {"_id": sid, "state": {"$in": [PENDING, PREPARING, READY]}}
        request = {
            "$set": {"state": REQUESTED, "requested_host": host},
            "$currentDate": {"updated_at": True, "times.requested": True},
        }
        # Usually the daemon made the record at job start: one round trip.
        doc = self.steps.find_one_and_update(waiting, request, return_document=ReturnDocument.AFTER)
        if doc is None:
            self.create_step(job_id, DEPLOY, module, app_id=app_id, script=script)
            doc = self.steps.find_one_and_update(waiting, request, return_document=ReturnDocument.AFTER)
            doc = doc or self.steps.find_one({"_id": sid})
        return Step.from_doc(doc)

    @retry_transient
    def abandon_step(self, sid: str, reason: str) -> None:
        """The client gave up waiting: cancel the step whether or not a worker holds it."""
        self._cancel_active({"_id": sid}, reason)

    @retry_transient
    def reset_step_for_replay(self, sid: str) -> bool:
        """`replay`: put a finished step back to pending (a new attempt, same id)."""
        result = self.steps.update_one(
            {"_id": sid, "state": {"$in": list(TERMINAL)}},
            {
                "$set": {
                    "state": PENDING,
                    "message": "replay requested",
                    "lease": FREE_LEASE,
                    "attempts": 0,
                    "cancel_requested": False,
                    "exit_code": None,
                },
                "$currentDate": {"updated_at": True},
            },
        )
        return result.modified_count == 1

    # --- event checkpoints ------------------------------------------------------------

    @retry_transient
    def load_checkpoint(self) -> Checkpoint:
        doc = self.state.find_one({"_id": "events"}) or {}
        stream, poll = doc.get("stream") or {}, doc.get("poll") or {}
        return Checkpoint(
            resume_token=stream.get("resume_token"),
            caught_up_at=stream.get("caught_up_at") or poll.get("caught_up_at"),
            poll_high_water=poll.get("high_water"),
        )

    @retry_transient
    def save_stream_checkpoint(self, resume_token: Mapping[str, Any] | None, caught_up_at: datetime) -> None:
        self.state.update_one(
            {"_id": "events"},
            {"$set": {"stream": {"resume_token": resume_token, "caught_up_at": caught_up_at}}},
            upsert=True,
        )

    @retry_transient
    def save_poll_checkpoint(self, high_water: datetime, caught_up_at: datetime) -> None:
        self.state.update_one(
            {"_id": "events"},
            {"$set": {"poll": {"high_water": high_water, "caught_up_at": caught_up_at}}},
            upsert=True,
        )

    # --- images ------------------------------------------------------------------------

    @retry_transient
    def record_image(self, record: ImageRecord) -> None:
        self.images.replace_one({"_id": record.alias}, record.to_doc(), upsert=True)

    @retry_transient
    def get_image_record(self, alias: str) -> ImageRecord | None:
        doc = self.images.find_one({"_id": alias})
        return ImageRecord.from_doc(doc) if doc else None

    @retry_transient
    def image_records(self, app_id: ObjectId | None = None, state: str | None = "live") -> list[ImageRecord]:
        query: dict[str, Any] = {}
        if app_id is not None:
            query["app_id"] = same_id(app_id)
        if state is not None:
            query["state"] = state
        return [ImageRecord.from_doc(doc) for doc in self.images.find(query).sort("created_at", -1)]

    @retry_transient
    def mark_image_pruned(self, alias: str, reason: str) -> None:
        self.images.update_one(
            {"_id": alias},
            {"$set": {"state": "pruned", "pruned_reason": reason}, "$currentDate": {"pruned_at": True}},
        )

    @retry_transient
    def all_image_aliases(self) -> set[str]:
        """Aliases of every `container_images` record, whatever its state."""
        return {str(doc["_id"]) for doc in self.images.find({}, {"_id": 1})}

    @retry_transient
    def apps_container_images(self) -> dict[str, list[str]]:
        """Each `build_infos.container_image` any app names -> the ids of those apps (retention never touches them)."""
        named: dict[str, list[str]] = {}
        for doc in self.apps.find({"build_infos.container_image": {"$exists": True}}):
            value = (doc.get("build_infos") or {}).get("container_image")
            if isinstance(value, str) and value:
                named.setdefault(value, []).append(str(doc["_id"]))
        return named

    @retry_transient
    def active_step_images(self) -> dict[str, list[str]]:
        """Image aliases recorded (field `image`) on steps in flight -> the ids of those steps."""
        used: dict[str, list[str]] = {}
        for doc in self.steps.find({"state": {"$in": list(ACTIVE)}, "image": {"$exists": True}}):
            if isinstance(doc.get("image"), str) and doc["image"]:
                used.setdefault(doc["image"], []).append(str(doc["_id"]))
        return used

    @retry_transient
    def ended_buildimage_jobs(self, app_ids: list[ObjectId]) -> list[dict[str, Any]]:
        """Ghost's buildimage jobs of these apps that ended `done` or `failed` (the caller keeps those that
        built their AMI: `ghost.Job.built_image`)."""
        query = {"command": BUILDIMAGE, "status": {"$in": ["done", "failed"]}, "app_id": {"$in": list(app_ids)}}
        return list(self.jobs.find(query))

    # --- instances -----------------------------------------------------------------------

    @retry_transient
    def heartbeat(self, instance_id: str, info: Mapping[str, Any]) -> None:
        self.instances.update_one(
            {"_id": instance_id},
            {"$set": {"info": dict(info)}, "$currentDate": {"seen_at": True}},
            upsert=True,
        )

    @retry_transient
    def live_instances_on(self, host: str, max_age: float) -> list[dict[str, Any]]:
        """Instances on `host` whose heartbeat is younger than `max_age` seconds."""
        since = utcnow() - timedelta(seconds=max_age)
        return list(self.instances.find({"seen_at": {"$gte": since}, "info.host": host}))

    @retry_transient
    def remove_instance(self, instance_id: str) -> None:
        self.instances.delete_one({"_id": instance_id})

    @retry_transient
    def live_instances(self, max_age: float) -> list[dict[str, Any]]:
        since = utcnow() - timedelta(seconds=max_age)
        return list(self.instances.find({"seen_at": {"$gte": since}}))
