"""What both event sources share: the choice between them, and their loop plumbing."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta
from typing import Any

from pymongo.errors import PyMongoError

from ..config import Config
from ..logs import get_logger
from ..metrics import MetricsRecorder
from ..policy import Pacer
from ..store import TRANSIENT_ERRORS, Store, utcnow
from .intake import Intake

log = get_logger(__name__)


class StartupError(Exception):
    """The daemon cannot start as configured; the message says how to fix it."""


def choose_event_mode(config: Config, store: Store) -> tuple[str, str]:
    """Which source to run, and why (logged at start and shown by `status`)."""
    if config.events.mode == "poll":
        return "poll", "events.mode is poll"
    supported, why = store.change_streams_supported()
    if supported:
        return "change_stream", f"{why} (events.mode {config.events.mode})"
    if config.events.mode == "change_stream":
        raise StartupError(
            f"events.mode is change_stream but {why}. Convert the server to a single-node replica set "
            "(start mongod with --replSet rs0, then run rs.initiate() once) or set events.mode: poll"
        )
    return "poll", f"{why}; polling jobs every {config.events.poll_interval:g}s"


class Source:
    """Common loop plumbing: stop event, progress ticks (for the watchdog), last event time."""

    name = "source"

    def __init__(
        self,
        config: Config,
        store: Store,
        intake: Intake,
        stop: threading.Event,
        metrics: MetricsRecorder | None = None,
    ):
        self.config = config
        self.store = store
        self.intake = intake
        self.stop = stop
        self.metrics = metrics
        self.last_tick = time.monotonic()
        self.last_event_at: datetime | None = None

    def tick(self) -> None:
        self.last_tick = time.monotonic()

    def seen(self, job_time: Any) -> None:
        if isinstance(job_time, datetime):
            self.last_event_at = job_time
        if self.metrics is not None:
            self.metrics.event_received(self.name)

    def catch_up_since(self, caught_up_at: datetime | None) -> datetime:
        if caught_up_at is None:
            return utcnow() - timedelta(seconds=self.config.events.initial_lookback)
        return caught_up_at - timedelta(seconds=self.config.events.overlap)

    def run(self) -> None:
        """Run until `stop` is set, riding out MongoDB outages with the loops' backoff."""
        pacer = Pacer()
        while not self.stop.is_set():
            try:
                self.run_once()
                pacer.succeeded()
            except TRANSIENT_ERRORS as error:
                log.warning(
                    "event_source_mongodb_unavailable", source=self.name, error=str(error), retry_in_s=pacer.delay
                )
            except PyMongoError as error:
                log.error("event_source_error", source=self.name, error=str(error), retry_in_s=pacer.delay)
            self.tick()
            pacer.pause(self.stop)

    def run_once(self) -> None:
        raise NotImplementedError
