"""The buildimage step on the real LXD, with the busybox base image.

Each test builds the context the runner would (record, lease, `running`) and
calls `buildimage.run`; images and containers it makes are found by the job
ids of the test's own database and removed at the end.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from bson import ObjectId
from pymongo.database import Database

from ghost_buildpackd.config import Config
from ghost_buildpackd.ghost.fields import BadDocument
from ghost_buildpackd.logs import configure_logging
from ghost_buildpackd.lxd import IMAGE_PROP_JOB, TAG_JOB, ContainerSpec, ImageInfo, Lxd
from ghost_buildpackd.model import BUILDIMAGE, FAILED, SUCCEEDED, Actor, step_id
from ghost_buildpackd.steps import (
    StepContext,
    StepFailed,
    buildimage,
    container_name,
    container_spec,
    run_after_outcome,
    step_tags,
)
from ghost_buildpackd.store import Store
from ghost_buildpackd.upkeep.templates import TAG_TEMPLATE, template_name
from tests.conftest import WORKING_COPY_IDS, leftover_containers
from tests.support.daemon import DaemonProcess
from tests.support.ghost import b64, finish_buildimage, make_app, make_job, set_status
from tests.support.profiles import profile_names
from tests.support.steps import step_context, take_over_after_crash
from tests.support.waiting import wait_until

pytestmark = pytest.mark.lxd  # every test here drives the real LXD

SECRET = "s3cr3t-Token-4711"
STUB_SALT = ["sh", "/srv/salt/salt/stub.sh"]


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """The structured log of the test, as JSON lines."""
    stream = io.StringIO()
    configure_logging("json", "debug", stream)
    yield stream
    structlog.reset_defaults()


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config(container={"provisioner_commands": {"salt": STUB_SALT}})


def buildimage_job(db: Database, app_id: ObjectId, ami_id: str = "ami-0123abcd") -> ObjectId:
    job_id = make_job(db, app_id, "buildimage", "started")
    finish_buildimage(db, job_id, ami_id)
    return job_id


def build(config: Config, store: Store, lxd: Lxd, job_id: ObjectId) -> tuple[StepContext, Any]:
    """The body, then its after-outcome chores, as the runner runs them."""
    ctx = step_context(config, store, lxd, job_id, BUILDIMAGE)
    outcome = buildimage.run(ctx)
    run_after_outcome(ctx)
    return ctx, outcome


def fail(config: Config, store: Store, lxd: Lxd, job_id: ObjectId) -> tuple[StepContext, StepFailed]:
    ctx = step_context(config, store, lxd, job_id, BUILDIMAGE)
    with pytest.raises(StepFailed) as raised:
        buildimage.run(ctx)
    return ctx, raised.value


def salt_tree(ghost_dirs: dict[str, Path], job_id: ObjectId, stub: str) -> Path:
    """Ghost's salt provisioner tree for the job, with a stub in place of salt-call."""
    tree = ghost_dirs["provisioner_tree"] / f"salt-{job_id}"
    (tree / "salt").mkdir(parents=True)
    (tree / "pillar").mkdir()
    (tree / "salt" / "stub.sh").write_text(stub)
    return tree


def job_log(ghost_dirs: dict[str, Path], job_id: ObjectId) -> str:
    path = ghost_dirs["log_dir"] / f"{job_id}.txt"
    return path.read_text() if path.exists() else ""


def run_in_image(lxd: Lxd, image: str, job_id: ObjectId, script: str) -> str:
    """Start a container from `image` (tagged with the job, so it is cleaned), run `sh -c script`, return its output."""
    name = f"gbp-check-{job_id}"
    lxd.create_container(ContainerSpec(name=name, image=image, tags={TAG_JOB: str(job_id)}))
    try:
        lxd.start(name)
        lxd.wait_ready(name, 60)
        output = bytearray()
        result = lxd.execute(name, ["sh", "-c", script], {}, output.extend, 30)
        assert result.exit_code == 0, (result, output.decode())
        return output.decode()
    finally:
        lxd.delete_container(name)


