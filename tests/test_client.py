"""Ghost's client of the deploy handshake (MongoDB only; a thread plays the daemon through Store)."""

from __future__ import annotations

import threading
import time
from datetime import datetime

import pytest
from bson import ObjectId
from pymongo.database import Database

from ghost_buildpackd.ghost.client import ABANDONED, NO_DAEMON, run_buildpack
from ghost_buildpackd.model import CANCELLED, DEPLOY, FAILED, REQUESTED, RUNNING, SUCCEEDED, Actor, step_id
from ghost_buildpackd.store import Store
from tests.support.ghost import make_app, make_job
from tests.support.steps import claim_named_step
from tests.support.waiting import wait_until

HOST = "ghost-host-1"


@pytest.fixture
def job_id(db: Database) -> ObjectId:
    return make_job(db, make_app(db), command="deploy", status="started", modules=["app"])


class FakeDaemon:
    """Takes the requested step bound to HOST and finishes it as the runner would (leases, fenced writes)."""

    def __init__(
        self, store: Store, job_id: ObjectId, final: str, exit_code: int | None, tail: str, after: float = 0.0
    ):
        self.store = store
        self.after = after  # seconds before it starts (a restart's gap), then it heartbeats as an instance on HOST
        self.sid = step_id(job_id, DEPLOY, "app")
        self.final, self.exit_code, self.tail = final, exit_code, tail
        self.finished_at = 0.0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            if self.after:
                threading.Event().wait(self.after)  # the gap under test: no instance on HOST meanwhile
                self.store.heartbeat("next-instance", {"host": HOST})
            step = wait_until(
                lambda: claim_named_step(self.store, self.sid, "fake-daemon", 30, (REQUESTED,)), 20, "the request"
            )
            assert step.requested_host == HOST
            step = self.store.move(step, Actor.RUNNER, RUNNING)
            assert step is not None
            self.store.move(
                step,
                Actor.RUNNER,
                self.final,
                message=f"buildpack {self.final}",
                exit_code=self.exit_code,
                output_tail=self.tail,
            )
            self.finished_at = time.monotonic()
        except BaseException as error:  # surfaced by the test
            self.error = error

    def __enter__(self) -> FakeDaemon:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(30)
        assert self.error is None, self.error


def test_follows_the_step_record_by_change_stream(db: Database, store: Store, job_id: ObjectId) -> None:
    # poll_interval is long: only the change stream can bring the outcome back quickly.
    with FakeDaemon(store, job_id, SUCCEEDED, 0, "installed 3 packages") as daemon:
        result = run_buildpack(db, job_id, "app", timeout=60, host=HOST, poll_interval=30, wait_mode="change_stream")
        returned_at = time.monotonic()

    assert result.state == SUCCEEDED and result.ok
    assert result.exit_code == 0 and result.output_tail == "installed 3 packages"
    assert returned_at - daemon.finished_at < 10
    record = store.get_step(step_id(job_id, DEPLOY, "app"))
    assert record.requested_host == HOST and record.state == SUCCEEDED


def test_follows_the_step_record_by_polling(db: Database, store: Store, job_id: ObjectId) -> None:
    with FakeDaemon(store, job_id, FAILED, 3, "exit 3 here"):
        result = run_buildpack(db, str(job_id), "app", timeout=60, host=HOST, poll_interval=0.1, wait_mode="poll")

    assert result.state == FAILED and not result.ok
    assert result.exit_code == 3 and result.message == "buildpack failed" and result.output_tail == "exit 3 here"


def test_auto_mode_gets_the_outcome(db: Database, store: Store, job_id: ObjectId) -> None:
    with FakeDaemon(store, job_id, SUCCEEDED, 0, ""):
        result = run_buildpack(db, job_id, "app", timeout=60, host=HOST, poll_interval=0.2)

    assert result.state == SUCCEEDED


def test_timeout_abandons_the_request_and_cancels_the_record(db: Database, store: Store, job_id: ObjectId) -> None:
    started = time.monotonic()
    result = run_buildpack(db, job_id, "app", timeout=1.0, host=HOST, poll_interval=0.1, wait_mode="poll")
    elapsed = time.monotonic() - started

    assert result.state == ABANDONED and not result.ok
    assert "1s" in result.message
    assert 1.0 <= elapsed < 5
    record = store.get_step(step_id(job_id, DEPLOY, "app"))
    assert record.state == CANCELLED and record.message == result.message


