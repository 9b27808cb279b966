"""Leases against the test MongoDB: claim order, server clock, bounded renewals, fenced writes, self-fencing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

import pytest
import structlog
from bson import ObjectId
from pymongo.errors import AutoReconnect, PyMongoError

from ghost_buildpackd.model import BUILDIMAGE, DEPLOY, READY, REQUESTED, RUNNING, SUCCEEDED, Actor, step_id
from ghost_buildpackd.policy import LIMITS
from ghost_buildpackd.runner import Bodies, Runner
from ghost_buildpackd.steps import LeaseLost, Outcome, StepContext, StepFailed
from ghost_buildpackd.store import ImageRecord, Store, utcnow
from tests.support.faketime import SteppedClock
from tests.support.ghost import make_app, make_job
from tests.support.mongo import free_port
from tests.support.waiting import wait_until

HOST = "host-a"


def requested_buildimage(store: Store, db) -> str:
    """A build whose AMI is built: the intake records it requested, for any host."""
    job = make_job(db, make_app(db))
    store.create_step(job, BUILDIMAGE, app_id=None, state=REQUESTED)
    return step_id(job, BUILDIMAGE)


def test_a_requested_deploy_step_is_claimed_before_older_builds(db, store):
    older = [requested_buildimage(store, db) for _ in range(3)]
    job = make_job(db, make_app(db, name="api"), command="deploy", status="started", modules=["app"])
    store.request_step(job, "app", HOST, None)

    first = store.claim_step("me", 30, HOST)

    assert first is not None and first.id == step_id(job, DEPLOY, "app"), "Ghost's request waited behind builds"
    assert store.claim_step("me", 30, HOST).id == older[0]


def test_a_script_handed_back_at_shutdown_keeps_the_time_ghost_asked_for_it(db, store):
    job = make_job(db, make_app(db, name="api"), command="deploy", status="started", modules=["app"])
    asked = store.request_step(job, "app", HOST, None)
    requested_at = db.container_steps.find_one({"_id": asked.id})["times"]["requested"]
    held = store.claim_step("me", 30, HOST)
    assert held is not None and held.id == asked.id
    running = store.move(held, Actor.RUNNER, RUNNING)
    assert running is not None

    handed_back = store.move(running, Actor.SHUTDOWN, REQUESTED)

    assert handed_back is not None and handed_back.state == REQUESTED and handed_back.owner is None
    assert db.container_steps.find_one({"_id": asked.id})["times"]["requested"] == requested_at


def test_claims_leases_and_outcomes_are_written_with_majority_write_concern(db, store):
    for collection in (store.steps, store.images, store.apps):
        assert collection.write_concern.document == {"w": "majority"}, collection.name
    sid = requested_buildimage(store, db)  # the server accepts them
    assert store.claim_step("me", 30, HOST).id == sid


def test_each_claim_gets_a_higher_claim_number_even_after_a_replay(db, store):
    sid = requested_buildimage(store, db)
    first = store.claim_step("me", 30, HOST)
    assert store.move(store.move(first, Actor.RUNNER, RUNNING), Actor.RUNNER, SUCCEEDED) is not None
    assert store.reset_step_for_replay(sid)
    second = store.claim_step("me", 30, HOST)
    assert (first.claim, second.claim) == (1, 2)
    assert second.attempts == 1  # the attempt budget starts again; the claim number never does


# What another instance does with the store, in a process of its own whose wall clock the test sets or steps.
ON_A_SKEWED_HOST = """
import json, os, sys, time
from ghost_buildpackd.store import Store

uri, database, action, arg = sys.argv[1:]
store = Store.from_uri(uri, database)
if action == "claim":  # claim with this TTL; the lease's expiry
    step = store.claim_step("skewed", float(arg), "host-a")
    print(json.dumps(step and step.lease_expires_at.isoformat()))
elif action == "renew":  # renew the lease of this step as its holder would; whether it was renewed
    print(json.dumps(store.renew_lease(store.get_step(arg), 30, within=5) is not None))
elif action == "step":  # step this process's wall clock; how far server_now moved, before and after a new reading
    before, started = store.server_now(), time.monotonic()
    offset_file = os.environ["FAKETIME_TIMESTAMP_FILE"]
    with open(offset_file + ".new", "w") as offset:
        offset.write(arg)
    os.replace(offset_file + ".new", offset_file)
    moved = lambda: (store.server_now() - before).total_seconds() - (time.monotonic() - started)
    at_once = moved()
    store.measure_server_clock()  # as the heartbeat thread does every few seconds
    print(json.dumps([at_once, moved()]))
