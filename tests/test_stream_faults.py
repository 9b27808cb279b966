"""The change stream on jobs: events cut to what intake needs, and a scan instead when the stream fails."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import structlog
from bson import ObjectId
from pymongo import monitoring
from pymongo.errors import OperationFailure

from ghost_buildpackd.events import ChangeStreamSource, Intake
from ghost_buildpackd.model import BUILDIMAGE, step_id
from ghost_buildpackd.store import JOB_EVENT_FIELDS, Store, next_change, utcnow
from tests.support.ghost import finish_buildimage, make_app, make_job
from tests.support.waiting import wait_until

pytestmark = pytest.mark.mongodb

BSON_OBJECT_TOO_LARGE = 10334


class PoisonedStream:
    """A change stream that fails on the event of one job, as a server does on an event over 16 MB."""

    def __init__(self, stream: Any, poison: ObjectId):
        self.stream = stream
        self.poison = poison

    def try_next(self) -> Any:
        change = self.stream.try_next()
        if change is not None and (change.get("documentKey") or {}).get("_id") == self.poison:
            raise OperationFailure("BSONObjectTooLarge: event exceeds the maximum size", BSON_OBJECT_TOO_LARGE)
        return change

    @property
    def resume_token(self) -> Any:
        return self.stream.resume_token

    def close(self) -> None:
        self.stream.close()

    def __enter__(self) -> PoisonedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PoisonedStore(Store):
    """Every stream it opens fails on the poisoned job's event, however often it is resumed."""

    poison: ObjectId | None = None

    def watch_jobs(self, resume_token: Any, max_await: float) -> Any:
        return PoisonedStream(super().watch_jobs(resume_token, max_await), self.poison)


@pytest.fixture
def streaming(db, make_config) -> Iterator[tuple[PoisonedStore, threading.Event, ChangeStreamSource]]:
    store = PoisonedStore(db)
    store.ensure_indexes()
    stop = threading.Event()
    intake = Intake(store, on_new_steps=lambda: None, on_job_ended=lambda _job: None)
    source = ChangeStreamSource(make_config(events={"rescan_interval": "1h"}), store, intake, stop)
    yield store, stop, source
    stop.set()


def test_an_event_the_stream_cannot_deliver_is_read_by_a_scan_and_the_stream_goes_on(db, streaming):
    store, stop, source = streaming
    app = make_app(db)
    poisoned, later = make_job(db, app), make_job(db, app)
    store.poison = poisoned
    with structlog.testing.capture_logs() as logs:
        thread = threading.Thread(target=source.run, daemon=True)
        thread.start()
        wait_until(lambda: any(e["event"] == "catch_up_done" for e in logs), 30, "the stream to open")
        finish_buildimage(db, poisoned)
        wait_until(lambda: store.get_step(step_id(poisoned, BUILDIMAGE)), 30, "the poisoned job's step, by a scan")
        finish_buildimage(db, later)
        wait_until(lambda: store.get_step(step_id(later, BUILDIMAGE)), 30, "a later job's step")
        stop.set()
        thread.join(10)

    events = [entry["event"] for entry in logs]
    assert events.count("change_stream_failed_catching_up") == 1, "the stream met the poisoned event again"
    assert "event_source_error" not in events
    assert store.load_checkpoint().resume_token is not None, "the reopened stream saved no token"


def test_job_events_carry_only_what_intake_reads(db, store):
    with store.watch_jobs(None, max_await=0.5) as stream:
        pipeline = stream._pipeline
        job = make_job(db, make_app(db))
        change = wait_until(lambda: next_change(stream), 10, "the insert event")
    assert pipeline[-1] == {"$project": {field: 1 for field in JOB_EVENT_FIELDS}}
    assert {"documentKey", "operationType"} <= set(JOB_EVENT_FIELDS)
    assert change["documentKey"]["_id"] == job


def test_a_job_near_16_mb_does_not_break_the_stream(db, store):
    job = make_job(db, make_app(db))
    with store.watch_jobs(None, max_await=0.5) as stream:
        db.jobs.update_one({"_id": job}, {"$set": {"log": "x" * (16 * 1024 * 1024 - 4096)}})
        change = wait_until(lambda: next_change(stream), 30, "the update event")
    assert change["documentKey"]["_id"] == job
    assert "fullDocument" not in change and "updateDescription" not in change


class FindRecorder(monitoring.CommandListener):
    """The `find` commands a client sends, as the server receives them."""

    def __init__(self) -> None:
        self.finds: list[dict[str, Any]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "find":
            self.finds.append(dict(event.command))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def test_the_catch_up_scan_reads_ghosts_jobs_through_the_daemons_index(mongo, db, store):
    """On the real server's query planner: each query of the catch-up scan is an index scan on (command,
    _updated), also when the index was dropped while no daemon ran (the next start makes it again)."""
    db.jobs.insert_many([{"command": "deploy", "_updated": utcnow(), "status": "done"} for _ in range(50)])
    db.jobs.drop_index("buildpackd_command_updated")
    recorder = FindRecorder()
    with mongo.client(event_listeners=[recorder]) as client:
        watched = Store(client[db.name])
        watched.ensure_indexes()  # what every daemon start does
        list(watched.jobs_changed_since(utcnow() - timedelta(hours=1), ("buildimage", "deploy")))
    assert len(recorder.finds) == 2
    for find in recorder.finds:
        explained = db.command("explain", {"find": "jobs", "filter": find["filter"], "sort": find.get("sort", {})})
        plan = str(explained["queryPlanner"]["winningPlan"])
        assert "IXSCAN" in plan and "buildpackd_command_updated" in plan and "COLLSCAN" not in plan, plan
