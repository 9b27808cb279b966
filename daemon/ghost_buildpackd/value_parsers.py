"""Value parsers: a raw YAML value -> a typed value, or `Invalid(reason)`.

Shared by the daemon's configuration (config/) and the reader of Ghost's own
config.yml (ghost/config_yml.py). This module imports nothing of the project,
so both can import it without importing each other.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any


class Invalid(ValueError):
    """A value failed its parser; the message is the reason, without the key."""


_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_duration(value: Any) -> float:
    """`30s`, `10m`, `1h30m`, `250ms` or a bare number of seconds -> seconds."""
    if isinstance(value, bool):
        raise Invalid(f"expected a duration like 30m, got {value!r}")
    if isinstance(value, int | float) and value >= 0:
        return float(value)
    text = str(value).strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", text)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", "", text).strip():
        raise Invalid(f"expected a duration like 30m, got {value!r}")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def parse_size(value: Any) -> int:
    """`2GiB`, `512MB`, `1048576` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", str(value).lower())
    if not match or isinstance(value, bool):
        raise Invalid(f"expected a size like 2GiB, got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])


def parse_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {value!r}")
    return value


def parse_str(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"expected a non-empty string, got {value!r}")
    return value


def parse_str_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise Invalid(f"expected a list of strings, got {value!r}")
    return tuple(value)


def parse_command_list(value: Any) -> tuple[tuple[str, ...], ...]:
    if not isinstance(value, list) or not all(isinstance(item, list) for item in value):
        raise Invalid(f"expected a list of commands (each a list of strings), got {value!r}")
    return tuple(parse_str_list(item) for item in value)


def parse_absolute_path(value: Any) -> Path:
    text = parse_str(value)
    if not text.startswith("/"):
        raise Invalid(f"expected an absolute path, got {value!r}")
    return Path(text)


def positive_int(minimum: int = 1, maximum: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < minimum
            or (maximum is not None and value > maximum)
        ):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
            raise Invalid(f"expected a whole number {bound}, got {value!r}")
        return value

    return parse


def one_of(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise Invalid(f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    return parse


def optional(parser: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        return None if value is None else parser(value)

    return parse


def parse_cpu(value: Any) -> str:
    """LXD's limits.cpu: a count (`2`) or a set (`0-1`, `0,2`)."""
    text = str(value)
    if isinstance(value, bool) or not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", text):
        raise Invalid(f"expected a CPU count like 2 or a set like 0-1, got {value!r}")
    return text


def parse_memory(value: Any) -> str:
    """LXD's limits.memory: a size (`2GiB`, bytes) or a share of the host's memory (`20%`)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", str(value))
    if match and not isinstance(value, bool) and 0 < float(match.group(1)) <= 100:
        return f"{match.group(1)}%"
    try:
        return str(parse_size(value))
    except Invalid:
        raise Invalid(f"expected a size like 2GiB or a share of the host's memory like 20%, got {value!r}") from None


UNIX_ENDPOINT = "unix:"


def parse_endpoint(value: Any) -> str:
    """`local`, `unix:/path/to/unix.socket` (the snap's socket, say) or an https:// URL."""
    text = parse_str(value)
    if text.startswith(UNIX_ENDPOINT):
        if not text[len(UNIX_ENDPOINT) :].startswith("/"):
            raise Invalid(f"expected unix: followed by an absolute socket path, got {value!r}")
        return text
    if text != "local" and not text.startswith("https://"):
        raise Invalid(f"expected 'local', unix:/path/to/unix.socket or an https:// URL, got {value!r}")
    return text


def parse_listen(value: Any) -> tuple[str, int]:
    match = re.fullmatch(r"(.+):(\d{1,5})", str(value))
    if not match or not 0 < int(match.group(2)) < 65536:
        raise Invalid(f"expected host:port like 127.0.0.1:9469, got {value!r}")
    return match.group(1), int(match.group(2))
