"""Ghost's side of the handshakes: ask for a module's script, or a job's container build, and wait for the outcome.

`ghost-buildpackd buildpack` (what Ghost's Python 2.7 worker runs) is a thin
command over `run_buildpack`, which Python 3 code may also call directly
(pymongo only, no LXD). Once Ghost has cloned the module, `run_buildpack`
waits for the app's container build still in flight (bounded), sets the
deploy step to `requested`, bound to the host it runs on (the disk holding the
working copy), and waits for the daemon on that host to finish it. It gives
up early when that daemon's heartbeat stops, or once it stopped and no other
started within the restart grace; on its own timeout it abandons the request,
so the daemon stops and cleans up. `run_buildimage` does the same
for the container build of a buildimage job (`ghost-buildpackd buildimage`).

    from ghost_buildpackd.ghost.client import run_buildpack

    result = run_buildpack(db, job["_id"], module["name"], timeout=2400)
    if not result.ok:
        raise RuntimeError(f"buildpack: {result.state}: {result.message}")
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bson import ObjectId
from pymongo.database import Database
from pymongo.errors import PyMongoError

from ..joblog import JobLog
from ..model import (
    BUILD_PACK,
    BUILDIMAGE,
    CANCELLED,
    DEPLOY,
    FAILED,
    MODULE_SCRIPTS,
    SKIPPED,
    SUCCEEDED,
    Step,
    cancellation,
    step_id,
)
from ..policy import LIMITS
from ..store import Store, next_change
from .documents import parse_app
from .fields import BadDocument, parse_object_id

# The client's own states: it stopped waiting and cancelled the request; no live daemon on its host.
ABANDONED, NO_DAEMON = "abandoned", "no_daemon"
WAIT_MODES = ("auto", "change_stream", "poll")


@dataclasses.dataclass(frozen=True)
class BuildpackResult:
    """What became of a buildpack request."""

    state: str  # succeeded | failed | cancelled | skipped | abandoned | no_daemon
    exit_code: int | None
    message: str
    output_tail: str
    timed_out: bool = False  # failed: the daemon killed the script at container.exec_timeout

    @property
    def ok(self) -> bool:
        return self.state in (SUCCEEDED, SKIPPED)


def run_buildpack(
    db: Database,
    job_id: ObjectId | str,
    module_name: str,
    timeout: float = 2400.0,
    host: str | None = None,
    poll_interval: float = 2.0,
    wait_mode: str = "auto",
    script: str = BUILD_PACK,
    daemon_max_age: float | None = None,
    restart_grace: float = 0.0,
    build_wait: float = 0.0,
    job_log_dir: Path | None = None,
    ghost_root: Path | None = None,
) -> BuildpackResult:
    """Ask the daemon to run `module_name`'s `script` for deploy (or redeploy) job `job_id`; wait for the outcome.

    `timeout` counts from the request and should exceed the daemon's
    `container.exec_timeout` (30m by default) plus a container start, so the
    daemon reports a timeout before the client gives up. `host` is the name the
    daemon on this host uses (its `host` setting, else the hostname).
    `wait_mode`: `auto` (change stream when the server offers one, else polling
    every `poll_interval`), `change_stream` or `poll`. With `daemon_max_age`,
    nothing is asked unless a daemon on `host` has a heartbeat younger than
    that, and the wait ends (the request cancelled) once none has; a daemon
    that stopped less than `restart_grace` seconds ago counts as restarting,
    so the wait rides a restart (the next instance gives the outcome). With
    `build_wait`, the app's container build still in flight is waited for first,
    at most that long. `job_log_dir` (Ghost's log directory): where those waits
    are said, in the job's log. With `ghost_root` (Ghost's root directory), a
    file of the script's name committed in the module's working copy is
    removed once the outcome `succeeded` is recorded, as Ghost's `rm -vf` after
    the script: never earlier, so a run the daemon repeats after a crash runs
    that file again.
    """
    job_oid = _job_object_id(job_id)
    if not isinstance(module_name, str) or not module_name.strip():
        raise ValueError(f"module_name: expected a module name, got {module_name!r}")
    if script not in MODULE_SCRIPTS:
        raise ValueError(f"script: expected one of {', '.join(MODULE_SCRIPTS)}, got {script!r}")
    _check_wait(timeout, poll_interval, wait_mode)
    store = Store(db)
    host = host or socket.gethostname()
    alive = _liveness(store, host, daemon_max_age, restart_grace)
    if not alive():
        return BuildpackResult(NO_DAEMON, None, _no_daemon(host, daemon_max_age, restart_grace), "")
    sid = step_id(job_oid, DEPLOY, module_name, script)
    job = store.get_job(job_oid)
    app_id = job.get("app_id") if job else None
    if app_id is not None and build_wait > 0:
        notes = JobLog(job_log_dir, str(job_oid), f"container {DEPLOY} {module_name}") if job_log_dir else None
        wait_for_build(store, app_id, build_wait, poll_interval, notes)
    deadline = time.monotonic() + timeout
    step = store.request_step(job_oid, module_name, host, app_id, script)
    if not step.terminal:
        step = _wait(store, sid, deadline, poll_interval, wait_mode, alive) or step
    if step.terminal:
        result = _result(step)
    elif not alive():
        result = _abandon(store, sid, _no_daemon(host, daemon_max_age, restart_grace, "while waiting"), NO_DAEMON)
    else:
        result = _abandon(store, sid, f"abandoned by Ghost's client after waiting {timeout:g}s for the outcome")
    if result.state == SUCCEEDED and ghost_root is not None and app_id is not None:  # also a finish that won a race
        remove_committed_script(store, app_id, module_name, script, ghost_root, job_log_dir, job_oid)
    return result


def _check_wait(timeout: float, poll_interval: float, wait_mode: str) -> None:
    if timeout <= 0 or poll_interval <= 0:
        raise ValueError("timeout and poll_interval: expected durations above zero")
    if wait_mode not in WAIT_MODES:
        raise ValueError(f"wait_mode: expected one of {', '.join(WAIT_MODES)}, got {wait_mode!r}")


def run_buildimage(
    db: Database,
    job_id: ObjectId | str,
    timeout: float = 2400.0,
    host: str | None = None,
    poll_interval: float = 2.0,
    wait_mode: str = "auto",
    daemon_max_age: float | None = None,
    restart_grace: float = 0.0,
) -> BuildpackResult:
    """Ask the daemon on `host` to build the container image of buildimage job `job_id` now; wait for the outcome.

    What Ghost's buildimage job runs once its AMI is recorded (the job is still
    `started`): the step is made at once, bound to this host, or found when it
    exists (one build per job: a second request waits for the same build).
    `timeout`, `wait_mode`, `daemon_max_age`, `restart_grace` as for `run_buildpack`; on the
    timeout the request is cancelled and the daemon stops the build.
    """
    job_oid = _job_object_id(job_id)
    _check_wait(timeout, poll_interval, wait_mode)
    store = Store(db)
    host = host or socket.gethostname()
    alive = _liveness(store, host, daemon_max_age, restart_grace)
    if not alive():
        return BuildpackResult(NO_DAEMON, None, _no_daemon(host, daemon_max_age, restart_grace), "")
    job = store.get_job(job_oid)
    if job is None or job.get("command") != BUILDIMAGE:
        return BuildpackResult(FAILED, None, f"refused: no buildimage job with _id {job_oid}", "")
    deadline = time.monotonic() + timeout
    step = store.request_build(job_oid, job.get("app_id"), host)
    if not step.terminal:
        step = _wait(store, step.id, deadline, poll_interval, wait_mode, alive) or step
    if step.terminal:
        return _result(step)
    if not alive():
        return _abandon(store, step.id, _no_daemon(host, daemon_max_age, restart_grace, "while waiting"), NO_DAEMON)
    return _abandon(store, step.id, f"abandoned by Ghost's client after waiting {timeout:g}s")


def wait_for_build(store: Store, app_id: Any, limit: float, poll_interval: float, notes: JobLog | None) -> None:
    """Wait (at most `limit` seconds) for the app's container build in flight, so the deploy uses its image."""
    build = store.app_build_in_flight(app_id)
    if build is None:
        return
    say = notes.write if notes is not None else (lambda text: None)
    say(
        f"waiting up to {limit:g}s for the app's container build (buildimage job {build.job_id}, {build.state}), "
        "so this deploy uses the image it makes"
    )
    deadline = time.monotonic() + limit
    pause = threading.Event()  # never set: an interruptible sleep
    while build is not None and not build.terminal and (remaining := deadline - time.monotonic()) > 0:
        pause.wait(min(poll_interval, remaining))
        build = store.get_step(build.id)
    if build is None or not build.terminal:
        say(f"the container build is still not finished after {limit:g}s: this deploy uses the app's current image")
    else:
        say(f"the container build of job {build.job_id} ended: {build.state} ({build.message})")


