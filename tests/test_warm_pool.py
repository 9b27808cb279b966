"""The warm pool on the real LXD and MongoDB: idle deploy containers made ahead, taken by steps, replaced, dropped."""

from __future__ import annotations

import dataclasses
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog
from bson import ObjectId
from pymongo.database import Database
from structlog.testing import capture_logs

from ghost_buildpackd.check.lxd_server import warm_pool_check
from ghost_buildpackd.config import Config
from ghost_buildpackd.ghost.client import run_buildpack
from ghost_buildpackd.lxd import TAG_STEP, ContainerSpec, Lxd
from ghost_buildpackd.model import DEPLOY, READY, SUCCEEDED, step_id
from ghost_buildpackd.status import kept_by_design, render_kept
from ghost_buildpackd.steps import deploy, run_after_outcome
from ghost_buildpackd.steps.warm import idle_launcher, warm_candidates
from ghost_buildpackd.store import Store
from ghost_buildpackd.upkeep.warm_pool import (
    IdleContainer,
    WarmPool,
    WarmTarget,
    choose_targets,
    idle_containers,
    take_idle,
    warm_key,
)
from tests.conftest import WORKING_COPY_IDS, leftover_containers
from tests.support.daemon import DaemonProcess
from tests.support.ghost import make_app, make_job, module_doc, set_status
from tests.support.steps import deploy_context, finish_preparation
from tests.support.waiting import wait_until

pytestmark = pytest.mark.lxd  # every test here drives the real LXD

BASH_IMAGE = "ghost-buildpackd/busybox-bash"  # scripts/setup builds it (scripts/build-base-image --with-bash)
BUILD_PACK = "echo built-in-a-warm-container > out.txt\n"


@pytest.fixture
def warm_config(make_config: Callable[..., Config]) -> Config:
    return make_config(container={"warm_pool": {"per_app": 1, "max": 4}}).with_instance_id()


@pytest.fixture
def pools(store: Store, lxd: Lxd, lxd_cleanup: None) -> Iterator[Callable[..., WarmPool]]:
    """Make warm pools of this test; whatever they keep is removed at the end."""
    made: list[WarmPool] = []

    def make(config: Config, memory: Callable[[], int | None] = lambda: 1 << 40) -> WarmPool:
        stop = threading.Event()
        pool = WarmPool(
            config,
            store,
            lxd,
            stop,
            candidates=lambda: warm_candidates(config, store, lxd),
            launch=idle_launcher(config, lxd, stop),
            memory=memory,
        )
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.stop.set()
        pool.close(within=30)


def deployed_app(db: Database, alias: str | None) -> tuple[ObjectId, ObjectId]:
    """An app with one module that has a build_pack, and a deploy job of it (so it counts as deployed lately)."""
    app_id = make_app(db, container_image=alias, modules=[module_doc("app", "/srv/app", BUILD_PACK)])
    return app_id, make_job(db, app_id, command="deploy", status="started", modules=["app"])


def idle_of(lxd: Lxd, app_id: ObjectId) -> list[IdleContainer]:
    return [c for c in idle_containers(lxd.list_containers()) if c.app_id == str(app_id)]


def working_copy(root: Path) -> Path:
    path = root / "shop" / "prod" / "web" / "app"
    path.mkdir(parents=True)
    os.chown(path, *WORKING_COPY_IDS)
    return path


