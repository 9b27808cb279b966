"""`ghost-buildpackd buildimage` as Ghost's buildimage job runs it, once the AMI is recorded and the job is still
`started`: a subprocess against a running daemon on the real LXD, its stdout and stderr into the job log as
Ghost's `gcall` sends them.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bson import ObjectId

from ghost_buildpackd.ghost.commands import EXIT_NO_DAEMON, EXIT_REFUSED, EXIT_TIMED_OUT
from ghost_buildpackd.model import BUILDIMAGE, CANCELLED, FAILED, SUCCEEDED, step_id
from ghost_buildpackd.store import Store
from tests.conftest import leftover_containers
from tests.support.daemon import DaemonProcess
from tests.support.ghost import finish_buildimage, make_app, make_job, set_status
from tests.support.steps import terminal_step
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
OUTCOME_PREFIX = "ghost-buildpackd: "


def buildimage_command(config: Path, log_dir: Path, job: ObjectId | str, *options: str) -> subprocess.Popen[bytes]:
    """The command as Ghost's gcall starts it: stdout and stderr appended to the job's log."""
    with (log_dir / f"{job}.txt").open("a") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "ghost_buildpackd", "buildimage", "--config", str(config), *options, "--", str(job)],
            cwd=REPO,
            stdout=handle,
            stderr=handle,
        )


def gcall(config: Path, log_dir: Path, job: ObjectId | str, *options: str) -> tuple[int, list[str], str]:
    """Run it to the end; exit code, outcome lines, the job's log."""
    code = buildimage_command(config, log_dir, job, *options).wait(timeout=240)
    text = (log_dir / f"{job}.txt").read_text()
    return code, [line for line in text.splitlines() if line.startswith(OUTCOME_PREFIX)], text


def ami_recorded(db, app: ObjectId) -> ObjectId:
    """Ghost's buildimage job as it is when 19.08 ran its container build: started, the new AMI on the app."""
    job = make_job(db, app)
    set_status(db, job, "started")
    db.apps.update_one({"_id": app}, {"$set": {"ami": "ami-0fresh"}})
    return job


def log_of(log_dir: Path, job: ObjectId) -> str:
    path = log_dir / f"{job}.txt"
    return path.read_text() if path.exists() else ""


@pytest.mark.lxd
def test_the_build_runs_inside_the_started_job_and_never_twice(
    db, store: Store, lxd, image_alias, write_config, ghost_dirs, tmp_path, lxd_cleanup
):
    app = make_app(
        db,
        source_container_image=image_alias,
        pre_buildimage="echo early-marker-3141; sleep 3; echo late-marker-2718",
    )
    config = write_config()
    log_dir = ghost_dirs["log_dir"]
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready()
        job = ami_recorded(db, app)
        sid = step_id(job, BUILDIMAGE)

        command = buildimage_command(config, log_dir, job)
        # The step is asked for at once, although the job is only `started`, bound to this host.
        step = wait_until(lambda: (found := store.get_step(sid)) and found.requested_host and found, 20, "the request")
        assert step.requested_host == socket.gethostname()
        # The container's output reaches the job log while the command still waits.
        wait_until(lambda: "early-marker-3141" in log_of(log_dir, job), 120, "the hook's first line")
        assert command.poll() is None and "late-marker-2718" not in log_of(log_dir, job)
        assert command.wait(timeout=240) == 0, log_of(log_dir, job)

        text = log_of(log_dir, job)
        lines = [line for line in text.splitlines() if line.startswith(OUTCOME_PREFIX)]
        assert lines == [f"ghost-buildpackd: container build of job {job}: succeeded in a container, exit 0"]
        assert text.count("late-marker-2718") == 1
        assert store.get_step(sid).state == SUCCEEDED
        assert db.apps.find_one({"_id": app})["build_infos"]["container_image"] == str(job)
        assert lxd.image_by_alias(str(job)) is not None
        assert db.container_images.find_one({"_id": str(job)})["ami_id"] == "ami-0fresh"

        # Ghost then ends the job `done`: the daemon does not build it again. A buildimage job that never asked
        # (an unpatched Ghost) is built once it is done; the intake reads jobs in the order they changed, so once
        # that one's step exists, the first job's `done` was read too.
        finish_buildimage(db, job, "ami-0fresh")
        unpatched = make_job(db, app)
        finish_buildimage(db, unpatched, "ami-0second")
        built = wait_until(lambda: terminal_step(store, step_id(unpatched, BUILDIMAGE)), 120, "the unpatched build")
        assert built.state == SUCCEEDED and built.requested_host is None
        again = store.get_step(sid)
        # Built once: a claim to build it ahead (when the intake saw the job start first; Ghost's Packer
        # definition never came) and the build's.
        assert again.state == SUCCEEDED and again.claim <= 2, again
        assert [s.id for s in store.steps_for_job(job)] == [sid]
        assert log_of(log_dir, job).count("late-marker-2718") == 1
        assert daemon.terminate() == 0
    assert leftover_containers(lxd, db) == []


