"""`ghost-buildpackd buildpack` as Ghost's worker runs it: a subprocess against a running daemon on the real LXD.

Ghost's `gcall` sends the command's stdout and stderr into the job log file; these
tests do the same, then check the exit code, the one outcome line, and that the
script's output is in the job log exactly once.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from bson import ObjectId

from ghost_buildpackd.ghost.commands import EXIT_CANCELLED, EXIT_NO_DAEMON, EXIT_REFUSED, EXIT_TIMED_OUT
from ghost_buildpackd.model import CANCELLED, DEPLOY, FAILED, RUNNING, SUCCEEDED, step_id
from ghost_buildpackd.store import Store
from tests.conftest import WORKING_COPY_IDS, leftover_containers
from tests.support.daemon import DaemonProcess
from tests.support.ghost import b64, finish_buildimage, make_app, make_job, module_doc, set_status
from tests.support.steps import terminal_step
from tests.support.waiting import wait_until

pytestmark = pytest.mark.mongodb

REPO = Path(__file__).resolve().parents[1]
OUTCOME_PREFIX = "ghost-buildpackd: "


def working_copy(root: Path, module: str) -> Path:
    path = root / "shop" / "prod" / "web" / module
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, *WORKING_COPY_IDS)
    return path


def gcall(config: Path, log_dir: Path, job: ObjectId, module: str, *options: str) -> tuple[int, list[str], str]:
    """Run the command as Ghost's gcall does (stdout and stderr into the job log); exit code, outcome lines, log."""
    job_log = log_dir / f"{job}.txt"
    with job_log.open("a") as handle:
        code = subprocess.run(
            [
                sys.executable,
                "-m",
                "ghost_buildpackd",
                "buildpack",
                str(job),
                module,
                "--config",
                str(config),
                *options,
            ],
            cwd=REPO,
            stdout=handle,
            stderr=handle,
            timeout=180,
        ).returncode
    text = job_log.read_text()
    return code, [line for line in text.splitlines() if line.startswith(OUTCOME_PREFIX)], text