def _liveness(store: Store, host: str, max_age: float | None, restart_grace: float) -> Callable[[], bool]:
    """Whether a daemon on `host` is alive, or restarting, looked up at most every `liveness_every` seconds."""
    if max_age is None:
        return lambda: True
    last: dict[str, Any] = {"at": -LIMITS.liveness_every, "alive": True}

    def alive() -> bool:
        if time.monotonic() - last["at"] >= LIMITS.liveness_every:
            last["alive"] = store.daemon_on(host, max_age, restart_grace)
            last["at"] = time.monotonic()
        return last["alive"]

    return alive


def _no_daemon(host: str, max_age: float | None, restart_grace: float, when: str = "") -> str:
    lapse = f"{max_age:g}s" if max_age is not None else "a while"
    restart = f", none restarted within {restart_grace:g}s of a stop" if restart_grace > 0 else ""
    return f"no live ghost-buildpackd on host {host}{' ' + when if when else ''} (no heartbeat for {lapse}{restart})"


def _job_object_id(job_id: Any) -> ObjectId:
    try:
        return parse_object_id(job_id, "job_id")
    except BadDocument as error:
        raise ValueError(str(error)) from None


def remove_committed_script(
    store: Store, app_id: ObjectId, module_name: str, script: str, root: Path, log_dir: Path | None, job: ObjectId
) -> None:
    """Ghost's `rm -vf` of the script it ran from the clone, so a committed one is not packaged; said in the job log.

    Only after the outcome is recorded: until then the daemon may run the step
    again (a crash before the record), and that run must find the same file.
    """
    notes = JobLog(log_dir, str(job), f"container {DEPLOY} {module_name}") if log_dir else None
    try:
        app = parse_app(store.get_app(app_id), app_id)
        path = app.working_copy(root, app.module(module_name)) / script
        if not path.exists() and not path.is_symlink():
            return
        path.unlink()
    except (BadDocument, OSError) as error:  # the script succeeded: say so rather than fail the deploy
        if notes is not None:
            notes.write(f"{script} could not be removed from the working copy: {error}")
        return
    if notes is not None:
        notes.write(f"{script} removed from the working copy, as Ghost does once it ran")