def publish_stray_image(lxd: Lxd, base: str, job_id: ObjectId, **properties: str) -> ImageInfo:
    """An image carrying the job's property but no alias, as a publish cut short would leave."""
    name = f"gbp-stray-{job_id}"
    lxd.create_container(ContainerSpec(name=name, image=base, tags={TAG_JOB: str(job_id)}))
    try:
        return lxd.publish(name, {IMAGE_PROP_JOB: str(job_id), **properties}, "none")
    finally:
        lxd.delete_container(name)


def assert_nothing_published(lxd: Lxd, store: Store, db: Database, job_id: ObjectId) -> None:
    assert lxd.image_by_alias(str(job_id)) is None
    assert not [i for i in lxd.list_images() if i.properties.get(IMAGE_PROP_JOB) == str(job_id)]
    assert store.get_image_record(str(job_id)) is None
    assert leftover_containers(lxd, db) == []
    assert not [profile for profile in profile_names(lxd) if str(job_id) in profile]


# --- a successful build ----------------------------------------------------------------------


PRE_HOOK = """\
echo "pre hook for $GHOST_APP/$GHOST_ENV/$GHOST_ROLE color=$GHOST_ENV_COLOR"
echo "the token is $API_TOKEN"
echo "$GHOST_APP $GHOST_ENV $GHOST_ROLE $GHOST_ENV_COLOR $EMPTY_VAR." > /pre-mark
echo "$API_TOKEN" > /token-mark
"""
SALT_STUB = """\
echo "salt stub running"
test -f /pre-mark && echo "features after pre" > /salt-mark
"""
POST_HOOK = """\
test -f /salt-mark && echo "post after features" > /post-mark
echo "post hook done"
"""


@pytest.mark.usefixtures("lxd_cleanup")
def test_hooks_and_features_are_baked_into_the_published_image(
    config: Config,
    store: Store,
    lxd: Lxd,
    db: Database,
    ghost_dirs: dict[str, Path],
    logs: io.StringIO,
    base_image: str,
) -> None:
    app_id = make_app(
        db,
        color="blue",
        container_image="previous-image",
        env_vars=[{"var_key": "API_TOKEN", "var_value": SECRET}, {"var_key": "EMPTY_VAR"}],
        pre_buildimage=PRE_HOOK,
        post_buildimage=POST_HOOK,
        features=[{"name": "nginx", "version": "1.2"}],  # salt, the default provisioner
    )
    job_id = buildimage_job(db, app_id, "ami-0feedbeef")
    salt_tree(ghost_dirs, job_id, SALT_STUB)

    ctx, outcome = build(config, store, lxd, job_id)

    alias = str(job_id)
    assert outcome.state == SUCCEEDED and alias in outcome.message
    image = lxd.image_by_alias(alias)
    assert image is not None and outcome.fields["fingerprint"] == image.fingerprint
    base = lxd.image_by_alias(base_image)
    assert image.properties[IMAGE_PROP_JOB] == alias
    assert image.properties["ghost.app"] == "shop" and image.properties["ghost.color"] == "blue"
    assert image.properties["ghost.ami_id"] == "ami-0feedbeef"
    assert image.properties["ghost-buildpackd.base_image"] == base.fingerprint
    assert (image.properties["os"], image.properties["release"]) == (base.properties["os"], base.properties["release"])

    record = store.get_image_record(alias)
    assert record is not None
    assert (record.fingerprint, record.job_id, record.app_id) == (image.fingerprint, job_id, app_id)
    assert (record.ami_id, record.ami_name) == ("ami-0feedbeef", "ami.prod.eu-west-1.web.shop.1")
    assert record.app_identity == "ami.prod.eu-west-1.web.shop.blue" and record.base_image == base.fingerprint
    assert record.size > 0 and record.state == "live"
    assert db.apps.find_one({"_id": app_id})["build_infos"]["container_image"] == alias
    # Once the image is published, the build's container is kept as the template of the app's deploys: mapped as
    # theirs, no job tags.
    deploy_spec = container_spec(ctx, image.fingerprint, idmap=WORKING_COPY_IDS)
    assert lxd.container_status(template_name(deploy_spec)) == "Stopped"
    kept = [c for c in lxd.list_containers() if c.tags.get(TAG_TEMPLATE) == image.fingerprint]
    assert [c.name for c in kept] == [template_name(deploy_spec)] and TAG_JOB not in kept[0].tags

    marks = run_in_image(
        lxd,
        image.fingerprint,
        job_id,
        "cat /pre-mark /salt-mark /post-mark /token-mark; test -e /var/lib/ghost-buildpackd || echo no-scripts",
    )
    assert marks.splitlines() == [
        "shop prod web blue .",
        "features after pre",
        "post after features",
        SECRET,  # the app's variables reached the scripts
        "no-scripts",  # the daemon's hook files are not part of the image
    ]

    text = job_log(ghost_dirs, job_id)
    assert "[container buildimage] pre hook for shop/prod/web color=blue" in text
    assert "[container buildimage] salt stub running" in text
    assert "[container buildimage] post hook done" in text
    assert text.index("pre hook for") < text.index("salt stub running") < text.index("post hook done")
    assert "the token is ***" in text
    structured = logs.getvalue()
    assert "salt stub running" in structured
    assert SECRET not in text and SECRET not in structured
    assert leftover_containers(lxd, db) == []
    assert lxd.container_status(container_name(ctx.step)) is None