def buildpack_running(config: Path, store: Store, job: ObjectId, module: str) -> subprocess.Popen[str]:
    """Ghost's `buildpack` command for `module`, started, once the daemon runs the script."""
    command = subprocess.Popen(
        [sys.executable, "-m", "ghost_buildpackd", "buildpack", str(job), module, "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sid = step_id(job, DEPLOY, module)
    wait_until(lambda: (s := store.get_step(sid)) is not None and s.state == RUNNING, 60, "the buildpack running")
    return command


def started_deploy(db, app: ObjectId, modules: list[str]) -> ObjectId:
    job = make_job(db, app, command="deploy", modules=modules)
    set_status(db, job, "started")
    return job


@pytest.mark.lxd
def test_exit_codes_and_one_copy_of_the_output(
    db, store, lxd, image_alias, write_config, ghost_dirs, tmp_path, lxd_cleanup
):
    app = make_app(
        db,
        source_container_image=image_alias,
        container_image=image_alias,
        modules=[
            module_doc("api", "/srv/api", "echo built-marker-4821 in $(pwd)", after_all_deploy=b64("echo after-5512")),
            module_doc("worker", "/srv/worker", "echo failing-marker-77; exit 3"),
            module_doc("docs", "/srv/docs", None),
            module_doc("slow", "/srv/slow", "sleep 120"),
        ],
    )
    for module in ("api", "worker", "docs", "slow"):
        working_copy(ghost_dirs["root"], module)
    config = write_config()
    log_dir = ghost_dirs["log_dir"]
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready()
        job = started_deploy(db, app, ["api", "worker", "docs", "slow"])

        code, lines, text = gcall(config, log_dir, job, "api")
        assert code == 0, text
        assert lines == ["ghost-buildpackd: build_pack of module api: succeeded in a container, exit 0"]
        assert text.count("built-marker-4821 in /srv/api") == 1

        code, lines, text = gcall(config, log_dir, job, "worker")
        assert code == 3, text
        assert lines[-1].startswith("ghost-buildpackd: build_pack of module worker: script failed: ")
        assert lines[-1].endswith("exited with code 3, exit 3")
        assert text.count("failing-marker-77") == 1

        code, lines, text = gcall(config, log_dir, job, "docs")
        assert code == 0, text
        assert (
            lines[-1]
            == "ghost-buildpackd: build_pack of module docs: nothing to run (module docs has no build_pack), exit 0"
        )

        code, lines, text = gcall(config, log_dir, job, "api", "--script", "after_all_deploy")
        assert code == 0, text
        assert text.count("after-5512") == 1
        record = store.get_step(step_id(job, DEPLOY, "api", "after_all_deploy"))
        assert (record.state, record.script) == (SUCCEEDED, "after_all_deploy")
        build_pack = store.get_step(step_id(job, DEPLOY, "api"))  # a step of its own, in a container of its own
        assert build_pack.state == SUCCEEDED and f"{job}-a-api-" in record.container != build_pack.container

        started = time.monotonic()
        code, lines, text = gcall(config, log_dir, job, "slow", "--timeout", "3s")
        assert code == EXIT_TIMED_OUT, text
        assert time.monotonic() - started < 60
        # Whether the script had started within the 3 s depends on the host's load: the line says which.
        assert re.search(
            r"timed out: abandoned by Ghost's client after waiting 3s for the outcome, "
            r"(while the script was running \(stopped\)|before the script ran), exit 67$",
            lines[-1],
        ), lines[-1]
        slow = step_id(job, DEPLOY, "slow")
        assert wait_until(lambda: terminal_step(store, slow), 60, "the abandoned step").state == CANCELLED

        code, lines, text = gcall(config, log_dir, job, "nope")
        assert code == EXIT_REFUSED, text
        assert "the app has no module named 'nope'" in lines[-1]

        code, lines, text = gcall(config, log_dir, job, "api", "--timeout", "soon")
        assert code == 2 and "--timeout" in text

        set_status(db, job, "done")
        assert daemon.terminate() == 0
    assert wait_until(lambda: leftover_containers(lxd, db) == [], 30, "no container left")


@pytest.mark.lxd
def test_redeploy_runs_after_all_deploy_and_a_job_end_cancels(
    db, store, lxd, image_alias, write_config, ghost_dirs, tmp_path, lxd_cleanup
):
    app = make_app(
        db,
        source_container_image=image_alias,
        container_image=image_alias,
        modules=[module_doc("api", "/srv/api", "sleep 120", after_all_deploy=b64("echo redeploy-after-9$((1+1))"))],
    )
    working_copy(ghost_dirs["root"], "api")
    config = write_config()
    log_dir = ghost_dirs["log_dir"]
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready()
        redeploy = make_job(db, app, command="redeploy", options=["0123456789abcdef01234567"])
        set_status(db, redeploy, "started")
        code, _lines, text = gcall(config, log_dir, redeploy, "api", "--script", "after_all_deploy")
        assert code == 0, text
        assert text.count("redeploy-after-92") == 1

        # The job ends (Ghost's worker failed it elsewhere) while the buildpack runs: cancelled.
        deploy = started_deploy(db, app, ["api"])
        command = buildpack_running(config, store, deploy, "api")
        set_status(db, deploy, "failed", "aborted by the user")
        out, err = command.communicate(timeout=90)
        assert command.returncode == EXIT_CANCELLED, out + err
        assert err == "" and len(out.splitlines()) == 1 and "cancelled: deploy job ended (failed)" in out
        assert "while the script was running (stopped), exit 66" in out  # not "before it ran": it was running
        assert daemon.terminate() == 0
    assert wait_until(lambda: leftover_containers(lxd, db) == [], 30, "no container left")


@pytest.mark.lxd
def test_an_app_with_containers_off_is_refused(
    db, store, lxd, image_alias, write_config, ghost_dirs, tmp_path, lxd_cleanup
):
    # "Don't use containers" cleared source_container_image; container_image stays from an older build.
    app = make_app(db, source_container_image=None, container_image=image_alias)
    working_copy(ghost_dirs["root"], "app")
    config = write_config()
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready()
        job = started_deploy(db, app, ["app"])
        code, lines, text = gcall(config, ghost_dirs["log_dir"], job, "app")
        assert code == EXIT_REFUSED, text
        assert "refused: app.build_infos.source_container_image is not set" in lines[-1]
        record = store.get_step(step_id(job, DEPLOY, "app"))
        assert record.state == FAILED and record.exit_code is None
        assert "building" not in text  # the buildpack never ran
        assert daemon.terminate() == 0
    assert leftover_containers(lxd, db) == []


def test_no_live_daemon_answers_at_once_and_asks_nothing(db, store, write_config, ghost_dirs):
    app = make_app(db, container_image="whatever")
    job = started_deploy(db, app, ["app"])
    started = time.monotonic()
    code, lines, text = gcall(write_config(), ghost_dirs["log_dir"], job, "app")
    assert code == EXIT_NO_DAEMON, text
    assert time.monotonic() - started < 20
    assert len(lines) == 1 and lines[0].endswith(", exit 69")
    assert lines[0].startswith(
        "ghost-buildpackd: build_pack of module app: no live daemon on this host: no live ghost-buildpackd on host "
    )
    assert store.steps.count_documents({}) == 0

    code, lines, text = gcall(write_config(), ghost_dirs["log_dir"], "not-an-id", "app")  # type: ignore[arg-type]
    assert code == 2 and lines[-1].startswith("ghost-buildpackd: build_pack of module app: bad arguments: job_id: ")
    assert store.steps.count_documents({}) == 0


@pytest.mark.lxd
def test_ghost_config_debug_keeps_the_deploy_container(
    db, store, lxd, image_alias, write_config, ghost_dirs, tmp_path, lxd_cleanup
):
    ghost_config = tmp_path / "ghost-config.yml"
    ghost_config.write_text(yaml.safe_dump({"container": {"enabled": True, "endpoint": "localhost", "debug": True}}))
    app = make_app(db, source_container_image=image_alias, container_image=image_alias)
    working_copy(ghost_dirs["root"], "app")
    config = write_config(ghost={"config": str(ghost_config)})
    assert "debug" not in yaml.safe_load(config.read_text())["container"]  # only Ghost's config.yml says so
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready()
        job = started_deploy(db, app, ["app"])
        code, _lines, text = gcall(config, ghost_dirs["log_dir"], job, "app")
        assert code == 0, text
        name = store.get_step(step_id(job, DEPLOY, "app")).container  # the prepared container, adopted by the run
        assert f"debug: container {name} kept; get in with: lxc exec {name} -- sh" in text
        assert daemon.terminate() == 0
    assert lxd.container_status(name) is not None  # kept after the outcome and after the daemon stopped


@pytest.mark.lxd
def test_deploy_waits_for_the_build_in_flight_then_uses_its_image(
    db, store, lxd, image_alias, write_config, ghost_dirs, tmp_path, lxd_cleanup
):
    app = make_app(
        db,
        source_container_image=image_alias,
        container_image=image_alias,
        pre_buildimage="sleep 4; echo pre-hook-done",
        modules=[module_doc("app", "/srv/app", "cat /etc/built-by 2>/dev/null || echo no-marker")],
    )
    working_copy(ghost_dirs["root"], "app")
    config = write_config()
    log_dir = ghost_dirs["log_dir"]
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready()
        build = make_job(db, app)
        finish_buildimage(db, build)
        wait_until(lambda: store.get_step(step_id(build, "buildimage")), 30, "the build step")
        deploy = started_deploy(db, app, ["app"])
        assert not terminal_step(store, step_id(build, "buildimage"))  # still in flight when Ghost asks

        code, _lines, text = gcall(config, log_dir, deploy, "app")

        assert code == 0, text
        assert f"waiting up to 600s for the app's container build (buildimage job {build}" in text
        assert f"the container build of job {build} ended: succeeded" in text
        step = store.get_step(step_id(deploy, DEPLOY, "app"))
        assert step.image == str(build)  # the new image, not the one of the app at job start
        assert text.index("ended: succeeded") < text.index("running its build_pack")

        # A build that fails: the next deploy says which older image it uses and why.
        db.apps.update_one({"_id": app}, {"$set": {"lifecycle_hooks.pre_buildimage": b64("echo broken; exit 9")}})
        failed = make_job(db, app)
        finish_buildimage(db, failed, ami_id="ami-0fa11ed")
        assert (
            wait_until(lambda: terminal_step(store, step_id(failed, "buildimage")), 60, "failed build").state == FAILED
        )
        second = started_deploy(db, app, ["app"])
        code, _lines, text = gcall(config, log_dir, second, "app")
        assert code == 0, text
        assert f"the app's last container build (buildimage job {failed}) failed: " in text
        assert f"this deploy uses the older image {build}" in text

        # Ghost's buildimage that fails only at the autoscaling group update still gets its image.
        db.apps.update_one({"_id": app}, {"$set": {"lifecycle_hooks.pre_buildimage": b64("echo fine")}})
        asg = make_job(db, app)
        set_status(db, asg, "failed", "Autoscaling group update failed: Throttling")
        assert wait_until(lambda: terminal_step(store, step_id(asg, "buildimage")), 60, "ASG build").state == SUCCEEDED
        assert lxd.image_by_alias(str(asg)) is not None
        assert db.apps.find_one({"_id": app})["build_infos"]["container_image"] == str(asg)
        for job in (deploy, second):
            set_status(db, job, "done")
        assert daemon.terminate() == 0
    for alias in (str(build), str(asg)):
        image = lxd.image_by_alias(alias)
        lxd.delete_alias(alias)
        if image is not None:
            lxd.delete_image(image.fingerprint)


@pytest.mark.slow
@pytest.mark.lxd
def test_a_daemon_that_dies_while_the_script_runs_is_noticed_by_its_heartbeat(
    db, store, lxd, image_alias, write_config, ghost_dirs, tmp_path, lxd_cleanup
):
    app = make_app(
        db,
        source_container_image=image_alias,
        container_image=image_alias,
        modules=[module_doc("app", "/srv/app", "sleep 600")],
    )
    working_copy(ghost_dirs["root"], "app")
    config = write_config()
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        daemon.wait_ready()
        job = started_deploy(db, app, ["app"])
        sid = step_id(job, DEPLOY, "app")
        command = buildpack_running(config, store, job, "app")
        daemon.kill()
        killed_at = time.monotonic()
        out, err = command.communicate(timeout=120)  # its own timeout is 40 minutes: the heartbeat ends it
    finally:
        daemon.kill()
    assert command.returncode == EXIT_NO_DAEMON, out + err
    assert time.monotonic() - killed_at < 60  # the heartbeat's age limit (30 s) plus a look every 5 s
    assert (
        err == ""
        and len(out.splitlines()) == 1
        and "no live ghost-buildpackd on host" in out
        and "while waiting" in out
    )
    assert store.get_step(sid).state == CANCELLED  # a daemon started later will not run it


@pytest.mark.lxd
def test_ghost_config_without_container_enabled_turns_every_step_off(
    db, store, lxd, write_config, ghost_dirs, tmp_path, lxd_cleanup
):
    # Ghost 19.08 without `container.enabled: true` (no container section: its default) ran nothing in containers.
    ghost_config = tmp_path / "ghost-config.yml"
    ghost_config.write_text("ami_retention: 5\n")
    app = make_app(db, container_image="older-build")
    working_copy(ghost_dirs["root"], "app")
    config = write_config(ghost={"config": str(ghost_config)})
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready()
        said = daemon.saw("containers_off_in_ghost_config")
        assert said is not None and said["ghost_config"] == str(ghost_config)
        build = make_job(db, app)
        finish_buildimage(db, build)
        deploy = started_deploy(db, app, ["app"])
        wait_until(lambda: daemon.saw("buildimage_without_containers", job_id=str(build)), 30, "the build seen")
        wait_until(lambda: daemon.saw("deploy_without_containers", job_id=str(deploy)), 30, "the deploy seen")
        assert store.steps.count_documents({}) == 0
        # Only an unpatched Ghost asks then: refused, nothing run.
        code, lines, text = gcall(config, ghost_dirs["log_dir"], deploy, "app")
        assert code == EXIT_REFUSED, text
        assert "refused: container.enabled is not true in Ghost's config.yml" in lines[-1]
        assert [event["event"] for event in daemon.events()].count("containers_off_in_ghost_config") == 1
        assert daemon.terminate() == 0
    assert leftover_containers(lxd, db) == []
