"""`ghost-buildpackd replay JOB_ID`: the one way to run a finished buildimage step again."""

from __future__ import annotations

from ghost_buildpackd.cli import main
from ghost_buildpackd.model import FAILED, REQUESTED, step_id
from tests.support.ghost import finish_buildimage, make_app, make_job


def test_replay_puts_a_finished_build_back_as_requested(db, store, write_config, capsys):
    job = make_job(db, make_app(db))
    finish_buildimage(db, job)
    sid = step_id(job, "buildimage")
    store.create_step(job, "buildimage", state=FAILED, message="pre_buildimage hook exited with code 1")
    config = write_config()
    assert main(["replay", str(job), "--config", str(config)]) == 0
    step = store.get_step(sid)
    assert (step.state, step.attempts, step.message) == (REQUESTED, 0, "replay requested")
    assert "was failed; now requested" in capsys.readouterr().out
    assert main(["replay", str(job), "--config", str(config)]) == 1  # not finished: nothing to replay
    assert "is requested: nothing to replay" in capsys.readouterr().out


def test_replay_creates_the_step_of_a_job_the_daemon_never_saw(db, store, write_config, capsys):
    job = make_job(db, make_app(db))
    finish_buildimage(db, job)
    assert main(["replay", str(job), "--config", str(write_config())]) == 0
    assert store.get_step(step_id(job, "buildimage")).state == REQUESTED


def test_replay_refuses_bad_or_unknown_job_ids(db, write_config, capsys):
    config = str(write_config())
    assert main(["replay", "not-an-id", "--config", config]) == 2
    assert "JOB_ID: expected an ObjectId (24 hex digits), got 'not-an-id'" in capsys.readouterr().out
    assert main(["replay", "0" * 24, "--config", config]) == 1
    assert "no buildimage job 000000000000000000000000" in capsys.readouterr().out
