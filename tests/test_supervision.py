"""No long-lived loop of the daemon dies silently: bad job times are skipped, and any loop that raises is
logged with its traceback and restarted with backoff, and shows as crash-looping where operators look."""

from __future__ import annotations

import itertools
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog

from ghost_buildpackd.daemon import Daemon
from ghost_buildpackd.lxd import Lxd
from ghost_buildpackd.model import SUCCEEDED, step_id
from ghost_buildpackd.policy import Backoff
from ghost_buildpackd.store import Store
from ghost_buildpackd.supervise import Supervised
from tests.support.daemon import DaemonProcess
from tests.support.ghost import finish_buildimage, make_app, make_job, module_doc
from tests.support.trivial_daemon import TRIVIAL
from tests.support.waiting import wait_until

MODES = [("change_stream", "replica_set"), ("poll", "standalone")]
by_mode = pytest.mark.parametrize(("mode", "mongo"), MODES, indirect=["mongo"], ids=[m for m, _ in MODES])
QUICK = Backoff(first=0.1, longest=0.8)  # the loops' backoff, scaled down


class Crashing:
    """A loop body that raises its first `crashes` runs, then loops until `stop`, marking progress."""

    def __init__(self, crashes: int, stop: threading.Event):
        self.crashes = crashes
        self.stop = stop
        self.starts: list[float] = []
        self.last_tick = time.monotonic()

    def __call__(self) -> None:
        self.starts.append(time.monotonic())
        self.last_tick = time.monotonic()
        if len(self.starts) <= self.crashes:
            raise TypeError(f"crash {len(self.starts)}")
        while not self.stop.wait(0.05):
            self.last_tick = time.monotonic()


def test_a_loop_that_raises_is_logged_with_its_traceback_and_restarted_with_longer_waits() -> None:
    stop = threading.Event()
    body = Crashing(3, stop)
    loop = Supervised("events", body, stop, progress=lambda: body.last_tick, backoff=QUICK)
    with structlog.testing.capture_logs() as logs:
        loop.start()
        wait_until(lambda: len(body.starts) == 4, 10, "the fourth start")
        assert loop.crash_looping(time.monotonic())
        problem = loop.problem(time.monotonic(), stall_after=60)
        assert problem == "events loop crashed 3 time(s) in a row, restarting (last: TypeError: crash 3)"
        assert loop.stall(time.monotonic(), stall_after=60) is None  # not for long enough to starve the watchdog
        wait_until(lambda: not loop.crash_looping(time.monotonic()), 10, "the loop to count as recovered")
        assert loop.problem(time.monotonic(), stall_after=60) is None
        stop.set()
        loop.thread.join(10)
    assert not loop.thread.is_alive() and loop.ended
    crashed = [entry for entry in logs if entry["event"] == "loop_crashed"]
    assert [(e["loop"], e["error"], e["crashes_in_a_row"]) for e in crashed] == [
        ("events", f"TypeError: crash {n}", n) for n in (1, 2, 3)
    ]
    assert all(entry["exc_info"] is True and entry["log_level"] == "error" for entry in crashed)  # the traceback
    waits = [later - earlier for earlier, later in itertools.pairwise(body.starts)]
    assert [entry["retry_in_s"] for entry in crashed] == [0.1, 0.2, 0.4]
    assert waits[0] >= 0.1 and waits[1] >= 0.2 and waits[2] >= 0.4


def test_a_loop_crashing_for_longer_than_the_stall_limit_counts_as_stalled_and_a_returned_one_as_ended() -> None:
    stop = threading.Event()
    body = Crashing(10**6, stop)  # marks progress at each start: only the crashes tell
    loop = Supervised("heartbeat", body, stop, progress=lambda: body.last_tick, backoff=QUICK).start()
    wait_until(lambda: len(body.starts) >= 3, 10, "a few crashes")
    stalled = wait_until(lambda: loop.stall(time.monotonic(), stall_after=1.0), 10, "the crash loop to count as stall")
    assert stalled.startswith("heartbeat loop crash-looping for over 1s (last: TypeError: crash ")
    stop.set()
    loop.thread.join(10)

    running = threading.Event()
    ended = Supervised("upkeep", lambda: None, running).start()  # returns although nothing asked it to stop
    ended.thread.join(10)
    assert ended.stall(time.monotonic(), stall_after=60) == "upkeep loop ended"
    assert ended.problem(time.monotonic(), stall_after=60) == "upkeep loop ended"


class ScanFailing(Store):
    """The first `failures` catch-up scans raise what no MongoDB call raises."""

    failures = 3

    def job_batches(self, since, commands):  # type: ignore[no-untyped-def]
        if self.failures > 0:
            self.failures -= 1
            raise TypeError("'<' not supported between instances of 'list' and 'datetime.datetime'")
        return super().job_batches(since, commands)


