"""The poll source (standalone servers, like Ghost's own docker-compose): jobs read by `_updated` behind a
persisted high-water mark, with a probe that brings the next read forward when a job changed."""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from ..logs import get_logger
from ..store import utcnow
from .intake import COMMANDS
from .source import Source

log = get_logger(__name__)


def clamp_to_clock(updated: Any, now: datetime) -> datetime | None:
    """A job's `_updated` as a high-water candidate, never later than `now` (MongoDB's clock when the
    query started, as the store estimates it). Ghost's cancel (`run.py`) writes `_updated` in local
    time: on a host ahead of UTC that is hours in the future, and a mark there would skip every job
    changed until then."""
    if not isinstance(updated, datetime):
        return None
    if updated.tzinfo is None:
        now = now.replace(tzinfo=None)
    return min(updated, now)


class PollSource(Source):
    name = "poll"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._future_jobs: set[Any] = set()  # jobs already warned about (job_updated_in_the_future)

    def _warn_future(self, doc: Mapping[str, Any]) -> None:
        """Once per job: its `_updated` is ahead of MongoDB's clock (re-read each poll until it is not)."""
        if doc.get("_id") in self._future_jobs:
            return
        self._future_jobs.add(doc.get("_id"))
        log.warning(
            "job_updated_in_the_future",
            job_id=str(doc.get("_id")),
            updated=str(doc.get("_updated")),
            consequence="the high-water mark stays at MongoDB's clock (Ghost's cancel writes local time)",
        )

    def run_once(self) -> None:
        checkpoint = self.store.load_checkpoint()
        high_water = checkpoint.poll_high_water
        first = True
        while not self.stop.is_set():
            self.tick()
            started = utcnow()
            since = (
                self.catch_up_since(checkpoint.caught_up_at)
                if first and high_water is None
                else (high_water or started) - timedelta(seconds=self.config.events.overlap)
            )
            clock = self.store.server_now()  # no mark past the server's clock (see clamp_to_clock)

            def handled(doc: Mapping[str, Any], clock: datetime = clock) -> None:
                nonlocal high_water
                updated = clamp_to_clock(doc.get("_updated"), clock)
                if updated is not None and updated != doc.get("_updated"):
                    self._warn_future(doc)
                if updated is not None and (high_water is None or updated > high_water):
                    high_water = updated
                    self.seen(updated)

            read = self.intake.catch_up(since, handled, progress=self.tick)
            if first:
                log.info("catch_up_done", source=self.name, since=since.isoformat(), jobs_read=read)
                first = False
            self.store.save_poll_checkpoint(high_water or started, started)
            self._wait_for_a_change(high_water or started)

    def _wait_for_a_change(self, mark: datetime) -> None:
        """Until the next read of the overlap window, or sooner when a probe sees a job changed past the mark.

        The probe only brings a read forward (a deploy's `started` then prepares its containers
        within about `probe_interval`); the window's reads still catch late and same-time writes.
        Jobs dated past MongoDB's clock are left to those reads, or they would trigger every probe.
        """
        deadline = time.monotonic() + self.config.events.poll_interval
        while not self.stop.wait(min(self.config.events.probe_interval, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                return
            if self.store.job_changed_between(mark, self.store.server_now(), COMMANDS):  # BSON dates: UTC either way
                return