def test_a_deploy_takes_the_idle_container_and_the_pool_replaces_it(
    warm_config: Config, pools, store: Store, lxd: Lxd, db: Database, image_alias: str, ghost_dirs
) -> None:
    app_id, job_id = deployed_app(db, image_alias)
    pool = pools(warm_config)
    assert pool.reconcile() is True  # made one
    assert pool.reconcile() is False  # nothing missing
    (idle,) = idle_of(lxd, app_id)
    assert idle.ready and idle.owner == warm_config.instance_id
    assert lxd.container_status(idle.name) == "Running"

    with capture_logs() as events:
        ctx = deploy_context(warm_config, store, lxd, job_id, "app", "prepare")
        assert deploy.prepare(ctx).state == READY
        finish_preparation(ctx)
    assert ctx.step.container == idle.name  # taken, not launched
    assert [e["container"] for e in events if e["event"] == "warm_container_taken"] == [idle.name]
    assert not any(e["event"] == "container_creating" for e in events)
    taken = {c.name: c for c in lxd.list_containers()}[idle.name]
    assert taken.tags[TAG_STEP] == ctx.step.id  # the step's container now, found by its tags as any other
    assert idle_of(lxd, app_id) == []

    assert pool.reconcile() is True  # replaced at once
    (replacement,) = idle_of(lxd, app_id)
    assert replacement.name != idle.name and replacement.ready

    module_dir = working_copy(ghost_dirs["root"])
    run = deploy_context(warm_config, store, lxd, job_id, "app", "run")
    try:
        outcome = deploy.run(run)
    finally:
        run_after_outcome(run)
    assert outcome.state == SUCCEEDED, outcome
    assert (module_dir / "out.txt").read_text() == "built-in-a-warm-container\n"
    assert (module_dir / "out.txt").stat().st_uid == WORKING_COPY_IDS[0]
    assert leftover_containers(lxd, db) == []  # the taken container went with its step
    assert [c.name for c in idle_of(lxd, app_id)] == [replacement.name]


def test_only_the_instance_keeping_an_idle_container_hands_it_out(
    warm_config: Config, pools, lxd: Lxd, db: Database, image_alias: str, store: Store
) -> None:
    app_id, _ = deployed_app(db, image_alias)
    pool = pools(warm_config)
    pool.reconcile()
    (idle,) = idle_of(lxd, app_id)
    (target,) = warm_candidates(warm_config, store, lxd)
    spec = target.spec
    assert take_idle(lxd, spec, "another-instance", structlog.get_logger("test")) is None
    other_shape = dataclasses.replace(spec, processes=(spec.processes or 0) + 1)
    assert take_idle(lxd, other_shape, pool.owner, structlog.get_logger("test")) is None
    assert idle_of(lxd, app_id) == [idle]


def test_idle_containers_follow_the_apps_image(
    warm_config: Config, pools, lxd: Lxd, db: Database, image_alias: str
) -> None:
    app_id, _ = deployed_app(db, image_alias)
    pool = pools(warm_config)
    pool.reconcile()
    (old,) = idle_of(lxd, app_id)
    new_alias = f"gbp-test-{uuid.uuid4().hex[:10]}"
    bash = lxd.image_by_alias(BASH_IMAGE)
    assert bash is not None, f"{BASH_IMAGE} is missing: run scripts/setup"
    lxd.point_alias(new_alias, bash.fingerprint, "ghost-buildpackd tests")
    try:
        db.apps.update_one({"_id": app_id}, {"$set": {"build_infos.container_image": new_alias}})
        with capture_logs() as events:
            assert pool.reconcile() is True
        (new,) = idle_of(lxd, app_id)
        assert new.image == bash.fingerprint and new.name != old.name
        assert lxd.container_status(old.name) is None
        assert {"container": old.name, "reason": "no longer wanted"}.items() <= next(
            e for e in events if e["event"] == "warm_container_removed"
        ).items()
        db.apps.update_one({"_id": app_id}, {"$set": {"build_infos.container_image": None}})  # no image: none kept
        assert pool.reconcile() is False
        assert idle_of(lxd, app_id) == []
    finally:
        lxd.delete_alias(new_alias)


def test_the_pool_keeps_at_most_max_for_the_apps_deployed_last(
    make_config: Callable[..., Config], pools, lxd: Lxd, db: Database, image_alias: str
) -> None:
    config = make_config(container={"warm_pool": {"per_app": 1, "max": 1}}).with_instance_id()
    first, _ = deployed_app(db, image_alias)
    second, _ = deployed_app(db, image_alias)  # deployed after the first
    pool = pools(config)
    while pool.reconcile():
        pass
    # Both apps share one image and shape: one idle container serves either, and the bound is one.
    kept = [c for c in idle_containers(lxd.list_containers()) if c.app_id in (str(first), str(second))]
    assert len(kept) == 1 and kept[0].app_id == str(second)


