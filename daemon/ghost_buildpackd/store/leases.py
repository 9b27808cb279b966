"""Claims and leases: which step a runner takes next, the lease it holds it by, renewals, and the
`container.max_prepared` count.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pymongo
from pymongo import ReturnDocument

from ..model import (
    BUILDIMAGE,
    DEPLOY,
    PENDING,
    PREPARING,
    READY,
    REQUESTED,
    RUNNING,
    Step,
)
from .connection import retry_transient
from .steps import StepRecords, step_from_doc


class Leases(StepRecords):
    """Claims of steps and the leases that fence their holders."""

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
