"""Reliability: secrets masked whole, provisioner trees checked, deadlines on probes and LXD operations."""

from __future__ import annotations

import base64
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pymongo.database import Database
from structlog.testing import capture_logs

from ghost_buildpackd.config import Config, LxdConfig
from ghost_buildpackd.ghost.client import run_buildpack
from ghost_buildpackd.joblog import JobLog, OutputCollector
from ghost_buildpackd.logs import Secrets
from ghost_buildpackd.lxd import ContainerSpec, Lxd, LxdError
from ghost_buildpackd.model import FAILED, READY, SUCCEEDED, step_id
from ghost_buildpackd.steps import StepFailed, deploy
from ghost_buildpackd.store import Store
from tests.conftest import WORKING_COPY_IDS, leftover_containers
from tests.support.ghost import finish_buildimage, make_app, make_job, module_doc, set_status
from tests.support.steps import deploy_context, state_of, terminal_step
from tests.support.waiting import wait_until
from tests.test_buildimage import assert_nothing_published, build, buildimage_job, fail, salt_tree
from tests.test_buildimage import config as buildimage_config  # noqa: F401  (a fixture)
from tests.test_deploy import job_log, prepare_ready, run_deploy
from tests.test_faults import assert_nothing_left, buildimage_app, daemons, deploy_app, features_config  # noqa: F401  (daemons is a fixture)
from tests.test_faults import buildimage_job as faults_buildimage_job
from tests.test_faults import working_copy as faults_working_copy


def pem_key(seed: int) -> str:
    """A PEM-shaped multi-line secret: 64-character base64 lines between the armour lines."""
    body = base64.b64encode(bytes((seed * 7 + i * 13) % 256 for i in range(640))).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join(["-----BEGIN PRIVATE KEY-----", *lines, "-----END PRIVATE KEY-----"])


def key_lines(key: str) -> list[str]:
    return key.splitlines()


# --- masking ------------------------------------------------------------------------------


class _Silent:
    def info(self, *_args: object, **_fields: object) -> None:
        pass

    warning = debug = info

    def bind(self, **_fields: object) -> _Silent:
        return self


def test_every_line_of_a_multi_line_secret_is_masked_in_a_log_string() -> None:
    key = pem_key(1)
    with Secrets.registered([key]):
        masked = Secrets.redact(f"error: {key}\nlater, line 3 alone: {key_lines(key)[3]}")
    assert all(line not in masked for line in key_lines(key)), masked
    assert masked.startswith("error: ***") and masked.endswith("line 3 alone: ***")


def test_a_secret_across_the_forced_split_of_a_long_line_is_masked(tmp_path: Path) -> None:
    key = pem_key(2)
    secret_line = key_lines(key)[2]
    # A line with no newline past the forced-split length, with a secret line where the split falls.
    data = b"x" * ((64 << 10) - 20) + secret_line.encode() + b"y" * 100 + b"\n"
    job_log_ = JobLog(tmp_path, "job", "test")
    with Secrets.registered([key]):
        for cut in (len(data) - 150, (64 << 10) - 10, (64 << 10) + 5):  # chunk ends inside the secret, after it
            collector = OutputCollector(job_log_, _Silent(), 1 << 30, 1 << 20)
            collector(data[:cut])
            collector(data[cut:])
            collector.finish()
    written = job_log_.path.read_text()
    assert secret_line not in written.replace("\n", "").replace("[test] ", "")
    assert written.count("***") == 3