@pytest.mark.lxd
def test_exit_codes_of_a_failed_refused_and_timed_out_build(
    db, store: Store, lxd, image_alias, write_config, ghost_dirs, tmp_path, lxd_cleanup
):
    failing = make_app(db, name="failing", source_container_image=image_alias, pre_buildimage="echo broken; exit 9")
    slow = make_app(db, name="slow", source_container_image=image_alias, pre_buildimage="sleep 120")
    off = make_app(db, name="off", source_container_image=None)
    config = write_config()
    log_dir = ghost_dirs["log_dir"]
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready()

        job = ami_recorded(db, failing)
        code, lines, text = gcall(config, log_dir, job)
        assert code == 9, text
        assert lines[-1].startswith(f"ghost-buildpackd: container build of job {job}: script failed: ")
        assert lines[-1].endswith("exited with code 9, exit 9")
        assert store.get_step(step_id(job, BUILDIMAGE)).state == FAILED

        job = ami_recorded(db, off)  # containers off for the app: Ghost's patch never asks then
        code, lines, text = gcall(config, log_dir, job)
        assert code == EXIT_REFUSED, text
        assert "source_container_image" in lines[-1]

        deploy = make_job(db, failing, command="deploy", status="started", modules=["app"])
        code, lines, text = gcall(config, log_dir, deploy)
        assert code == EXIT_REFUSED, text
        assert lines == [
            f"ghost-buildpackd: container build of job {deploy}: refused, or could not run: "
            f"refused: no buildimage job with _id {deploy}, exit 65"
        ]
        assert store.get_step(step_id(deploy, BUILDIMAGE)) is None

        job = ami_recorded(db, slow)
        started = time.monotonic()
        code, lines, text = gcall(config, log_dir, job, "--timeout", "3s")
        assert code == EXIT_TIMED_OUT, text
        assert time.monotonic() - started < 60
        assert "timed out: abandoned by Ghost's client after waiting 3s" in lines[-1]
        stopped = wait_until(lambda: terminal_step(store, step_id(job, BUILDIMAGE)), 60, "the abandoned build")
        assert stopped.state == CANCELLED
        assert daemon.terminate() == 0
    assert leftover_containers(lxd, db) == []


def test_no_live_daemon_answers_at_once_and_asks_nothing(db, store: Store, write_config, ghost_dirs):
    job = ami_recorded(db, make_app(db))
    started = time.monotonic()
    code, lines, text = gcall(write_config(), ghost_dirs["log_dir"], job)
    assert code == EXIT_NO_DAEMON, text
    assert time.monotonic() - started < 20
    assert len(lines) == 1 and lines[0].endswith(", exit 69")
    assert lines[0].startswith(
        f"ghost-buildpackd: container build of job {job}: no live daemon on this host: no live ghost-buildpackd "
    )
    assert store.steps.count_documents({}) == 0

    code, lines, text = gcall(write_config(), ghost_dirs["log_dir"], "not-an-id")
    assert code == 2 and lines[-1].startswith("ghost-buildpackd: container build of job not-an-id: bad arguments: ")
    assert store.steps.count_documents({}) == 0
