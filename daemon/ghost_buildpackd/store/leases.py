"""Claims and leases: which step a runner takes next, the lease it holds it by, renewals, and the
`container.max_prepared` count.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pymongo
from pymongo import ReturnDocument

from ..claims import CLAIM_CANDIDATES, DECIDING_STATE, PREPARED_STATES, HostBinding
from ..model import BUILDIMAGE, DEPLOY, PREPARING, Step
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

        Work is what `claims.CLAIM_CANDIDATES` says, in its order, each bound to
        hosts as it says. The state is left as it was: the caller decides what
        the step needs next. `exclude` holds the ids this process already works
        on (its own leases may lapse in an outage).
        """
        expired = {"lease.expires_at": {"$lt": self.server_now()}}
        for candidate in CLAIM_CANDIDATES:
            if kinds and candidate.kind is not None and candidate.kind not in kinds:
                continue
            query: dict[str, Any] = {"state": candidate.state, **self._bound(candidate.host, host), **expired}
            if candidate.kind is not None:
                query["kind"] = candidate.kind
            elif kinds:
                query["kind"] = {"$in": list(kinds)}
            if exclude:
                query["_id"] = {"$nin": list(exclude)}
            doc = self.steps.find_one_and_update(
                query,
                self._claim_update(owner, ttl),
                sort=[("created_at", pymongo.ASCENDING)],
                return_document=ReturnDocument.AFTER,
            )
            if doc:
                return step_from_doc(doc)
        return None

    @staticmethod
    def _bound(binding: HostBinding, host: str) -> dict[str, Any]:
        """The condition on `requested_host` under which `host` may claim a step bound by `binding`."""
        if binding == HostBinding.REQUESTED_HERE:
            return {"requested_host": host}
        if binding == HostBinding.HERE_OR_UNBOUND:
            return {"requested_host": {"$in": [None, host]}}
        return {}

    def requested_step_waiting(self, host: str) -> bool:
        """Whether a step asked for on `host` waits for a worker (a cheap read on the state index): the claim
        candidates Ghost's worker waits for (a deploy step `requested`, a build its buildimage job asked for)."""
        asked = list(dict.fromkeys(candidate.state for candidate in CLAIM_CANDIDATES if candidate.asked))
        query = {
            "state": {"$in": asked},
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
    def builds_ahead_held(self, step: Step) -> int:
        """Builds other than `step` its lease owner holds while they run ahead of their AMI (`preparing`)."""
        query = {"kind": BUILDIMAGE, "state": PREPARING, "lease.owner": step.owner, "_id": {"$ne": step.id}}
        return self.steps.count_documents(query)

    @retry_transient
    def prepared_deploy_count(self, sid: str) -> int:
        """Deploy steps other than `sid` whose container is launched ahead, or about to be, and not yet asked for.

        The rule is claims.py's (`PREPARED_STATES`, `DECIDING_STATE`): a step
        counts once its container is recorded; of those still deciding, the
        ones with a smaller id count first.
        """
        launched = {"container": {"$type": "string"}}
        query = {
            "kind": DEPLOY,
            "state": {"$in": list(PREPARED_STATES)},
            "$or": [{**launched, "_id": {"$ne": sid}}, {"state": DECIDING_STATE, "_id": {"$lt": sid}}],
        }
        return self.steps.count_documents(query)
