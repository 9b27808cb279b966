"""Poll mode between two reads of the overlap window: a cheap probe brings the next read forward."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import structlog

from ghost_buildpackd.events import Intake, PollSource
from ghost_buildpackd.model import DEPLOY, step_id
from ghost_buildpackd.store import Store, utcnow
from tests.support.ghost import make_app, make_job, module_doc, set_status
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.mongodb, pytest.mark.parametrize("mongo", ["standalone"], indirect=True)]


class CountingIntake(Intake):
    """Counts the reads of the overlap window (each is one `catch_up`)."""

    reads = 0

    def catch_up(self, *args: Any, **kwargs: Any) -> int:
        self.reads += 1
        return super().catch_up(*args, **kwargs)


class CountingStore(Store):
    """Counts the probes."""

    probes = 0

    def job_changed_between(self, *args: Any, **kwargs: Any) -> bool:
        self.probes += 1
        return super().job_changed_between(*args, **kwargs)


@pytest.fixture
def store(db) -> CountingStore:
    store = CountingStore(db)
    store.ensure_indexes()
    return store


@pytest.fixture
def polling(store, make_config) -> Iterator[CountingIntake]:
    """A poll source whose window is read once an hour, probed every 100 ms; runs until the test ends."""
    config = make_config(events={"mode": "poll", "poll_interval": "1h", "probe_interval": "100ms"})
    intake = CountingIntake(store, on_new_steps=lambda: None, on_job_ended=lambda _job: None)
    stop = threading.Event()
    source = PollSource(config, store, intake, stop)
    with structlog.testing.capture_logs() as logs:
        thread = threading.Thread(target=source.run, daemon=True)
        thread.start()
        wait_until(lambda: any(entry["event"] == "catch_up_done" for entry in logs), 30, "the first read")
        yield intake
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert not [entry for entry in logs if entry["log_level"] in ("error", "critical")]


def test_a_started_deploy_is_read_within_the_probe_not_the_poll_interval(db, store, polling):
    app = make_app(db, container_image="previous-build", modules=[module_doc("api", "/srv/api", "make")])
    job = make_job(db, app, command="deploy", modules=["api"])
    set_status(db, job, "started")
    # With a read once an hour, only the probe can have the step made within seconds.
    wait_until(lambda: store.get_step(step_id(job, DEPLOY, "api")), 10, "the deploy's step record")
    assert polling.reads == 2


def test_a_job_dated_past_the_servers_clock_does_not_set_the_probe_off(db, store, polling):
    # Ghost's cancel writes `_updated` in local time: hours ahead on a host east of UTC.
    job = make_job(db, make_app(db), command="deploy")
    db.jobs.update_one({"_id": job}, {"$set": {"status": "cancelled", "_updated": utcnow() + timedelta(hours=3)}})
    reads_before, probes_before = polling.reads, store.probes
    wait_until(lambda: store.probes >= probes_before + 10, 30, "ten probes after the job's write")
    assert polling.reads == reads_before, "a probe counted the job dated in the future"