def _result(step: Step) -> BuildpackResult:
    return BuildpackResult(step.state, step.exit_code, step.message, step.output_tail, step.timed_out)


def _abandon(store: Store, sid: str, reason: str, state: str = ABANDONED) -> BuildpackResult:
    """Give up: cancel the request (the daemon stops and cleans up); a finish that raced us wins."""
    before = store.get_step(sid)
    store.abandon_step(sid, reason)
    step = store.get_step(sid)
    if step is not None and step.terminal and not (step.state == CANCELLED and step.message.startswith(reason)):
        return _result(step)
    said = step.message if step is not None and step.state == CANCELLED else reason
    if said == reason and before is not None and not before.terminal:  # a holder ends it: say what it was doing
        said = cancellation(reason, before.state)
    return BuildpackResult(state, None, said, step.output_tail if step else "")


Alive = Callable[[], bool]


def _wait(store: Store, sid: str, deadline: float, poll_interval: float, mode: str, alive: Alive) -> Step | None:
    """The step once terminal, or its last known record at the deadline or once no daemon is alive."""
    if mode != "poll":  # in auto mode a server without change streams refuses the stream: then poll
        try:
            return _wait_by_change_stream(store, sid, deadline, poll_interval, alive)
        except PyMongoError:  # the stream broke (or was refused): polling still gets the outcome
            if mode == "change_stream":
                raise
    return _wait_by_polling(store, sid, deadline, poll_interval, alive)


def _wait_by_change_stream(store: Store, sid: str, deadline: float, poll_interval: float, alive: Alive) -> Step | None:
    """Wake on each write to the record; re-read it then (and at least every poll_interval, as a safety net)."""
    step = None
    remaining = deadline - time.monotonic()
    with store.watch_step(sid, max_await=min(poll_interval, max(remaining, 0.001))) as stream:
        while True:
            # Read after the stream is open, so no write between the two is missed.
            step = store.get_step(sid)
            if step is None or step.terminal or time.monotonic() >= deadline or not alive():
                return step
            next_change(stream)


def _wait_by_polling(store: Store, sid: str, deadline: float, poll_interval: float, alive: Alive) -> Step | None:
    pause = threading.Event()  # never set: wait() is an interruptible sleep bounded by the deadline
    while True:
        step = store.get_step(sid)
        remaining = deadline - time.monotonic()
        if step is None or step.terminal or remaining <= 0 or not alive():
            return step
        pause.wait(min(poll_interval, remaining))
