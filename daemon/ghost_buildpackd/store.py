"""MongoDB adapter: the only module that talks to MongoDB.

Ghost's collections (`jobs`, `apps`) are read; the one Ghost field written is
`apps.build_infos.container_image`. The daemon's own state lives beside them:
`container_steps` (one record per step, with its lease), `container_images`
(what each published image is), `buildpackd_state` (event checkpoints),
`buildpackd_instances` (heartbeats) and `buildpackd_base_images` (the base
images Ghost's UI offers, read by Ghost's patched `libs/lxd.py`). What a step is (kinds, states, the
`Step` record) and who may move it where is `model.py`'s; the queries here
that move steps take their from-states from its transition table.

Datetimes the daemon writes are set on insert, inside a sub-document, or with
`$currentDate` (server time), never as a bare `$set` of a top-level datetime:
all three are plain MongoDB and keep the BSON date type on every server.

Leases are reckoned on the server's clock (`server_now`: the server's time read
from its `hello` reply, carried forward by this host's monotonic clock), so a
host whose clock is skewed, or steps, neither steals a healthy lease nor keeps
an expired one. Writes that decide who holds a step and what its outcome is
use majority write concern, so a replica-set failover cannot roll back an
acknowledged claim or outcome.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import heapq
import itertools
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pymongo
from bson import ObjectId
from pymongo import ReturnDocument, UpdateOne, WriteConcern
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
from .model import (
    ACTIVE,
    BUILD_PACK,
    BUILDIMAGE,
    CANCELLED,
    DEPLOY,
    PENDING,
    PREPARING,
    READY,
    REQUESTED,
    RUNNING,
    TERMINAL,
    Actor,
    Script,
    Step,
    StepKind,
    StepState,
    cancellation,
    from_states,
    known,
    step_id,
)
from .policy import MONGODB_RETRY, retrying

log = get_logger(__name__)

STEPS, IMAGES, STATE, INSTANCES = "container_steps", "container_images", "buildpackd_state", "buildpackd_instances"
NOT_STOPPED = {"stopped_at": {"$exists": False}}  # an instance record whose process has not ended
# The base images Ghost's UI may offer, one document (BASE_IMAGES_ID) that Ghost's patched libs/lxd.py reads
# with pymongo 3.7: `images`, `refreshed_at` (server time), `refreshed_by`.
BASE_IMAGES, BASE_IMAGES_ID = "buildpackd_base_images", "selectable"
NO_CHANGE_STREAMS = 40573  # "The $changeStream stage is only supported on replica sets"
UNAUTHORIZED = 13
COMMAND_NOT_FOUND = 59  # `hello` on servers before 4.2.10 and 4.4.2
TRANSIENT_ERRORS = (AutoReconnect, ConnectionFailure, NetworkTimeout, ServerSelectionTimeoutError)
CATCH_UP_BATCH = 500  # jobs a catch-up scan decides per bulk read of their steps and apps
# A step nobody holds carries a lease that expired long ago rather than none, so
# "free" is one comparison (`lease.expires_at < now`) for every query and index.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FREE_LEASE = {"owner": None, "token": None, "expires_at": EPOCH}
# Claims, leases and outcomes: acknowledged only once a majority of the replica set has them.
MAJORITY = WriteConcern(w="majority")
# A reading of the server's clock is off by up to half its round trip: a slower one does not replace a
# reading already taken (the lease margin, at least 1 s, covers half of this).
CLOCK_READING_MAX_ROUND_TRIP = 0.5
CLOCK_MOVED = 1.0  # seconds between a new reading and the running estimate worth a log line


def utcnow() -> datetime:
    return datetime.now(UTC)


def any_of(values: Iterable[str]) -> dict[str, list[str]]:
    """A filter matching any of `values` (the states the transition table allows a move from)."""
    return {"$in": list(values)}


# Codes a server answers with while it shuts down or its primary changes: the same call succeeds once it
# is back or a new primary is elected (ShutdownInProgress, PrimarySteppedDown, NotWritablePrimary,
# InterruptedAtShutdown, InterruptedDueToReplStateChange, NotPrimaryNoSecondaryOk, NotPrimaryOrSecondary).
IN_TRANSITION = frozenset({91, 189, 10107, 11600, 11602, 13435, 13436})


class ServerInTransition(AutoReconnect):
    """A call the server refused while shutting down or changing primary (often as a write concern error,
    which pymongo does not count as a lost connection): handled like one, so every retry and outage path
    that knows AutoReconnect knows it."""


def in_transition(error: BaseException) -> bool:
    return isinstance(error, OperationFailure) and (
        error.code in IN_TRANSITION or error.has_error_label("RetryableWriteError")
    )


def _transitions_as_transient(call: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(call)
    def translated(*args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except OperationFailure as error:
            if in_transition(error):
                raise ServerInTransition(str(error), error.details) from error
            raise

    return translated


_retry_through_outages = retrying(
    lambda error: isinstance(error, TRANSIENT_ERRORS), "mongodb_unavailable_retrying", MONGODB_RETRY
)


def retry_transient(call: Callable[..., Any]) -> Callable[..., Any]:
    """Retries a MongoDB call through outages and primary changes: exponential backoff, ~2 minutes in all.

    As after a lost connection, a write the server applied before refusing to acknowledge it cannot
    apply twice: the writes are conditional (on a state, a lease, a claim number), and an outcome
    already written under our claim is recognised as ours."""
    return _retry_through_outages(_transitions_as_transient(call))


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


@dataclasses.dataclass(frozen=True)
class BaseImage:
    """An image Ghost's UI may offer as an app's base image (`buildpackd_base_images`), in the words of
    Ghost 19.08's `list_lxd_images`: the fingerprint it stores, the description and aliases it shows."""

    fingerprint: str
    aliases: tuple[str, ...]
    description: str | None  # the image's `description` property; None when it has none (Ghost shows "None")
    os: str | None
    release: str | None

    def to_doc(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "aliases": list(self.aliases)}


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


