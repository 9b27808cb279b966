"""Every qualifying job gets exactly one step, run once: across kills, restarts, outages and several instances.

The daemons here are real processes with the production intake, leases and
runner; only the step bodies are trivial (tests/support/trivial_daemon.py):
each records its effect in `test_effects`, one document per step counting how
many times the effect happened and which instance did it.
"""

from __future__ import annotations

import random
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from bson import ObjectId
from pymongo.errors import AutoReconnect

from ghost_buildpackd.model import FAILED, SUCCEEDED, TERMINAL, step_id
from ghost_buildpackd.store import utcnow
from tests.support.daemon import DaemonProcess
from tests.support.ghost import finish_buildimage, make_app, make_job, module_doc, set_status
from tests.support.mongo import skip_unless_restartable
from tests.support.waiting import wait_until

# Each test runs daemon processes (trivial bodies): a daemon connects to LXD at start, as in production.
pytestmark = [pytest.mark.lxd, pytest.mark.mongodb]

# Change streams on the replica set; polling on a standalone server, what Ghost's docker-compose runs.
MODES = [("change_stream", "replica_set"), ("poll", "standalone")]
by_mode = pytest.mark.parametrize(("mode", "mongo"), MODES, indirect=["mongo"], ids=[m for m, _ in MODES])


def daemon(write_config, tmp_path: Path, name: str, mode: str, **overrides) -> DaemonProcess:
    config = write_config(f"{name}.yml", events={"mode": mode}, **overrides)
    return DaemonProcess(config, tmp_path / f"{name}.log", trivial_bodies=True)


def buildimage_jobs(db, app: ObjectId, count: int) -> list[ObjectId]:
    jobs = []
    for _ in range(count):
        job = make_job(db, app)
        finish_buildimage(db, job)
        jobs.append(job)
    return jobs


def answers(db) -> bool:
    try:
        db.command("ping")
    except AutoReconnect:
        return False
    return True


def all_steps_finished(db, jobs: list[ObjectId], kind: str = "buildimage"):
    wanted = {step_id(job, kind) for job in jobs}
    records = {doc["_id"]: doc for doc in db.container_steps.find()}
    done = [sid for sid in wanted if records.get(sid, {}).get("state") in TERMINAL]
    return len(done) == len(wanted) and records


def effects(db) -> dict[str, dict]:
    return {doc["_id"]: doc for doc in db.test_effects.find()}


@by_mode
def test_jobs_finished_while_no_daemon_ran_are_caught_up(db, write_config, tmp_path, mode):
    app = make_app(db)
    before = buildimage_jobs(db, app, 5)
    with daemon(write_config, tmp_path, "d1", mode) as process:
        process.wait_ready()
        records = wait_until(lambda: all_steps_finished(db, before), 30, "caught-up steps to finish")
        after = buildimage_jobs(db, app, 3)
        records = wait_until(lambda: all_steps_finished(db, before + after), 30, "new steps to finish")
        assert process.saw("catch_up_done", source=mode)
        assert process.terminate() == 0
    assert {records[step_id(job, "buildimage")]["state"] for job in before + after} == {SUCCEEDED}
    assert {sid: doc["count"] for sid, doc in effects(db).items()} == {
        step_id(job, "buildimage"): 1 for job in before + after
    }


@by_mode
def test_sigkill_at_random_moments_loses_no_job_and_repeats_no_step(db, write_config, tmp_path, mode):
    """Kill -9 three times while jobs keep arriving; after the last restart every job has one finished step."""
    app = make_app(db)
    jobs: list[ObjectId] = []
    stop = threading.Event()

    def ghost_creates_jobs() -> None:
        # Until the last kill, however long daemons take to start: a catch-up takes a whole backlog in one batch.
        while not stop.is_set():
            jobs.extend(buildimage_jobs(db, app, 1))
            stop.wait(random.uniform(0.05, 0.15))

    producer = threading.Thread(target=ghost_creates_jobs)
    producer.start()
    rng = random.Random(7)
    kills = 0
    try:
        for round_ in range(3):
            process = daemon(write_config, tmp_path, f"r{round_}", mode, lease_ttl="3s").start()
            process.wait_ready()
            seen = db.container_steps.count_documents({})
            wait_until(lambda seen=seen: db.container_steps.count_documents({}) > seen, 30, "steps to be created")
            threading.Event().wait(rng.uniform(0.05, 0.5))  # a random moment to kill at, not a wait for a result
            process.kill()
            kills += 1
    finally:
        stop.set()
        producer.join()
    with daemon(write_config, tmp_path, "final", mode, lease_ttl="3s") as process:
        process.wait_ready()
        records = wait_until(lambda: all_steps_finished(db, jobs), 120, "every step to finish after restarts")
        process.terminate()
    assert db.container_steps.count_documents({}) == len(jobs)
    assert {records[step_id(job, "buildimage")]["state"] for job in jobs} == {SUCCEEDED}
    done = effects(db)
    assert set(done) == {step_id(job, "buildimage") for job in jobs}
    # A kill between a step's effect and its record makes the successor run it again: at most
    # one repeat per step held at each kill (4 workers), never more.
    repeats = sum(doc["count"] - 1 for doc in done.values())
    assert repeats <= kills * 4