def test_a_multi_line_secret_is_masked_in_the_job_log_and_the_structured_log_of_a_real_step(
    make_config: Callable[..., Config],
    store: Store,
    lxd: Lxd,
    db: Database,
    image_alias: str,
    ghost_dirs: dict[str, Path],
    lxd_cleanup: None,
) -> None:
    key = pem_key(3)
    build_pack = """echo "the key: $TLS_KEY"
printf '%s' "$(head -c 65500 /dev/zero | tr '\\0' x)"; echo "$TLS_KEY" | tr -d '\\n'; echo
echo buildpack-done
"""
    env_vars = [{"var_key": "TLS_KEY", "var_value": key}]
    app_id = make_app(db, container_image=image_alias, modules=[module_doc("app", "/srv/app", build_pack)],
                      env_vars=env_vars)  # fmt: skip
    job_id = make_job(db, app_id, command="deploy", status="started", modules=["app"])
    module_dir = ghost_dirs["root"] / "shop" / "prod" / "web" / "app"
    module_dir.mkdir(parents=True)
    os.chown(module_dir, *WORKING_COPY_IDS)

    with capture_logs() as events:
        outcome = run_deploy(deploy_context(make_config(), store, lxd, job_id, "app", "run"))

    assert outcome.state == SUCCEEDED, outcome
    text = job_log(make_config(), job_id)
    assert "the key: ***" in text and "buildpack-done" in text
    logged = repr(events)
    glued = text.replace("\n", "")  # a forced split must not leave a secret in two halves either
    for line in key_lines(key):
        assert line not in text and line not in glued and line not in logged, line
        assert line not in outcome.output_tail
    assert leftover_containers(lxd, db) == []


# --- provisioner trees --------------------------------------------------------------------


def _symlinked_tree(tree: Path, top: Path) -> None:
    real = top.parent / "elsewhere"
    tree.rename(real)
    tree.symlink_to(real)


def _symlinked_top(tree: Path, top: Path) -> None:
    real = top.parent / "real-provisioner-tree"
    top.rename(real)
    top.symlink_to(real)


def _world_writable_tree(tree: Path, top: Path) -> None:
    tree.chmod(0o777)


def _group_writable_top(tree: Path, top: Path) -> None:
    top.chmod(0o775)


def _foreign_owner(tree: Path, top: Path) -> None:
    os.chown(tree, 4242, 4242)


UNSAFE_TREES = {
    "the tree is a symlink": (_symlinked_tree, "is a symlink (LXD would follow it as root)"),
    "ghost.provisioner_tree is a symlink": (_symlinked_top, "is a symlink"),
    "the tree is world-writable": (_world_writable_tree, "writable by its group or by others (mode 0777)"),
    "ghost.provisioner_tree is group-writable": (_group_writable_top, "writable by its group or by others (mode 0775)"),
    "the tree belongs to another user": (_foreign_owner, "owned by uid 4242, not by root"),
}


@pytest.mark.parametrize("case", list(UNSAFE_TREES))
def test_unsafe_provisioner_tree_is_refused_before_any_container(
    case: str,
    buildimage_config: Config,  # noqa: F811
    store: Store,
    lxd: Lxd,
    db: Database,
    ghost_dirs: dict[str, Path],
) -> None:
    spoil, reason = UNSAFE_TREES[case]
    job_id = buildimage_job(db, make_app(db, features=[{"name": "web", "provisioner": "salt"}]))
    tree = salt_tree(ghost_dirs, job_id, "echo salt ran")
    spoil(tree, ghost_dirs["provisioner_tree"])

    ctx, error = fail(buildimage_config, store, lxd, job_id)

    assert f"provisioner tree {tree} is not mounted" in error.message, error.message
    assert reason in error.message, error.message
    assert store.get_step(ctx.step.id).container is None
    assert_nothing_published(lxd, store, db, job_id)


# --- deadlines ----------------------------------------------------------------------------

HANG_MKDIR = "rm /bin/mkdir && printf '#!/bin/sh\\nexec sleep 100000\\n' > /bin/mkdir && chmod 755 /bin/mkdir"


def variant_image(lxd: Lxd, base_image: str, script: str, label: str) -> tuple[str, str]:
    """A local image: the base image after `sh -c script` ran in it. Returns (alias, fingerprint)."""
    base = lxd.image_by_alias(base_image)
    assert base is not None
    name = f"gbp-test-{label}-{uuid.uuid4().hex[:8]}"
    lxd.create_container(ContainerSpec(name=name, image=base.fingerprint, tags={}))
    try:
        lxd.start(name)
        lxd.wait_ready(name, 60)
        output = bytearray()
        result = lxd.execute(name, ["sh", "-c", script], {}, output.extend, 60)
        assert result.ok, (result, output.decode())
        lxd.stop(name)
        image = lxd.publish(name, {"description": f"ghost-buildpackd test: {label}", **base.properties}, "none")
    finally:
        lxd.delete_container(name)
    lxd.point_alias(name, image.fingerprint)
    return name, image.fingerprint