# What intake reads of a change event on jobs (`_id`, the resume token, is always kept).
JOB_EVENT_FIELDS = ("operationType", "documentKey", "wallTime", "clusterTime")
QUIET_STREAM_PAUSE = 0.05  # shortest wait between two empty reads of a change stream


def next_change(stream: Any, pause: threading.Event | None = None) -> Any:
    """The next change of `stream`, or None when there is none yet.

    The server normally holds an empty read for the stream's maxAwaitTimeMS;
    a server or proxy that answers at once would make a quiet stream a
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


def described(value: Any) -> str:
    """A value's kind for a log line: `a list of datetime, str`, `a str: '...'` (cut short)."""
    if isinstance(value, list):
        return "a list of " + ", ".join(type(item).__name__ for item in value[:5]) + (", ..." if len(value) > 5 else "")
    return f"a {type(value).__name__}: {str(value)[:80]!r}"


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


@dataclasses.dataclass(frozen=True)
class ServerClock:
    """The server's time at one instant of this host's monotonic clock, and how long the reading took.

    The host's wall clock plays no part: an NTP step or `date -s` on this host
    moves neither the estimate nor any lease decision made from it.
    """

    server_time: datetime
    at: float  # this host's monotonic clock when the server read its time (midpoint of the round trip)
    round_trip: float

    def now(self, monotonic_now: float) -> datetime:
        return self.server_time + timedelta(seconds=monotonic_now - self.at)


class JobBatch:
    """Jobs of a catch-up scan with their step records and apps, read in bulk.

    It answers the Store calls the intake makes to decide a job (`get_step`,
    `get_app`, `steps_for_job`) from what was read with the batch, and keeps
    the records `create_step` asks for until `flush` writes them in one bulk
    upsert. `get_job` and `cancel_job_steps` go to the store itself.
    """

    def __init__(
        self,
        store: Store,
        jobs: list[dict[str, Any]],
        steps: list[dict[str, Any]],
        apps: dict[Any, dict[str, Any] | None],  # None: read with the batch, and not there
    ):
        self.store = store
        self.jobs = jobs
        self._steps = {doc["_id"]: doc for doc in steps}
        self._by_job: dict[Any, list[dict[str, Any]]] = {}
        for doc in steps:
            self._by_job.setdefault(doc["job_id"], []).append(doc)
        self._apps = apps
        self._new: dict[str, dict[str, Any]] = {}

    def get_job(self, job_id: ObjectId) -> dict[str, Any] | None:
        return self.store.get_job(job_id)

    def cancel_job_steps(self, job_id: ObjectId, reason: str) -> int:
        return self.store.cancel_job_steps(job_id, reason)

    def get_step(self, sid: str) -> Step | None:
        doc = self._steps.get(sid)
        return step_from_doc(doc) if doc else None

    def get_app(self, app_id: ObjectId) -> dict[str, Any] | None:
        return self._apps[app_id] if app_id in self._apps else self.store.get_app(app_id)

    def steps_for_job(self, job_id: ObjectId) -> list[Step]:
        return [step_from_doc(doc) for doc in self._by_job.get(job_id, [])]

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
        """Queue the record for `flush`; False when the batch already knows it."""
        doc = new_step_doc(job_id, kind, module, app_id, state, message, script)
        if doc["_id"] in self._steps:
            return False
        self._steps[doc["_id"]] = self._new[doc["_id"]] = doc
        self._by_job.setdefault(job_id, []).append(doc)
        return True

    def flush(self) -> tuple[set[str], set[str]]:
        """Write the queued records: (ids created now, ids another instance had created meanwhile)."""
        created = self.store.insert_new_steps(self._new.values())
        raced = set(self._new) - created
        self._new = {}
        return created, raced


