"""A primary change of a three-node replica set under running steps (real mongod, real LXD, the real daemon).

The primary is either asked to step down (`replSetStepDown`: an election within
a second or two) or SIGKILLed (the others elect after their election timeout,
10 s by default). The daemon runs with the production lease (30 s). Afterwards:
no step lost, none run twice with a visible effect, the image record and
`apps.build_infos.container_image` agree with LXD, and the change stream
resumes on the new primary with no gap. Each test prints what the change cost.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from bson import ObjectId
from pymongo.database import Database
from pymongo.errors import PyMongoError

from ghost_buildpackd.model import SUCCEEDED, step_id
from tests.support.ghost import finish_buildimage, make_app, make_job, set_status
from tests.support.mongo import Mongod, ReplicaSetMongo
from tests.support.steps import terminal_step
from tests.support.waiting import wait_until
from tests.test_faults import (
    BUILDPACK,
    BUILDPACK_LABEL,
    Client,
    assert_nothing_left,
    buildimage_app,
    buildimage_job,
    deploy_app,
    event_of,
    features_config,
    freeze,
    images_of_job,
    thaw,
    working_copy,
)

pytestmark = [
    pytest.mark.lxd,
    pytest.mark.slow,
    pytest.mark.parametrize("mongo", ["three_node"], indirect=True),
]

LEASE_TTL = "30s"  # the production default: a primary change must fit in it
HOW = ["step_down", "kill"]


@pytest.fixture
def replica_set(mongo) -> Iterator[ReplicaSetMongo]:
    assert isinstance(mongo, ReplicaSetMongo) and len(mongo.nodes) == 3, mongo.describe()
    mongo.wait_for_primary()
    yield mongo
    mongo.start()  # a member a test killed comes back; the set has a primary again


def change_primary(replica_set: ReplicaSetMongo, how: str) -> Mongod:
    """Step the primary down or SIGKILL it; returns the old primary (the election may still be running)."""
    if how == "step_down":
        return replica_set.step_down()
    old = replica_set.wait_for_primary()
    old.kill()
    return old


def wait_for_new_primary(replica_set: ReplicaSetMongo, old: Mongod, started: float) -> float:
    new = wait_until(
        lambda: (primary := replica_set.primary()) is not None and primary is not old and primary,
        60,
        "a new primary",
        interval=0.1,
    )
    elapsed = time.monotonic() - started
    print(f"new primary {new.host} after {elapsed:.1f}s")
    return elapsed


def runs_of(copy) -> list[str]:
    return (copy / "runs.log").read_text().split()


def write_through_election(action, what: str) -> None:
    """Ghost's own write while the set elects: retried until a primary takes it, as Ghost's worker would fail and
    a user retry."""
    wait_until(lambda: _succeeds(action), 90, what, interval=0.2)


def _succeeds(action) -> bool:
    try:
        action()
    except PyMongoError:
        return False
    return True


def buildpack_waiting(db: Database, store, base_image, ghost_dirs, daemons):
    """A deploy whose buildpack has started and waits for `go` in the working copy, Ghost's client waiting."""
    app = deploy_app(db, base_image, BUILDPACK)
    first = daemons(lease_ttl=LEASE_TTL).start()
    job = make_job(db, app, command="deploy", modules=["api"])
    sid = step_id(job, "deploy", "api")
    copy = working_copy(ghost_dirs["root"])
    set_status(db, job, "started")
    wait_until(lambda: store.get_step(sid) and store.get_step(sid).state == "ready", 60, "the step prepared")
    client = Client(db, job, timeout=240)
    wait_until(lambda: event_of(first, "command_started", job, label=BUILDPACK_LABEL), 60, "the buildpack")
    wait_until(lambda: (copy / "runs.log").exists(), 60, "the buildpack to start")
    return first, sid, copy, client


@pytest.mark.parametrize("how", HOW)
def test_a_primary_change_during_a_buildpack_runs_it_once(
    how, replica_set, db: Database, store, lxd, base_image, ghost_dirs, daemons
):
    first, sid, copy, client = buildpack_waiting(db, store, base_image, ghost_dirs, daemons)

    started = time.monotonic()
    old = change_primary(replica_set, how)
    wait_for_new_primary(replica_set, old, started)
    (copy / "go").touch()
    result = client.outcome(240)
    print(f"{how}: outcome {time.monotonic() - started:.1f}s after the primary change")

    assert result.state == SUCCEEDED, result.message
    assert runs_of(copy) == ["start", "end"], "the buildpack ran more than once"
    step = store.get_step(sid)
    assert step.state == SUCCEEDED and step.exit_code == 0
    assert first.alive() and first.terminate() == 0
    assert_nothing_left(lxd, db, store)


