"""Intake: which step records a job creates, decided from the job and app as they are when read."""

from __future__ import annotations

from datetime import timedelta

import pytest
from bson import ObjectId
from pymongo import MongoClient, monitoring

from ghost_buildpackd.config import config_from_mapping
from ghost_buildpackd.events import Intake, StartupError, choose_event_mode
from ghost_buildpackd.ghost.documents import parse_app
from ghost_buildpackd.model import CANCELLED, FAILED, PENDING, READY, REQUESTED, RUNNING, SUCCEEDED, step_id
from ghost_buildpackd.store import Store
from tests.support.ghost import finish_buildimage, make_app, make_job, module_doc, set_status
from tests.support.steps import claim_named_step


class Calls:
    def __init__(self) -> None:
        self.woken = 0
        self.ended: list[ObjectId] = []

    def wake(self) -> None:
        self.woken += 1

    def job_ended(self, job_id: ObjectId) -> None:
        self.ended.append(job_id)


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def intake(store, calls) -> Intake:
    return Intake(store, on_new_steps=calls.wake, on_job_ended=calls.job_ended)


def steps(store):
    return {doc["_id"]: doc for doc in store.steps.find()}


def test_finished_buildimage_makes_one_requested_step_however_often_seen(db, store, intake, calls):
    job = make_job(db, make_app(db))
    finish_buildimage(db, job)
    for _ in range(3):
        intake.handle_job_id(job)
    records = steps(store)
    assert list(records) == [step_id(job, "buildimage")]
    record = records[step_id(job, "buildimage")]
    assert (record["state"], record.get("requested_host")) == (REQUESTED, None)  # any host builds it
    assert calls.woken == 1


def test_a_started_buildimage_makes_its_build_to_run_ahead_and_its_ami_asks_for_it(db, store, intake, calls):
    job = make_job(db, make_app(db), status="started")
    intake.handle_job_id(job)
    intake.handle_job_id(job)
    sid = step_id(job, "buildimage")
    assert (list(steps(store)), store.get_step(sid).state, calls.woken) == ([sid], PENDING, 1)
    store.steps.update_one({"_id": sid}, {"$set": {"state": READY}})  # built ahead meanwhile
    finish_buildimage(db, job)  # a Ghost without the patch: nobody asked for the build
    intake.handle_job_id(job)
    assert store.get_step(sid).state == REQUESTED and calls.woken == 2


def test_an_ami_asked_for_by_ghosts_command_is_not_asked_again(db, store, intake, calls):
    job = make_job(db, make_app(db), status="started")
    intake.handle_job_id(job)
    sid = step_id(job, "buildimage")
    store.request_build(job, store.get_step(sid).app_id, "ghost-host")
    store.steps.update_one({"_id": sid}, {"$set": {"state": SUCCEEDED}})
    finish_buildimage(db, job)
    intake.handle_job_id(job)
    assert (store.get_step(sid).state, store.get_step(sid).requested_host, calls.woken) == (
        SUCCEEDED,
        "ghost-host",
        1,
    )


@pytest.mark.parametrize("status", ["failed", "aborted"])
def test_a_buildimage_ending_without_an_ami_cancels_its_build(db, store, intake, calls, status):
    job = make_job(db, make_app(db), status="started")
    intake.handle_job_id(job)
    set_status(db, job, status, "ERROR: ami_id not found. The packer process may have failed.")
    intake.handle_job_id(job)
    step = store.get_step(step_id(job, "buildimage"))
    assert step.state == CANCELLED and f"buildimage job ended ({status})" in step.message, step
    assert calls.ended == [job]  # the sweep removes what was built ahead


def test_buildimage_without_container_image_or_failed_before_makes_nothing(db, store, intake):
    disabled = make_job(db, make_app(db, name="legacy", source_container_image=None))
    finish_buildimage(db, disabled)
    started_disabled = make_job(db, make_app(db, name="legacy2", source_container_image=None), status="started")
    failed = make_job(db, make_app(db, name="other"))
    set_status(db, failed, "failed", "AMI build failed")
    for job in (disabled, started_disabled, failed):
        intake.handle_job_id(job)
    assert steps(store) == {}


def test_deploy_started_makes_a_step_per_module_with_a_buildpack(db, store, intake):
    app = make_app(
        db,
        container_image="previous-build",
        modules=[module_doc("api", "/srv/api", "make"), module_doc("static", "/srv/static", None)],
    )
    job = make_job(db, app, command="deploy", modules=["api", "static"])
    set_status(db, job, "started")
    intake.handle_job_id(job)
    assert list(steps(store)) == [step_id(job, "deploy", "api")]