"""


def on_a_skewed_host(mongo, db, tmp_path, offset: float, action: str, arg: str) -> object:
    """Run `action` of ON_A_SKEWED_HOST against the test's database, this host's wall clock off by `offset` s."""
    clock = SteppedClock(tmp_path / "clock", offset)
    done = subprocess.run(
        [sys.executable, "-c", ON_A_SKEWED_HOST, mongo.uri, db.name, action, arg],
        env={**os.environ, **clock.env()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_host_whose_clock_runs_ahead_cannot_steal_a_healthy_lease(mongo, db, store, tmp_path):
    sid = requested_buildimage(store, db)
    healthy = store.claim_step("healthy", 30, HOST)
    assert healthy is not None and healthy.id == sid

    assert on_a_skewed_host(mongo, db, tmp_path, 3600, "claim", "30") is None
    assert on_a_skewed_host(mongo, db, tmp_path, 3600, "renew", sid), "the holder's renewal must still work from there"


def test_a_host_whose_clock_runs_behind_takes_leases_that_expire_on_time(mongo, db, store, tmp_path):
    requested_buildimage(store, db)

    expires_at = datetime.fromisoformat(on_a_skewed_host(mongo, db, tmp_path, -3600, "claim", "10"))

    server_now = store.db.client.admin.command("isMaster")["localTime"].replace(tzinfo=UTC)
    assert abs((expires_at - server_now).total_seconds() - 10) < 5


@pytest.mark.parametrize("step", ["+45", "-45"])
def test_a_step_of_the_hosts_wall_clock_does_not_move_the_server_time_it_reckons_leases_on(mongo, db, tmp_path, step):
    at_once, after_a_reading = on_a_skewed_host(mongo, db, tmp_path, 0, "step", step)
    assert abs(at_once) < 1, f"server_now moved by {at_once:.1f}s when the wall clock stepped by {step}s"
    assert abs(after_a_reading) < 1, f"the next reading moved server_now by {after_a_reading:.1f}s"


class SteppableMonotonic:
    """A monotonic clock the test moves: `per_call` seconds at each reading, or a jump at once."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.per_call = 0.0

    def __call__(self) -> float:
        self.now += self.per_call
        return self.now


def server_time(store: Store) -> datetime:
    return store.db.client.admin.command("isMaster")["localTime"].replace(tzinfo=UTC)


def test_a_slow_reading_of_the_server_clock_does_not_replace_a_quick_one(db):
    monotonic = SteppableMonotonic()
    store = Store(db, monotonic=monotonic)
    store.measure_server_clock()  # a quick reading: the server's time at 1000.0
    held = store.server_now()
    monotonic.per_call = 2.0  # the next reading takes 4 s: its time could be off by 2 s
    with structlog.testing.capture_logs() as logs:
        store.measure_server_clock()
    monotonic.per_call = 0.0
    # Still the quick reading, carried forward by the 2 + 2 + 2 s the clock moved since.
    assert abs((store.server_now() - held).total_seconds() - 6.0) < 0.01
    assert not [entry for entry in logs if entry["event"] == "mongodb_clock_moved"]


def test_a_reading_that_disagrees_with_the_estimate_is_taken_and_logged(db):
    monotonic = SteppableMonotonic()
    store = Store(db, monotonic=monotonic)
    store.measure_server_clock()
    monotonic.now += 30  # the estimate runs 30 s ahead of what the server will say (as if its clock stepped back)
    with structlog.testing.capture_logs() as logs:
        store.measure_server_clock()

    [moved] = [entry for entry in logs if entry["event"] == "mongodb_clock_moved"]
    assert -31 < moved["by_s"] < -29
    assert abs((store.server_now() - server_time(store)).total_seconds()) < 2


def test_an_expired_lease_is_not_renewed_even_when_nobody_took_it(db, store):
    requested_buildimage(store, db)
    step = store.claim_step("me", 30, HOST)
    store.steps.update_one({"_id": step.id}, {"$set": {"lease.expires_at": datetime(2000, 1, 1, tzinfo=UTC)}})
    assert store.renew_lease(step, 30, within=5) is None