# --- base image references -------------------------------------------------------------------


def reference_for(how: str, base: ImageInfo, alias: str) -> str:
    return {
        "fingerprint": base.fingerprint,
        "prefix": base.fingerprint[:12],
        "alias": alias,
        "os_release": base.os_release,
    }[how]


@pytest.mark.usefixtures("lxd_cleanup")
@pytest.mark.parametrize("how", ["fingerprint", "prefix", "alias", "os_release"])
def test_base_image_is_found_by_fingerprint_prefix_alias_and_os_release(
    how: str, config: Config, store: Store, lxd: Lxd, db: Database, base_image: str
) -> None:
    base = lxd.image_by_alias(base_image)
    app_id = make_app(db, source_container_image=reference_for(how, base, base_image))
    job_id = buildimage_job(db, app_id)
    if how == "os_release":  # a newer image of the same OS that the daemon published must not be taken
        publish_stray_image(lxd, base.fingerprint, job_id, os=base.properties["os"], release=base.properties["release"])

    _, outcome = build(config, store, lxd, job_id)

    assert outcome.state == SUCCEEDED
    record = store.get_image_record(str(job_id))
    assert record.base_image == base.fingerprint


@pytest.mark.usefixtures("lxd_cleanup")
def test_ami_id_falls_back_to_the_app_when_the_job_message_has_none(
    config: Config, store: Store, lxd: Lxd, db: Database
) -> None:
    app_id = make_app(db, ami="ami-0fromapp")
    job_id = make_job(db, app_id, "buildimage", "started")
    set_status(db, job_id, "done", "Build image finished")

    _, outcome = build(config, store, lxd, job_id)

    assert outcome.state == SUCCEEDED
    assert store.get_image_record(str(job_id)).ami_id == "ami-0fromapp"
    assert lxd.image_by_alias(str(job_id)).properties["ghost.ami_id"] == "ami-0fromapp"