def test_deploy_of_an_app_switched_off_makes_nothing_even_with_a_left_over_image(db, store, intake):
    # Ghost's "Don't use containers" clears source_container_image; container_image stays.
    app = make_app(db, source_container_image=None, container_image="left-over-build")
    job = make_job(db, app, command="deploy")
    set_status(db, job, "started")
    intake.handle_job_id(job)
    assert steps(store) == {}


def test_deploy_of_an_app_with_containers_but_no_image_yet_makes_no_step(db, store, intake):
    # Ghost 19.08 runs the buildpacks on its host until build_infos.container_image is set; the patch does too.
    job = make_job(db, make_app(db), command="deploy")
    set_status(db, job, "started")
    intake.handle_job_id(job)
    assert steps(store) == {}


@pytest.mark.parametrize("stored", ["", "None", " None ", "missing"])
def test_an_app_without_a_source_image_however_ghost_wrote_it_makes_no_step(db, store, intake, stored):
    # Ghost's UI writes '' ("Don't use containers") or 'None' (its selector hidden); API apps may lack the key.
    app = make_app(db, source_container_image=None if stored == "missing" else stored, container_image="older-build")
    build = make_job(db, app)
    finish_buildimage(db, build)
    deploy = make_job(db, app, command="deploy")
    set_status(db, deploy, "started")
    for job in (build, deploy):
        intake.handle_job_id(job)
    assert steps(store) == {}
    assert parse_app(db.apps.find_one({"_id": app})).source_container_image == ""


def test_containers_disabled_in_ghost_config_make_no_step(db, store, calls):
    intake = Intake(store, on_new_steps=calls.wake, on_job_ended=calls.job_ended, containers_enabled=False)
    app = make_app(db, container_image="older-build")
    build = make_job(db, app)
    finish_buildimage(db, build)
    deploy = make_job(db, app, command="deploy")
    set_status(db, deploy, "started")
    for job in (build, deploy):
        intake.handle_job_id(job)
    assert steps(store) == {} and calls.woken == 0


def test_an_empty_stored_build_pack_makes_a_step_as_ghost_runs_it(db, store, intake):
    # `'build_pack' in module`: a build_pack file committed in the clone runs even when the stored one is empty.
    app = make_app(db, container_image="x", modules=[module_doc("api", "/srv/api", ""), module_doc("doc", "/d", None)])
    job = make_job(db, app, command="deploy", modules=["api", "doc"])
    set_status(db, job, "started")
    intake.handle_job_id(job)
    assert list(steps(store)) == [step_id(job, "deploy", "api")]


def test_redeploy_end_cancels_its_after_all_deploy_step(db, store, intake):
    app = make_app(db, container_image="x")
    job = make_job(db, app, command="redeploy", options=["deploy-id"])
    store.request_step(job, "app", "some-host", app, script="after_all_deploy")
    set_status(db, job, "failed", "Redeploy Failed")
    intake.handle_job_id(job)
    record = steps(store)[step_id(job, "deploy", "app", "after_all_deploy")]
    assert record["_id"] == f"{job}:deploy.after_all_deploy:app" and record["script"] == "after_all_deploy"
    assert record["state"] == CANCELLED


@pytest.mark.parametrize(
    ("status", "message", "made"),
    [
        ("failed", "Autoscaling group update failed: throttled", True),
        ("failed", "Autoscaling group update failed", True),
        ("failed", "ERROR: ami_id not found. The packer process may have failed.", False),
        ("aborted", "Autoscaling group update failed", False),
    ],
)
def test_buildimage_failed_only_at_the_autoscaling_update_still_gets_its_image(
    db, store, intake, status, message, made
):
    job = make_job(db, make_app(db))
    set_status(db, job, status, message)
    intake.handle_job_id(job)
    assert (step_id(job, "buildimage") in steps(store)) is made


def test_deploy_of_an_unknown_module_fails_its_step_with_the_reason(db, store, intake):
    job = make_job(db, make_app(db, container_image="x"), command="deploy", modules=["app", "ghost-module"])
    set_status(db, job, "started")
    intake.handle_job_id(job)
    records = steps(store)
    assert records[step_id(job, "deploy", "app")]["state"] == PENDING
    failed = records[step_id(job, "deploy", "ghost-module")]
    assert failed["state"] == FAILED
    assert failed["message"] == "job.modules: the app has no module named 'ghost-module'"


