"""Supervised loops: no long-lived thread of the daemon dies silently.

Each long-lived loop (event intake, request watcher, heartbeats, LXD health
probe, upkeep, the runner's dispatcher, lease renewer and lease guard) runs
under `Supervised`. An exception escaping the loop is logged with its
traceback (`loop_crashed`, with the loop's name) and the loop starts again
after the loops' backoff
(`policy.Pacer`, `LOOP_BACKOFF`), longer after each crash in a row. A loop
counts as crash-looping from a crash until it has run `backoff.longest`
seconds without crashing again.

What the health answers read from it:
- `problem`: crash-looping, without progress past the stall limit, or ended
  while the daemon runs (`/readyz`, and `status --check` through the
  heartbeat record);
- `stalled`: without progress past the stall limit (a loop that marks its
  progress), crash-looping for longer than that limit, or ended: the main
  loop then stops feeding systemd's watchdog, which restarts the process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .logs import get_logger
from .policy import LOOP_BACKOFF, Backoff, Pacer

log = get_logger(__name__)


class Supervised:
    """One long-lived loop, restarted with backoff whenever it raises; it ends when `body` returns."""

    def __init__(
        self,
        name: str,
        body: Callable[[], None],
        stop: threading.Event,
        progress: Callable[[], float] | None = None,
        backoff: Backoff = LOOP_BACKOFF,
    ):
        self.name = name
        self.body = body
        self.stop = stop  # set: no restart after a crash
        self._progress = progress  # monotonic time of the loop's last progress, for loops that mark it
        self.backoff = backoff
        self.crashes = 0  # in a row
        self.crashing_since = 0.0  # monotonic time of the first crash in a row
        self.last_error = ""
        self.running_since: float | None = None  # None: not started, or waiting to restart
        self.ended = False
        self.thread = threading.Thread(target=self._supervise, name=name, daemon=True)

    def start(self) -> Supervised:
        self.thread.start()
        return self

    def _supervise(self) -> None:
        try:
            self._run_until_it_returns()
        finally:  # whatever ended it (BaseException included): the health answers say so
            self.ended = True

    def _run_until_it_returns(self) -> None:
        pacer = Pacer(self.backoff)
        while True:
            self.running_since = time.monotonic()
            try:
                self.body()
                return
            except Exception as error:
                if self._recovered(time.monotonic()):  # the last crash is long past: start the backoff over
                    pacer.succeeded()
                    self.crashes = 0
                self._log_crash(error, pacer.delay)
            if self.stop.is_set():
                return
            pacer.pause(self.stop)
            if self.stop.is_set():
                return

    def _log_crash(self, error: Exception, retry_in: float) -> None:
        """Called in the `except` block, so the log line carries the traceback."""
        now = time.monotonic()
        if self.crashes == 0:
            self.crashing_since = now
        self.crashes += 1
        self.running_since = None
        self.last_error = f"{type(error).__name__}: {error}"[:300]
        log.exception(
            "loop_crashed",
            loop=self.name,
            error=self.last_error,
            crashes_in_a_row=self.crashes,
            retry_in_s=None if self.stop.is_set() else retry_in,
        )

    def _recovered(self, now: float) -> bool:
        return self.running_since is not None and now - self.running_since >= self.backoff.longest

    def crash_looping(self, now: float) -> bool:
        return self.crashes > 0 and not self._recovered(now)

    def _ended_early(self) -> bool:
        return self.ended and not self.stop.is_set()

    def stall(self, now: float, stall_after: float) -> str | None:
        """Why this loop counts as stalled (the watchdog starves), None when it does not."""
        if self._ended_early():
            return f"{self.name} loop ended"
        if self.crash_looping(now) and now - self.crashing_since > stall_after:
            return f"{self.name} loop crash-looping for over {stall_after:g}s (last: {self.last_error})"
        if self._progress is not None and now - self._progress() > stall_after:
            return f"{self.name} loop without progress for over {stall_after:g}s"
        return None

    def problem(self, now: float, stall_after: float) -> str | None:
        """What readiness says about this loop, None when it is healthy."""
        stalled = self.stall(now, stall_after)
        if stalled or not self.crash_looping(now):
            return stalled
        return f"{self.name} loop crashed {self.crashes} time(s) in a row, restarting (last: {self.last_error})"
