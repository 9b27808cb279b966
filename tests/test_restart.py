"""Restarts and stops against Ghost's waiting commands: real daemon processes (trivial step bodies) and the real
`ghost-buildpackd buildpack` command.

- A restart fails no waiting command: heartbeats go on while the stopping daemon finishes the step it runs, a
  step it had not started stays requested for the next instance, and a command waiting through the gap
  between the two processes gets its outcome from the next one.
- The stop is bounded: MongoDB frozen during the stop holds a step worker in a retried call; the daemon leaves
  at its stop bound with a clear log line, and the next instance resumes the step once MongoDB answers.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from bson import ObjectId

from ghost_buildpackd.config import load_config
from ghost_buildpackd.daemon import EXIT_STOP_BOUND
from ghost_buildpackd.model import DEPLOY, REQUESTED, RUNNING, SUCCEEDED, step_id
from ghost_buildpackd.policy import LIMITS
from ghost_buildpackd.store import Store
from tests.support.daemon import DaemonProcess
from tests.support.ghost import finish_buildimage, make_app, make_job, module_doc, set_status
from tests.support.mongo import StandaloneMongo
from tests.support.steps import state_of, terminal_step
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.lxd, pytest.mark.mongodb]  # a daemon connects to LXD at start

REPO = Path(__file__).resolve().parents[1]


def trivial_daemon(config: Path, log: Path, work_seconds: float) -> DaemonProcess:
    return DaemonProcess(config, log, extra_env={"TEST_WORK_SECONDS": str(work_seconds)}, trivial_bodies=True)


def buildpack_command(config: Path, job: ObjectId, module: str) -> subprocess.Popen[str]:
    """Ghost's worker: `ghost-buildpackd buildpack JOB MODULE`, waiting for the outcome."""
    return subprocess.Popen(
        [sys.executable, "-m", "ghost_buildpackd", "buildpack", str(job), module, "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def effect_counts(db) -> dict[str, int]:
    return {doc["_id"]: doc["count"] for doc in db.test_effects.find()}


def test_a_restart_during_deploys_fails_no_waiting_command(db, store: Store, write_config, tmp_path: Path) -> None:
    """One worker: module a runs when the daemon is told to stop, module b is requested and waits. The stopping
    daemon finishes a and leaves b; the next instance starts 12 s after the first ended (more than two of the
    commands' looks at the heartbeats); both commands exit 0 and each script ran once."""
    config = write_config("d.yml", workers=1)
    gap = 12.0
    assert gap < LIMITS.restart_grace(load_config(config))
    app = make_app(
        db,
        container_image="any-image",
        modules=[module_doc("a", "/srv/a", "echo a"), module_doc("b", "/srv/b", "echo b")],
    )
    job = make_job(db, app, command="deploy", modules=["a", "b"])
    set_status(db, job, "started")
    first = trivial_daemon(config, tmp_path / "d0.log", work_seconds=8).start()
    second = trivial_daemon(config, tmp_path / "d1.log", work_seconds=0.5)
    commands: dict[str, subprocess.Popen[str]] = {}
    try:
        first.wait_ready()
        commands["a"] = buildpack_command(config, job, "a")
        wait_until(lambda: state_of(store, step_id(job, DEPLOY, "a")) == RUNNING, 60, "module a running")
        commands["b"] = buildpack_command(config, job, "b")
        wait_until(lambda: state_of(store, step_id(job, DEPLOY, "b")) == REQUESTED, 60, "module b requested")

        assert first.terminate(120) == 0
        ended = time.monotonic()
        left = store.get_step(step_id(job, DEPLOY, "b"))
        assert left.state == REQUESTED and left.owner is None, left  # not started: claimable by the next
        assert first.saw("daemon_stopped") and not first.saw("step_claimed", module="b", state=REQUESTED)
        wait_until(
            lambda: time.monotonic() - ended > gap and all(c.poll() is None for m, c in commands.items() if m == "b"),
            gap + 10,
            f"{gap:g}s without a daemon, command b still waiting",
        )
        second.start().wait_ready()
        outputs = {module: command.communicate(timeout=120) for module, command in commands.items()}
        codes = {module: command.returncode for module, command in commands.items()}
        assert second.terminate() == 0
    finally:
        for command in commands.values():
            command.kill()
        first.kill()
        second.kill()

    assert codes == {"a": 0, "b": 0}, outputs
    for module, (out, err) in outputs.items():
        assert err == "" and out.splitlines() == [
            f"ghost-buildpackd: build_pack of module {module}: succeeded in a container, exit 0"
        ]
    assert effect_counts(db) == {step_id(job, DEPLOY, "a"): 1, step_id(job, DEPLOY, "b"): 1}
    assert second.saw("step_claimed", module="b", state=REQUESTED) and not second.saw("step_claimed", module="a")
    assert store.instances.count_documents({"stopped_at": {"$exists": True}}) == 1  # the second one's own


@pytest.mark.parametrize("mongo", ["standalone"], indirect=True)
def test_a_stop_held_by_a_frozen_mongodb_leaves_at_the_stop_bound(
    mongo, db, store: Store, write_config, tmp_path: Path
) -> None:
    """A build runs; MongoDB freezes (SIGSTOP); SIGTERM. The aborted step's release is a MongoDB write retried
    for minutes, in a worker thread Python joins at exit: the daemon leaves at its stop bound instead, exit 3,
    saying so. Once MongoDB answers again, the next instance takes the step over (its lease expired) and the
    build's effect happens once."""
    assert isinstance(mongo, StandaloneMongo)
    config = write_config("d.yml", shutdown_grace="1s", lxd={"timeout": "10s"})
    bound = LIMITS.stop_bound(load_config(config))
    app = make_app(db)
    job = make_job(db, app)
    finish_buildimage(db, job)
    sid = step_id(job, "buildimage")
    first = trivial_daemon(config, tmp_path / "d0.log", work_seconds=600).start()
    second = trivial_daemon(config, tmp_path / "d1.log", work_seconds=0.5)
    try:
        first.wait_ready()
        wait_until(lambda: state_of(store, sid) == RUNNING, 60, "the build running")
        mongo.node.freeze()
        try:
            stopped_at = time.monotonic()
            code = first.terminate(bound + 60)
            took = time.monotonic() - stopped_at
        finally:
            mongo.node.thaw()
        print(f"\nstop with MongoDB frozen: exit {code} after {took:.1f}s (stop bound {bound:g}s)")
        left = first.saw("stop_bound_reached_exiting")
        second.start().wait_ready()
        step = wait_until(lambda: terminal_step(store, sid), 120, "the build's outcome")
        assert second.terminate() == 0
    finally:
        first.kill()
        second.kill()

    assert code == EXIT_STOP_BOUND and bound - 1 <= took < bound + 15, (code, took)
    assert left is not None and left["steps_in_flight"] == [sid] and left["stop_bound_s"] == bound, left
    assert step.state == SUCCEEDED, step.message
    assert effect_counts(db) == {sid: 1}
    assert second.saw("step_claimed", step=sid)
