"""Ghost 19.08's own worker, with ghost/ghost-19.08.patch applied, running deploys against a daemon on the real LXD.

Ghost's job body (`command.Command().execute`) runs in Python 2.7 as Ghost's user, as an RQ worker
runs it (tests/support/ghost_worker.py); only AWS, Redis and SSH are replaced, after the steps these
tests look at (tests/support/ghost_driver.py). Apps and jobs are written by Ghost's API code.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from bson import ObjectId
from pymongo.database import Database

from ghost_buildpackd.ghost.commands import EXIT_NO_DAEMON
from ghost_buildpackd.lxd import Lxd
from ghost_buildpackd.model import CANCELLED
from ghost_buildpackd.store import Store
from tests.conftest import WORKING_COPY_IDS, leftover_containers, raw_config, remove_job_images
from tests.support.daemon import DaemonProcess
from tests.support.ghost import b64
from tests.support.ghost_worker import (
    GHOST_DATABASE,
    GHOST_IDS,
    GhostJobRun,
    GhostUnavailable,
    GhostWorker,
    ghost_config,
    ghost_runtime,
    ghost_sources,
    patched_ghost_tree,
)
from tests.support.mongo import MongoServer, StandaloneMongo
from tests.support.waiting import wait_until

# Each test runs on the suite's one-node replica set (the daemon on change streams) and on its standalone
# server (the daemon polling, as with Ghost's docker-compose). Ghost reaches either at MONGO_HOST, the
# server's own loopback address, on the port Ghost hard-codes (27017).
pytestmark = [pytest.mark.slow, pytest.mark.parametrize("mongo", ["replica_set", "standalone"], indirect=True)]


@pytest.fixture
def ghost_mongo(mongo: MongoServer) -> MongoServer:
    if f"{mongo.host}:27017" not in mongo.uri:
        pytest.skip(f"Ghost 19.08 reaches MongoDB on port 27017 only; this run's is {mongo.describe()}")
    return mongo


@pytest.fixture(scope="session")
def ghost_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ghost's tree with the patch applied, once per session (each run copies it with its config.yml)."""
    try:
        ghost_runtime()
        sources = ghost_sources()
    except GhostUnavailable as missing:
        pytest.skip(str(missing))
    return patched_ghost_tree(sources, tmp_path_factory.mktemp("ghost-tree") / "cloud-deploy")


@pytest.fixture
def apitest(ghost_mongo: MongoServer) -> Iterator[Database]:
    """Ghost's database (its name is hard-coded), empty for each test; the daemon uses it too."""
    client = ghost_mongo.client()
    client.drop_database(GHOST_DATABASE)
    yield client[GHOST_DATABASE]
    client.drop_database(GHOST_DATABASE)
    client.close()


@pytest.fixture
def ghost_config_changes() -> dict[str, Any]:
    """Keys of Ghost's config.yml this test changes; a test parametrizes this name to set its own."""
    return {}


@pytest.fixture
def ghost_daemon_config(
    ghost_mongo: MongoServer,
    apitest: Database,
    ghost_dirs: dict[str, Path],
    ghost_config_changes: dict[str, Any],
    tmp_path: Path,
) -> Path:
    """The daemon's config (the command reads it through GHOST_BUILDPACKD_CONFIG), on Ghost's database.

    Its `ghost.config` is a copy of the config.yml Ghost's worker reads, as both read one file in production.
    """
    (ghost_dirs["root"].parent / "ghost-config.yml").write_text(yaml.safe_dump(ghost_config(**ghost_config_changes)))
    path = tmp_path / "daemon.yml"
    path.write_text(yaml.safe_dump(raw_config(ghost_mongo, apitest, ghost_dirs)))
    return path


@pytest.fixture
def ghost(
    ghost_tree: Path,
    ghost_mongo: MongoServer,
    apitest: Database,
    ghost_dirs: dict[str, Path],
    ghost_daemon_config: Path,
    ghost_config_changes: dict[str, Any],
    tmp_path: Path,
) -> GhostWorker:
    """Runs Ghost jobs of this test: `ghost.run(job_id)` gives the exit code, the job and its log."""
    return GhostWorker(
        runtime=ghost_runtime(),
        tree=ghost_tree,
        work=tmp_path / "ghost-worker",
        ghost_root=ghost_dirs["root"],
        log_dir=ghost_dirs["log_dir"],
        mongo_host=ghost_mongo.host,
        database=apitest,
        daemon_config=ghost_daemon_config,
        config=ghost_config_changes,
        packer=ghost_dirs["packer_dir"],
    )


