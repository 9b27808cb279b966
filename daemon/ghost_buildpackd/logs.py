"""Structured logging: JSON lines for journald, readable lines on a terminal.

Every line carries `event`, `level` and `timestamp`, plus the context bound
with `bind_contextvars` (job_id, app, step, container, module) by whoever runs
a step. Secret values (the app's `env_vars` values) are registered with
`Secrets` while a step runs and replaced by `***` in every string a log line
carries, as a last line of defence: the code never logs them on purpose.

Under systemd (`JOURNAL_STREAM` names standard error), each line starts with
the syslog priority `<N>` that journald reads (SyslogLevelPrefix), so
`journalctl -p warning` and the journal's colours follow the level. Records of
the standard library's loggers (pylxd, ws4py, urllib3) go through the same
processors and renderer, so every line has the same shape.

Output is masked line by line, so each line of a multi-line value (a PEM key)
is registered too.

Modules take and hold loggers as `Logger`, the protocol of the calls they make.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TextIO, cast

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


# syslog priorities journald reads from a `<N>` line prefix, by structlog method / stdlib level name.
JOURNALD_PRIORITIES = {
    "critical": 2,
    "fatal": 2,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "info": 6,
    "debug": 7,
    "notset": 7,
}


def stream_is_journal(stream: Any) -> bool:
    """True when `stream` is the journald stream systemd gave this process (`JOURNAL_STREAM=dev:ino`)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        stat = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


def journald_priority_prefix(_logger: Any, method: str, rendered: Any) -> Any:
    """structlog processor after the renderer: `<N>` + the line, N the level's syslog priority."""
    return f"<{JOURNALD_PRIORITIES.get(method.lower(), 6)}>{rendered}"


class _CurrentStderr:
    """Whatever `sys.stderr` is when a line is written (it may be swapped after configuration)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()

    def fileno(self) -> int:
        return sys.stderr.fileno()


# One lock for every line written to the log stream, the daemon's and the libraries' alike: structlog and the
# standard library's handler each lock alone, and a library's warning could land inside one of our lines.
_WRITE_LOCK = threading.RLock()


class _LineLogger:
    """structlog's logger: each line written whole, in one write, under `_WRITE_LOCK`."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def msg(self, message: str) -> None:
        with _WRITE_LOCK:
            self._stream.write(message + "\n")
            self._stream.flush()

    log = debug = info = warn = warning = err = error = critical = exception = failure = fatal = msg


class _StdlibHandler(logging.StreamHandler):
    """The root handler `configure_logging` installs (replaced, not stacked, when called again)."""

    def createLock(self) -> None:  # logging calls it from __init__
        self.lock = _WRITE_LOCK


def _not_a_full_pool(record: logging.LogRecord) -> bool:
    """urllib3's "Connection pool is full, discarding connection": pylxd's unix-socket pool keeps one
    connection, and every other concurrent LXD call's is closed after use. Harmless, and hundreds per
    busy minute (the fleet benchmark): dropped, so the warning level keeps its meaning."""
    return not (record.name == "urllib3.connectionpool" and record.getMessage().startswith("Connection pool is full"))


# Standard-library loggers below this level are dropped: pylxd and ws4py are chatty at info.
LIBRARY_LEVEL = logging.WARNING


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Set structlog and the standard library's logging up once, at the very start of a command.

    The default stream is standard error.
    """
    stream = stream or cast(TextIO, _CurrentStderr())  # a TextIO in all the logging handler uses
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if use_console
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    finishing = [renderer, journald_priority_prefix] if stream_is_journal(stream) else [renderer]
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact_secrets,
    ]
    structlog.configure(
        processors=[*shared, *finishing],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=lambda *_args: _LineLogger(stream),
        cache_logger_on_first_use=False,
    )
    handler = _StdlibHandler(stream)
    handler.addFilter(_not_a_full_pool)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder(), *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *finishing],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdlibHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LIBRARY_LEVEL)


class Logger(Protocol):
    """What the daemon's modules call on a logger: an event name and fields (structlog's loggers)."""

    def debug(self, event: str, **fields: Any) -> Any: ...

    def info(self, event: str, **fields: Any) -> Any: ...

    def warning(self, event: str, **fields: Any) -> Any: ...

    def error(self, event: str, **fields: Any) -> Any: ...

    def exception(self, event: str, **fields: Any) -> Any: ...

    def bind(self, **fields: Any) -> Logger: ...


def get_logger(name: str | None = None) -> Logger:
    return structlog.get_logger(name) if name else structlog.get_logger()
