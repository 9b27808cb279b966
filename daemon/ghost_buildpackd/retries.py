"""Retrying transient errors with backoff (tenacity), the one way both adapters do it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tenacity

from .logs import get_logger

log = get_logger(__name__)


def retrying(
    transient: Callable[[BaseException], bool], event: str, attempts: int, multiplier: float, max_wait: float
) -> Any:
    """A decorator retrying calls that fail with a transient error, logging `event` before each wait."""
    return tenacity.retry(
        retry=tenacity.retry_if_exception(transient),
        wait=tenacity.wait_exponential(multiplier=multiplier, max=max_wait),
        stop=tenacity.stop_after_attempt(attempts),
        before_sleep=lambda state: log.warning(
            event,
            attempt=state.attempt_number,
            error=str(state.outcome.exception()) if state.outcome else None,
        ),
        reraise=True,
    )