@pytest.mark.usefixtures("lxd_cleanup")
def test_an_older_jobs_build_finishing_last_leaves_the_app_on_the_newer_jobs_image(
    config: Config, store: Store, lxd: Lxd, db: Database
) -> None:
    app_id = make_app(db)
    older = buildimage_job(db, app_id)
    newer = buildimage_job(db, app_id)
    # Ghost made `newer` a minute later (Eve's `_created`), yet its build finishes first.
    created = db.jobs.find_one({"_id": older})["_created"]
    db.jobs.update_one({"_id": newer}, {"$set": {"_created": created + timedelta(minutes=1)}})
    _, first = build(config, store, lxd, newer)
    assert first.state == SUCCEEDED
    assert store.app_container_image(app_id) == str(newer)

    _, late = build(config, store, lxd, older)

    assert late.state == SUCCEEDED and f"keeps container image {newer}" in late.message
    assert store.app_container_image(app_id) == str(newer), "an older job's build took the app back"
    # The older build is published and recorded as usual (retention decides when it goes).
    assert lxd.image_by_alias(str(older)).fingerprint == late.fields["fingerprint"]
    assert store.get_image_record(str(older)).state == "live"
    assert lxd.image_by_alias(str(newer)).fingerprint == first.fields["fingerprint"]


# --- failures: nothing published, nothing left, the app keeps its image ----------------------


@pytest.mark.usefixtures("lxd_cleanup")
def test_failing_pre_hook_fails_the_step_and_keeps_the_previous_image(
    config: Config, store: Store, lxd: Lxd, db: Database, ghost_dirs: dict[str, Path]
) -> None:
    app_id = make_app(
        db,
        container_image="previous-image",
        pre_buildimage="echo about to fail\nexit 3\n",
        post_buildimage="echo post should not run\n",
    )
    job_id = buildimage_job(db, app_id)

    _, error = fail(config, store, lxd, job_id)

    assert "pre_buildimage hook" in error.message and "exited with code 3" in error.message
    assert error.exit_code == 3
    assert "about to fail" in error.output_tail
    assert db.apps.find_one({"_id": app_id})["build_infos"]["container_image"] == "previous-image"
    assert_nothing_published(lxd, store, db, job_id)
    text = job_log(ghost_dirs, job_id)
    assert "about to fail" in text and "post should not run" not in text
    assert text.count("$ sh /var/lib/ghost-buildpackd/hook-pre_buildimage") == 1  # a script failure is not retried


@pytest.mark.usefixtures("lxd_cleanup")
def test_failing_features_install_names_the_command_and_exit_code(
    config: Config, store: Store, lxd: Lxd, db: Database, ghost_dirs: dict[str, Path]
) -> None:
    app_id = make_app(db, container_image="previous-image", features=[{"name": "php", "provisioner": "salt"}])
    job_id = buildimage_job(db, app_id)
    salt_tree(ghost_dirs, job_id, "echo highstate failed\nexit 5\n")

    _, error = fail(config, store, lxd, job_id)

    assert "features install (salt)" in error.message
    assert "sh /srv/salt/salt/stub.sh" in error.message and "exited with code 5" in error.message
    assert db.apps.find_one({"_id": app_id})["build_infos"]["container_image"] == "previous-image"
    assert_nothing_published(lxd, store, db, job_id)


@pytest.mark.usefixtures("lxd_cleanup")
def test_a_hook_running_past_exec_timeout_is_killed(
    make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, ghost_dirs: dict[str, Path]
) -> None:
    config = make_config(container={"exec_timeout": "2s"})
    app_id = make_app(db, pre_buildimage="echo sleeping\nsleep 30\n")
    job_id = buildimage_job(db, app_id)

    started = time.monotonic()
    _, error = fail(config, store, lxd, job_id)

    assert time.monotonic() - started < 25
    assert "did not finish within 2s" in error.message and "sh /var/lib/ghost-buildpackd/hook-pre_buildimage" in (
        error.message
    )
    assert_nothing_published(lxd, store, db, job_id)
    assert "sleeping" in job_log(ghost_dirs, job_id)