def test_deploy_end_cancels_free_steps_and_asks_holders_to_stop(db, store, intake, calls):
    app = make_app(db, container_image="x", modules=[module_doc("a", "/srv/a", "x"), module_doc("b", "/srv/b", "x")])
    job = make_job(db, app, command="deploy", modules=["a", "b"])
    set_status(db, job, "started")
    intake.handle_job_id(job)
    held = claim_named_step(store, step_id(job, "deploy", "b"), "someone", 60, (PENDING,))
    assert held is not None
    set_status(db, job, "aborted")
    intake.handle_job_id(job)
    records = steps(store)
    assert records[step_id(job, "deploy", "a")]["state"] == CANCELLED
    assert records[step_id(job, "deploy", "a")]["message"] == "deploy job ended (aborted), before the script ran"
    assert records[step_id(job, "deploy", "b")]["state"] == PENDING
    assert store.get_step(step_id(job, "deploy", "b")).cancel_requested is True
    assert calls.ended == [job]


def test_a_job_killed_at_ghosts_rq_timeout_says_so_and_that_the_script_was_running(db, store, intake):
    app = make_app(db, container_image="x", modules=[module_doc("a", "/srv/a", "x")])
    job = make_job(db, app, command="deploy", modules=["a"])
    set_status(db, job, "started")
    intake.handle_job_id(job)
    sid = step_id(job, "deploy", "a")
    store.steps.update_one({"_id": sid}, {"$set": {"state": RUNNING}})  # its holder died: the lease is free
    set_status(db, job, "failed", "<class 'rq.timeouts.JobTimeoutException'>")  # how Ghost records rq's kill
    intake.handle_job_id(job)
    step = store.get_step(sid)
    assert step.state == CANCELLED
    assert step.message == (
        "deploy job ended (failed) at Ghost's RQ job timeout (rq_worker_job_timeout killed it), "
        "while the script was running (stopped)"
    )


@pytest.mark.parametrize(
    ("app_changes", "job_changes", "message"),
    [
        (None, {"app_id": ObjectId("0" * 24)}, "malformed app: job.app_id: no app with _id 000000000000000000000000"),
        (
            None,
            {"app_id": "not-an-id"},
            "malformed job: job.app_id: expected an ObjectId (24 hex digits), got 'not-an-id'",
        ),
        ({"name": "../etc"}, None, "malformed app: app.name: must be a single path segment"),
        ({"env": 42}, None, "malformed app: app.env: expected a string, got int"),
        ({"env_vars": [{"var_key": "A B", "var_value": "s3cret"}]}, None, "malformed app: app.env_vars[0].var_key"),
        ({"build_infos": "yes"}, None, "malformed app: app.build_infos: expected an object, got str"),
    ],
)
def test_bad_documents_fail_the_step_with_field_and_reason(db, store, intake, app_changes, job_changes, message):
    app = make_app(db)
    if app_changes:
        db.apps.update_one({"_id": app}, {"$set": app_changes})
    job = make_job(db, app)
    finish_buildimage(db, job)
    if job_changes:
        db.jobs.update_one({"_id": job}, {"$set": job_changes})
    intake.handle_job_id(job)
    record = steps(store)[step_id(job, "buildimage")]
    assert record["state"] == FAILED
    assert record["message"].startswith(message)
    assert "s3cret" not in record["message"]


def test_other_commands_are_ignored(db, store, intake):
    job = make_job(db, make_app(db), command="executescript")
    set_status(db, job, "done")
    intake.handle_job_id(job)
    intake.handle_job_id(ObjectId())  # a job deleted meanwhile
    assert steps(store) == {}


def test_catch_up_reads_jobs_changed_since_a_time(db, store, intake):
    jobs = [make_job(db, make_app(db, name=f"app{i}")) for i in range(3)]
    for job in jobs:
        finish_buildimage(db, job)
    # From a second before the first of them changed.
    since = db.jobs.find_one({"_id": jobs[0]})["_updated"] - timedelta(seconds=1)
    assert intake.catch_up(since) == 3
    assert set(steps(store)) == {step_id(job, "buildimage") for job in jobs}


