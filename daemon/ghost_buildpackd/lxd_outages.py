"""Riding out an LXD outage: when LXD counts as back after it went away.

Policy over the adapter (`lxd/`), which only reports that LXD went away
(`is_unavailable`) or is shutting down (`is_shutting_down`) and which server
answers (`Lxd.answering_pid`). The runner waits here before a step starts over,
a step's release before it removes its container.
"""

from __future__ import annotations

import contextlib
import threading
import time

from .logs import get_logger
from .lxd import Lxd, causes, is_shutting_down
from .policy import LIMITS

log = get_logger(__name__)

# Set on an error once a wait saw LXD come back after it (`wait_until_back`).
LXD_BACK_AFTER = "_ghost_buildpackd_lxd_back_after"


def wait_until_back(lxd: Lxd, error: BaseException, abort: threading.Event, limit: float) -> bool:
    """After `error` said LXD went away: True once it answers again, False on `abort` or after `limit` s.

    A server shutting down still answers reads until it exits, so after a
    refusal for that reason LXD is back only when another server answers.
    An error another wait already saw LXD come back after (a clean-up that
    waited before re-raising it) is over: the server answering now is the
    next one, and waiting for yet another would wait out `limit` for nothing.
    """
    if any(getattr(cause, LXD_BACK_AFTER, False) for cause in causes(error)):
        return True
    leaving = lxd.server_pid if is_shutting_down(error) else None
    started = time.monotonic()
    while not abort.wait(LIMITS.lxd_probe_every):
        pid = lxd.answering_pid()
        if pid is not None and (leaving is None or pid != leaving):
            log.info("lxd_available_again", waited_s=round(time.monotonic() - started, 1))
            for cause in causes(error):
                with contextlib.suppress(AttributeError):  # a few built-in exceptions take no attributes
                    setattr(cause, LXD_BACK_AFTER, True)
            return True
        if time.monotonic() - started > limit:
            return False
    return False