@pytest.fixture
def ghost_lxd_cleanup(lxd: Lxd, apitest: Database) -> Iterator[None]:
    """What this test's Ghost jobs left in LXD if it failed half-way (found by job id in Ghost's database)."""
    yield
    for name in leftover_containers(lxd, apitest):
        lxd.delete_container(name)
    remove_job_images(lxd, apitest)


@pytest.fixture
def daemon(ghost_daemon_config: Path, tmp_path: Path, ghost_lxd_cleanup: None) -> Iterator[DaemonProcess]:
    with DaemonProcess(ghost_daemon_config, tmp_path / "daemon.log") as process:
        process.wait_ready()
        yield process


@pytest.fixture
def git_repo(tmp_path: Path, ghost_dirs: dict[str, Path]) -> Callable[..., str]:
    """A bare git repository holding `files` on branch main, readable by Ghost's user; returns its path."""

    def make(name: str = "app", files: dict[str, str] | None = None) -> str:
        work = tmp_path / "sources" / name
        work.mkdir(parents=True)
        for relative, text in (files or {"README": "hello\n"}).items():
            (work / relative).write_text(text)
        git = ["git", "-c", "user.name=Tester", "-c", "user.email=tester@example.invalid"]
        subprocess.run([*git, "init", "-q", "-b", "main"], cwd=work, check=True)
        subprocess.run([*git, "add", "."], cwd=work, check=True)
        subprocess.run([*git, "commit", "-q", "-m", "first"], cwd=work, check=True)
        bare = tmp_path / "repos" / f"{name}.git"
        subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
        subprocess.run(["chown", "-R", "{}:{}".format(*GHOST_IDS), str(bare)], check=True)
        return str(bare)

    return make


def ghost_app(git_repo: str, build_pack: str, source_container_image: str | None = None, **fields: Any) -> dict:
    """An app as Ghost's UI posts it (scripts base64)."""
    build_infos: dict[str, Any] = {"source_ami": "ami-0base", "subnet_id": "subnet-0test", "ssh_username": "admin"}
    if source_container_image is not None:
        build_infos["source_container_image"] = source_container_image
    build_infos.update(fields.pop("build_infos", {}))
    return {
        "name": "shop",
        "env": "prod",
        "role": "web",
        "region": "eu-west-1",
        "provider": "aws",
        "instance_type": "t2.micro",
        "vpc_id": "vpc-0test",
        "build_infos": build_infos,
        "env_vars": [{"var_key": "SHOP_MODE", "var_value": "test"}],
        "features": [],
        "lifecycle_hooks": {"pre_buildimage": "", "post_buildimage": ""},
        "autoscale": {"name": ""},
        "environment_infos": {"instance_tags": []},
        "modules": [
            {
                "name": "app",
                "path": "/srv/app",
                "scope": "code",
                "git_repo": git_repo,
                "uid": WORKING_COPY_IDS[0],
                "gid": WORKING_COPY_IDS[1],
                "build_pack": b64(build_pack),
            }
        ],
        **fields,
    }


def deploy(ghost: GhostWorker, app: dict[str, Any] | ObjectId) -> GhostJobRun:
    app_id = app if isinstance(app, ObjectId) else ghost.insert_app(app)
    return timed_run(ghost, ghost.insert_job(app_id, "deploy", modules=[{"name": "app"}]))


def timed_run(ghost: GhostWorker, job_id: ObjectId) -> GhostJobRun:
    started = time.monotonic()
    run = ghost.run(job_id)
    print(f"Ghost job {job_id}: {run.job.get('status')} in {time.monotonic() - started:.1f}s")
    return run


def outcome_lines(log: str, script: str) -> list[str]:
    """The command's one line per run of `script`, as Ghost's gcall wrote it into the job log."""
    return [line for line in log.splitlines() if line.startswith(f"ghost-buildpackd: {script} of module ")]


def working_copy(ghost_dirs: dict[str, Path]) -> Path:
    return ghost_dirs["root"] / "shop" / "prod" / "web" / "app"


def owner(path: Path) -> tuple[int, int]:
    return path.stat().st_uid, path.stat().st_gid