@by_mode
def test_two_instances_run_a_burst_of_100_jobs_exactly_once(db, write_config, tmp_path, mode):
    app = make_app(db)
    with (
        daemon(write_config, tmp_path, "a", mode, workers=3) as first,
        daemon(write_config, tmp_path, "b", mode, workers=3) as second,
    ):
        first.wait_ready()
        second.wait_ready()
        jobs = buildimage_jobs(db, app, 100)
        records = wait_until(lambda: all_steps_finished(db, jobs), 90, "100 steps to finish")
        assert first.terminate() == 0
        assert second.terminate() == 0
    assert db.container_steps.count_documents({}) == 100
    assert {records[step_id(job, "buildimage")]["state"] for job in jobs} == {SUCCEEDED}
    done = effects(db)
    assert {doc["count"] for doc in done.values()} == {1}
    assert len(done) == 100
    workers = {doc["instances"][0] for doc in done.values()}
    assert len(workers) == 2, "both instances should have done work"


@by_mode
def test_mongodb_outage_while_jobs_arrive_loses_nothing(mongo, db, write_config, tmp_path, mode):
    skip_unless_restartable(mongo)
    app = make_app(db)
    # A lease longer than the outage (a real server's restart and election take seconds): a holder gives a step
    # up, and it runs again, only when an outage outlasts its lease (docs/reliability.md).
    with daemon(write_config, tmp_path, "d", mode, lease_ttl="90s") as process:
        process.wait_ready()
        before = buildimage_jobs(db, app, 5)
        logged = len(process.events())
        mongo.stop()
        try:
            wait_until(
                lambda: any(
                    process.saw(event, since=logged)
                    for event in (
                        "event_source_mongodb_unavailable",
                        "mongodb_unavailable_retrying",
                        "event_source_error",
                        "claim_failed_mongodb_unavailable",
                        "request_watch_failed",
                    )
                ),
                60,
                "the daemon to notice the outage",
            )
            assert process.alive()
        finally:
            mongo.start()
        # Ghost's worker reconnects too: its first call may meet a pooled connection the restart closed.
        wait_until(lambda: answers(db), 30, "the test's own MongoDB client to reconnect")
        after = buildimage_jobs(db, app, 5)
        records = wait_until(lambda: all_steps_finished(db, before + after), 90, "steps after the outage")
        assert process.terminate() == 0
    assert {records[step_id(job, "buildimage")]["state"] for job in before + after} == {SUCCEEDED}
    assert {doc["count"] for doc in effects(db).values()} == {1}


def test_deploy_steps_run_on_request_and_are_cancelled_when_the_job_ends(db, store, write_config, tmp_path):
    app = make_app(
        db, container_image="x", modules=[module_doc("api", "/srv/api", "make"), module_doc("web", "/srv/web", "x")]
    )
    job = make_job(db, app, command="deploy", modules=["api", "web"])
    with daemon(write_config, tmp_path, "d", "change_stream") as process:
        process.wait_ready()
        set_status(db, job, "started")
        api, web = step_id(job, "deploy", "api"), step_id(job, "deploy", "web")
        wait_until(lambda: {s.state for s in store.steps_for_job(job)} == {"ready"}, 30, "both steps prepared")
        store.request_step(job, "api", host=__import__("socket").gethostname(), app_id=app)
        wait_until(lambda: store.get_step(api).state == SUCCEEDED, 30, "the requested step to run")
        set_status(db, job, "done")
        wait_until(lambda: store.get_step(web).state == "cancelled", 30, "the unrequested step to be cancelled")
        process.terminate()
    assert effects(db)[api]["count"] == 1
    assert web not in effects(db)


def test_bad_documents_are_recorded_and_the_daemon_carries_on(db, store, write_config, tmp_path):
    good_app = make_app(db)
    bad_app = make_app(db, name="bad/name")
    with daemon(write_config, tmp_path, "d", "change_stream") as process:
        process.wait_ready()
        bad_job = make_job(db, bad_app)
        finish_buildimage(db, bad_job)
        orphan_job = make_job(db, ObjectId())
        finish_buildimage(db, orphan_job)
        typed_job = make_job(db, good_app)
        db.jobs.update_one({"_id": typed_job}, {"$set": {"app_id": 12}})
        finish_buildimage(db, typed_job)
        good_job = make_job(db, good_app)
        finish_buildimage(db, good_job)
        wait_until(lambda: all_steps_finished(db, [bad_job, orphan_job, typed_job, good_job]), 30, "all four steps")
        assert process.alive()
        process.terminate()
    states = {job: store.get_step(step_id(job, "buildimage")) for job in (bad_job, orphan_job, typed_job, good_job)}
    assert states[good_job].state == SUCCEEDED
    assert states[bad_job].state == FAILED and "app.name: must be a single path segment" in states[bad_job].message
    assert states[orphan_job].state == FAILED and "no app with _id" in states[orphan_job].message
    assert states[typed_job].state == FAILED and "job.app_id: expected an ObjectId" in states[typed_job].message


def test_an_unusable_resume_token_is_logged_loudly_and_costs_no_job(mongo, db, store, write_config, tmp_path):
    app = make_app(db)
    jobs = buildimage_jobs(db, app, 3)
    store.save_stream_checkpoint({"_data": "8263A1B2C3000000012B022C0100296E5A1004"}, utcnow() - timedelta(minutes=1))
    with daemon(write_config, tmp_path, "d", "change_stream") as process:
        process.wait_ready()
        wait_until(lambda: all_steps_finished(db, jobs), 30, "the jobs found by the catch-up scan")
        assert process.saw("resume_token_unusable_catching_up")
        process.terminate()
    assert {doc["count"] for doc in effects(db).values()} == {1}
