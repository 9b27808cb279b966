"""No long-lived loop of the daemon dies silently: bad job times are skipped, and any loop that raises is
logged with its traceback and restarted with backoff, and shows as crash-looping where operators look."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from ghost_buildpackd.model import SUCCEEDED, step_id
from tests.support.daemon import DaemonProcess
from tests.support.ghost import finish_buildimage, make_app, make_job
from tests.support.waiting import wait_until

MODES = [("change_stream", "replica_set"), ("poll", "standalone")]
by_mode = pytest.mark.parametrize(("mode", "mongo"), MODES, indirect=["mongo"], ids=[m for m, _ in MODES])


def step_state(db, job) -> str | None:
    doc = db.container_steps.find_one({"_id": step_id(job, "buildimage")})
    return doc["state"] if doc else None


@pytest.mark.lxd
@pytest.mark.mongodb
@pytest.mark.slow
@by_mode
def test_a_job_whose_updated_is_not_a_date_is_skipped_and_intake_goes_on(db, write_config, tmp_path: Path, mode):
    """A job whose `_updated` holds a string beside a date is in the catch-up scan's range, and its time cannot
    be ordered with the other jobs' (a TypeError ended the event thread for good, heartbeats going on)."""
    app = make_app(db)
    now = datetime.now(UTC).replace(microsecond=0)
    bad = make_job(db, app, status="done", message="Build image OK: [ami-1]")
    db.jobs.update_one({"_id": bad}, {"$set": {"_updated": [now, now.isoformat()]}})
    before = make_job(db, app, command="deploy", status="done")  # a second command: the scans' times are compared
    config = write_config("d.yml", events={"mode": mode})
    with DaemonProcess(config, tmp_path / "d.log", trivial_bodies=True) as process:
        process.wait_ready()
        good = make_job(db, app)
        finish_buildimage(db, good)
        wait_until(lambda: step_state(db, good) == SUCCEEDED, 60, "the good job's step to run")
        skipped = wait_until(lambda: process.saw("job_skipped_updated_not_a_date"), 30, "the bad job named in the log")
        assert skipped["job_id"] == str(bad) and skipped["field"] == "_updated"
        assert skipped["reason"] == "expected a date, got a list of datetime, str"
        assert not process.saw("loop_crashed")
        assert process.terminate() == 0
    assert step_state(db, bad) is None
    assert before
