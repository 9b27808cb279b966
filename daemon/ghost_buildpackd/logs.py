"""Structured logging: JSON lines for journald, readable lines on a terminal.

Every line carries `event`, `level` and `timestamp`, plus the context bound
with `bind_contextvars` (job_id, app, step, container, module) by whoever runs
a step. Secret values (the app's `env_vars` values) are registered with
`Secrets` while a step runs and replaced by `***` in every string a log line
carries, as a last line of defence: the code never logs them on purpose.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import structlog

REDACTED = "***"
# Values shorter than this are not treated as secrets in output: masking every
# "1" or "no" would make logs unreadable and protects nothing.
MIN_SECRET_LENGTH = 4


class Secrets:
    """Process-wide registry of values that must never appear in a log."""

    _lock = threading.Lock()
    _counts: dict[str, int] = {}

    @classmethod
    @contextmanager
    def registered(cls, values: Iterable[str]) -> Iterator[None]:
        kept = [value for value in values if len(value) >= MIN_SECRET_LENGTH]
        with cls._lock:
            for value in kept:
                cls._counts[value] = cls._counts.get(value, 0) + 1
        try:
            yield
        finally:
            with cls._lock:
                for value in kept:
                    cls._counts[value] -= 1
                    if not cls._counts[value]:
                        del cls._counts[value]

    @classmethod
    def redact(cls, text: str) -> str:
        values = cls._counts
        if not values:
            return text
        # Longest first, so a secret containing another is masked whole.
        for value in sorted(values, key=len, reverse=True):
            if value in text:
                text = text.replace(value, REDACTED)
        return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return Secrets.redact(value)
    if isinstance(value, dict):
        return {key: _redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(item) for item in value]
    return value


def redact_secrets(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: mask registered secrets anywhere in the event."""
    if not Secrets._counts:
        return event_dict
    return {key: _redact_value(value) for key, value in event_dict.items()}


class _CurrentStderr:
    """Whatever `sys.stderr` is when a line is written (it may be swapped after configuration)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Set structlog up once, at the very start of a command (default stream: standard error)."""
    stream = stream or _CurrentStderr()  # type: ignore[assignment]
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if use_console
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # pylxd and ws4py use the standard library; keep their chatter at warnings.
    logging.basicConfig(level=logging.WARNING, stream=stream, format="%(name)s: %(message)s")


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name) if name else structlog.get_logger()