def container_steps(ghost: GhostWorker, job_id: ObjectId) -> list[dict[str, Any]]:
    """The daemon's step records for a Ghost job."""
    return list(ghost.db.container_steps.find({"job_id": job_id}))


def held_for_the_daemon(gate: Path, script: str) -> str:
    """`script` after a wait (at most 60 s) for `gate`, so the job stays `started` until the daemon has read it:
    in poll mode a job done in a second may otherwise first be read once it has ended, with nothing to decide."""
    return f"for _ in $(seq 1200); do [ -e {gate} ] && break; sleep 0.05; done\n{script}"


def deploy_read_by_the_daemon(
    ghost: GhostWorker, daemon: DaemonProcess, app: dict[str, Any], gate: Path
) -> tuple[GhostJobRun, dict[str, Any]]:
    """Run a deploy whose build_pack is `held_for_the_daemon(gate, ...)`; the gate opens once the daemon has
    decided the started job. Returns the run and that decision's log line."""
    job_id = ghost.insert_job(ghost.insert_app(app), "deploy", modules=[{"name": "app"}])
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(timed_run, ghost, job_id)
        try:
            decided = wait_until(
                lambda: daemon.saw("deploy_without_containers", job_id=str(job_id)),
                60,
                "the daemon's reading of the started job",
            )
        finally:
            gate.touch()
        return running.result(), decided


def assert_ran_on_ghosts_host(ghost: GhostWorker, run: GhostJobRun, decided: dict[str, Any], reason: str) -> None:
    """Ghost ran build_pack with bash itself, and the daemon, having read the same job, made no step, for `reason`."""
    assert run.job["status"] == "done", run.log
    assert "Buildpack: Execute" in run.log and "Execute in a container" not in run.log, run.log
    assert outcome_lines(run.log, "build_pack") == []
    assert reason in decided["reason"], decided
    assert container_steps(ghost, run.job["_id"]) == []


def test_ghost_writes_apps_and_jobs_as_its_api_does(ghost: GhostWorker, git_repo: Callable[..., str]) -> None:
    app_id = ghost.insert_app(ghost_app(git_repo(), "true"))
    job_id = ghost.insert_job(app_id, "deploy", modules=[{"name": "app"}])
    app = ghost.db.apps.find_one({"_id": app_id})
    job = ghost.db.jobs.find_one({"_id": job_id})
    assert app is not None and job is not None
    assert app["modules"][0]["initialized"] is False
    assert {change["field"] for change in app["pending_changes"]} >= {"modules", "build_infos"}
    assert app["environment_infos"]["instance_tags"] == [{"tag_name": "Name", "tag_value": "ec2.prod.web.shop"}]
    assert {"_created", "_updated", "_etag"} <= app.keys()
    assert (job["status"], job["message"], job["instance_type"]) == ("init", "Initializing job", "t2.micro")
    assert job["modules"] == [{"name": "app", "rev": "HEAD"}]
    assert job["app_id"] == app_id


def test_a_deploy_without_a_source_image_runs_the_buildpack_with_bash_on_ghosts_host(
    ghost: GhostWorker, git_repo: Callable[..., str], ghost_dirs: dict[str, Path]
) -> None:
    buildpack = 'echo "buildpack as $(id -u):$(id -g) groups $(id -G) mode $SHOP_MODE ld ${LD_LIBRARY_PATH-unset}"\n'
    run = deploy(ghost, ghost_app(git_repo(), buildpack + "touch built\n"))
    assert run.exit_code == 0, run.output + run.log
    assert run.job["status"] == "done", run.log
    assert run.job["message"].startswith("Deployment OK: [app: ")
    assert "buildpack as 1001:1002 groups 1002 mode test ld unset" in run.log
    assert "Buildpack: Execute" in run.log and "Execute in a container" not in run.log
    assert (working_copy(ghost_dirs) / "built").exists()
    assert (working_copy(ghost_dirs) / "README").read_text() == "hello\n"
    # Packaging and the manifest went to the (local) S3 bucket, then the stand-in for SSH.
    assert "Uploading package: " in run.log and "not sent to instances" in run.log
    assert ghost.db.deploy_histories.count_documents({"job_id": run.job["_id"]}) == 1


