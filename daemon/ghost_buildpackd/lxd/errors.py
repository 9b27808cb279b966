"""How LXD failed: the adapter's errors, and the classification of what pylxd and requests raise.

Whether an error means LXD went away (`is_unavailable`), refused because it is
shutting down, or is worth retrying at once (`retry_lxd`); what to do about an
outage is decided outside the adapter (`lxd_outages.py`).
"""

from __future__ import annotations

from collections.abc import Iterator

import requests
from pylxd.exceptions import ClientConnectionFailed, LXDAPIException, NotFound

from ..policy import LXD_RETRY, retrying


class LxdError(Exception):
    """An LXD operation failed in a way the caller should report."""


class ImagePullFailed(LxdError):
    """Copying an image from another LXD server failed; the text says why."""


class LxdUnavailable(LxdError):
    """LXD itself went away (stopped, restarting, shutting down), as opposed to refusing a request."""


def causes(error: BaseException | None) -> Iterator[BaseException]:
    """`error` and the errors it was raised from or while handling (bounded: the chain is short)."""
    for _ in range(10):
        if error is None:
            return
        yield error
        error = error.__cause__ or error.__context__


# What LXD answers while it stops: refusing changes, then (its database closed first) failing what it still takes.
SHUTTING_DOWN_MESSAGES = ("shutting down", "database is closed")


def is_shutting_down(error: BaseException | None) -> bool:
    """LXD refused or failed a request because it is shutting down (it still answers some meanwhile)."""
    return any(
        isinstance(e, LXDAPIException) and any(words in str(e).lower() for words in SHUTTING_DOWN_MESSAGES)
        for e in causes(error)
    )


def is_unavailable(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, says LXD could not be reached or is shutting down."""
    unreachable = (LxdUnavailable, requests.ConnectionError, ClientConnectionFailed)
    return any(isinstance(e, unreachable) for e in causes(error)) or is_shutting_down(error)


def raised_by_lxd(error: BaseException | None) -> bool:
    """Whether LXD failed the call `error` comes from (an API error, a failed operation, a lost connection):
    `error`, or an error it was raised from or while handling, is LXD's or this module's."""
    failures = (LxdError, LXDAPIException, ClientConnectionFailed, requests.RequestException)
    return any(isinstance(e, failures) for e in causes(error))


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, requests.ConnectionError | requests.Timeout):
        return True
    if isinstance(error, LXDAPIException) and not isinstance(error, NotFound):
        text = str(error).lower()
        transient = ("timeout", "connection reset", "try again", "busy", *SHUTTING_DOWN_MESSAGES)
        return any(words in text for words in transient)
    return False


def is_update_conflict(error: LXDAPIException) -> bool:
    """A write to an instance refused because another write changed it since the read (ETag) or is under way."""
    return error.response.status_code == 412 or "non-reusable operation" in str(error)


retry_lxd = retrying(_is_transient, "lxd_transient_error_retrying", LXD_RETRY)
