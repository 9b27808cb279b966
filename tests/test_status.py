"""`ghost-buildpackd status` against the harness MongoDB, with records written as the daemon writes them."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable
from datetime import timedelta

import pytest

from ghost_buildpackd.config import Config
from ghost_buildpackd.model import BUILDIMAGE, DEPLOY, FAILED, RUNNING, SUCCEEDED, step_id
from ghost_buildpackd.status import Thresholds, check_status, show_status
from ghost_buildpackd.store import ImageRecord, Store, redacted_uri, utcnow
from tests.support.ghost import make_app, make_job
from tests.support.mongo import free_port
from tests.support.steps import seed_step

pytestmark = pytest.mark.mongodb


def seed(store: Store) -> dict[str, str]:
    """One live and one long-dead instance, a step in flight, two finished steps, one image."""
    app_id = make_app(store.db, name="shop")
    build_job, deploy_job = make_job(store.db, app_id), make_job(store.db, app_id, command="deploy")
    newest = store.newest_job_update()
    assert newest is not None
    now = utcnow()
    store.heartbeat(
        "ghost-1:4242:abcd",
        {
            "host": "ghost-1",
            "pid": 4242,
            "version": "0.1.0",
            "event_mode": "poll",
            "mode_reason": "the server is a standalone",
            "last_event_at": newest - timedelta(seconds=12),
            "started_at": now - timedelta(hours=1),
            "steps_in_flight": 1,
        },
    )
    store.instances.insert_one({"_id": "gone:1:dead", "info": {"host": "gone"}, "seen_at": now - timedelta(hours=2)})

    running = step_id(deploy_job, DEPLOY, "api")
    seed_step(store, deploy_job, DEPLOY, "api", app_id=app_id, state=RUNNING)
    lease = {"owner": "ghost-1:4242:abcd", "token": uuid.uuid4().hex, "expires_at": now + timedelta(seconds=30)}
    store.steps.update_one(
        {"_id": running},
        {"$set": {"lease": lease, "container": "gbp-x-d-api", "times": {"started": now - timedelta(seconds=95)}}},
    )
    for job, kind, module, state, seconds in (
        (build_job, BUILDIMAGE, None, SUCCEEDED, 130),
        (deploy_job, DEPLOY, "worker", FAILED, 7),
    ):
        seed_step(store, job, kind, module, app_id=app_id, state=state, message=f"{state} here")
        store.steps.update_one(
            {"_id": step_id(job, kind, module)},
            {
                "$set": {
                    "exit_code": 0 if state == SUCCEEDED else 3,
                    "times": {"started": now - timedelta(seconds=seconds), "finished": now},
                }
            },
        )
    store.record_image(
        ImageRecord(
            alias=str(build_job),
            fingerprint="f" * 64,
            job_id=build_job,
            app_id=app_id,
            app_identity=str(app_id),
            app_label="shop/prod/web",
            region="eu-west-1",
            ami_id="ami-0123abcd",
            ami_name="ami.prod.eu-west-1.web.shop.1",
            base_image="ghost-buildpackd/busybox",
            size=3 * 2**20,
            created_at=now,
        )
    )
    return {
        "running": running,
        "built": step_id(build_job, BUILDIMAGE),
        "failed": step_id(deploy_job, DEPLOY, "worker"),
    }


def test_json_report(store: Store, make_config: Callable[..., Config]) -> None:
    ids = seed(store)
    out = io.StringIO()
    assert show_status(make_config(), out, as_json=True, last=10) == 0
    report = json.loads(out.getvalue())

    [instance] = report["instances"]  # the one with an old heartbeat is not alive
    assert instance["id"] == "ghost-1:4242:abcd"
    assert instance["event_mode"] == "poll" and instance["steps_in_flight"] == 1
    assert report["events"]["modes"] == ["poll"]
    assert report["events"]["lag_s"] == pytest.approx(12, abs=1)

    [flight] = report["steps_in_flight"]
    assert (flight["id"], flight["state"], flight["lease"], flight["container"]) == (
        ids["running"],
        RUNNING,
        "held",
        "gbp-x-d-api",
    )
    assert flight["age_s"] == pytest.approx(95, abs=5)

    finished = {step["id"]: step for step in report["finished_steps"]}
    assert set(finished) == {ids["built"], ids["failed"]}
    assert finished[ids["built"]]["outcome"] == SUCCEEDED
    assert finished[ids["built"]]["duration_s"] == pytest.approx(130, abs=2)
    assert (finished[ids["failed"]]["outcome"], finished[ids["failed"]]["exit_code"]) == (FAILED, 3)

    [image] = report["images"]["shop/prod/web"]
    assert image["ami_id"] == "ami-0123abcd" and image["size"] == 3 * 2**20


def test_text_report_and_last(store: Store, make_config: Callable[..., Config]) -> None:
    ids = seed(store)
    out = io.StringIO()
    assert show_status(make_config(), out, as_json=False, last=1) == 0
    text = out.getvalue()
    assert "ghost-1:4242:abcd" in text and "gone:1:dead" not in text
    assert "poll (the server is a standalone)" in text
    assert "lag 12s" in text or "lag 11" in text or "lag 13" in text
    assert ids["running"] in text and "1m35s" in text
    assert "Last 1 finished steps" in text
    assert sum(ids[key] in text for key in ("built", "failed")) == 1
    assert "shop/prod/web" in text and "3.0MiB" in text


def test_empty_database_says_so(store: Store, make_config: Callable[..., Config]) -> None:
    out = io.StringIO()
    assert show_status(make_config(), out, as_json=False, last=5) == 0
    text = out.getvalue()
    assert "none: no daemon has sent a heartbeat recently" in text
    assert "lag unknown" in text


def test_unreachable_mongodb_exits_1_with_the_reason(make_config: Callable[..., Config]) -> None:
    uri = f"mongodb://ghost:s3cr3t-pw@127.0.0.1:{free_port()}/"
    config = make_config(mongodb={"uri": uri, "timeout": "1s"})
    out = io.StringIO()
    assert show_status(config, out, as_json=True, last=5) == 1
    error = json.loads(out.getvalue())["error"]
    assert error.startswith(f"cannot reach MongoDB at mongodb://ghost:***@127.0.0.1:{uri.rsplit(':', 1)[1]}")
    assert "s3cr3t-pw" not in error


def test_redacted_uri_keeps_everything_but_the_password() -> None:
    assert redacted_uri("mongodb://u:p%40ss@h:1/db?x=1") == "mongodb://u:***@h:1/db?x=1"
    assert redacted_uri("mongodb://h:1/") == "mongodb://h:1/"


def run_check(config: Config, **thresholds: float) -> tuple[int, str]:
    out = io.StringIO()
    code = check_status(config, out, as_json=False, thresholds=Thresholds(**thresholds))
    return code, out.getvalue()


def test_check_passes_within_the_thresholds(store: Store, make_config: Callable[..., Config]) -> None:
    seed(store)
    code, text = run_check(make_config(host="ghost-1"), max_lag=60, max_failures=1)
    assert code == 0, text
    assert text.startswith("ghost-buildpackd status --check: OK (1 live instance(s) on host ghost-1, lag 1")


def test_check_names_every_problem(store: Store, make_config: Callable[..., Config]) -> None:
    ids = seed(store)
    code, text = run_check(make_config(host="ghost-2"), max_lag=5)
    assert code == 1
    lines = text.splitlines()
    assert lines[0] == "ghost-buildpackd status --check: FAILED"
    assert lines[1] == "  no live instance on host ghost-2 (live on: ghost-1)"
    assert lines[2].startswith("  event lag 1") and lines[2].endswith("s is over --max-lag 5s")
    assert lines[3] == f"  1 failed step(s) in the last 1h00m (over --max-failures 0): {ids['failed']}: failed here"


def test_check_counts_only_failures_within_the_window(store: Store, make_config: Callable[..., Config]) -> None:
    ids = seed(store)
    store.steps.update_one({"_id": ids["failed"]}, {"$set": {"updated_at": utcnow() - timedelta(hours=2)}})
    code, text = run_check(make_config(host="ghost-1"), max_lag=60, window=3600)
    assert code == 0, text
    out = io.StringIO()
    assert check_status(make_config(host="ghost-1"), out, True, Thresholds(max_lag=60, window=3 * 3600)) == 1
    verdict = json.loads(out.getvalue())
    assert verdict["failed_steps"] == [ids["failed"]] and not verdict["ok"]


def test_check_fails_when_mongodb_cannot_be_reached(make_config: Callable[..., Config]) -> None:
    config = make_config(mongodb={"uri": f"mongodb://127.0.0.1:{free_port()}/", "timeout": "1s"})
    code, text = run_check(config)
    assert code == 1
    assert text.startswith("ghost-buildpackd status: cannot reach MongoDB at")


def test_check_names_a_crash_looping_loop_of_an_instance_on_this_host(
    store: Store, make_config: Callable[..., Config]
) -> None:
    seed(store)
    problem = "events loop crashed 3 time(s) in a row, restarting (last: TypeError: boom)"
    store.instances.update_one({"_id": "ghost-1:4242:abcd"}, {"$set": {"info.loop_problems": [problem]}})
    code, text = run_check(make_config(host="ghost-1"), max_lag=60, max_failures=1)
    assert code == 1
    assert text.splitlines()[1:] == [f"  instance ghost-1:4242:abcd: {problem}"]