def test_a_deploy_with_a_source_image_runs_the_buildpack_in_a_container_through_the_daemon(
    ghost: GhostWorker,
    git_repo: Callable[..., str],
    ghost_dirs: dict[str, Path],
    daemon: DaemonProcess,
    image_alias: str,
    base_image: str,
) -> None:
    # The daemon masks env_vars values in logs: the script checks SHOP_MODE itself.
    buildpack = '[ "$SHOP_MODE" = test ] && echo "in-container-$GHOST_MODULE_NAME-mode-ok"; touch built-in-container\n'
    app = ghost_app(git_repo(), buildpack, base_image, build_infos={"container_image": image_alias})
    run = deploy(ghost, app)
    assert run.exit_code == 0, run.output + run.log
    assert run.job["status"] == "done", run.log
    assert "Buildpack: Execute in a container" in run.log
    assert run.log.count("in-container-app-mode-ok") == 1, run.log
    assert "ghost-buildpackd: build_pack of module app: succeeded in a container, exit 0" in run.log
    assert [step["state"] for step in container_steps(ghost, run.job["_id"])] == ["succeeded"]
    built = working_copy(ghost_dirs) / "built-in-container"
    assert (built.stat().st_uid, built.stat().st_gid) == WORKING_COPY_IDS
    assert ghost.db.deploy_histories.count_documents({"job_id": run.job["_id"]}) == 1


@pytest.mark.parametrize("source_container_image", ["", "None"])  # UI: "Don't use containers"; selector hidden
def test_an_app_using_no_container_runs_its_buildpack_with_bash_on_ghosts_host(
    ghost: GhostWorker,
    git_repo: Callable[..., str],
    ghost_dirs: dict[str, Path],
    daemon: DaemonProcess,
    image_alias: str,
    source_container_image: str,
) -> None:
    gate = ghost_dirs["root"].parent / "daemon-read-the-job"
    buildpack = held_for_the_daemon(gate, "echo on-the-host-as-$(id -u); touch built-on-host\n")
    app = ghost_app(git_repo(), buildpack, source_container_image, build_infos={"container_image": image_alias})
    run, decided = deploy_read_by_the_daemon(ghost, daemon, app, gate)
    assert_ran_on_ghosts_host(ghost, run, decided, "source_container_image is not set")
    assert run.log.count("on-the-host-as-1001") == 1, run.log
    assert owner(working_copy(ghost_dirs) / "built-on-host") == WORKING_COPY_IDS


@pytest.mark.parametrize("ghost_config_changes", [{"container": {"enabled": False, "endpoint": "localhost"}}])
def test_containers_disabled_in_ghosts_config_run_the_buildpack_on_ghosts_host(
    ghost: GhostWorker,
    git_repo: Callable[..., str],
    ghost_dirs: dict[str, Path],
    daemon: DaemonProcess,
    image_alias: str,
    base_image: str,
) -> None:
    gate = ghost_dirs["root"].parent / "daemon-read-the-job"
    buildpack = held_for_the_daemon(gate, "echo on-the-host\n")
    app = ghost_app(git_repo(), buildpack, base_image, build_infos={"container_image": image_alias})
    run, decided = deploy_read_by_the_daemon(ghost, daemon, app, gate)
    assert_ran_on_ghosts_host(ghost, run, decided, "container.enabled is not true in Ghost's config.yml")
    assert run.log.count("on-the-host") == 1, run.log


def test_an_app_without_a_built_container_image_runs_on_ghosts_host_and_says_why(
    ghost: GhostWorker,
    git_repo: Callable[..., str],
    ghost_dirs: dict[str, Path],
    daemon: DaemonProcess,
    base_image: str,
) -> None:
    gate = ghost_dirs["root"].parent / "daemon-read-the-job"
    app = ghost_app(git_repo(), held_for_the_daemon(gate, "echo on-the-host\n"), base_image)
    run, decided = deploy_read_by_the_daemon(ghost, daemon, app, gate)
    assert_ran_on_ghosts_host(ghost, run, decided, "container_image is not set")
    why = [line for line in run.log.splitlines() if "runs on this host" in line]
    assert len(why) == 1, run.log
    assert why[0].endswith(
        "Buildpack: runs on this host: the app has no container image yet (build_infos.container_image); "
        "a successful buildimage builds one, and later deploys run it in a container"
    ), why