def test_no_idle_container_is_made_while_memory_is_short_and_they_go_below_half(
    warm_config: Config, pools, lxd: Lxd, db: Database, image_alias: str
) -> None:
    app_id, _ = deployed_app(db, image_alias)
    available = [1 << 40]
    pool = pools(warm_config, memory=lambda: available[0])
    floor = warm_config.container.warm_pool.min_free_memory
    available[0] = floor - 1
    with capture_logs() as events:
        assert pool.reconcile() is False
    assert idle_of(lxd, app_id) == []
    assert any(e["event"] == "warm_pool_paused_low_memory" and e["available_bytes"] == floor - 1 for e in events)
    available[0] = floor * 2
    assert pool.reconcile() is True and len(idle_of(lxd, app_id)) == 1
    available[0] = floor // 2 - 1
    assert pool.reconcile() is False
    assert idle_of(lxd, app_id) == []


def test_idle_containers_of_a_dead_instance_are_removed_and_a_live_ones_kept(
    warm_config: Config, pools, lxd: Lxd, db: Database, store: Store, image_alias: str
) -> None:
    app_id, _ = deployed_app(db, image_alias)
    other = pools(dataclasses.replace(warm_config, instance_id=None).with_instance_id())  # another instance
    assert other.owner != warm_config.instance_id
    other.reconcile()
    (theirs,) = idle_of(lxd, app_id)
    mine = pools(warm_config)
    store.heartbeat(other.owner, {"host": "elsewhere"})
    mine.remove_unwanted(idle_containers(lxd.list_containers()), {})
    assert lxd.container_status(theirs.name) == "Running"  # its instance beats: not ours to judge
    store.mark_instance_stopped(other.owner, within=5)
    mine.remove_unwanted(idle_containers(lxd.list_containers()), {})
    assert lxd.container_status(theirs.name) is None


def test_the_pools_loop_fills_it_and_a_stop_removes_what_it_keeps(
    warm_config: Config, pools, lxd: Lxd, db: Database, image_alias: str
) -> None:
    app_id, _ = deployed_app(db, image_alias)
    pool = pools(warm_config)
    pool.loop.start()
    wait_until(lambda: [c for c in idle_of(lxd, app_id) if c.ready], 120, "an idle container made by the loop")
    pool.stop.set()
    pool.close(within=30)
    assert not pool.loop.thread.is_alive()
    assert idle_of(lxd, app_id) == []


def test_status_and_check_list_the_idle_containers(
    warm_config: Config, pools, lxd: Lxd, db: Database, image_alias: str
) -> None:
    app_id, _ = deployed_app(db, image_alias)
    pool = pools(warm_config)
    pool.reconcile()
    (idle,) = idle_of(lxd, app_id)
    kept = kept_by_design(warm_config)
    listed = [c for c in kept["warm_pool"]["containers"] if c["name"] == idle.name]
    assert listed == [
        {"name": idle.name, "app_id": str(app_id), "image": idle.image[:12], "instance": pool.owner, "ready": True}
    ]
    assert idle.name in render_kept(kept)
    line = warm_pool_check(warm_config, lxd, "dir")
    assert line.ok and not line.warning and "a full copy of its image's files" in line.detail, line
    assert "up to 4 idle deploy containers (1 per app" in line.detail
    off = warm_pool_check(
        dataclasses.replace(
            warm_config,
            container=dataclasses.replace(
                warm_config.container, warm_pool=dataclasses.replace(warm_config.container.warm_pool, per_app=0)
            ),
        ),
        lxd,
        "dir",
    )
    assert off.detail.startswith("off (container.warm_pool)"), off


def test_a_daemon_keeps_an_idle_container_for_the_next_deploy_and_removes_it_at_its_stop(
    write_config: Callable[..., Path], store: Store, lxd: Lxd, db: Database, image_alias: str, ghost_dirs, tmp_path,
    lxd_cleanup: None,
) -> None:  # fmt: skip
    app_id = make_app(db, container_image=image_alias, modules=[module_doc("app", "/srv/app", BUILD_PACK)])
    module_dir = working_copy(ghost_dirs["root"])
    # The pool's periodic pass is an hour away: only the app's first deploy can bring its idle container.
    config = write_config(container={"warm_pool": {"per_app": 1, "max": 4}}, sweep_interval="1h")
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready()
        first = make_job(db, app_id, command="deploy", status="started", modules=["app"])
        assert run_buildpack(db, first, "app", timeout=120, poll_interval=0.2).ok
        set_status(db, first, "done")
        ready = wait_until(lambda: [c for c in idle_of(lxd, app_id) if c.ready], 120, "the daemon's idle container")
        job = make_job(db, app_id, command="deploy", status="started", modules=["app"])
        result = run_buildpack(db, job, "app", timeout=120, poll_interval=0.2)
        assert result.ok, result
        assert (module_dir / "out.txt").read_text() == "built-in-a-warm-container\n"
        step = store.get_step(step_id(job, DEPLOY, "app"))
        assert step is not None and step.container == ready[0].name  # the deploy ran in the idle container
        wait_until(
            lambda: [c for c in idle_of(lxd, app_id) if c.ready and c.name != ready[0].name], 120, "its replacement"
        )
        set_status(db, job, "done")
        assert daemon.terminate(120) == 0
        assert daemon.saw("warm_pool_drained", removed=1) is not None
    assert idle_of(lxd, app_id) == []


