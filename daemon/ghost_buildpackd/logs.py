"""Structured logging: JSON lines for journald, readable lines on a terminal.

Every line carries `event`, `level` and `timestamp`, plus the context bound
with `bind_contextvars` (job_id, app, step, container, module) by whoever runs
a step. Secret values (the app's `env_vars` values) are registered with
`Secrets` while a step runs and replaced by `***` in every string a log line
carries, as a last line of defence: the code never logs them on purpose.
Output is masked line by line, so each line of a multi-line value (a PEM key)
is registered too.
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
        kept = [piece for value in values for piece in _pieces(value)]
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
    def safe_cut(cls, data: bytes, at: int) -> int:
        """The largest index <= `at` where cutting `data` splits no registered secret in it.

        A line cut by force (it has no newline yet) is masked in two parts; a
        secret straddling the cut would be masked in neither.
        """
        secrets = [value.encode("utf-8", "replace") for value in list(cls._counts)]
        cut = max(0, at)
        moved = True
        while moved and cut > 0:  # each move goes left: bounded by `at`
            moved = False
            for secret in secrets:
                start = data.find(secret, max(0, cut - len(secret) + 1), cut + len(secret) - 1)
                if start != -1 and start < cut:
                    cut, moved = start, True
        return cut

    @classmethod
    def longest(cls) -> int:
        """Length in bytes of the longest registered value (0 when none)."""
        return max((len(value.encode("utf-8", "replace")) for value in list(cls._counts)), default=0)

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


def _pieces(value: str) -> list[str]:
    """What to mask for one secret value: the value, and each of its lines when it has several."""
    lines = [line.strip() for line in value.splitlines()] if "\n" in value or "\r" in value else []
    return [piece for piece in dict.fromkeys([value, *lines]) if len(piece) >= MIN_SECRET_LENGTH]


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
