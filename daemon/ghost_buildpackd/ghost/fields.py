"""Reading one field of a Ghost document: a value of the expected kind, or `BadDocument` naming the
field and the reason (never the value of a field that may hold a secret).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId

# Ghost's own validation of a module path; `..` segments pass it, so they are refused separately.
_MODULE_PATH = re.compile(r"^(/[a-zA-Z0-9.\-_]+)+$")
_SEGMENT = re.compile(r"^[A-Za-z0-9_.+\-]+$")


class BadDocument(ValueError):
    """A Ghost document cannot be used; `field` names where, `reason` says why."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


def parse_object_id(value: Any, field: str) -> ObjectId:
    """An ObjectId, or its 24-hex-digit string form."""
    if isinstance(value, ObjectId):
        return value
    if value is None:  # ObjectId(None) would make up a new id
        raise BadDocument(field, "missing (expected an ObjectId)")
    try:
        return ObjectId(str(value)) if isinstance(value, str) else ObjectId(value)
    except (InvalidId, TypeError):
        raise BadDocument(field, f"expected an ObjectId (24 hex digits), got {short_repr(value)}") from None


def short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def text_field(doc: Mapping[str, Any], key: str, where: str, required: bool = True) -> str:
    value = doc.get(key)
    if value is None or value == "":
        if required:
            raise BadDocument(f"{where}.{key}", "missing")
        return ""
    if not isinstance(value, str):
        raise BadDocument(f"{where}.{key}", f"expected a string, got {type(value).__name__}")
    return value


def segment_field(doc: Mapping[str, Any], key: str, where: str, required: bool = True) -> str:
    """A value that becomes one directory name under ghost.root."""
    value = text_field(doc, key, where, required)
    if value and (value in (".", "..") or not _SEGMENT.match(value) or len(value) > 255):
        raise BadDocument(
            f"{where}.{key}",
            f"must be a single path segment of letters, digits, '.', '_', '+' or '-', got {short_repr(value)}",
        )
    return value


def mapping_field(value: Any, field: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BadDocument(field, f"expected an object, got {type(value).__name__}")
    return value


def list_field(value: Any, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadDocument(field, f"expected a list, got {type(value).__name__}")
    return value


def validate_module_path(value: Any, field: str) -> str:
    """Where a module lives on instances: absolute, not `/`, no `.` or `..` segments."""
    if not isinstance(value, str) or not value:
        raise BadDocument(field, f"expected an absolute path, got {short_repr(value)}")
    if not value.startswith("/"):
        raise BadDocument(field, f"must be absolute, got {short_repr(value)}")
    if value.rstrip("/") == "":
        raise BadDocument(field, "must not be '/'")
    if any(part in (".", "..") for part in value.split("/")):
        raise BadDocument(field, f"must not contain '.' or '..' segments, got {short_repr(value)}")
    if not _MODULE_PATH.match(value):
        raise BadDocument(field, f"must match {_MODULE_PATH.pattern}, got {short_repr(value)}")
    return value