def test_catch_up_in_batches_decides_like_one_job_at_a_time(db, store, intake, calls, monkeypatch):
    monkeypatch.setattr("ghost_buildpackd.store.jobs.CATCH_UP_BATCH", 2)  # 7 jobs: four batches
    app = make_app(db, container_image="x", modules=[module_doc("api", "/srv/api", "make")])
    legacy = make_app(db, name="legacy", source_container_image=None)
    built = [make_job(db, app) for _ in range(2)]
    for job in built:
        finish_buildimage(db, job)
    skipped = make_job(db, legacy)
    finish_buildimage(db, skipped)
    started = make_job(db, app, command="deploy", modules=["api", "nope"])
    set_status(db, started, "started")
    ended = make_job(db, app, command="deploy", modules=["api"])
    set_status(db, ended, "started")
    intake.handle_job_id(ended)  # its step exists from the job's start, then the job ends unnoticed
    set_status(db, ended, "aborted")
    dangling = make_job(db, app)
    db.jobs.update_one({"_id": dangling}, {"$set": {"app_id": ObjectId("0" * 24)}})
    finish_buildimage(db, dangling)
    failed = make_job(db, app)
    set_status(db, failed, "failed")
    since = db.jobs.find_one({"_id": built[0]})["_updated"] - timedelta(seconds=1)
    woken = calls.woken

    assert intake.catch_up(since) == 7
    records = steps(store)
    assert set(records) == {
        *(step_id(job, "buildimage") for job in built),
        step_id(started, "deploy", "api"),
        step_id(started, "deploy", "nope"),
        step_id(ended, "deploy", "api"),
        step_id(dangling, "buildimage"),
    }
    assert records[step_id(started, "deploy", "nope")]["state"] == FAILED
    assert records[step_id(dangling, "buildimage")]["message"].startswith("malformed app: job.app_id: no app")
    assert records[step_id(ended, "deploy", "api")]["state"] == CANCELLED
    assert calls.ended == [ended]
    assert calls.woken > woken

    # Seen again (an overlap, a restart): nothing new, nobody woken.
    woken = calls.woken
    assert intake.catch_up(since) == 7
    assert steps(store) == records
    assert calls.woken == woken


def test_a_record_another_instance_made_during_a_batch_is_left_as_it_was(db, store):
    job = make_job(db, make_app(db))
    finish_buildimage(db, job)
    batch = store.read_job_batch([db.jobs.find_one({"_id": job})])
    assert batch.get_step(step_id(job, "buildimage")) is None
    assert store.create_step(job, "buildimage", state=FAILED, message="the other instance's")
    assert batch.create_step(job, "buildimage") is True
    assert batch.create_step(job, "buildimage") is False  # queued once
    assert batch.flush() == (set(), {step_id(job, "buildimage")})
    assert store.get_step(step_id(job, "buildimage")).message == "the other instance's"


def test_a_batch_costs_the_same_round_trips_whatever_its_size(mongo, db):
    """Two reads to decide a batch and one write to record it, however many jobs it holds."""
    commands: list[str] = []

    class Counter(monitoring.CommandListener):
        def started(self, event):
            commands.append(event.command_name)

        def succeeded(self, event):
            pass

        def failed(self, event):
            pass

    app = make_app(db)
    jobs = [make_job(db, app) for _ in range(20)]
    for job in jobs:
        finish_buildimage(db, job)
    client = MongoClient(mongo.uri, event_listeners=[Counter()], tz_aware=True)
    try:
        counted = Store(client[db.name])
        docs = list(counted.jobs.find({"_id": {"$in": jobs}}))
        commands.clear()
        batch = counted.read_job_batch(docs)
        for job in jobs:
            assert batch.create_step(job, "buildimage", app_id=app)
        created, raced = batch.flush()
        sent = list(commands)
    finally:
        client.close()
    assert len(created) == 20 and not raced
    assert sent == ["find", "find", "update"]  # the jobs' steps, their apps, one bulk upsert


class StandaloneStore:
    """What a standalone server answers; only the method choose_event_mode calls."""

    def change_streams_supported(self):
        return False, "the server is a standalone (change streams need a replica set)"


def test_event_mode_choice():
    auto = config_from_mapping({}, env={})
    assert choose_event_mode(auto, StandaloneStore())[0] == "poll"
    poll = config_from_mapping({"events": {"mode": "poll"}}, env={})
    assert choose_event_mode(poll, StandaloneStore()) == ("poll", "events.mode is poll")
    strict = config_from_mapping({"events": {"mode": "change_stream"}}, env={})
    with pytest.raises(StartupError, match=r"single-node replica set .* or set events.mode: poll"):
        choose_event_mode(strict, StandaloneStore())


def test_auto_picks_change_streams_when_the_server_offers_them(store):
    mode, reason = choose_event_mode(config_from_mapping({}, env={}), store)
    assert mode == "change_stream"
    assert "change streams" in reason
