"""Which of LXD's answers mean "LXD is going away" (the step waits for it) rather than a refusal (the step fails)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests
from pylxd.exceptions import LXDAPIException

from ghost_buildpackd.lxd import Lxd, LxdUnavailable, is_unavailable
from ghost_buildpackd.lxd_outages import wait_until_back


def lxd_answer(status: int, error: str) -> LXDAPIException:
    """The exception pylxd raises for an error answer of LXD's API, as LXD words it."""
    response = requests.Response()
    response.status_code = status
    response._content = json.dumps({"type": "error", "error": error, "error_code": status}).encode()
    return LXDAPIException(response)


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        ("LXD is shutting down", True),
        # Seen during an LXD restart (the soak): its database closes before it stops answering.
        ("Failed to begin transaction: sql: database is closed", True),
        ("Profile not found", False),
        ("Instance not found", False),
    ],
)
def test_an_lxd_stopping_is_told_apart_from_a_refusal(error: str, unavailable: bool) -> None:
    assert is_unavailable(lxd_answer(500, error)) is unavailable
    try:
        raise RuntimeError("while launching") from lxd_answer(500, error)
    except RuntimeError as wrapped:
        assert is_unavailable(wrapped) is unavailable  # also as the cause of another error


@pytest.mark.lxd
def test_an_outage_another_wait_saw_end_is_not_waited_for_again(lxd: Lxd) -> None:
    """As in the soak: LXD restarts while a script runs; the clean-up waits for the next server and re-raises
    the error; the runner's own wait on that error must not wait for yet another server (it waited out its
    10-minute limit, the step stuck `requested`)."""
    refused = lxd_answer(500, "LXD is shutting down")
    serving = lxd.answering_pid()
    assert serving is not None
    lxd.server_pid = -1  # the server that was leaving when the error came (it has gone since)
    assert wait_until_back(lxd, refused, threading.Event(), limit=30)  # the clean-up's wait: the next server answers
    assert lxd.server_pid == serving

    started = time.monotonic()
    try:
        raise LxdUnavailable(str(refused)) from refused  # how the runner receives it
    except LxdUnavailable as seen_by_the_runner:
        assert wait_until_back(lxd, seen_by_the_runner, threading.Event(), limit=5)
    assert time.monotonic() - started < 1, "the runner waited for another restart"

    # An error no wait has seen the end of still waits for another server than the one answering.
    assert not wait_until_back(lxd, lxd_answer(500, "LXD is shutting down"), threading.Event(), limit=1)