def test_missing_base_image_names_what_was_looked_for_and_what_exists(
    config: Config, store: Store, lxd: Lxd, db: Database, base_image: str
) -> None:
    app_id = make_app(db, source_container_image="debian/no-such-release")
    job_id = buildimage_job(db, app_id)

    ctx, error = fail(config, store, lxd, job_id)

    assert "'debian/no-such-release'" in error.message and "source_container_image" in error.message
    assert base_image in error.message  # the local images are listed
    assert store.get_step(ctx.step.id).container is None  # no container was even named
    assert_nothing_published(lxd, store, db, job_id)


@pytest.mark.usefixtures("lxd_cleanup")
def test_an_image_the_daemon_published_is_refused_as_a_base_image(
    config: Config, store: Store, lxd: Lxd, db: Database, logs: io.StringIO
) -> None:
    shop = make_app(db, pre_buildimage="echo shop-secret-sauce > /baked\n")
    shop_job = buildimage_job(db, shop)
    _, built = build(config, store, lxd, shop_job)
    assert built.state == SUCCEEDED
    fingerprint = built.fields["fingerprint"]
    refs = {"alias of another app's build": str(shop_job), "fingerprint prefix": fingerprint[:12]}
    for name, ref in refs.items():
        other = make_app(db, name=f"other-{len(ref)}", source_container_image=ref)
        job_id = buildimage_job(db, other)

        ctx, error = fail(config, store, lxd, job_id)

        assert "app.build_infos.source_container_image" in error.message, name
        assert "never a base image" in error.message and str(shop_job) in error.message, name
        assert store.get_step(ctx.step.id).container is None, f"{name}: a container was named"
        assert_nothing_published(lxd, store, db, job_id)
    # Nor is the app's own earlier build: each build starts from the chosen base again.
    db.apps.update_one({"_id": shop}, {"$set": {"build_infos.source_container_image": str(shop_job)}})
    again = buildimage_job(db, shop)
    _, error = fail(config, store, lxd, again)
    assert "never a base image" in error.message
    assert_nothing_published(lxd, store, db, again)
    assert store.app_container_image(shop) == str(shop_job)
    created = [json.loads(line) for line in logs.getvalue().splitlines() if '"container_creating"' in line]
    assert len(created) == 1, "only the first build created a container"


def test_invalid_base64_hook_fails_before_any_container(config: Config, store: Store, lxd: Lxd, db: Database) -> None:
    app_id = make_app(db)
    db.apps.update_one({"_id": app_id}, {"$set": {"lifecycle_hooks.post_buildimage": "not base64 !!"}})
    job_id = buildimage_job(db, app_id)
    ctx = step_context(config, store, lxd, job_id, BUILDIMAGE)

    with pytest.raises(BadDocument) as raised:
        buildimage.run(ctx)

    assert raised.value.field == "app.lifecycle_hooks.post_buildimage" and "base64" in raised.value.reason
    assert store.get_step(ctx.step.id).container is None
    assert_nothing_published(lxd, store, db, job_id)


def test_missing_provisioner_tree_fails_before_any_container(
    config: Config, store: Store, lxd: Lxd, db: Database, ghost_dirs: dict[str, Path]
) -> None:
    app_id = make_app(db, features=[{"name": "web", "provisioner": "salt"}])  # salt: Ghost's default provisioner
    job_id = buildimage_job(db, app_id)

    ctx, error = fail(config, store, lxd, job_id)

    assert str(ghost_dirs["provisioner_tree"] / f"salt-{job_id}") in error.message and "salt" in error.message
    assert store.get_step(ctx.step.id).container is None
    assert_nothing_published(lxd, store, db, job_id)


def test_a_step_aborted_before_it_starts_creates_no_container(
    config: Config, store: Store, lxd: Lxd, db: Database
) -> None:
    job_id = buildimage_job(db, make_app(db))
    ctx = step_context(config, store, lxd, job_id, BUILDIMAGE)
    ctx.abort.set()

    with pytest.raises(StepFailed, match="cancelled before creating the container"):
        buildimage.run(ctx)

    assert_nothing_published(lxd, store, db, job_id)