def test_files_a_container_buildpack_gives_another_user_do_not_stop_ghosts_next_deploy(
    ghost: GhostWorker,
    git_repo: Callable[..., str],
    ghost_dirs: dict[str, Path],
    daemon: DaemonProcess,
    image_alias: str,
    base_image: str,
) -> None:
    buildpack = "mkdir -p d/e && touch d/e/f owned && chown -R 33:33 d && chown 33:33 owned\n"
    app_id = ghost.insert_app(
        ghost_app(git_repo(), buildpack, base_image, build_infos={"container_image": image_alias})
    )
    first = deploy(ghost, app_id)
    assert first.job["status"] == "done", first.log
    copy = working_copy(ghost_dirs)
    owners = {owner(path) for path in (copy / "d", copy / "d" / "e", copy / "d" / "e" / "f", copy / "owned")}
    # Ghost's own `chmod -R u+rwx` and `rm -rf` of the previous clone, as its user, before the next clone.
    again = deploy(ghost, app_id)
    assert again.job["status"] == "done", again.log
    assert "Removing previous clone" in again.log
    assert owners == {WORKING_COPY_IDS}


def test_an_empty_stored_build_pack_runs_the_committed_file_in_the_container(
    ghost: GhostWorker, git_repo: Callable[..., str], daemon: DaemonProcess, image_alias: str, base_image: str
) -> None:
    repo = git_repo(files={"README": "hello\n", "build_pack": "echo from-the-committed-file\n"})
    app = ghost_app(repo, "", base_image, build_infos={"container_image": image_alias})
    assert app["modules"][0]["build_pack"] == ""
    run = deploy(ghost, app)
    assert run.job["status"] == "done", run.log
    assert outcome_lines(run.log, "build_pack") == [
        "ghost-buildpackd: build_pack of module app: succeeded in a container, exit 0"
    ]
    assert run.log.count("from-the-committed-file") == 1, run.log


def test_stdout_and_stderr_of_a_container_buildpack_keep_their_order_in_ghosts_job_log(
    ghost: GhostWorker, git_repo: Callable[..., str], daemon: DaemonProcess, image_alias: str, base_image: str
) -> None:
    buildpack = "for i in 1 2 3; do echo line-out-$i; echo line-err-$i >&2; done\n"
    run = deploy(ghost, ghost_app(git_repo(), buildpack, base_image, build_infos={"container_image": image_alias}))
    assert run.job["status"] == "done", run.log
    shown = [line.split("line-")[1] for line in run.log.splitlines() if "line-" in line]
    assert shown == ["out-1", "err-1", "out-2", "err-2", "out-3", "err-3"], run.log


def test_a_failing_buildpack_in_a_container_fails_ghosts_job_with_its_exit_code(
    ghost: GhostWorker,
    git_repo: Callable[..., str],
    daemon: DaemonProcess,
    image_alias: str,
    base_image: str,
) -> None:
    buildpack = "echo about-to-fail; exit 7\n"
    app = ghost_app(git_repo(), buildpack, base_image, build_infos={"container_image": image_alias})
    run = deploy(ghost, app)
    assert run.exit_code == 0, run.output  # Ghost's deploy catches the GCallException itself
    assert run.job["status"] == "failed", run.log
    assert run.job["message"] == "Deployment Failed: [app] 'ERROR: Buildpack: Execute in a container'"
    assert "about-to-fail" in run.log
    assert "script failed" in run.log and "exit 7" in run.log
    assert ghost.db.deploy_histories.count_documents({}) == 0


def test_without_a_live_daemon_the_command_exits_69_and_ghosts_job_fails(
    ghost: GhostWorker, git_repo: Callable[..., str], image_alias: str, base_image: str
) -> None:
    app = ghost_app(git_repo(), "touch never\n", base_image, build_infos={"container_image": image_alias})
    run = deploy(ghost, app)
    assert run.job["status"] == "failed", run.log
    assert run.job["message"] == "Deployment Failed: [app] 'ERROR: Buildpack: Execute in a container'"
    (outcome,) = outcome_lines(run.log, "build_pack")
    assert "no live daemon on this host" in outcome and outcome.endswith(f", exit {EXIT_NO_DAEMON}"), outcome
    assert not (Path(ghost.ghost_root) / "shop" / "prod" / "web" / "app" / "never").exists()


