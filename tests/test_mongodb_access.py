"""A MongoDB with access control, as a site may run it: a user without the `changeStream` privilege."""

from __future__ import annotations

import pytest
import yaml

from ghost_buildpackd.model import SUCCEEDED, step_id
from tests.conftest import raw_config
from tests.support.daemon import DaemonProcess
from tests.support.ghost import finish_buildimage, make_app, make_job
from tests.support.steps import terminal_step
from tests.support.waiting import wait_until

# The daemon process connects to LXD at start; its step bodies are trivial.
pytestmark = [pytest.mark.lxd, pytest.mark.mongodb]

# What the daemon does on Ghost's database, without `changeStream`.
WITHOUT_CHANGE_STREAMS = [
    "find", "insert", "update", "remove", "createIndex", "createCollection", "listCollections", "listIndexes",
]  # fmt: skip


@pytest.mark.parametrize("mongo", ["authenticated"], indirect=True)
def test_a_user_without_the_change_stream_privilege_polls_and_says_so_once(mongo, db, ghost_dirs, tmp_path):
    uri = mongo.user_uri(db.name, "ghost_buildpackd", WITHOUT_CHANGE_STREAMS)
    raw = raw_config(mongo, db, ghost_dirs)
    raw["mongodb"]["uri"] = uri
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump(raw))
    app = make_app(db)
    with DaemonProcess(config, tmp_path / "daemon.log", trivial_bodies=True) as process:
        process.wait_ready()
        ready = process.saw("daemon_ready")
        assert ready["event_mode"] == "poll"
        assert "may not open change streams" in ready["mode_reason"], ready
        assert "changeStream" in ready["mode_reason"]
        job = make_job(db, app)
        finish_buildimage(db, job)
        step = wait_until(lambda: terminal_step_of(db, job), 60, "the job's step, found by polling")
        assert step.state == SUCCEEDED, step.message
        assert process.terminate() == 0
    said = [e for e in process.events() if "may not open change streams" in str(e.get("mode_reason", ""))]
    assert len(said) == 1, said


def terminal_step_of(db, job):
    from ghost_buildpackd.store import Store

    return terminal_step(Store(db), step_id(job, "buildimage"))