def test_a_renewal_gives_up_within_its_bound_when_mongodb_is_unreachable(db, store):
    requested_buildimage(store, db)
    step = store.claim_step("me", 30, HOST)
    unreachable = Store.from_uri(f"mongodb://127.0.0.1:{free_port()}/?directConnection=true", db.name, timeout=30)
    started = time.monotonic()
    with pytest.raises(PyMongoError):
        unreachable.renew_lease(step, 30, within=1)
    # Bounded by `within`, not by 30 s of server selection nor by minutes of retries.
    assert time.monotonic() - started < 10


def image_record(alias: str, fingerprint: str) -> ImageRecord:
    return ImageRecord(
        alias=alias,
        fingerprint=fingerprint,
        job_id=ObjectId(alias),
        app_id=ObjectId(),
        app_identity="shop",
        app_label="shop",
        region="eu-west-1",
        ami_id="ami-1",
        ami_name="ami",
        base_image="base",
        size=1,
        created_at=utcnow(),
    )


def test_an_image_record_is_never_overwritten_by_an_earlier_claim(store):
    alias = str(ObjectId())
    assert store.record_image(image_record(alias, "f" * 64), claim=3)
    assert not store.record_image(image_record(alias, "e" * 64), claim=2)
    assert store.get_image_record(alias).fingerprint == "f" * 64
    assert store.record_image(image_record(alias, "d" * 64), claim=3)  # a retry of the same claim applies
    assert store.record_image(image_record(alias, "c" * 64), claim=4)
    assert store.get_image_record(alias).fingerprint == "c" * 64


def test_the_app_image_is_set_by_compare_and_set(db, store):
    app = make_app(db, container_image="old")
    assert not store.set_app_container_image(app, "mine", expected="something-else")
    assert store.app_container_image(app) == "old"
    assert store.set_app_container_image(app, "mine", expected="old")
    assert store.app_container_image(app) == "mine"
    fresh = make_app(db, name="fresh")
    assert store.set_app_container_image(fresh, "first", expected=None)
    assert store.app_container_image(fresh) == "first"


# --- the runner's self-fencing ------------------------------------------------------------------------


class Blocking:
    """A step body that runs until aborted, noting when (as a command stopped by its abort would)."""

    def __init__(self) -> None:
        self.aborted_at: datetime | None = None
        self.started = threading.Event()

    def __call__(self, ctx: StepContext) -> Outcome:
        self.started.set()
        ctx.abort.wait(120)
        self.aborted_at = ctx.store.server_now()
        raise StepFailed("interrupted")


def runner_with(make_config, store: Store, body: Blocking, ttl: str) -> Runner:
    config = make_config(lease_ttl=ttl, workers=1).with_instance_id()
    ready = lambda ctx: Outcome(READY)  # noqa: E731
    return Runner(config, store, lxd=None, bodies=Bodies(buildimage=body, prepare_deploy=ready, run_deploy=body))


def test_a_holder_that_cannot_renew_stops_acting_before_its_lease_expires(db, store, make_config, monkeypatch):
    sid = requested_buildimage(store, db)
    body = Blocking()
    runner = runner_with(make_config, store, body, ttl="3s")

    def outage(*_args, **_kwargs):
        raise AutoReconnect("MongoDB unreachable (test)")

    monkeypatch.setattr(store, "renew_lease", outage)
    with structlog.testing.capture_logs() as logs:
        runner.start()
        try:
            assert body.started.wait(30), "the step was not claimed"
            expires_at = store.get_step(sid).lease_expires_at
            wait_until(lambda: body.aborted_at, 15, "the holder to give the step up")
        finally:
            runner.stop(grace=5)

    assert body.aborted_at < expires_at, "the holder still acted when a successor could take the step"
    margin = (expires_at - body.aborted_at).total_seconds()
    assert margin > LIMITS.lease_margin(3) / 2, f"stopped only {margin:.2f}s before the expiry"
    assert any(entry["event"] == "lease_expired_locally" for entry in logs)
    step = store.get_step(sid)
    assert step.state == RUNNING and step.attempts == 1, "the lost step's outcome must not be recorded"


def test_confirm_lease_refuses_once_the_local_deadline_passed(db, store, make_config):
    requested_buildimage(store, db)
    step = store.claim_step("me", 30, HOST)
    ctx = StepContext(
        step=step,
        config=make_config(),
        store=store,
        lxd=None,
        log=structlog.get_logger("test"),
        abort=threading.Event(),
        instance_id="me",
        lease_valid_until=time.monotonic() + 60,
    )
    ctx.confirm_lease()  # time left
    ctx.lease_valid_until = time.monotonic() - 0.1
    with pytest.raises(LeaseLost):
        ctx.confirm_lease()
    assert ctx.abort.is_set()