def test_a_deploy_failing_within_a_second_of_its_start_leaves_its_step_cancelled_and_no_container(
    mongo: MongoServer,
    ghost: GhostWorker,
    ghost_daemon_config: Path,
    ghost_lxd_cleanup: None,
    lxd: Lxd,
    image_alias: str,
    base_image: str,
    tmp_path: Path,
) -> None:
    """Ghost fails the deploy at its clone (no such repository) while the daemon launches the module's container
    ahead: the job's end wins. The daemon runs with the production lease (renewed every 10 s, longer than the
    preparation) and no safety scan within the test, so only the job's end itself can end the step."""
    raw = yaml.safe_load(ghost_daemon_config.read_text())
    raw["lease_ttl"] = "30s"
    raw.setdefault("events", {})["rescan_interval"] = "1h"
    ghost_daemon_config.write_text(yaml.safe_dump(raw))
    with DaemonProcess(ghost_daemon_config, tmp_path / "daemon.log") as process:
        process.wait_ready()
        app = ghost_app(
            str(tmp_path / "no-such-repo.git"),
            "touch never\n",
            base_image,
            build_infos={"container_image": image_alias},
        )
        run = deploy(ghost, app)
        job_id = run.job["_id"]
        assert run.job["status"] == "failed", run.output + run.log
        polling = isinstance(mongo, StandaloneMongo)
        if polling:
            # Polling may read the job only once it has failed: then no step is made at all, which is as good.
            # Wait until a poll has read the job as it ended (the high-water mark reached its last write).
            ended_at = ghost.db.jobs.find_one({"_id": job_id})["_updated"]
            wait_until(
                lambda: (mark := Store(ghost.db).load_checkpoint().poll_high_water) and mark >= ended_at,
                60,
                "a poll to read the ended job",
            )
            # A step made from an earlier poll may still be held by its preparation: asked to cancel, its holder
            # ends it when the launch returns.
            wait_until(
                lambda: [s["state"] for s in container_steps(ghost, job_id)] in ([], ["cancelled"]),
                60,
                "no step, or the step cancelled",
            )
        else:
            wait_until(
                lambda: [s["state"] for s in container_steps(ghost, job_id)] == ["cancelled"],
                60,
                "the step to be cancelled",
            )
        steps = container_steps(ghost, job_id)
        if steps or not polling:
            (step,) = steps
            assert step["message"] == "deploy job ended (failed), before the script ran"
            assert process.saw("container_creating", job_id=str(job_id)), "the container was not launched ahead"
        wait_until(lambda: leftover_containers(lxd, ghost.db) == [], 60, "the prepared container to be removed")
        assert process.alive()


def test_a_committed_build_pack_file_wins_over_the_stored_script_in_the_container(
    ghost: GhostWorker, git_repo: Callable[..., str], daemon: DaemonProcess, image_alias: str, base_image: str
) -> None:
    repo = git_repo(files={"README": "hello\n", "build_pack": "echo from-the-committed-file\n"})
    app = ghost_app(repo, "echo from-the-stored-script\n", base_image, build_infos={"container_image": image_alias})
    run = deploy(ghost, app)
    assert run.job["status"] == "done", run.log
    assert run.log.count("from-the-committed-file") == 1, run.log
    assert "from-the-stored-script" not in run.log
    # Ghost's `rm -vf` after the script, done by the client once the outcome is recorded: not packaged.
    assert "build_pack removed from the working copy, as Ghost does once it ran" in run.log
    assert not (Path(ghost.ghost_root) / "shop" / "prod" / "web" / "app" / "build_pack").exists()


def test_after_all_deploy_runs_in_a_container_and_a_redeploy_runs_none(
    ghost: GhostWorker, git_repo: Callable[..., str], daemon: DaemonProcess, image_alias: str, base_image: str
) -> None:
    app = ghost_app(git_repo(), "echo building\n", base_image, build_infos={"container_image": image_alias})
    app["modules"][0]["after_all_deploy"] = b64("echo after-all-deploy-ran; touch after-all-deploy-ran\n")
    app_id = ghost.insert_app(app)
    first = deploy(ghost, app_id)
    assert first.job["status"] == "done", first.log
    assert outcome_lines(first.log, "after_all_deploy") == [
        "ghost-buildpackd: after_all_deploy of module app: succeeded in a container, exit 0"
    ]
    assert first.log.count("after-all-deploy-ran") == 1, first.log
    assert first.log.index("not sent to instances") < first.log.index("after-all-deploy-ran")

    # Ghost's redeploy builds its module as {path, name}: no after_all_deploy there, nothing asked of the daemon.
    deploy_id = str(first.job["modules"][0]["deploy_id"])
    again = timed_run(ghost, ghost.insert_job(app_id, "redeploy", options=[deploy_id, "serial"]))
    assert again.job["status"] == "done", again.log
    assert again.job["message"] == f"Redeploy OK: [{deploy_id}]"
    assert "Extracting package: " in again.log
    assert outcome_lines(again.log, "after_all_deploy") == []
    assert "after-all-deploy-ran" not in again.log