@pytest.mark.usefixtures("lxd_cleanup")
def test_debug_keeps_the_container_and_says_how_to_get_in(
    make_config: Callable[..., Config],
    store: Store,
    lxd: Lxd,
    db: Database,
    ghost_dirs: dict[str, Path],
    logs: io.StringIO,
) -> None:
    config = make_config(container={"debug": True})
    app_id = make_app(db, post_buildimage="echo broken post hook\nexit 1\n")
    job_id = buildimage_job(db, app_id)

    ctx, error = fail(config, store, lxd, job_id)

    name = container_name(ctx.step)
    assert "post_buildimage hook" in error.message
    assert leftover_containers(lxd, db) == [name]
    assert f"lxc exec {name} -- sh" in job_log(ghost_dirs, job_id)
    kept = [json.loads(line) for line in logs.getvalue().splitlines() if "container_kept_for_debug" in line]
    assert kept and kept[0]["command"] == f"lxc exec {name} -- sh"
    assert lxd.image_by_alias(str(job_id)) is None


# --- replay and crashes ----------------------------------------------------------------------


@pytest.mark.usefixtures("lxd_cleanup")
def test_replay_moves_the_alias_to_a_new_image_and_deletes_the_old_one(
    config: Config, store: Store, lxd: Lxd, db: Database, base_image: str
) -> None:
    app_id = make_app(db, pre_buildimage="echo first > /build-mark\n")
    job_id = buildimage_job(db, app_id)
    _, first = build(config, store, lxd, job_id)
    stray = publish_stray_image(
        lxd, lxd.image_by_alias(base_image).fingerprint, job_id
    )  # a publish of an earlier attempt that was cut short
    store.move(store.get_step(f"{job_id}:buildimage"), Actor.RUNNER, SUCCEEDED)  # as the runner records it
    db.apps.update_one({"_id": app_id}, {"$set": {"lifecycle_hooks.pre_buildimage": b64("echo second > /build-mark")}})

    _, second = build(config, store, lxd, job_id)  # `replay`: the step is pending again, same alias

    old, new = first.fields["fingerprint"], second.fields["fingerprint"]
    assert old != new
    assert lxd.image_by_alias(str(job_id)).fingerprint == new
    assert lxd.image_by_fingerprint(old) is None
    assert lxd.image_by_fingerprint(stray.fingerprint) is None
    assert store.get_image_record(str(job_id)).fingerprint == new
    assert run_in_image(lxd, new, job_id, "cat /build-mark") == "second\n"


@pytest.mark.usefixtures("lxd_cleanup")
def test_a_half_published_image_is_deleted_and_built_again_after_a_crash(
    config: Config, store: Store, lxd: Lxd, db: Database
) -> None:
    app_id = make_app(db, container_image="previous-image")
    job_id = buildimage_job(db, app_id)
    _, first = build(config, store, lxd, job_id)
    # The crash came after the alias was set but before the MongoDB records were written.
    store.images.delete_one({"_id": str(job_id)})
    db.apps.update_one({"_id": app_id}, {"$set": {"build_infos.container_image": "previous-image"}})

    ctx = take_over_after_crash(config, store, lxd, job_id, BUILDIMAGE)
    outcome = buildimage.run(ctx)

    assert ctx.step.attempts == 2 and outcome.state == SUCCEEDED
    new = outcome.fields["fingerprint"]
    assert new != first.fields["fingerprint"] and lxd.image_by_fingerprint(first.fields["fingerprint"]) is None
    assert lxd.image_by_alias(str(job_id)).fingerprint == new == store.get_image_record(str(job_id)).fingerprint
    assert db.apps.find_one({"_id": app_id})["build_infos"]["container_image"] == str(job_id)