@pytest.fixture
def hanging_mkdir_image(lxd: Lxd, base_image: str) -> Iterator[str]:
    """The base image whose `mkdir` never returns (so the readiness probe hangs); deleted afterwards."""
    alias, fingerprint = variant_image(lxd, base_image, HANG_MKDIR, "hanging-mkdir")
    yield alias
    lxd.delete_alias(alias)
    lxd.delete_image(fingerprint)


@pytest.mark.slow
def test_an_image_whose_mkdir_hangs_fails_at_the_readiness_deadline_and_frees_the_worker(
    db: Database,
    store: Store,
    lxd: Lxd,
    base_image: str,
    hanging_mkdir_image: str,
    ghost_dirs: dict[str, Path],
    daemons,  # noqa: F811
) -> None:
    group = daemons(workers=1, container=features_config(ready_timeout="5s"))
    process = group.start()
    tree = ghost_dirs["provisioner_tree"]
    hanging = faults_buildimage_job(db, buildimage_app(db, hanging_mkdir_image), tree)
    finish_buildimage(db, hanging, ami_id="ami-0000hang")
    good = faults_buildimage_job(db, buildimage_app(db, base_image), tree)
    finish_buildimage(db, good, ami_id="ami-00000good")

    failed = wait_until(lambda: terminal_step(store, step_id(hanging, "buildimage")), 120, "the hanging step ended")
    built = wait_until(lambda: terminal_step(store, step_id(good, "buildimage")), 120, "the second step ended")

    assert failed.state == FAILED, failed.message
    assert "readiness probe `mkdir -p /var/lib/ghost-buildpackd` did not finish within 5s" in failed.message
    took = (failed.finished_at - failed.started_at).total_seconds()
    print(f"hanging readiness probe: step failed {took:.1f}s after it started (ready_timeout 5s)")
    assert took < 5 + 30  # the deadline, plus a force stop and the clean-up
    assert built.state == SUCCEEDED, built.message
    assert built.started_at >= failed.finished_at  # one worker: the second step ran once the first let it go
    assert process.alive()
    assert_nothing_left(lxd, db, store)


def test_an_lxd_operation_past_its_deadline_fails_with_the_reason(lxd: Lxd, base_image: str) -> None:
    hurried = Lxd(LxdConfig(timeout=60, operation_timeout=0.001))
    base = lxd.image_by_alias(base_image)
    assert base is not None
    name = f"gbp-test-deadline-{uuid.uuid4().hex[:8]}"
    try:
        with pytest.raises(LxdError) as raised:
            hurried.create_container(ContainerSpec(name=name, image=base.fingerprint, tags={}))
        assert f"creating container {name}: the LXD operation did not finish within lxd.operation_timeout" in str(
            raised.value
        )
        assert "LXD may still be working on it" in str(raised.value)
    finally:  # LXD carries on: the container appears, and goes
        wait_until(lambda: lxd.container_status(name) is not None, 60, "the container LXD went on creating")
        lxd.delete_container(name)


@pytest.mark.slow
def test_an_abort_during_a_hanging_readiness_probe_ends_the_step(
    make_config: Callable[..., Config],
    store: Store,
    lxd: Lxd,
    db: Database,
    hanging_mkdir_image: str,
    lxd_cleanup: None,
) -> None:
    app_id = make_app(db, container_image=hanging_mkdir_image, modules=[module_doc("app", "/srv/app", "true")])
    job_id = make_job(db, app_id, command="deploy", status="started", modules=["app"])
    ctx = deploy_context(make_config(container={"ready_timeout": "10m"}), store, lxd, job_id, "app", "prepare")
    cancel = threading.Timer(2.0, ctx.abort.set)  # the runner sets it on a cancellation, a lost lease or shutdown
    cancel.start()
    started = time.monotonic()

    with pytest.raises(StepFailed) as raised:
        deploy.prepare(ctx)

    assert "the readiness probe `mkdir -p /var/lib/ghost-buildpackd` was interrupted" in raised.value.message
    assert time.monotonic() - started < 60, "the probe held the step past its cancellation"
    assert leftover_containers(lxd, db) == []