@pytest.mark.lxd
@pytest.mark.mongodb
@by_mode
def test_a_crashing_event_loop_is_restarted_shows_in_readiness_and_then_a_job_gets_its_step(
    db, make_config, mode
) -> None:
    config = make_config(events={"mode": mode}).with_instance_id()
    store = ScanFailing(db)
    daemon = Daemon(config, store, Lxd(config.lxd), bodies=TRIVIAL)
    app = make_app(db)
    with structlog.testing.capture_logs() as logs:
        thread = threading.Thread(target=daemon.run, daemon=True)
        thread.start()
        try:
            problems = wait_until(
                lambda: [p for p in daemon.readiness() if p.startswith("events loop crashed")], 30, "readiness to fail"
            )
            assert "(last: TypeError: '<' not supported between instances of 'list' and" in problems[0]
            wait_until(lambda: store.failures == 0, 30, "the event loop to be restarted past its crashes")
            job = make_job(db, app)
            finish_buildimage(db, job)
            wait_until(lambda: step_state(db, job) == SUCCEEDED, 60, "a job's step after the crashes")
            wait_until(lambda: daemon.readiness() == [], 60, "readiness once the loop has recovered")
        finally:
            daemon.request_stop()
            thread.join(120)
    assert not thread.is_alive()
    # A daemon inside another program (this test) never arms the stop bound's exit, which would end that program.
    assert "stop-bound" not in [t.name for t in threading.enumerate()]
    crashed = [entry for entry in logs if entry["event"] == "loop_crashed"]
    assert [(entry["loop"], entry["crashes_in_a_row"]) for entry in crashed] == [("events", n) for n in (1, 2, 3)]


def step_state(db, job) -> str | None:
    doc = db.container_steps.find_one({"_id": step_id(job, "buildimage")})
    return doc["state"] if doc else None


@pytest.mark.lxd
@pytest.mark.mongodb
@pytest.mark.slow
@by_mode
def test_a_job_whose_updated_is_not_a_date_is_skipped_and_intake_goes_on(db, write_config, tmp_path: Path, mode):
    """A job whose `_updated` holds a string beside a date is in the catch-up scan's range, and its time cannot
    be ordered with the other jobs' (a TypeError ended the event thread for good, heartbeats going on)."""
    app = make_app(db)
    now = datetime.now(UTC).replace(microsecond=0)
    bad = make_job(db, app, status="done", message="Build image OK: [ami-1]")
    db.jobs.update_one({"_id": bad}, {"$set": {"_updated": [now, now.isoformat()]}})
    caught_up = make_job(db, app)  # finished while no daemon ran: the catch-up scan must still read it
    finish_buildimage(db, caught_up)
    make_job(db, app, command="deploy", status="done")  # a second command: the scans' times are compared
    config = write_config("d.yml", events={"mode": mode})
    with DaemonProcess(config, tmp_path / "d.log", trivial_bodies=True) as process:
        process.wait_ready()
        good = make_job(db, app)
        finish_buildimage(db, good)
        wait_until(lambda: step_state(db, good) == step_state(db, caught_up) == SUCCEEDED, 60, "the good jobs' steps")
        skipped = wait_until(lambda: process.saw("job_skipped_updated_not_a_date"), 30, "the bad job named in the log")
        assert skipped["job_id"] == str(bad) and skipped["field"] == "_updated"
        assert skipped["reason"] == "expected a date, got a list of datetime, str"
        assert not process.saw("loop_crashed")
        assert process.terminate() == 0
    assert step_state(db, bad) is None


SCAN_JOBS = 50_000  # deploys started: a catch-up scan of several seconds here (0.05 to 0.3 s a batch of 500)
SCAN_STALL_LIMIT = 1.0  # seconds; the daemon's is two minutes or more, for scans of millions of jobs


@pytest.mark.lxd
@pytest.mark.mongodb
@pytest.mark.slow
@by_mode
def test_a_catch_up_scan_longer_than_the_stall_limit_is_progress_and_keeps_the_watchdog_fed(db, make_config, mode):
    """A start after a long outage scans every job changed since: while the scan goes on the event loop must
    not count as stalled, or the watchdog restarts the daemon into the same scan (its checkpoint is saved
    only once the scan is done), again and again."""
    app = make_app(db, container_image="img", modules=[module_doc("api", "/srv/api", "echo hi")])
    now = datetime.now(UTC).replace(microsecond=0)
    job = {"command": "deploy", "app_id": app, "status": "started", "message": "", "user": "tester", "options": []}
    db.jobs.insert_many(
        [
            {**job, "modules": [{"name": "api", "rev": "main"}], "_created": now, "_updated": now}
            for _ in range(SCAN_JOBS)
        ]
    )
    config = make_config(events={"mode": mode}).with_instance_id()
    daemon = Daemon(config, Store(db), Lxd(config.lxd))
    daemon.stall_after = SCAN_STALL_LIMIT
    events = next(loop for loop in daemon.loops if loop.name == "events")
    stalls: list[str] = []

    def scanned() -> bool:
        stall = events.stall(time.monotonic(), daemon.stall_after)  # what the main loop asks before feeding systemd
        if stall:
            stalls.append(stall)
        return any(entry["event"] == "catch_up_done" for entry in logs)

    with structlog.testing.capture_logs() as logs:
        started = time.monotonic()
        events.start()
        try:
            wait_until(scanned, 300, "the catch-up scan to end", interval=0.05)
        finally:
            took = time.monotonic() - started
            daemon.stop.set()
            events.thread.join(60)

    assert took > 2 * SCAN_STALL_LIMIT, f"the scan took only {took:.1f}s: it shows nothing about the stall limit"
    assert stalls == [], f"the event loop counted as stalled during the scan: {stalls[0]}"
    assert db.container_steps.count_documents({}) == SCAN_JOBS
    checkpoint = daemon.store.load_checkpoint()
    assert checkpoint.caught_up_at is not None and checkpoint.caught_up_at > now - timedelta(minutes=5)