@pytest.mark.parametrize("how", HOW)
def test_a_primary_change_while_the_outcome_is_written(
    how, replica_set, db: Database, store, lxd, base_image, ghost_dirs, daemons
):
    """The buildpack ends as the primary goes: the outcome write meets no primary and must land once one is back."""
    first, sid, copy, client = buildpack_waiting(db, store, base_image, ghost_dirs, daemons)

    started = time.monotonic()
    old = change_primary(replica_set, how)
    (copy / "go").touch()  # no primary yet: the outcome is written during the election
    wait_for_new_primary(replica_set, old, started)
    result = client.outcome(240)
    print(f"{how}: outcome {time.monotonic() - started:.1f}s after the primary change")

    assert result.state == SUCCEEDED, result.message
    assert runs_of(copy) == ["start", "end"]
    assert store.get_step(sid).state == SUCCEEDED
    assert first.alive() and first.terminate() == 0
    assert_nothing_left(lxd, db, store)


@pytest.mark.parametrize("how", HOW)
def test_a_primary_change_between_a_claim_and_its_first_write(
    how, replica_set, db: Database, store, lxd, base_image, ghost_dirs, daemons
):
    app = buildimage_app(db, base_image)
    process = daemons(lease_ttl=LEASE_TTL, container=features_config()).start()
    job = buildimage_job(db, app, ghost_dirs["provisioner_tree"])
    finish_buildimage(db, job)
    wait_until(lambda: event_of(process, "step_claimed", job), 60, "the claim", interval=0.01)
    freeze(process)  # the claim is acknowledged; nothing after it has been written yet
    started = time.monotonic()
    try:
        old = change_primary(replica_set, how)
        wait_for_new_primary(replica_set, old, started)
    finally:
        thaw(process)
    step = wait_until(lambda: terminal_step(store, step_id(job, "buildimage")), 180, "the build's outcome")

    assert step.state == SUCCEEDED, step.message
    assert_one_image_recorded(db, store, lxd, app, job)
    assert process.alive() and process.terminate() == 0
    assert_nothing_left(lxd, db, store)


@pytest.mark.parametrize("how", HOW)
def test_a_primary_change_during_a_publish_leaves_one_recorded_image(
    how, replica_set, db: Database, store, lxd, base_image, ghost_dirs, daemons
):
    app = make_app(
        db,
        source_container_image=base_image,
        pre_buildimage="mkdir -p /opt && head -c 6000000 /dev/urandom > /opt/payload",  # a publish that takes a while
        features=[{"name": "nginx", "version": "1", "provisioner": "salt"}],
    )
    process = daemons(lease_ttl=LEASE_TTL, container=features_config(publish_compression="xz")).start()
    job = buildimage_job(db, app, ghost_dirs["provisioner_tree"])
    finish_buildimage(db, job)
    wait_until(lambda: event_of(process, "image_publishing", job), 120, "the publication starting")
    started = time.monotonic()
    old = change_primary(replica_set, how)
    wait_for_new_primary(replica_set, old, started)
    step = wait_until(lambda: terminal_step(store, step_id(job, "buildimage")), 240, "the build's outcome")
    print(f"{how}: build outcome {time.monotonic() - started:.1f}s after the primary change")

    assert step.state == SUCCEEDED, step.message
    assert_one_image_recorded(db, store, lxd, app, job)
    assert process.alive() and process.terminate() == 0
    assert_nothing_left(lxd, db, store)


@pytest.mark.parametrize("how", HOW)
def test_the_change_stream_resumes_on_the_new_primary_with_no_gap(
    how, replica_set, db: Database, store, lxd, base_image, ghost_dirs, daemons
):
    """A job that finishes during the election still gets its step, found by the resumed stream."""
    app = buildimage_app(db, base_image)
    # The safety rescan is pushed out of the test's reach: only the stream can find the job in time.
    process = daemons(lease_ttl=LEASE_TTL, container=features_config(), events={"rescan_interval": "1h"}).start()
    before = buildimage_job(db, app, ghost_dirs["provisioner_tree"])
    finish_buildimage(db, before)
    wait_until(lambda: terminal_step(store, step_id(before, "buildimage")), 120, "the first build")

    job = buildimage_job(db, app, ghost_dirs["provisioner_tree"])
    set_status(db, job, "started")
    started = time.monotonic()
    old = change_primary(replica_set, how)
    write_through_election(lambda: finish_buildimage(db, job), "Ghost's 'done' write to land on a primary")
    wait_for_new_primary(replica_set, old, started)
    step = wait_until(lambda: terminal_step(store, step_id(job, "buildimage")), 180, "the build of the job")
    print(f"{how}: step of the job finished during the election, {time.monotonic() - started:.1f}s after")

    assert step.state == SUCCEEDED, step.message
    assert process.saw("step_created", job_id=str(job))
    assert process.alive() and process.terminate() == 0
    assert_nothing_left(lxd, db, store)


