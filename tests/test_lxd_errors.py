"""Which of LXD's answers mean "LXD is going away" (the step waits for it) rather than a refusal (the step fails)."""

from __future__ import annotations

import json

import pytest
import requests
from pylxd.exceptions import LXDAPIException

from ghost_buildpackd.lxd import is_unavailable


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