def test_a_blue_green_app_builds_in_its_colours_working_copy(
    ghost: GhostWorker,
    git_repo: Callable[..., str],
    ghost_dirs: dict[str, Path],
    daemon: DaemonProcess,
    image_alias: str,
    base_image: str,
) -> None:
    buildpack = "echo colour-$GHOST_ENV_COLOR; touch built-blue\n"
    app = ghost_app(git_repo(), buildpack, base_image, build_infos={"container_image": image_alias})
    app["blue_green"] = {"color": "blue", "is_online": False, "enable_blue_green": True}
    run = deploy(ghost, app)
    assert run.job["status"] == "done", run.log
    assert run.log.count("colour-blue") == 1, run.log
    built = ghost_dirs["root"] / "shop" / "prod" / "web" / "blue" / "app" / "built-blue"
    assert (built.stat().st_uid, built.stat().st_gid) == WORKING_COPY_IDS


def buildimage_job(ghost: GhostWorker, repo: str, base_image: str, pre_hook: str) -> tuple[ObjectId, ObjectId]:
    """An app with `pre_hook` and an autoscaling group, and its buildimage job (as Ghost's UI posts them)."""
    app = ghost_app(repo, "true\n", base_image)
    app["lifecycle_hooks"] = {"pre_buildimage": b64(pre_hook), "post_buildimage": ""}
    app["autoscale"] = {"name": "shop-asg"}
    app_id = ghost.insert_app(app)
    return app_id, ghost.insert_job(app_id, "buildimage", options=["True"])


def test_a_buildimage_job_builds_the_container_image_inside_itself_as_19_08_did(
    ghost: GhostWorker, git_repo: Callable[..., str], daemon: DaemonProcess, lxd: Lxd, base_image: str
) -> None:
    app_id, job_id = buildimage_job(ghost, git_repo(), base_image, "echo pre-hook-ran\n")
    run = timed_run(ghost, job_id)
    assert run.exit_code == 0, run.output + run.log
    assert (run.job["status"], run.job["message"]) == ("done", "Build image OK: [ami-0123abcd]"), run.log
    assert ghost.db.apps.find_one({"_id": app_id})["ami"] == "ami-0123abcd"
    # Inside the job, its output in the job's own log, before the job's end (built while Packer ran, or after
    # the AMI as 19.08 built it when Packer was quicker than the start of the build); the app points at the
    # image before Ghost writes `done`.
    assert "Generating a new container" in run.log
    assert run.log.index("pre-hook-ran") < run.log.index("autoscaling group shop-asg not updated")
    assert (
        run.log.index("Generating a new container")
        < run.log.index(f"container image {job_id} published")
        < run.log.index("autoscaling group shop-asg not updated")
    )
    assert run.log.count("pre-hook-ran") == 1, run.log
    assert ghost.db.apps.find_one({"_id": app_id})["build_infos"]["container_image"] == str(job_id)
    assert lxd.image_by_alias(str(job_id)) is not None


def test_the_container_build_runs_while_packer_runs_and_the_ami_only_publishes_it(
    ghost: GhostWorker, git_repo: Callable[..., str], daemon: DaemonProcess, lxd: Lxd, base_image: str
) -> None:
    app_id, job_id = buildimage_job(ghost, git_repo(), base_image, "echo pre-hook-ran\n")
    ghost.packer_seconds = 20  # Packer's run, longer than the container build
    run = timed_run(ghost, job_id)
    assert run.exit_code == 0, run.output + run.log
    assert (run.job["status"], run.job["message"]) == ("done", "Build image OK: [ami-0123abcd]"), run.log
    # Built once, while Packer ran; after the AMI only published, before the autoscaling update.
    assert run.log.count("pre-hook-ran") == 1, run.log
    assert run.log.index("pre-hook-ran") < run.log.index("Generating a new container"), run.log
    assert (
        run.log.index("Generating a new container")
        < run.log.index("was built ahead of the AMI: publishing it")
        < run.log.index("autoscaling group shop-asg not updated")
    ), run.log
    assert ghost.db.apps.find_one({"_id": app_id})["build_infos"]["container_image"] == str(job_id)
    assert lxd.image_by_alias(str(job_id)) is not None


