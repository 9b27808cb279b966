"""The deploy step on the real LXD: prepare, run, ownership, refusals, cleanup."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from pymongo.database import Database
from structlog.testing import capture_logs

from ghost_buildpackd.config import Config
from ghost_buildpackd.daemon import Daemon
from ghost_buildpackd.events import Intake
from ghost_buildpackd.ghost.client import run_buildpack
from ghost_buildpackd.ghost.fields import BadDocument
from ghost_buildpackd.logs import get_logger
from ghost_buildpackd.lxd import Lxd
from ghost_buildpackd.model import (
    CANCELLED,
    DEPLOY,
    FAILED,
    PENDING,
    PREPARING,
    READY,
    RUNNING,
    SKIPPED,
    SUCCEEDED,
    Actor,
    next_state,
    step_id,
)
from ghost_buildpackd.policy import LIMITS
from ghost_buildpackd.runner import Bodies, Runner
from ghost_buildpackd.runner import execute as runner_module
from ghost_buildpackd.steps import Outcome, StepContext, StepFailed, container_name, deploy, run_after_outcome
from ghost_buildpackd.store import Store
from ghost_buildpackd.upkeep.sweep import sweep_orphans
from tests.conftest import WORKING_COPY_IDS, leftover_containers
from tests.support.ghost import b64, make_app, make_job, module_doc, set_status
from tests.support.lxd_relay import LxdRelay
from tests.support.profiles import delete_profile
from tests.support.steps import back_to_pending, deploy_context, finish_preparation, terminal_step
from tests.support.waiting import wait_until

pytestmark = pytest.mark.lxd  # every test here drives the real LXD

SECRET = "s3cr3t-token-value"


def run_deploy(ctx):
    """deploy.run as the runner calls it: then the chores left for after the outcome (container deletion)."""
    try:
        return deploy.run(ctx)
    finally:
        run_after_outcome(ctx)


def working_copy(root: Path, module: str, app: tuple[str, ...] = ("shop", "prod", "web")) -> Path:
    """A module checkout as Ghost's worker leaves it, owned by the working copy user."""
    path = root.joinpath(*app, module)
    path.mkdir(parents=True)
    (path / "requirements.txt").write_text("flask\n")
    for item in (path, path / "requirements.txt"):
        os.chown(item, *WORKING_COPY_IDS)
    return path


def deploy_job(db: Database, alias: str | None, modules: list[dict[str, Any]], **app: Any) -> ObjectId:
    app_id = make_app(db, container_image=alias, modules=modules, **app)
    return make_job(db, app_id, command="deploy", status="started", modules=[m["name"] for m in modules])