def test_choose_targets_keeps_per_app_within_max_and_the_disk_bound() -> None:
    def target(image: str, disk: int) -> WarmTarget:
        return WarmTarget(app_id=ObjectId(), app=image, spec=ContainerSpec(name="", image=image, tags={}), disk=disk)

    big, small, snap, dup = (
        target("a" * 64, 6 << 30),
        target("b" * 64, 1 << 30),
        target("c" * 64, 0),
        target("b" * 64, 1 << 30),
    )
    wanted = choose_targets([big, small, dup, snap], per_app=2, maximum=5, max_disk=8 << 30)
    counts = {target.app: count for target, count in wanted.values()}
    # big: one fits in 8 GiB (two would not); small: two in what is left; its twin shares its shape; snapshots cost none
    assert counts == {big.app: 1, small.app: 2, snap.app: 2}
    assert choose_targets([big, small, snap], per_app=2, maximum=1, max_disk=8 << 30) == {warm_key(big.spec): (big, 1)}
    assert choose_targets([big], per_app=1, maximum=4, max_disk=1 << 30) == {}


def test_a_failing_pass_is_logged_and_the_loop_carries_on(warm_config: Config, store: Store, lxd: Lxd) -> None:
    passes: list[int] = []

    def candidates() -> list[WarmTarget]:
        passes.append(1)
        raise RuntimeError("LXD said no")

    stop = threading.Event()
    pool = WarmPool(warm_config, store, lxd, stop, candidates=candidates, launch=lambda spec: None)
    with capture_logs() as events:
        pool.loop.start()
        try:
            wait_until(lambda: any(e["event"] == "warm_pool_failed" for e in events), 30, "the failure logged")
            pool.kick()  # the next pass comes, and fails alike
            wait_until(lambda: len(passes) >= 2, 30, "a second pass")
            assert pool.loop.thread.is_alive() and pool.loop.crashes == 0
        finally:
            stop.set()
            pool.close(within=30)
    assert not pool.loop.thread.is_alive()


def test_a_take_racing_another_write_of_the_idle_container_still_takes_it(lxd: Lxd, base_image: str) -> None:
    """Seen with 50 apps deploying at once (benchmarks/fleet.py): a step took the idle container while the pool's
    own retag of it (the one making it takeable) was still being applied. LXD applies one update of an instance at
    a time and refuses the one that waited ("A matching non-reusable operation has now succeeded"): the step failed.
    Here two writers retag one running container at once, as the pool and a take did."""
    fingerprint = lxd.image_by_alias(base_image).fingerprint
    name = f"gbp-test-retag-{uuid.uuid4().hex[:8]}"
    lxd.create_container(ContainerSpec(name, fingerprint, tags={TAG_STEP: "made"}, idmap=WORKING_COPY_IDS))
    failures: list[str] = []
    written: set[str] = set()

    def writer(who: str) -> None:
        for round_ in range(10):
            tag = f"{who}-{round_}"
            try:
                lxd.retag_container(name, {TAG_STEP: tag})
                written.add(tag)
            except Exception as error:  # the race's symptom: counted, the other writer carries on
                failures.append(f"{type(error).__name__}: {error}")

    try:
        lxd.start(name)
        writers = [threading.Thread(target=writer, args=(who,)) for who in ("pool", "take")]
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join()
        final = next(c.tags for c in lxd.list_containers() if c.name == name)
    finally:
        lxd.delete_container(name)
    assert failures == []
    assert len(written) == 20
    assert final[TAG_STEP] in {"pool-9", "take-9"}  # the last write of one of them, whole