@pytest.mark.usefixtures("lxd_cleanup")
def test_a_recorded_image_is_kept_after_a_crash_and_the_app_is_updated(
    config: Config, store: Store, lxd: Lxd, db: Database, ghost_dirs: dict[str, Path]
) -> None:
    app_id = make_app(db, container_image="previous-image")
    job_id = buildimage_job(db, app_id)
    _, first = build(config, store, lxd, job_id)
    # The crash came after the image record but before the app was updated; a stray container remains.
    db.apps.update_one({"_id": app_id}, {"$set": {"build_infos.container_image": "previous-image"}})
    stray = f"gbp-{job_id}-b"
    ctx = take_over_after_crash(config, store, lxd, job_id, BUILDIMAGE)
    lxd.create_container(ContainerSpec(name=stray, image=first.fields["fingerprint"], tags=step_tags(ctx)))

    outcome = buildimage.run(ctx)

    assert outcome.state == SUCCEEDED and "earlier attempt" in outcome.message
    assert outcome.fields["fingerprint"] == first.fields["fingerprint"]
    assert lxd.image_by_alias(str(job_id)).fingerprint == first.fields["fingerprint"]
    assert db.apps.find_one({"_id": app_id})["build_infos"]["container_image"] == str(job_id)
    assert leftover_containers(lxd, db) == []


# --- against a running daemon ------------------------------------------------------------------


@pytest.mark.usefixtures("lxd_cleanup")
def test_a_running_daemon_builds_the_image_when_ghost_finishes_the_buildimage_job(
    write_config: Callable[..., Path], store: Store, lxd: Lxd, db: Database, ghost_dirs: dict[str, Path], tmp_path: Path
) -> None:
    app_id = make_app(db, container_image="previous-image", pre_buildimage="echo hello from the pre hook\n")
    path = write_config()
    with DaemonProcess(path, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready()
        job_id = make_job(db, app_id, "buildimage", "started")
        finish_buildimage(db, job_id, "ami-0d0e0f")
        sid = step_id(job_id, BUILDIMAGE)
        step = wait_until(lambda: (s := store.get_step(sid)) is not None and s.terminal and s, 90, "the step to end")

    assert step.state == SUCCEEDED, step.message
    image = lxd.image_by_alias(str(job_id))
    assert image is not None and image.properties["ghost.ami_id"] == "ami-0d0e0f"
    assert store.get_image_record(str(job_id)).fingerprint == image.fingerprint
    assert db.apps.find_one({"_id": app_id})["build_infos"]["container_image"] == str(job_id)
    assert "[container buildimage] hello from the pre hook" in job_log(ghost_dirs, job_id)
    assert leftover_containers(lxd, db) == []


@pytest.mark.usefixtures("lxd_cleanup")
def test_a_running_daemon_refuses_a_published_base_image_and_goes_on(
    write_config: Callable[..., Path], store: Store, lxd: Lxd, db: Database, tmp_path: Path
) -> None:
    def built(app_id: ObjectId) -> Any:
        job_id = make_job(db, app_id, "buildimage", "started")
        finish_buildimage(db, job_id)
        sid = step_id(job_id, BUILDIMAGE)
        return job_id, wait_until(lambda: (s := store.get_step(sid)) is not None and s.terminal and s, 90, sid)

    with DaemonProcess(write_config(), tmp_path / "daemon.log") as daemon:
        daemon.wait_ready()
        shop_job, shop = built(make_app(db, name="shop"))
        assert shop.state == SUCCEEDED, shop.message
        refused_job, refused = built(make_app(db, name="borrower", source_container_image=str(shop_job)))
        _, after = built(make_app(db, name="after"))
        assert daemon.alive()

    assert refused.state == FAILED
    assert "app.build_infos.source_container_image" in refused.message and "never a base image" in refused.message
    assert not daemon.saw("container_creating", job_id=str(refused_job)), "a container was made for the refused build"
    assert after.state == SUCCEEDED, after.message
    assert leftover_containers(lxd, db) == []