def owner(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_uid, info.st_gid


def job_log(config: Config, job_id: ObjectId) -> str:
    path = config.ghost.log_dir / f"{job_id}.txt"
    return path.read_text(encoding="utf-8") if path.exists() else ""


def prepare_ready(config: Config, store: Store, lxd: Lxd, job_id: ObjectId, module: str) -> StepContext:
    ctx = deploy_context(config, store, lxd, job_id, module, "prepare")
    outcome = deploy.prepare(ctx)
    assert outcome.state == READY, outcome
    finish_preparation(ctx)
    return ctx


# --- the buildpack runs ----------------------------------------------------------------

ENV_AND_FILES = """set -e
echo "pwd=$(pwd) script=$0"
echo "module=$GHOST_MODULE_NAME path=$GHOST_MODULE_PATH repo=$GHOST_MODULE_REPO app=$GHOST_APP/$GHOST_ENV/$GHOST_ROLE"
echo "token is $API_TOKEN, plain is $PLAIN"
mkdir -p build
echo "$API_TOKEN" > build/token
echo built > build/out.txt
echo buildpack-done
"""


def test_prepared_container_runs_buildpack_with_env_and_files_owned_by_working_copy_owner(
    make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, image_alias: str, ghost_dirs, lxd_cleanup
) -> None:
    config = make_config()
    env_vars = [{"var_key": "API_TOKEN", "var_value": SECRET}, {"var_key": "PLAIN", "var_value": "visible"}]
    job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", ENV_AND_FILES)], env_vars=env_vars)

    with capture_logs() as events:
        prepared = prepare_ready(config, store, lxd, job_id, "app")
        name = container_name(prepared.step)
        assert lxd.container_status(name) == "Running"
        record = store.steps.find_one({"_id": step_id(job_id, "deploy", "app")})
        assert record["image"] == image_alias and record["state"] == READY

        module_dir = working_copy(ghost_dirs["root"], "app")  # Ghost clones after the job started
        ctx = deploy_context(config, store, lxd, job_id, "app", "run")
        outcome = run_deploy(ctx)

    assert outcome.state == SUCCEEDED and outcome.exit_code == 0
    assert "buildpack-done" in outcome.output_tail
    assert any(event["event"] == "deploy_container_reused" for event in events)
    assert owner(module_dir / "build") == WORKING_COPY_IDS
    assert owner(module_dir / "build" / "out.txt") == WORKING_COPY_IDS
    assert (module_dir / "build" / "token").read_text().strip() == SECRET  # the buildpack did get it
    assert sorted(p.name for p in module_dir.iterdir()) == ["build", "requirements.txt"]  # no script left behind
    text = job_log(config, job_id)
    assert "pwd=/srv/app script=/var/lib/ghost-buildpackd/buildpack-app.sh" in text
    assert "module=app path=/srv/app repo=git@example.invalid:app.git app=shop/prod/web" in text
    assert "token is ***, plain is ***" in text  # every env_vars value counts as a secret
    assert SECRET not in text and "visible" not in text
    assert SECRET not in repr(events)
    assert leftover_containers(lxd, db) == []


def test_modules_of_one_job_run_in_parallel_without_prepare(
    make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, image_alias: str, ghost_dirs, lxd_cleanup
) -> None:
    config = make_config()
    names = ["api", "front", "worker"]
    script = 'echo "$GHOST_MODULE_NAME" > made-by.txt; mkdir -p cache/deep; touch cache/deep/file'
    job_id = deploy_job(db, image_alias, [module_doc(n, f"/opt/{n}", script) for n in names])
    dirs = {n: working_copy(ghost_dirs["root"], n) for n in names}
    contexts = {n: deploy_context(config, store, lxd, job_id, n, "run") for n in names}
    outcomes: dict[str, Any] = {}

    def run(module: str) -> None:
        try:
            outcomes[module] = run_deploy(contexts[module])
        except Exception as error:  # reported by the assertion below
            outcomes[module] = error

    threads = [threading.Thread(target=run, args=(n,)) for n in names]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    elapsed = time.monotonic() - started

    assert {n: getattr(o, "state", o) for n, o in outcomes.items()} == dict.fromkeys(names, SUCCEEDED)
    for module, path in dirs.items():
        assert (path / "made-by.txt").read_text().strip() == module
        assert owner(path / "cache" / "deep" / "file") == WORKING_COPY_IDS
    assert elapsed < 60
    assert leftover_containers(lxd, db) == []


INTERLEAVED = 'for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do echo "out-$i"; echo "err-$i" >&2; done'


def test_stdout_and_stderr_reach_the_job_log_in_the_order_written(
    make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, image_alias: str, ghost_dirs, lxd_cleanup
) -> None:
    """One stream, as Ghost's gcall gives a command (stdout and stderr both the job log)."""
    config = make_config()
    job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", INTERLEAVED)])
    working_copy(ghost_dirs["root"], "app")

    outcome = run_deploy(deploy_context(config, store, lxd, job_id, "app", "run"))

    assert outcome.state == SUCCEEDED, outcome
    text = job_log(config, job_id)
    written = re.findall(r"^\[container deploy app\] ((?:out|err)-\d+)$", text, re.MULTILINE)
    assert written == [f"{stream}-{i}" for i in range(1, 21) for stream in ("out", "err")], text


def test_an_empty_stored_build_pack_runs_the_file_committed_in_the_clone(
    make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, image_alias: str, ghost_dirs, lxd_cleanup
) -> None:
    """Ghost tests `'build_pack' in module`, then the clone's file wins: an empty stored script still runs it."""
    config = make_config()
    job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", ""), module_doc("idle", "/srv/idle", "")])
    assert db.apps.find_one()["modules"][0]["build_pack"] == ""
    prepared = prepare_ready(config, store, lxd, job_id, "app")
    assert prepared.step.container is None and leftover_containers(lxd, db) == []  # nothing launched ahead
    module_dir = working_copy(ghost_dirs["root"], "app")
    (module_dir / "build_pack").write_text("echo committed-build-pack-ran; touch made-by-file\n")
    working_copy(ghost_dirs["root"], "idle")  # no file: nothing to run

    outcome = run_deploy(deploy_context(config, store, lxd, job_id, "app", "run"))
    idle = run_deploy(deploy_context(config, store, lxd, job_id, "idle", "run"))

    assert outcome.state == SUCCEEDED, outcome
    assert "committed-build-pack-ran" in job_log(config, job_id)
    assert (module_dir / "made-by-file").exists()
    # Left for Ghost's client to remove once the outcome is recorded (a repeated run must find it).
    assert (module_dir / "build_pack").exists()
    assert idle.state == SKIPPED and "is empty" in idle.message
    assert leftover_containers(lxd, db) == []


def test_max_prepared_bounds_containers_waiting_for_their_request(
    make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, image_alias: str, ghost_dirs, lxd_cleanup
) -> None:
    config = make_config(container={"max_prepared": 1})
    job_id = deploy_job(db, image_alias, [module_doc(n, f"/srv/{n}", "touch made") for n in ("api", "front")])
    first = prepare_ready(config, store, lxd, job_id, "api")
    second = prepare_ready(config, store, lxd, job_id, "front")
    assert lxd.container_status(container_name(first.step)) == "Running"
    assert lxd.container_status(container_name(second.step)) is None  # past the bound: nothing launched
    assert store.get_step(second.step.id).state == READY
    assert "container.max_prepared" in job_log(config, job_id)

    module_dir = working_copy(ghost_dirs["root"], "front")
    with capture_logs() as events:
        outcome = run_deploy(deploy_context(config, store, lxd, job_id, "front", "run"))
    assert outcome.state == SUCCEEDED
    assert owner(module_dir / "made") == WORKING_COPY_IDS
    assert any(event["event"] == "deploy_container_not_prepared" for event in events)


def test_owner_differing_from_prepared_idmap_recreates_the_container(
    make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, image_alias: str, ghost_dirs, lxd_cleanup
) -> None:
    config = make_config(container={"idmap_user": "1002:1002"})  # what prepare assumes without a working copy
    job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", "touch made")])
    prepared = prepare_ready(config, store, lxd, job_id, "app")
    assert "uid 1002 1002" in lxd.describe_container(container_name(prepared.step)).config["raw.idmap"]
    module_dir = working_copy(ghost_dirs["root"], "app")  # owned by 1001:1002

    with capture_logs() as events:
        outcome = run_deploy(deploy_context(config, store, lxd, job_id, "app", "run"))

    assert outcome.state == SUCCEEDED
    assert any(event["event"] == "deploy_container_recreated_for_owner" for event in events)
    assert owner(module_dir / "made") == WORKING_COPY_IDS
    assert leftover_containers(lxd, db) == []


def test_privileged_mode_gives_the_same_ownership(
    make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, image_alias: str, ghost_dirs, lxd_cleanup
) -> None:
    config = make_config(container={"privileged": True})
    job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", "mkdir -p out && touch out/file")])
    prepared = prepare_ready(config, store, lxd, job_id, "app")
    assert lxd.describe_container(container_name(prepared.step)).config.get("security.privileged") == "true"
    module_dir = working_copy(ghost_dirs["root"], "app")

    outcome = run_deploy(deploy_context(config, store, lxd, job_id, "app", "run"))

    assert outcome.state == SUCCEEDED
    assert owner(module_dir / "out") == WORKING_COPY_IDS
    assert owner(module_dir / "out" / "file") == WORKING_COPY_IDS
    assert "chown -R -h 1001:1002 /srv/app" in job_log(config, job_id)
    assert leftover_containers(lxd, db) == []


# A package manager dropping privileges, or a buildpack handing files to the web server's user.
FILES_OF_OTHER_USERS = """set -e
mkdir -p cache/www/deep out
echo page > cache/www/deep/index.html
ln -s /etc/passwd cache/www/link
chown -R 33:33 cache
chown 65534:65534 out
chmod 500 cache/www/deep
"""


def every_owner(root: Path) -> set[tuple[int, int]]:
    """The (uid, gid) of every file, directory and symlink under `root`, `root` included (symlinks not followed)."""
    found = {(os.lstat(root).st_uid, os.lstat(root).st_gid)}
    for directory, names, files in os.walk(root):
        for name in names + files:
            info = os.lstat(Path(directory) / name)
            found.add((info.st_uid, info.st_gid))
    return found


@pytest.mark.parametrize("privileged", [False, True], ids=["unprivileged", "privileged"])
def test_files_of_other_container_users_are_handed_back_to_the_working_copy_owner(
    privileged: bool,
    make_config: Callable[..., Config],
    store: Store,
    lxd: Lxd,
    db: Database,
    image_alias: str,
    ghost_dirs,
    lxd_cleanup,
) -> None:
    config = make_config(container={"privileged": privileged})
    job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", FILES_OF_OTHER_USERS)])
    module_dir = working_copy(ghost_dirs["root"], "app")
    os.chown(module_dir.parent, *WORKING_COPY_IDS)  # Ghost's user owns the app's directory, as on Ghost's host

    outcome = run_deploy(deploy_context(config, store, lxd, job_id, "app", "run"))

    assert outcome.state == SUCCEEDED, outcome
    assert (module_dir / "cache" / "www" / "deep" / "index.html").exists()
    assert every_owner(module_dir) == {WORKING_COPY_IDS}
    assert os.lstat("/etc/passwd").st_uid == 0  # the symlink itself was handed back, never its target
    # What Ghost's next deploy does to the previous clone, as Ghost's user without supplementary groups.
    uid, gid = WORKING_COPY_IDS
    for command in (["chmod", "-R", "u+rwx", str(module_dir)], ["rm", "-rf", str(module_dir)]):
        done = subprocess.run(command, user=uid, group=gid, extra_groups=[], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert not module_dir.exists()
    assert leftover_containers(lxd, db) == []


def test_files_are_handed_back_after_a_script_stopped_at_its_timeout(
    make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, image_alias: str, ghost_dirs, lxd_cleanup
) -> None:
    """The timeout stops the container with the script; it is started again for the hand-back, or Ghost's next
    deploy could not remove the clone."""
    config = make_config(container={"exec_timeout": "4s"})
    job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", FILES_OF_OTHER_USERS + "sleep 60\n")])
    module_dir = working_copy(ghost_dirs["root"], "app")
    os.chown(module_dir.parent, *WORKING_COPY_IDS)

    with pytest.raises(StepFailed, match="did not finish within 4s"):
        run_deploy(deploy_context(config, store, lxd, job_id, "app", "run"))

    assert every_owner(module_dir) == {WORKING_COPY_IDS}
    assert leftover_containers(lxd, db) == []


def test_a_file_the_container_cannot_own_is_said_and_does_not_fail_the_buildpack(
    make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, image_alias: str, ghost_dirs, lxd_cleanup
) -> None:
    config = make_config()
    job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", FILES_OF_OTHER_USERS)])
    module_dir = working_copy(ghost_dirs["root"], "app")
    (module_dir / "put-there-by-root").touch()  # host root: no id inside an unprivileged container

    outcome = run_deploy(deploy_context(config, store, lxd, job_id, "app", "run"))

    assert outcome.state == SUCCEEDED, outcome
    assert owner(module_dir / "put-there-by-root") == (0, 0)
    assert every_owner(module_dir / "cache") == {WORKING_COPY_IDS}  # what the script made is handed back still
    assert "some files of the module keep their owner: " in job_log(config, job_id)
    assert leftover_containers(lxd, db) == []


def test_processes_left_behind_by_the_buildpack_end_before_the_outcome(
    make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, image_alias: str, ghost_dirs, lxd_cleanup
) -> None:
    config = make_config()
    build_pack = "(while true; do date >> bg.log; sleep 0.1; done) >/dev/null 2>&1 &\nsleep 4242 >/dev/null 2>&1 &"
    job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", build_pack)])
    copy = working_copy(ghost_dirs["root"], "app")
    ctx = deploy_context(config, store, lxd, job_id, "app", "run")

    outcome = deploy.run(ctx)  # the outcome is known here; the container is deleted after it is recorded
    name = container_name(ctx.step)
    processes: list[bytes] = []
    listing = lxd.execute(name, ["ps"], {}, processes.append, 30)

    assert outcome.state == SUCCEEDED, outcome
    assert listing.ok and b"PID" in b"".join(processes), "the container no longer runs commands: nothing was checked"
    assert b"4242" not in b"".join(processes), b"".join(processes).decode()
    assert lxd.describe_container(name).mounts == [], "the working copy is still mounted"
    assert (copy / "bg.log").exists()
    run_after_outcome(ctx)
    assert leftover_containers(lxd, db) == []


# --- the buildpack fails -----------------------------------------------------------


def test_failing_buildpack_records_exit_code_and_tail(
    make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, image_alias: str, ghost_dirs, lxd_cleanup
) -> None:
    config = make_config()
    job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", "echo about to fail; exit 3")])
    working_copy(ghost_dirs["root"], "app")

    with pytest.raises(StepFailed) as failure:
        run_deploy(deploy_context(config, store, lxd, job_id, "app", "run"))

    assert failure.value.exit_code == 3
    assert "exited with code 3" in failure.value.message
    assert "about to fail" in failure.value.output_tail
    assert leftover_containers(lxd, db) == []


def test_buildpack_past_the_timeout_is_killed(
    make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, image_alias: str, ghost_dirs, lxd_cleanup
) -> None:
    config = make_config(container={"exec_timeout": "2s"})
    job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", "echo sleeping; sleep 60")])
    working_copy(ghost_dirs["root"], "app")
    started = time.monotonic()

    with pytest.raises(StepFailed) as failure:
        run_deploy(deploy_context(config, store, lxd, job_id, "app", "run"))

    assert "did not finish within 2s" in failure.value.message
    assert failure.value.exit_code is None
    assert time.monotonic() - started < 40
    assert leftover_containers(lxd, db) == []


def test_abort_during_the_buildpack_stops_it_and_removes_the_container(
    make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, image_alias: str, ghost_dirs, lxd_cleanup
) -> None:
    config = make_config()
    job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", "echo long-work-started; sleep 60")])
    working_copy(ghost_dirs["root"], "app")
    ctx = deploy_context(config, store, lxd, job_id, "app", "run")
    threading.Thread(
        target=lambda: (
            wait_until(lambda: "long-work-started" in job_log(config, job_id), 60, "the buildpack to start"),
            ctx.abort.set(),
        ),
        daemon=True,
    ).start()

    with pytest.raises(StepFailed) as failure:
        run_deploy(ctx)

    assert "interrupted" in failure.value.message
    assert leftover_containers(lxd, db) == []


RUNS_IN_THIS_CONTAINER = """echo run >> /root/runs
echo "runs in this container: $(wc -l < /root/runs)"
if [ -e fail-once ]; then exit 3; fi
echo buildpack-done
"""


def test_a_container_the_buildpack_ran_in_is_never_reused_when_the_step_is_asked_again(
    make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, image_alias: str, ghost_dirs, lxd_cleanup
) -> None:
    """The buildpack failed as the daemon's shutdown ran out of grace, so the step went back to `requested` (the
    shutdown's row), and the daemon died before deleting the container it had released (working copy detached,
    processes ended, still running). The next claim must run in a new container, not the one the script ran in."""
    config = make_config()
    job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", RUNS_IN_THIS_CONTAINER)])
    module_dir = working_copy(ghost_dirs["root"], "app")
    (module_dir / "fail-once").touch()
    first = deploy_context(config, store, lxd, job_id, "app", "run")
    with pytest.raises(StepFailed):
        deploy.run(first)  # and no run_after_outcome: the process died before the container's deletion
    used = first.step.container
    assert used is not None and lxd.container_status(used) == "Running"
    assert lxd.describe_container(used).mounts == []  # released: nothing says "used" but the fact itself
    back = next_state(Actor.SHUTDOWN, RUNNING, DEPLOY)
    assert store.move(first.step, Actor.SHUTDOWN, back) is not None  # the shutdown's row: requested
    (module_dir / "fail-once").unlink()

    with capture_logs() as events:
        outcome = run_deploy(deploy_context(config, store, lxd, job_id, "app", "run"))

    assert outcome.state == SUCCEEDED, outcome
    assert not any(event["event"] == "deploy_container_reused" for event in events), events
    assert "runs in this container: 2" not in job_log(config, job_id)
    assert lxd.container_status(used) is None
    assert leftover_containers(lxd, db) == []


def test_lots_of_output_and_non_utf8_bytes_keep_the_job_log_bounded(
    make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, image_alias: str, ghost_dirs, lxd_cleanup
) -> None:
    config = make_config(container={"output_head": "2KiB", "output_tail": "1KiB"})
    script = (
        'i=0; while [ $i -lt 5000 ]; do echo "line $i of noise"; i=$((i+1)); done\n'
        "printf 'bad bytes: \\377\\376 end\\n'\n"
        "echo last-line\n"
    )
    job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", script)])
    working_copy(ghost_dirs["root"], "app")

    outcome = run_deploy(deploy_context(config, store, lxd, job_id, "app", "run"))

    text = job_log(config, job_id)
    assert outcome.state == SUCCEEDED
    assert "line 0 of noise" in text and "last-line" in text
    assert "bad bytes: \ufffd\ufffd end" in text
    assert "bytes of output omitted" in text
    assert "line 2500 of noise" not in text
    assert len(text.encode()) < 12_000  # ~95 KB printed
    assert outcome.output_tail.endswith("last-line")
    assert leftover_containers(lxd, db) == []


# --- the image is missing ---------------------------------------------------------


@pytest.mark.parametrize("alias", [None, "gbp-test-deploy-no-such-image"])
def test_missing_image_fails_prepare_and_run_with_a_message(
    alias: str | None, make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, ghost_dirs
) -> None:
    config = make_config()
    job_id = deploy_job(db, alias, [module_doc("app", "/srv/app", "touch made")])
    module_dir = working_copy(ghost_dirs["root"], "app")

    for phase, body in (("prepare", deploy.prepare), ("run", run_deploy)):
        ctx = deploy_context(config, store, lxd, job_id, "app", phase)
        with pytest.raises(StepFailed, match=r"app\.build_infos\.container_image") as failure:
            body(ctx)
        if alias:
            assert alias in failure.value.message
        store.move(ctx.step, Actor.RUNNER, FAILED, message=failure.value.message)
        back_to_pending(store, ctx.step.id)

    assert not (module_dir / "made").exists()
    assert leftover_containers(lxd, db) == []


# --- a deploy cancelled before Ghost asked -------------------------------------------------


def test_deploy_ended_before_the_request_intake_cancels_the_step_and_the_sweep_it_asks_for_removes_the_container(
    make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, image_alias: str, lxd_cleanup
) -> None:
    """Intake reads the ended job and asks for a sweep (the daemon wires that to its upkeep's sweep)."""
    config = make_config()
    job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", "touch made")])
    prepared = prepare_ready(config, store, lxd, job_id, "app")
    assert leftover_containers(lxd, db) == [container_name(prepared.step)]
    ended: list[ObjectId] = []
    intake = Intake(store, on_new_steps=lambda: None, on_job_ended=ended.append)

    set_status(db, job_id, "failed")  # Ghost's worker ends the job before it asks for the buildpack
    intake.handle_job_id(job_id)

    assert store.get_step(prepared.step.id).state == CANCELLED
    assert ended == [job_id]
    assert sweep_orphans(store, lxd, keep_debug=False, log=get_logger("test")) == [container_name(prepared.step)]
    result = run_buildpack(db, job_id, "app", timeout=5, poll_interval=0.1, host=config.host_name)
    assert result.state == CANCELLED and not result.ok
    assert leftover_containers(lxd, db) == []


@pytest.mark.parametrize("told_by_renewal", [False, True], ids=["before-any-renewal", "at-a-renewal"])
def test_a_deploy_that_ends_while_its_step_is_prepared_cancels_the_step_and_removes_its_container(
    make_config: Callable[..., Config],
    store: Store,
    lxd: Lxd,
    db: Database,
    image_alias: str,
    lxd_cleanup,
    told_by_renewal: bool,
) -> None:
    """Ghost's worker fails the deploy within a second of its start, while the daemon (on change streams, no
    safety scan within the test) launches the module's container: the job's end wins over the preparation,
    whether the holder hears of it at a lease renewal or only when it would release the step ready."""
    # A long lease: no renewal tells the holder before its preparation ends, as in the field (renewals every 10 s).
    lease = "3s" if told_by_renewal else "300s"
    config = make_config(lease_ttl=lease, events={"mode": "change_stream", "rescan_interval": "1h"})
    prepared, go_on = threading.Event(), threading.Event()

    def prepare_then_hold(ctx: StepContext) -> Outcome:
        outcome = deploy.prepare(ctx)
        prepared.set()
        go_on.wait(120)
        return outcome

    bodies = dataclasses.replace(Bodies.default(), prepare_deploy=prepare_then_hold)
    daemon = Daemon(config.with_instance_id(), store, lxd, bodies=bodies)
    assert daemon.mode == "change_stream"
    thread = threading.Thread(target=daemon.run, daemon=True)
    with capture_logs() as logs:
        thread.start()
        try:
            job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", "touch made")])
            sid = step_id(job_id, DEPLOY, "app")
            assert prepared.wait(120), "the preparation did not launch the container"
            container = store.get_step(sid).container
            assert container and leftover_containers(lxd, db) == [container]
            set_status(db, job_id, "failed")
            wait_until(lambda: store.get_step(sid).cancel_requested, 30, "the daemon to read the job's end")
            assert store.get_step(sid).state == PREPARING  # the end came while the container was prepared
            if told_by_renewal:
                wait_until(
                    lambda: any(entry["event"] == "step_cancel_requested" for entry in list(logs)),
                    30,
                    "a renewal to tell the holder",
                )
            go_on.set()
            step = wait_until(lambda: terminal_step(store, sid), 60, "the step to end")
            assert (step.state, step.message) == (CANCELLED, "deploy job ended (failed), before the script ran")
            wait_until(lambda: leftover_containers(lxd, db) == [], 60, "the prepared container to be removed")
        finally:
            go_on.set()
            daemon.request_stop()
            thread.join(120)
    assert not thread.is_alive()
    result = run_buildpack(db, job_id, "app", timeout=5, poll_interval=0.1, host=config.host_name)
    assert result.state == CANCELLED and not result.ok


# --- LXD failing a preparation: the step waits for Ghost's request all the same --------------------------


def prepared_by_runner(config: Config, store: Store, lxd: Lxd, job_id: ObjectId, module: str) -> Any:
    """The step of `module` once a runner on `lxd` prepared it (or ended it); the runner stopped again."""
    sid = step_id(job_id, DEPLOY, module)
    store.create_step(job_id, DEPLOY, module, app_id=store.get_job(job_id)["app_id"])
    running = Runner(config, store, lxd)
    running.start()
    try:
        return wait_until(
            lambda: (found := store.get_step(sid)).owner is None and found.state != PENDING and found,
            180,
            "the preparation to end",
        )
    finally:
        running.stop(grace=20)


def run_on_request(config: Config, store: Store, lxd: Lxd, db: Database, job_id: ObjectId, module: str) -> Any:
    """Ghost's request for the module's buildpack, served by a runner on `lxd`: the client's result."""
    running = Runner(config, store, lxd)
    running.start()
    try:
        return run_buildpack(db, job_id, module, timeout=180, poll_interval=0.1, host=config.host_name)
    finally:
        running.stop(grace=20)


def test_lxd_refusing_the_container_ahead_leaves_the_step_requestable_and_the_run_launches_it(
    make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, image_alias: str, ghost_dirs, lxd_cleanup
) -> None:
    """LXD refuses the container while the step is prepared (a profile it names is away for a moment, as while
    an operator recreates it): nothing is left in LXD, and the run Ghost asks for later launches one."""
    profile = f"gbp-test-{uuid.uuid4().hex[:10]}"
    # No template containers: none may be left using the profile the test removes.
    config = make_config(container={"profiles": [profile], "templates": 0}).with_instance_id()
    job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", "touch made")])
    module_dir = working_copy(ghost_dirs["root"], "app")
    try:
        step = prepared_by_runner(config, store, lxd, job_id, "app")
        assert step.state == READY, step
        assert (
            step.container is None and "LXD failed the launch" in step.message and "Profile not found" in step.message
        )
        assert leftover_containers(lxd, db) == []
        lxd.client.profiles.create(profile, config={}, devices={})
        result = run_on_request(config, store, lxd, db, job_id, "app")
    finally:
        delete_profile(lxd, profile)
    assert result.state == SUCCEEDED, result
    assert (module_dir / "made").exists()
    assert leftover_containers(lxd, db) == []


def test_lxd_away_longer_than_the_outage_wait_leaves_a_prepared_step_requestable(
    make_config: Callable[..., Config],
    store: Store,
    lxd: Lxd,
    db: Database,
    image_alias: str,
    ghost_dirs,
    lxd_cleanup,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The preparing runner's LXD goes away (the socket it reaches LXD through stops) for longer than it waits;
    LXD is there again when Ghost asks: the run launches the container."""
    monkeypatch.setattr(runner_module, "LIMITS", dataclasses.replace(LIMITS, lxd_outage_wait=2.0))
    config = make_config().with_instance_id()
    relay = LxdRelay(tmp_path / "lxd.socket")
    away = Lxd(dataclasses.replace(config.lxd, endpoint=relay.endpoint, timeout=2.0))
    relay.stop()
    job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", "touch made")])
    module_dir = working_copy(ghost_dirs["root"], "app")

    step = prepared_by_runner(config, store, away, job_id, "app")
    assert step.state == READY, step
    assert step.container is None and "LXD did not come back within 2s" in step.message

    result = run_on_request(config, store, lxd, db, job_id, "app")
    assert result.state == SUCCEEDED, result
    assert (module_dir / "made").exists()
    assert leftover_containers(lxd, db) == []


class LxdAwayAtTheHandBack(Lxd):
    """LXD, reached through `relay`, goes away as the first hand-back `chown` starts, and is back `after` seconds
    later: the script has ended by then, its verdict known."""

    def __init__(self, config: Any, relay_path: Path, after: float):
        self.relay = LxdRelay(relay_path)
        super().__init__(dataclasses.replace(config, endpoint=self.relay.endpoint, timeout=5.0))
        self.after = after
        self.cut = False

    def execute(self, name: str, argv: list[str], *args: Any, **kwargs: Any) -> Any:
        if argv[0] == "chown" and not self.cut:
            self.cut = True
            self.relay.stop()
            threading.Timer(self.after, self._back).start()
        return super().execute(name, argv, *args, **kwargs)

    def _back(self) -> None:
        self.relay = LxdRelay(self.relay.path)


def test_lxd_away_during_the_hand_back_hands_files_back_again_without_running_the_script_again(
    make_config: Callable[..., Config],
    store: Store,
    lxd: Lxd,
    db: Database,
    image_alias: str,
    ghost_dirs,
    lxd_cleanup,
    tmp_path: Path,
) -> None:
    """The buildpack has exited 0 when LXD goes away during the hand-back `chown`: once LXD is back, the step
    hands the files back in a new container and succeeds; the buildpack ran once (before: twice)."""
    config = make_config().with_instance_id()
    job_id = deploy_job(
        db, image_alias, [module_doc("app", "/srv/app", "echo ran >> runs; mkdir -p out; echo x > out/f")]
    )
    module_dir = working_copy(ghost_dirs["root"], "app")
    away = LxdAwayAtTheHandBack(config.lxd, tmp_path / "lxd.socket", after=2.0)

    with capture_logs() as logs:
        result = run_on_request(config, store, away, db, job_id, "app")

    assert away.cut, "the hand-back never ran"
    assert any(entry["event"] == "lxd_unavailable_step_waits" for entry in logs), "LXD never went away"
    assert result.state == SUCCEEDED, result
    assert (module_dir / "runs").read_text() == "ran\n", "the buildpack ran again after it had ended"
    assert any(entry["event"] == "deploy_script_not_run_again" for entry in logs)
    for path in (module_dir / "runs", module_dir / "out", module_dir / "out" / "f"):
        assert owner(path) == WORKING_COPY_IDS, path  # handed back in the new container
    assert leftover_containers(lxd, db) == []


def test_a_preparation_refused_for_its_input_still_fails_the_step_at_once(
    make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, lxd_cleanup
) -> None:
    """Only LXD's failures leave the step to the run: an image that does not exist fails it before Ghost asks."""
    config = make_config().with_instance_id()
    job_id = deploy_job(db, "gbp-test-deploy-no-such-image", [module_doc("app", "/srv/app", "touch made")])
    step = prepared_by_runner(config, store, lxd, job_id, "app")
    assert step.state == FAILED, step
    assert "LXD image 'gbp-test-deploy-no-such-image' does not exist on this host" in step.message


# --- refused input: nothing runs ---------------------------------------------------------

MARKER_SCRIPT = "touch /tmp/should-not-run; touch ran"


def _module(**changes: Any) -> dict[str, Any]:
    doc = module_doc("app", "/srv/app", MARKER_SCRIPT)
    doc.update(changes)
    return doc


REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "relative module path": ({"modules": [_module(path="srv/app")]}, "app.modules[0].path: must be absolute"),
    "module path /": ({"modules": [_module(path="/")]}, "app.modules[0].path: must not be '/'"),
    "module path with ..": ({"modules": [_module(path="/srv/../etc")]}, "app.modules[0].path: must not contain"),
    "module path with .": ({"modules": [_module(path="/srv/./app")]}, "app.modules[0].path: must not contain"),
    "app name with slash": ({"name": "sh/op"}, "app.name: must be a single path segment"),
    "env ..": ({"env": ".."}, "app.env: must be a single path segment"),
    "role with ..": ({"role": "../web"}, "app.role: must be a single path segment"),
    "colour escaping": ({"color": "../blue"}, "app.blue_green.color: must be a single path segment"),
    "build_pack not base64": ({"modules": [_module(build_pack="not base64 !!")]}, "build_pack: not valid base64"),
    "build_pack not UTF-8": (
        {"modules": [_module(build_pack=b64(b"echo \xff\xfe"))]},
        "build_pack: decoded script is not valid UTF-8",
    ),
    "no such module": ({"modules": [module_doc("other", "/srv/other", "true")]}, "app has no module named 'app'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_app_input_fails_before_anything_runs(
    case: str, make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, image_alias: str, ghost_dirs
) -> None:
    app_changes, expected = REFUSED[case]
    config = make_config()
    modules = app_changes.pop("modules", [_module()])
    job_id = deploy_job(db, image_alias, modules, **app_changes)
    module_dir = working_copy(ghost_dirs["root"], "app")

    for phase, body in (("prepare", deploy.prepare), ("run", run_deploy)):
        ctx = deploy_context(config, store, lxd, job_id, "app", phase)
        with pytest.raises((BadDocument, StepFailed)) as failure:
            body(ctx)
        assert expected in str(failure.value)
        store.move(ctx.step, Actor.RUNNER, FAILED, message=str(failure.value))
        back_to_pending(store, ctx.step.id)

    assert sorted(p.name for p in module_dir.iterdir()) == ["requirements.txt"]
    assert leftover_containers(lxd, db) == []


def _missing(root: Path, outside: Path) -> None:
    (root / "shop" / "prod" / "web").mkdir(parents=True)


def _a_file(root: Path, outside: Path) -> None:
    _missing(root, outside)
    (root / "shop" / "prod" / "web" / "app").write_text("not a directory")


def _symlink_outside(root: Path, outside: Path) -> None:
    _missing(root, outside)
    (root / "shop" / "prod" / "web" / "app").symlink_to(outside)


@pytest.mark.parametrize(
    ("make_copy", "expected"),
    [
        (_missing, "does not exist"),
        (_a_file, "is not a directory"),
        (_symlink_outside, "outside"),
    ],
    ids=["missing", "not a directory", "symlink outside root"],
)
def test_refused_working_copy_fails_the_run_before_anything_runs(
    make_copy: Callable[[Path, Path], None],
    expected: str,
    make_config: Callable[..., Config],
    store: Store,
    lxd: Lxd,
    db: Database,
    image_alias: str,
    ghost_dirs,
    tmp_path: Path,
) -> None:
    config = make_config()
    outside = tmp_path / "outside"
    outside.mkdir()
    make_copy(ghost_dirs["root"], outside)
    job_id = deploy_job(db, image_alias, [_module()])

    with pytest.raises(BadDocument, match="working copy") as failure:
        run_deploy(deploy_context(config, store, lxd, job_id, "app", "run"))

    assert expected in str(failure.value)
    assert list(outside.iterdir()) == []
    assert leftover_containers(lxd, db) == []