class Store:
    """Every MongoDB read and write the daemon, its CLI and the Ghost-side client make."""

    def __init__(self, db: Database, monotonic: Callable[[], float] = time.monotonic):
        self.db = db
        self.jobs: Collection = db["jobs"]
        self.apps: Collection = db.get_collection("apps", write_concern=MAJORITY)
        self.steps: Collection = db.get_collection(STEPS, write_concern=MAJORITY)
        self.images: Collection = db.get_collection(IMAGES, write_concern=MAJORITY)
        self.state: Collection = db[STATE]
        self.instances: Collection = db[INSTANCES]
        self.base_images: Collection = db[BASE_IMAGES]
        self._monotonic = monotonic
        self._server_clock: ServerClock | None = None  # measured at the first need
        self._undated_jobs: set[Any] = set()  # jobs whose `_updated` is not a date, already logged

    @classmethod
    def from_uri(cls, uri: str, database: str, timeout: float = 10.0) -> Store:
        return cls(connect(uri, timeout)[database])

    # --- server ------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        """Round trip to the server (raises when unreachable or unauthenticated)."""
        return self.db.command("ping")

    def measure_server_clock(self) -> datetime:
        """Read the server's clock (the `localTime` of its `hello` reply); returns the server's time now.

        The reply was made between sending and receiving, so the midpoint of
        the round trip, on this host's monotonic clock, is when the server read
        it: the error is at most half the round trip, which the lease margin
        covers. A reading slower than CLOCK_READING_MAX_ROUND_TRIP, and slower
        than the one held, is dropped. A later reading that disagrees with the
        running estimate means the server's clock moved (this host's wall
        clock is not involved): it is taken, and logged.
        """
        sent = self._monotonic()
        reply = self._hello()
        received = self._monotonic()
        server_time = reply.get("localTime")
        if isinstance(server_time, datetime):
            if server_time.tzinfo is None:
                server_time = server_time.replace(tzinfo=UTC)
            self._take_reading(ServerClock(server_time, sent + (received - sent) / 2, received - sent))
        elif self._server_clock is None:  # a server that does not say its time: this host's clock, read once
            self._server_clock = ServerClock(utcnow(), self._monotonic(), 0.0)
        return self.server_now()

    def _take_reading(self, reading: ServerClock) -> None:
        held = self._server_clock
        if held is not None:
            if reading.round_trip > max(CLOCK_READING_MAX_ROUND_TRIP, held.round_trip):
                return
            moved = (reading.server_time - held.now(reading.at)).total_seconds()
            if abs(moved) > CLOCK_MOVED:
                log.warning(
                    "mongodb_clock_moved",
                    by_s=round(moved, 3),
                    consequence="lease expiry is reckoned on MongoDB's clock as read now",
                )
        self._server_clock = reading

    def server_now(self) -> datetime:
        """The server's time now, carried from its last reading by this host's monotonic clock (read first if it
        never was): what lease expiry is reckoned on."""
        if self._server_clock is None:
            self.measure_server_clock()
        assert self._server_clock is not None
        return self._server_clock.now(self._monotonic())

    def _hello(self) -> dict[str, Any]:
        """The server's handshake reply: `hello` (4.4.2 and later), else its older name `isMaster` (4.2)."""
        try:
            return self.db.client.admin.command("hello")
        except OperationFailure as error:
            if error.code != COMMAND_NOT_FOUND:
                raise
            return self.db.client.admin.command("isMaster")

    def server_info(self) -> dict[str, Any]:
        hello = self._hello()
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
            if error.code == UNAUTHORIZED:
                return False, (
                    "the MongoDB user may not open change streams on Ghost's jobs collection (grant it the "
                    "changeStream and find actions there, as MongoDB's read role does)"
                )
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
            self._dated_jobs(
                self.jobs.find({"command": command, "_updated": {"$gte": since}}, batch_size=CATCH_UP_BATCH).sort(
                    "_updated", pymongo.ASCENDING
                )
            )
            for command in commands
        ]
        return heapq.merge(*scans, key=lambda doc: doc["_updated"])

    def _dated_jobs(self, jobs: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The jobs whose `_updated` is a date; the others are skipped, each named in the log once.

        Ghost writes a date there. An array holding a date beside something else
        (a string, say) is in the scan's range, and its time cannot be ordered
        with the other jobs': reading it would end the whole scan.
        """
        for doc in jobs:
            updated = doc.get("_updated")
            if isinstance(updated, datetime):
                yield doc
            elif doc.get("_id") not in self._undated_jobs:
                self._undated_jobs.add(doc.get("_id"))
                log.warning(
                    "job_skipped_updated_not_a_date",
                    job_id=str(doc.get("_id")),
                    command=doc.get("command"),
                    field="_updated",
                    reason=f"expected a date, got {described(updated)}",
                    consequence="catch-up scans and polls skip this job (Ghost writes a date there)",
                )

    def job_batches(self, since: datetime, commands: tuple[str, ...]) -> Iterator[JobBatch]:
        """`jobs_changed_since` in batches of CATCH_UP_BATCH, each with its jobs' steps and apps read in bulk."""
        jobs = self.jobs_changed_since(since, commands)
        while chunk := list(itertools.islice(jobs, CATCH_UP_BATCH)):
            yield self.read_job_batch(chunk)

    @retry_transient
    def read_job_batch(self, jobs: list[dict[str, Any]]) -> JobBatch:
        """Two queries for any number of jobs: the step records of these jobs, and their apps."""
        job_ids = [doc["_id"] for doc in jobs if isinstance(doc.get("_id"), ObjectId)]
        app_ids = list({doc["app_id"] for doc in jobs if isinstance(doc.get("app_id"), ObjectId)})
        # Deciding needs whether a record exists and whether it is finished, not its output.
        steps = list(self.steps.find({"job_id": {"$in": job_ids}}, {"output_tail": 0})) if job_ids else []
        apps: dict[Any, dict[str, Any] | None] = dict.fromkeys(app_ids)
        apps.update((doc["_id"], doc) for doc in (self.apps.find({"_id": {"$in": app_ids}}) if app_ids else []))
        return JobBatch(self, jobs, steps, apps)

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

    @retry_transient
    def newest_job_update(self, commands: tuple[str, ...] | None = None) -> datetime | None:
        """The newest `_updated` of any job, or of jobs of `commands` (then one index read each).

        BSON orders dates above strings and numbers, so a date is found first when there is one.
        """
        queries = [{"command": command} for command in commands] if commands else [{}]
        newest = None
        for query in queries:
            doc = self.jobs.find_one({**query, "_updated": {"$exists": True}}, sort=[("_updated", pymongo.DESCENDING)])
            updated = doc["_updated"] if doc else None
            if isinstance(updated, datetime) and (newest is None or updated > newest):
                newest = updated
        return newest

    @retry_transient
    def job_changed_between(self, after: datetime, until: datetime, commands: tuple[str, ...]) -> bool:
        """Whether a job of `commands` has an `_updated` in (after, until]: one index lookup per command."""
        window = {"$gt": after, "$lte": until}
        return any(
            self.jobs.find_one({"command": command, "_updated": window}, {"_id": 1}) is not None for command in commands
        )

    def watch_jobs(self, resume_token: Mapping[str, Any] | None, max_await: float) -> Any:
        """A change stream on jobs: writes only (and the events that end a stream), cut to what intake reads.

        Intake reads the job itself by `documentKey`: the event carries neither
        the document nor the changed fields, so a job near 16 MB cannot make an
        event too large for the stream.
        """
        pipeline: list[dict[str, Any]] = [
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
            },
            {"$project": {field: 1 for field in JOB_EVENT_FIELDS}},
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
    def app_container_image(self, app_id: ObjectId) -> str | None:
        doc = self.apps.find_one({"_id": app_id}, {"build_infos": 1})
        value = ((doc or {}).get("build_infos") or {}).get("container_image")
        return value if isinstance(value, str) else None

    @retry_transient
    def set_app_container_image(self, app_id: ObjectId, alias: str, expected: str | None) -> bool:
        """Point the app at `alias` only if it still names `expected` (None: nothing); False when it moved.

        A compare-and-set: a writer that paused after reading cannot overwrite
        what someone else wrote meanwhile.
        """
        result = self.apps.update_one(
            {"_id": app_id, "build_infos.container_image": expected}, {"$set": {"build_infos.container_image": alias}}
        )
        return result.matched_count == 1

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

    def _lease(self, owner: str, ttl: float) -> dict[str, Any]:
        return {"owner": owner, "token": uuid.uuid4().hex, "expires_at": self.server_now() + timedelta(seconds=ttl)}

    def _claim_update(self, owner: str, ttl: float) -> dict[str, Any]:
        return {
            "$set": {"lease": self._lease(owner, ttl)},
            "$inc": {"attempts": 1, "claims": 1},
            "$currentDate": {"updated_at": True},
        }

    @retry_transient
    def claim_step(
        self, owner: str, ttl: float, host: str, exclude: tuple[str, ...] = (), kinds: tuple[str, ...] | None = None
    ) -> Step | None:
        """Atomically take the lease on one step that needs work, oldest first.

        Work is, in this order: a `requested` deploy step bound to this host
        (Ghost's worker waits for it), a build Ghost's buildimage job asked for
        on this host (it waits too), a `pending` step, or an active step whose
        lease expired (its owner died); a deploy step that was running, and a
        build asked for by a job, are bound to their host. The state is left as it was: the caller decides what
        the step needs next. `exclude` holds the ids this process already works
        on (its own leases may lapse in an outage).
        """
        expired = {"lease.expires_at": {"$lt": self.server_now()}}
        # A build Ghost's job asked for runs on the job's host (its provisioner trees are there);
        # one the intake made (no requested_host) runs anywhere.
        here_or_anywhere = {"requested_host": {"$in": [None, host]}}
        candidates: list[dict[str, Any]] = [
            {"state": REQUESTED, "requested_host": host, **expired},
            {"state": PENDING, "kind": BUILDIMAGE, "requested_host": host, **expired},
            {"state": PENDING, **here_or_anywhere, **expired},
            {"state": PREPARING, **expired},
            {"state": RUNNING, "kind": BUILDIMAGE, **here_or_anywhere, **expired},
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
                self._claim_update(owner, ttl),
                sort=[("created_at", pymongo.ASCENDING)],
                return_document=ReturnDocument.AFTER,
            )
            if doc:
                return step_from_doc(doc)
        return None

    def requested_step_waiting(self, host: str) -> bool:
        """Whether a step requested on `host` waits for a worker (a cheap read on the state index): a deploy
        step `requested`, or a build Ghost's buildimage job asked for (`pending`, bound to its host)."""
        query = {
            "state": {"$in": [REQUESTED, PENDING]},
            "requested_host": host,
            "lease.expires_at": {"$lt": self.server_now()},
        }
        return self.steps.find_one(query, {"_id": 1}) is not None

    def renew_lease(self, step: Step, ttl: float, within: float) -> Step | None:
        """Extend the lease; None when it was lost (fencing: a successor may hold it now).

        One attempt, given up after `within` seconds (a PyMongoError): the
        holder's own deadline, not retries, decides when a lease that cannot be
        renewed counts as lost. A lease that already expired is not renewed,
        even when nobody took it yet: its holder has stopped acting on it.
        """
        with pymongo.timeout(within):
            now = self.server_now()
            doc = self.steps.find_one_and_update(
                {"_id": step.id, "lease.token": step.lease_token, "lease.expires_at": {"$gt": now}},
                {
                    "$set": {
                        "lease": {
                            "owner": step.owner,
                            "token": step.lease_token,
                            "expires_at": now + timedelta(seconds=ttl),
                        }
                    }
                },
                return_document=ReturnDocument.AFTER,
            )
        return step_from_doc(doc) if doc else None

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

    @retry_transient
    def prepared_deploy_count(self, sid: str) -> int:
        """Deploy steps other than `sid` whose container is launched ahead, or about to be, and not yet asked for.

        The container's name is recorded before its launch (absent when `run`
        is to launch it); of steps deciding at the same moment, those with a
        smaller id count first, so two of them never both take the last place.
        """
        launched = {"container": {"$type": "string"}}
        query = {
            "kind": DEPLOY,
            "state": {"$in": [PREPARING, READY]},
            "$or": [{**launched, "_id": {"$ne": sid}}, {"state": PREPARING, "_id": {"$lt": sid}}],
        }
        return self.steps.count_documents(query)

    @retry_transient
    def cancel_job_steps(self, job_id: ObjectId, reason: str) -> int:
        """Intake: cancel a deploy job's unfinished steps: free ones at once, held ones by asking their owner.

        Returns how many were cancelled outright; held ones get `cancel_requested`
        and their owner ends them (it checks at each lease renewal).
        """
        return self._cancel_active(Actor.INTAKE, {"job_id": job_id, "kind": DEPLOY}, reason)

    def _cancel_active(self, actor: Actor, query: dict[str, Any], reason: str) -> int:
        """Cancel the steps matching `query` that `actor` may cancel and nobody holds; ask the holders of the others.

        The request comes first: a holder that releases its step in between
        (a preparation done, writing `ready` only if nobody asked) either saw
        the request and ends the step itself, or released it before, and the
        step is free for the cancellation that follows. Either way the end wins.
        """
        states = from_states(actor, CANCELLED, query.get("kind"))
        active = {**query, "state": any_of(states)}
        self.steps.update_many(
            active,
            {"$set": {"cancel_requested": True, "cancel_reason": reason}, "$currentDate": {"updated_at": True}},
        )
        free = {**query, "lease.expires_at": {"$lt": self.server_now()}}
        cancelled = 0
        for started in (False, True):  # the message says whether the script had started (a running one is stopped)
            which = [state for state in states if (state == RUNNING) == started]
            if not which:
                continue
            cancelled += self.steps.update_many(
                {**free, "state": any_of(which)},
                {
                    "$set": {"state": CANCELLED, "message": cancellation(reason, which[0]), "lease": FREE_LEASE},
                    "$currentDate": {"updated_at": True, "times.finished": True},
                },
            ).modified_count
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
        waiting = {"_id": sid, "state": any_of(from_states(Actor.CLIENT, REQUESTED))}
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
        if doc is None:  # removed between our insert and read: nothing to wait on, and Ghost must hear it
            raise LookupError(f"step {sid} was removed while it was being requested")
        return step_from_doc(doc)

    @retry_transient
    def request_build(self, job_id: ObjectId, app_id: ObjectId | None, host: str) -> Step:
        """Ghost's buildimage job asks for its container build now, on `host`: the step is made at once
        (the job is still `started`), or found as it is (one build per job, whoever made it first)."""
        doc = new_step_doc(job_id, BUILDIMAGE, None, app_id, PENDING, "requested by Ghost's buildimage job")
        doc["requested_host"] = host
        with contextlib.suppress(DuplicateKeyError):  # made by the intake, an earlier request, or a replay
            self.steps.insert_one(doc)
        found = self.steps.find_one({"_id": doc["_id"]})
        return step_from_doc(found if found is not None else doc)

    @retry_transient
    def expire_stale_ready(self, max_age: float, reason: str) -> list[Step]:
        """Forget the container of deploy steps `ready` for longer than `max_age` seconds; those steps as they were.

        The step stays requestable (the sweep's row of the transition table):
        Ghost may still ask for it late in a long deploy, and the run then
        launches a new container. Each is changed only if it is still `ready`,
        unheld and unchanged, so a request arriving meanwhile wins; the caller
        deletes the containers returned (a run that launches one first removes
        them too: `remove_leftovers`).
        """
        now = self.server_now()  # updated_at and lease expiry are on the server's clock
        stale = {
            "state": any_of(from_states(Actor.SWEEP, READY)),
            "container": {"$type": "string"},
            "updated_at": {"$lt": now - timedelta(seconds=max_age)},
        }
        expired = []
        for found in self.steps.find(stale, {"_id": 1}):
            doc = self.steps.find_one_and_update(
                {**stale, "_id": found["_id"], "lease.expires_at": {"$lt": now}},
                {
                    "$set": {"state": READY, "container": None, "message": reason, "lease": FREE_LEASE},
                    "$currentDate": {"updated_at": True},
                },
                return_document=ReturnDocument.BEFORE,
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
        """`replay`: put a finished step back to pending (a new attempt, same id)."""
        result = self.steps.update_one(
            {"_id": sid, "state": any_of(from_states(Actor.REPLAY, PENDING))},
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
    def record_image(self, record: ImageRecord, claim: int = 0) -> bool:
        """Write the record unless one made by a later claim of the step exists (then False: fenced out).

        `claim` is the fencing token: a holder that paused and lost its step
        cannot overwrite what its successor recorded.
        """
        doc = {**record.to_doc(), "claim": claim}
        # A record written before claims were recorded counts as claim 0.
        self.images.update_one({"_id": record.alias, "claim": {"$exists": False}}, {"$set": {"claim": 0}})
        try:
            self.images.replace_one({"_id": record.alias, "claim": {"$lte": claim}}, doc, upsert=True)
        except DuplicateKeyError:  # the record exists, with a later claim
            return False
        return True

    @retry_transient
    def get_image_record(self, alias: str) -> ImageRecord | None:
        doc = self.images.find_one({"_id": alias})
        return ImageRecord.from_doc(doc) if doc else None

    @retry_transient
    def image_records(self, app_id: ObjectId | None = None, state: str | None = "live") -> list[ImageRecord]:
        query: dict[str, Any] = {}
        if app_id is not None:
            query["app_id"] = app_id
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

    # --- the base images Ghost's UI offers ---------------------------------------------------

    @retry_transient
    def save_base_images(self, images: Iterable[BaseImage], instance_id: str) -> None:
        """Replace the list Ghost's UI offers (`refreshed_at`, on the server's clock, says how old it is)."""
        self.base_images.update_one(
            {"_id": BASE_IMAGES_ID},
            {
                "$set": {"images": [image.to_doc() for image in images], "refreshed_by": instance_id},
                "$currentDate": {"refreshed_at": True},
            },
            upsert=True,
        )

    @retry_transient
    def load_base_images(self) -> dict[str, Any] | None:
        """The stored list as Ghost reads it (status and tests)."""
        return self.base_images.find_one({"_id": BASE_IMAGES_ID})

    # --- instances -----------------------------------------------------------------------

    @retry_transient
    def heartbeat(self, instance_id: str, info: Mapping[str, Any]) -> None:
        self.instances.update_one(
            {"_id": instance_id},
            {"$set": {"info": dict(info)}, "$currentDate": {"seen_at": True}},
            upsert=True,
        )

    @retry_transient
    def daemon_on(self, host: str, max_age: float, restart_grace: float) -> bool:
        """Whether `host` has a daemon, or soon will: one whose heartbeat is younger than `max_age`, or one that
        stopped less than `restart_grace` seconds ago (a restart: the next instance is on its way)."""
        now = self.server_now()  # seen_at and stopped_at are the server's times
        query = {
            "info.host": host,
            "$or": [
                {"seen_at": {"$gte": now - timedelta(seconds=max_age)}, **NOT_STOPPED},
                {"stopped_at": {"$gte": now - timedelta(seconds=restart_grace)}},
            ],
        }
        return self.instances.find_one(query, {"_id": 1}) is not None

    def mark_instance_stopped(self, instance_id: str, within: float) -> None:
        """At the end of a stop: the record says when the process ended (`stopped_at`, the server's time).

        One attempt bounded by `within` seconds (the stop is bounded); a record
        left unmarked ages out like a dead instance's. A heartbeat written
        later (its thread outlives the stop by a call) leaves the mark.
        """
        with pymongo.timeout(within):
            self.instances.update_one({"_id": instance_id}, {"$currentDate": {"stopped_at": True}})

    @retry_transient
    def forget_stopped_instances(self, host: str) -> int:
        """At start, once this instance's heartbeat is written: the stopped records of its host served their
        purpose (a client waiting through the restart sees this instance now)."""
        return self.instances.delete_many({"info.host": host, "stopped_at": {"$exists": True}}).deleted_count

    @retry_transient
    def live_instances(self, max_age: float) -> list[dict[str, Any]]:
        since = self.server_now() - timedelta(seconds=max_age)
        return list(self.instances.find({"seen_at": {"$gte": since}, **NOT_STOPPED}))
