"""Ghost's documents: jobs and apps as the daemon reads them, the app's container image (a compare-and-set),
the change stream on jobs, and catch-up scans read in batches (`JobBatch`).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import pymongo
from bson import ObjectId
from pymongo.database import Database

from ..logs import get_logger
from ..model import BUILD_PACK, DEPLOY, PENDING, Step
from .connection import Connection, described, retry_transient
from .steps import new_step_doc, step_from_doc

if TYPE_CHECKING:  # the composed store: a batch asks it for what this part lacks
    from . import Store

log = get_logger(__package__)

CATCH_UP_BATCH = 500  # jobs a catch-up scan decides per bulk read of their steps and apps
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


class BatchSource(Protocol):
    """What a `JobBatch` asks of the store itself."""

    def get_job(self, job_id: ObjectId) -> dict[str, Any] | None: ...
    def get_app(self, app_id: ObjectId) -> dict[str, Any] | None: ...
    def cancel_job_steps(self, job_id: ObjectId, reason: str, kind: str = ...) -> int: ...
    def insert_new_steps(self, docs: Iterable[dict[str, Any]]) -> set[str]: ...


class JobBatch:
    """Jobs of a catch-up scan with their step records and apps, read in bulk.

    It answers the Store calls the intake makes to decide a job (`get_step`,
    `get_app`, `steps_for_job`) from what was read with the batch, and keeps
    the records `create_step` asks for until `flush` writes them in one bulk
    upsert. `get_job` and `cancel_job_steps` go to the store itself.
    """

    def __init__(
        self,
        store: BatchSource,
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

    def cancel_job_steps(self, job_id: ObjectId, reason: str, kind: str = DEPLOY) -> int:
        return self.store.cancel_job_steps(job_id, reason, kind)

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


class Jobs(Connection):
    """Ghost's `jobs` and `apps`: reads, the change stream, and the one field written."""

    def __init__(self, db: Database, monotonic: Callable[[], float] = time.monotonic):
        super().__init__(db, monotonic)
        self._undated_jobs: set[Any] = set()  # jobs whose `_updated` is not a date, already logged

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
    def read_job_batch(self: Store, jobs: list[dict[str, Any]]) -> JobBatch:
        """Two queries for any number of jobs: the step records of these jobs, and their apps."""
        job_ids = [doc["_id"] for doc in jobs if isinstance(doc.get("_id"), ObjectId)]
        app_ids = list({doc["app_id"] for doc in jobs if isinstance(doc.get("app_id"), ObjectId)})
        # Deciding needs whether a record exists and whether it is finished, not its output.
        steps = list(self.steps.find({"job_id": {"$in": job_ids}}, {"output_tail": 0})) if job_ids else []
        apps: dict[Any, dict[str, Any] | None] = dict.fromkeys(app_ids)
        apps.update((doc["_id"], doc) for doc in (self.apps.find({"_id": {"$in": app_ids}}) if app_ids else []))
        return JobBatch(self, jobs, steps, apps)

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
    def recently_deployed_apps(self, limit: int, jobs: int = 200) -> list[ObjectId]:
        """Up to `limit` app ids, the most recently deployed first: from the newest `jobs` deploy jobs (one read on
        the (command, _updated) index)."""
        apps: list[ObjectId] = []
        newest = self.jobs.find({"command": DEPLOY}, {"app_id": 1}).sort("_updated", pymongo.DESCENDING).limit(jobs)
        for doc in newest:
            app_id = doc.get("app_id")
            if isinstance(app_id, ObjectId) and app_id not in apps:
                apps.append(app_id)
                if len(apps) >= limit:
                    break
        return apps

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
