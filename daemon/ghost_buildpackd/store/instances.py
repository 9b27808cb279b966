"""Instance records (`buildpackd_instances`): heartbeats, and whether a host has a live daemon."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import pymongo

from .clock import Clock
from .connection import retry_transient

NOT_STOPPED = {"stopped_at": {"$exists": False}}  # an instance record whose process has not ended


class Instances(Clock):
    """Heartbeats of the daemon's instances, on the server's clock."""

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
