"""MongoDB connection: the client, the collections, error codes, retries through outages, redaction."""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Self

import pymongo
from pymongo import WriteConcern
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import (
    AutoReconnect,
    ConnectionFailure,
    NetworkTimeout,
    OperationFailure,
    ServerSelectionTimeoutError,
)

from ..policy import MONGODB_RETRY, retrying

STEPS, IMAGES, STATE, INSTANCES = "container_steps", "container_images", "buildpackd_state", "buildpackd_instances"
# The base images Ghost's UI may offer, one document (BASE_IMAGES_ID) that Ghost's patched libs/lxd.py reads
# with pymongo 3.7: `images`, `refreshed_at` (server time), `refreshed_by`.
BASE_IMAGES, BASE_IMAGES_ID = "buildpackd_base_images", "selectable"
NO_CHANGE_STREAMS = 40573  # "The $changeStream stage is only supported on replica sets"
UNAUTHORIZED = 13
COMMAND_NOT_FOUND = 59  # `hello` on servers before 4.2.10 and 4.4.2
TRANSIENT_ERRORS = (AutoReconnect, ConnectionFailure, NetworkTimeout, ServerSelectionTimeoutError)
# Claims, leases and outcomes: acknowledged only once a majority of the replica set has them.
MAJORITY = WriteConcern(w="majority")


def utcnow() -> datetime:
    return datetime.now(UTC)


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


class Connection:
    """The database handle and the collections every part of the store shares, and the server itself."""

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

    @classmethod
    def from_uri(cls, uri: str, database: str, timeout: float = 10.0) -> Self:
        return cls(connect(uri, timeout)[database])

    def ping(self) -> dict[str, Any]:
        """Round trip to the server (raises when unreachable or unauthenticated)."""
        return self.db.command("ping")

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