def test_timeout_while_a_worker_holds_the_step_asks_it_to_stop(db: Database, store: Store, job_id: ObjectId) -> None:
    store.request_step(job_id, "app", HOST, None)
    held = store.claim_step("busy-daemon", 60, HOST, kinds=(DEPLOY,))
    assert held is not None and held.state == REQUESTED
    store.move(held, Actor.RUNNER, RUNNING)

    result = run_buildpack(db, job_id, "app", timeout=0.5, host=HOST, poll_interval=0.1, wait_mode="change_stream")

    assert result.state == ABANDONED
    record = store.get_step(held.id)
    assert record.state == RUNNING and record.cancel_requested  # its owner stops and records the end


def test_a_finished_step_returns_at_once(db: Database, store: Store, job_id: ObjectId) -> None:
    store.create_step(job_id, DEPLOY, "app", state=FAILED, message="app.build_infos.container_image: missing")
    started = time.monotonic()

    result = run_buildpack(db, job_id, "app", timeout=30, host=HOST, poll_interval=10)

    assert time.monotonic() - started < 2
    assert result.state == FAILED and result.message == "app.build_infos.container_image: missing"


@pytest.mark.parametrize("bad", ["not-an-id", "1234", 42, None])
def test_a_job_id_that_is_not_an_object_id_is_refused(db: Database, store: Store, bad: object) -> None:
    with pytest.raises(ValueError, match=r"job_id: .*expected an ObjectId"):
        run_buildpack(db, bad, "app", timeout=1)  # type: ignore[arg-type]
    assert store.steps.count_documents({}) == 0  # nothing was asked


def test_other_bad_arguments_are_refused(db: Database, store: Store, job_id: ObjectId) -> None:
    with pytest.raises(ValueError, match="module_name"):
        run_buildpack(db, job_id, "", timeout=1)
    with pytest.raises(ValueError, match="wait_mode"):
        run_buildpack(db, job_id, "app", timeout=1, wait_mode="sometimes")
    assert store.steps.count_documents({}) == 0


def stopped_instance(store: Store, name: str = "stopped-instance") -> None:
    """An instance on HOST that heartbeat until its stop and then marked its record stopped."""
    store.heartbeat(name, {"host": HOST})
    store.mark_instance_stopped(name, within=5)


def test_a_restart_is_ridden_out_and_the_next_instance_gives_the_outcome(
    db: Database, store: Store, job_id: ObjectId
) -> None:
    """The daemon on HOST stopped (a restart): no live heartbeat for longer than the client's liveness look, then
    the next instance takes the request; the client, given the restart grace, gets its outcome."""
    stopped_instance(store)
    with FakeDaemon(store, job_id, SUCCEEDED, 0, "after the restart", after=12) as daemon:
        result = run_buildpack(
            db, job_id, "app", timeout=60, host=HOST, poll_interval=0.2, daemon_max_age=30, restart_grace=40
        )

    assert result.state == SUCCEEDED, result.message
    assert result.output_tail == "after the restart" and daemon.finished_at > 0


def test_no_instance_started_within_the_restart_grace_ends_the_wait(
    db: Database, store: Store, job_id: ObjectId
) -> None:
    """A stop with no start after it: the stopped record's fresh heartbeat does not count, the grace ends."""
    stopped_instance(store)
    started = time.monotonic()
    result = run_buildpack(
        db, job_id, "app", timeout=60, host=HOST, poll_interval=0.2, daemon_max_age=30, restart_grace=2
    )

    assert result.state == NO_DAEMON and "while waiting" in result.message
    assert "none restarted within 2s of a stop" in result.message
    assert time.monotonic() - started < 15  # a look every 5 s once the grace (2 s) is over
    assert store.get_step(step_id(job_id, DEPLOY, "app")).state == CANCELLED  # a daemon started later skips it


def test_a_stop_past_the_restart_grace_answers_at_once(db: Database, store: Store, job_id: ObjectId) -> None:
    stopped_instance(store)
    db["buildpackd_instances"].update_one({"_id": "stopped-instance"}, {"$set": {"stopped_at": datetime(2020, 1, 1)}})

    result = run_buildpack(db, job_id, "app", timeout=60, host=HOST, daemon_max_age=30, restart_grace=60)

    assert result.state == NO_DAEMON and "while waiting" not in result.message
    assert store.get_step(step_id(job_id, DEPLOY, "app")) is None  # nothing was asked