@pytest.mark.slow
def test_a_600mb_publish_outlasting_the_http_timeout_succeeds(
    make_config: Callable[..., Config],
    store: Store,
    lxd: Lxd,
    db: Database,
    base_image: str,
    lxd_cleanup: None,
) -> None:
    config = make_config(lxd={"timeout": "3s"})  # publishing 600 MB uncompressed took 7 s here
    # 600 MB: ten copies of 60 MB of random data (urandom is slow in the container, and the copies do not compress).
    payload = "mkdir -p /opt && head -c 60000000 /dev/urandom > /opt/part && for i in 0 1 2 3 4 5 6 7 8 9; do " \
        "cat /opt/part; done > /opt/payload && rm /opt/part && ls -l /opt/payload"  # fmt: skip
    job_id = buildimage_job(db, make_app(db, source_container_image=base_image, pre_buildimage=payload))

    ctx, outcome = build(config, store, Lxd(config.lxd), job_id)  # the step's LXD client has the 3 s timeout

    assert outcome.state == SUCCEEDED, outcome
    image = lxd.image_by_alias(str(job_id))
    assert image is not None and image.size > 600_000_000, image
    publishing = store.get_step(ctx.step.id)
    assert publishing.container is not None and lxd.container_status(publishing.container) is None


@pytest.mark.slow
def test_a_prepared_container_past_prepared_max_age_is_removed_and_the_step_still_runs_when_asked(
    db: Database,
    store: Store,
    lxd: Lxd,
    base_image: str,
    ghost_dirs,
    daemons,  # noqa: F811
) -> None:
    """A long multi-module deploy reaches the module late: its container expired, its step did not."""
    process = daemons(container={"prepared_max_age": "4s"}, sweep_interval="1s").start()
    job = make_job(db, deploy_app(db, base_image, "echo late-module-ran > ran"), command="deploy", modules=["api"])
    set_status(db, job, "started")
    sid = step_id(job, "deploy", "api")
    wait_until(lambda: state_of(store, sid) == READY, 60, "the step prepared")
    container = store.get_step(sid).container
    assert container is not None and lxd.container_status(container) == "Running"

    wait_until(lambda: lxd.container_status(container) is None, 60, "the prepared container expired and removed")
    step = store.get_step(sid)
    assert step.state == READY and step.container is None, step
    assert process.saw("prepared_container_expired", step=sid)

    copy = faults_working_copy(ghost_dirs["root"])
    result = run_buildpack(db, job, "api", timeout=120, poll_interval=0.2)  # Ghost's worker reaches the module

    assert result.state == SUCCEEDED, result
    assert (copy / "ran").read_text().strip() == "late-module-ran"
    assert process.alive()
    set_status(db, job, "done")
    assert_nothing_left(lxd, db, store)


# --- defaults -----------------------------------------------------------------------------


def test_a_step_container_gets_the_default_memory_and_root_disk_limits(
    make_config: Callable[..., Config],
    store: Store,
    lxd: Lxd,
    db: Database,
    image_alias: str,
    lxd_cleanup: None,
) -> None:
    app_id = make_app(db, container_image=image_alias, modules=[module_doc("app", "/srv/app", "true")])
    job_id = make_job(db, app_id, command="deploy", status="started", modules=["app"])

    ctx = prepare_ready(make_config(), store, lxd, job_id, "app")

    details = lxd.describe_container(store.get_step(ctx.step.id).container)
    assert details is not None and details.status == "Running"
    assert details.config["limits.memory"] == "20%"
    root = details.devices["root"]
    assert root["size"] == str(20 << 30) and root["path"] == "/" and root["pool"] == "default"
