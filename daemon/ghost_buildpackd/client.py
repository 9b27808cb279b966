"""Ghost's side of the deploy handshake: ask for a module's buildpack and wait for its outcome.

Imported by Ghost's deploy worker (pymongo only, no LXD): once Ghost has
cloned the module, `run_buildpack` sets the deploy step to `requested`, bound
to the host it runs on (the disk holding the working copy), and waits for the
daemon on that host to finish it. On its own timeout it abandons the request,
so the daemon stops and cleans up.

    from ghost_buildpackd.client import run_buildpack

    result = run_buildpack(db, job["_id"], module["name"], timeout=2400)
    if not result.ok:
        raise GCallException(f"buildpack: {result.state}: {result.message}")
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from typing import Any

from bson import ObjectId
from pymongo.database import Database
from pymongo.errors import PyMongoError

from .ghost import BadDocument, parse_object_id
from .store import CANCELLED, SKIPPED, SUCCEEDED, Step, Store, next_change, step_id

ABANDONED = "abandoned"  # the client's own state: it stopped waiting and cancelled the request
WAIT_MODES = ("auto", "change_stream", "poll")


@dataclasses.dataclass(frozen=True)
class BuildpackResult:
    """What became of a buildpack request."""

    state: str  # succeeded | failed | cancelled | skipped | abandoned
    exit_code: int | None
    message: str
    output_tail: str

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
) -> BuildpackResult:
    """Ask the daemon to run `module_name`'s buildpack for deploy job `job_id` and wait for the outcome.

    `timeout` should exceed the daemon's `container.exec_timeout` (30m by default)
    plus a container start, so the daemon reports a timeout before the client gives up.
    `host` is the name the daemon on this host uses (its `host` setting, else the
    hostname). `wait_mode`: `auto` (change stream when the server offers one, else
    polling every `poll_interval`), `change_stream` or `poll`.
    """
    job_oid = _job_object_id(job_id)
    if not isinstance(module_name, str) or not module_name.strip():
        raise ValueError(f"module_name: expected a module name, got {module_name!r}")
    if timeout <= 0 or poll_interval <= 0:
        raise ValueError("timeout and poll_interval: expected durations above zero")
    if wait_mode not in WAIT_MODES:
        raise ValueError(f"wait_mode: expected one of {', '.join(WAIT_MODES)}, got {wait_mode!r}")
    store = Store(db)
    deadline = time.monotonic() + timeout
    sid = step_id(job_oid, "deploy", module_name)
    job = store.get_job(job_oid)
    step = store.request_step(job_oid, module_name, host or socket.gethostname(), job.get("app_id") if job else None)
    if not step.terminal:
        step = _wait(store, sid, deadline, poll_interval, wait_mode) or step
    if step.terminal:
        return _result(step)
    return _abandon(store, sid, timeout)


def _job_object_id(job_id: Any) -> ObjectId:
    try:
        return parse_object_id(job_id, "job_id")
    except BadDocument as error:
        raise ValueError(str(error)) from None


def _result(step: Step) -> BuildpackResult:
    return BuildpackResult(step.state, step.exit_code, step.message, step.output_tail)


def _abandon(store: Store, sid: str, timeout: float) -> BuildpackResult:
    """Give up: cancel the request (the daemon stops and cleans up); a finish that raced us wins."""
    reason = f"abandoned by Ghost's client after waiting {timeout:g}s"
    store.abandon_step(sid, reason)
    step = store.get_step(sid)
    if step is not None and step.terminal and not (step.state == CANCELLED and step.message == reason):
        return _result(step)
    return BuildpackResult(ABANDONED, None, reason, step.output_tail if step else "")


def _wait(store: Store, sid: str, deadline: float, poll_interval: float, mode: str) -> Step | None:
    """The step once terminal, or its last known record at the deadline."""
    if mode != "poll":  # in auto mode a server without change streams refuses the stream: then poll
        try:
            return _wait_by_change_stream(store, sid, deadline, poll_interval)
        except PyMongoError:  # the stream broke (or was refused): polling still gets the outcome
            if mode == "change_stream":
                raise
    return _wait_by_polling(store, sid, deadline, poll_interval)


def _wait_by_change_stream(store: Store, sid: str, deadline: float, poll_interval: float) -> Step | None:
    """Wake on each write to the record; re-read it then (and at least every poll_interval, as a safety net)."""
    step = None
    remaining = deadline - time.monotonic()
    with store.watch_step(sid, max_await=min(poll_interval, max(remaining, 0.001))) as stream:
        while True:
            # Read after the stream is open, so no write between the two is missed.
            step = store.get_step(sid)
            if step is None or step.terminal or time.monotonic() >= deadline:
                return step
            next_change(stream)


def _wait_by_polling(store: Store, sid: str, deadline: float, poll_interval: float) -> Step | None:
    pause = threading.Event()  # never set: wait() is an interruptible sleep bounded by the deadline
    while True:
        step = store.get_step(sid)
        remaining = deadline - time.monotonic()
        if step is None or step.terminal or remaining <= 0:
            return step
        pause.wait(min(poll_interval, remaining))
