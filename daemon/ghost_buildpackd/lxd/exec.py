"""Running a command in a container: LXD's exec operation, its output websockets, and its deadline.

Unlike pylxd's `execute`, which has no deadline, closes the output websockets
as soon as the command has exited (dropping output still in flight, seen under
load) and then polls every 100 ms, this waits for LXD to end each stream
itself once it has sent everything. The deadline (and an abort) are enforced
from outside the exec, by force-stopping the container: that ends every
process in it, so the exec operation returns.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlparse

import pylxd
from ws4py.client import WebSocketBaseClient

from ..logs import get_logger
from .errors import LxdUnavailable, is_unavailable
from .records import ExecResult

log = get_logger(__name__)

OUTPUT_DRAIN_TIMEOUT = 10.0  # after the command exits, how long LXD may take to flush its output streams


class _InputStream(WebSocketBaseClient):
    """An exec's stdin websocket: closed with an empty message right after the handshake."""

    def __init__(self, url: str, **kwargs: Any):
        super().__init__(url, exclude_headers=["origin"], **kwargs)  # LXD refuses a ws+unix Origin

    def handshake_ok(self) -> None:
        self.send(b"", binary=False)


class _OutputStream(WebSocketBaseClient):
    """An exec's stdout or stderr websocket, read by its own thread once connected.

    Chunks go to `on_output`; `ended` is set when LXD ends the stream (an empty
    message, then the close). The thread starts only after `connect()` has
    processed what came with the handshake, so two readers never race.
    """

    def __init__(self, url: str, on_output: Callable[[bytes], None], **kwargs: Any):
        super().__init__(url, exclude_headers=["origin"], **kwargs)
        self.on_output = on_output
        self.ended = threading.Event()
        self.reader = threading.Thread(target=self.run, name="exec-output", daemon=True)

    def open(self) -> None:
        self.connect()
        self.reader.start()

    def received_message(self, message: Any) -> None:
        if not message.data:  # LXD's end-of-stream marker
            self.ended.set()
            return
        self.on_output(bytes(message.data))

    def closed(self, code: int, reason: str | None = None) -> None:
        self.ended.set()

    def unhandled_error(self, error: Exception) -> None:
        # LXD may reset the connection right after its end-of-stream marker.
        self.ended.set()

    def _write(self, data: bytes) -> None:
        # Only protocol replies (pongs, close) are written on an output stream; once LXD has
        # ended it they cannot be delivered and need not be.
        with contextlib.suppress(OSError, RuntimeError):
            super()._write(data)


def stream_exec(
    client: pylxd.Client,
    name: str,
    argv: list[str],
    env: Mapping[str, str],
    on_output: Callable[[bytes], None],
    cwd: str | None,
) -> int:
    """One exec operation with its stdout/stderr websockets, on a client without an HTTP timeout (the command
    runs as long as it runs); returns the exit code once LXD has ended both output streams."""
    response = client.api.instances[name].exec.post(
        json={"command": list(argv), "environment": dict(env), "wait-for-websocket": True,
              "interactive": False, "cwd": cwd}
    ).json()  # fmt: skip
    fds = response["metadata"]["metadata"]["fds"]
    path = urlparse(response["operation"]).path + "/websocket"  # the operation's URL, as LXD gave it
    streams: list[_OutputStream] = []
    stdin = _InputStream(client.websocket_url, ssl_options=client.ssl_options)
    try:
        stdin.resource = f"{path}?secret={fds['0']}"
        stdin.connect()  # sends end-of-input at once: commands get no stdin
        for fd in ("1", "2"):
            stream = _OutputStream(client.websocket_url, on_output, ssl_options=client.ssl_options)
            stream.resource = f"{path}?secret={fds[fd]}"
            stream.open()
            streams.append(stream)
        operation = client.operations.wait_for_operation(response["operation"])
        deadline = time.monotonic() + OUTPUT_DRAIN_TIMEOUT
        for stream in streams:
            stream.ended.wait(max(0.0, deadline - time.monotonic()))
        return int(operation.metadata["return"])
    finally:
        websockets: list[WebSocketBaseClient] = [stdin, *streams]
        for websocket in websockets:
            with contextlib.suppress(Exception):
                websocket.close()


def execute(
    client: Callable[[], pylxd.Client],
    stop: Callable[[str], None],
    name: str,
    argv: list[str],
    env: Mapping[str, str],
    on_output: Callable[[bytes], None],
    timeout: float,
    cwd: str | None,
    abort: threading.Event | None,
    stop_wait: float,
) -> ExecResult:
    """Run `argv` in container `name` on a thread of its own (`client()` gives its connection), streaming output
    chunks to `on_output`; at `timeout` or on `abort`, `stop` force-stops the container, then the exec is
    given `stop_wait` seconds to return."""
    outcome: dict[str, Any] = {}
    done = threading.Event()
    started = time.monotonic()

    def run() -> None:
        try:
            outcome["exit_code"] = stream_exec(client(), name, argv, env, on_output, cwd)
        except Exception as error:  # reported to the caller as a lost command
            outcome["error"] = f"{type(error).__name__}: {error}"
            outcome["exception"] = error
        finally:
            done.set()

    worker = threading.Thread(target=run, name=f"exec-{name}", daemon=True)
    worker.start()
    deadline = started + timeout
    reason = ""
    while not done.wait(min(0.25, max(0.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            reason = "timeout"
            break
        if abort is not None and abort.is_set():
            reason = "aborted"
            break
    if reason:
        log.warning("exec_interrupted_stopping_container", container=name, reason=reason)
        try:
            stop(name)
        except Exception as error:
            log.error("force_stop_failed", container=name, error=str(error))
        done.wait(stop_wait)
    elif is_unavailable(outcome.get("exception")):
        raise LxdUnavailable(f"LXD went away while `{argv[0]}` ran in {name}: {outcome['error']}")
    return ExecResult(
        exit_code=None if reason else outcome.get("exit_code"),
        timed_out=reason == "timeout",
        aborted=reason == "aborted",
        error=outcome.get("error", ""),
        duration=time.monotonic() - started,
    )