def test_a_failed_container_build_fails_the_buildimage_job_before_the_autoscaling_update(
    ghost: GhostWorker, git_repo: Callable[..., str], daemon: DaemonProcess, base_image: str
) -> None:
    app_id, job_id = buildimage_job(ghost, git_repo(), base_image, "echo hook-failing; exit 3\n")
    run = timed_run(ghost, job_id)
    assert run.job["status"] == "failed", run.log
    assert run.job["message"].startswith("An error occured during container process"), run.job
    assert "hook-failing" in run.log
    assert "autoscaling group" not in run.log  # 19.08 returned before the autoscaling update
    assert "container_image" not in ghost.db.apps.find_one({"_id": app_id})["build_infos"]


def test_ghosts_own_job_timeout_fails_a_job_whose_buildpack_overruns(
    ghost: GhostWorker, git_repo: Callable[..., str]
) -> None:
    """rq's death penalty, as Ghost's worker wraps each job, with `rq_worker_job_timeout` from Ghost's config.yml."""
    app_id = ghost.insert_app(ghost_app(git_repo(), "echo overrunning; sleep 6\n"))
    job_id = ghost.insert_job(app_id, "deploy", modules=[{"name": "app"}])
    run = ghost.run(job_id, rq_worker_job_timeout=2)
    assert run.exit_code == 1, run.output  # the job body raised, as rq's worker would see it
    assert "JobTimeoutException" in run.output
    assert run.job["status"] == "failed" and "JobTimeoutException" in run.job["message"], run.job
    assert "overrunning" in run.log


OVERRUNNING = "echo overrunning-in-container; sleep 300\n"


@pytest.mark.parametrize("ghost_config_changes", [{"rq_worker_job_timeout": 30}])
def test_the_commands_wait_ends_within_ghosts_rq_job_timeout(
    ghost: GhostWorker, git_repo: Callable[..., str], daemon: DaemonProcess, image_alias: str, base_image: str
) -> None:
    """The daemon reads rq_worker_job_timeout from Ghost's config.yml: the command gives up first, and says why."""
    started = time.monotonic()
    run = deploy(ghost, ghost_app(git_repo(), OVERRUNNING, base_image, build_infos={"container_image": image_alias}))
    assert time.monotonic() - started < 30, run.log
    assert run.job["status"] == "failed", run.log
    assert run.job["message"] == "Deployment Failed: [app] 'ERROR: Buildpack: Execute in a container'"
    assert "overrunning-in-container" in run.log
    (outcome,) = outcome_lines(run.log, "build_pack")
    assert re.search(
        r": timed out: abandoned by Ghost's client after waiting \S+ for the outcome, "
        r"while the script was running \(stopped\), exit 67$",
        outcome,
    ), outcome


def test_a_deploy_killed_at_ghosts_rq_timeout_stops_its_running_container_script_saying_so(
    ghost: GhostWorker, git_repo: Callable[..., str], daemon: DaemonProcess, image_alias: str, base_image: str
) -> None:
    """Ghost's worker alone times out first (here only its config.yml is lowered, as if the daemon's own
    buildpack.timeout were raised past it): the job fails as rq ends it, and the daemon stops the script."""
    app = ghost_app(git_repo(), OVERRUNNING, base_image, build_infos={"container_image": image_alias})
    job_id = ghost.insert_job(ghost.insert_app(app), "deploy", modules=[{"name": "app"}])
    run = ghost.run(job_id, rq_worker_job_timeout=20)
    assert run.job["status"] == "failed" and "JobTimeoutException" in run.job["message"], run.job
    assert "overrunning-in-container" in run.log
    (step,) = wait_until(
        lambda: [s for s in container_steps(ghost, job_id) if s["state"] == CANCELLED],
        60,
        "the daemon's cancellation of the step",
    )
    assert step["message"] == (
        "deploy job ended (failed) at Ghost's RQ job timeout (rq_worker_job_timeout killed it), "
        "while the script was running (stopped)"
    ), step
