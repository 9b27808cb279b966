"""Operating a real daemon: `status` shows its steps, and a killed daemon's container is swept after restart."""

from __future__ import annotations

import io
import json
import os

import pytest

from ghost_buildpackd.config import load_config
from ghost_buildpackd.lxd import TAG_STEP
from ghost_buildpackd.model import CANCELLED, step_id
from ghost_buildpackd.status import show_status
from tests.conftest import leftover_containers
from tests.support.daemon import DaemonProcess
from tests.support.ghost import make_app, make_job, module_doc, set_status
from tests.support.waiting import wait_until


def status_report(config_path) -> dict:
    out = io.StringIO()
    assert show_status(load_config(config_path, env={}), out, as_json=True, last=5) == 0
    return json.loads(out.getvalue())


@pytest.mark.lxd
def test_status_shows_a_running_daemon_and_a_killed_daemons_container_is_swept(
    db, store, lxd, base_image, write_config, tmp_path
):
    base = lxd.image_by_alias(base_image)
    alias = f"gbp-test-ops-{os.getpid()}"
    lxd.point_alias(alias, base.fingerprint)  # stands for the app's last built image
    try:
        app = make_app(db, container_image=alias, modules=[module_doc("api", "/srv/api", "true")])
        job = make_job(db, app, command="deploy", modules=["api"])
        config = write_config(lease_ttl="3s", sweep_interval="1h")
        sid = step_id(job, "deploy", "api")

        first = DaemonProcess(config, tmp_path / "first.log").start()
        first.wait_ready()
        set_status(db, job, "started")
        wait_until(lambda: (s := store.get_step(sid)) is not None and s.state == "ready", 60, "the prepared step")
        report = status_report(config)
        assert [i["pid"] for i in report["instances"]] == [first.pid]
        assert report["instances"][0]["event_mode"] == "change_stream"
        assert [(s["id"], s["state"]) for s in report["steps_in_flight"]] == [(sid, "ready")]
        container = [c.name for c in lxd.list_containers() if c.tags.get(TAG_STEP) == sid]
        assert len(container) == 1

        first.kill()  # no clean-up at all
        set_status(db, job, "done")  # Ghost's deploy ends while no daemon runs
        assert leftover_containers(lxd, db) == container

        with DaemonProcess(config, tmp_path / "second.log") as second:
            second.wait_ready()
            wait_until(lambda: leftover_containers(lxd, db) == [], 60, "the orphan container to be removed")
            # LXD lists the container gone before its delete call returns to the daemon, which logs it then.
            wait_until(
                lambda: second.saw("orphan_container_removed", container=container[0], step=sid),
                30,
                "the sweep's line for the container it removed",
            )
            assert store.get_step(sid).state == CANCELLED
            assert second.terminate() == 0
    finally:
        lxd.delete_alias(alias)