def test_a_write_the_old_primary_took_alone_is_written_again_on_the_new_primary(
    replica_set, db: Database, store, lxd, base_image, ghost_dirs, daemons
):
    """The secondaries are cut off while a build publishes: its first record write (w: majority) reaches only the
    primary, which is then killed; the others elect a new primary without that write. The daemon, never
    acknowledged, must write it again there: the app never points at an image without its record."""
    # A publish of a second or two: the secondaries are cut off as it starts, and it ends (and the records are
    # written) within the ten seconds the old primary stays primary without a majority.
    app = buildimage_app(db, base_image, pre_hook="mkdir -p /opt && head -c 20000000 /dev/urandom > /opt/payload")
    process = daemons(lease_ttl=LEASE_TTL, container=features_config()).start()
    job = buildimage_job(db, app, ghost_dirs["provisioner_tree"])
    finish_buildimage(db, job)
    wait_until(lambda: event_of(process, "image_publishing", job), 120, "the publication starting")
    old = replica_set.wait_for_primary()
    others = [node for node in replica_set.nodes if node is not old]
    for node in others:
        node.freeze()
    started = time.monotonic()
    try:
        # The first write after the publication reaches the old primary alone (no majority: not acknowledged;
        # the daemon waits for the acknowledgement before its next write).
        cut_off_at = last_write_of(old, db.name)
        wait_until(lambda: last_write_of(old, db.name) != cut_off_at, 240, "a write on the old primary alone")
        old.kill()  # gone: the new primary cannot catch up from it (as it would from a member still reachable)
    finally:
        for node in others:
            node.thaw()
    wait_for_new_primary(replica_set, old, started)
    old.start()  # it rejoins as a secondary of the new primary
    step = wait_until(lambda: terminal_step(store, step_id(job, "buildimage")), 240, "the build's outcome")
    print(f"rollback: build outcome {time.monotonic() - started:.1f}s after the secondaries were cut off")

    assert step.state == SUCCEEDED, step.message
    assert_one_image_recorded(db, store, lxd, app, job)
    assert process.alive() and process.terminate() == 0
    assert_nothing_left(lxd, db, store)


def last_write_of(node: Mongod, database: str) -> object:
    """The newest oplog entry of `database` on `node` (the old primary's own history)."""
    with node.direct_client(serverSelectionTimeoutMS=1000) as direct:
        entry = direct.local["oplog.rs"].find_one(
            {"ns": {"$regex": f"^{database}\\."}}, {"ts": 1}, sort=[("$natural", -1)]
        )
    return entry and entry["ts"]


def assert_one_image_recorded(db: Database, store, lxd, app: ObjectId, job: ObjectId) -> None:
    images = images_of_job(lxd, job)
    assert len(images) == 1, f"expected one image of the job, got {images}"
    record = store.get_image_record(str(job))
    assert record is not None and record.fingerprint == images[0]
    assert db.apps.find_one({"_id": app})["build_infos"]["container_image"] == str(job)


def test_a_replica_set_without_a_primary_for_a_while_loses_no_job(
    replica_set, db: Database, store, lxd, base_image, ghost_dirs, daemons
):
    """Both secondaries cut off: the primary steps down and the set is read-only (no primary) for 40 s, longer
    than the lease. A job that finished just before is built once the set has a primary again, and so is one
    finished after; the daemon says what happened and keeps going."""
    app = buildimage_app(db, base_image)
    process = daemons(lease_ttl=LEASE_TTL, container=features_config()).start()
    old = replica_set.wait_for_primary()
    others = [node for node in replica_set.nodes if node is not old]
    before = buildimage_job(db, app, ghost_dirs["provisioner_tree"])
    finish_buildimage(db, before)
    logged = len(process.events())
    for node in others:
        node.freeze()
    try:
        wait_until(lambda: replica_set.primary() is None, 60, "the old primary to step down", interval=0.2)
        read_only_since = time.monotonic()
        wait_until(
            lambda: time.monotonic() - read_only_since > 40 and process.assert_alive(),
            60,
            "40 s without a primary",
            interval=1,
        )
    finally:
        for node in others:
            node.thaw()
    replica_set.wait_for_primary()
    after = buildimage_job(db, app, ghost_dirs["provisioner_tree"])
    write_through_election(lambda: finish_buildimage(db, after), "Ghost's 'done' write")
    for job in (before, after):
        step = wait_until(lambda job=job: terminal_step(store, step_id(job, "buildimage")), 240, "the builds")
        assert step.state == SUCCEEDED, step.message
    assert any(
        process.saw(event, since=logged)
        for event in ("mongodb_unavailable_retrying", "event_source_mongodb_unavailable", "heartbeat_failed")
    ), "the daemon said nothing of the outage"
    assert process.alive() and process.terminate() == 0
    assert_nothing_left(lxd, db, store)
