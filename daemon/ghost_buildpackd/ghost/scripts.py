"""Ghost's module scripts: decoded as Ghost decodes them (Python 2.7's lenient base64), or read from
the working copy, where a committed file of the same name wins as it does in Ghost.
"""

from __future__ import annotations

import base64
import dataclasses
import re
from pathlib import Path
from typing import Any

from .fields import BadDocument

MAX_SCRIPT_BYTES = 1 << 20


def decode_script(value: Any, field: str) -> str:
    """Ghost stores scripts as base64 of UTF-8; missing or empty means no script.

    Decoded as Ghost's `b64decode_utf8` decodes (`ghost_b64decode`), so a script
    Ghost runs is never refused here.
    """
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise BadDocument(field, f"expected a base64 string, got {type(value).__name__}")
    if len(value) > MAX_SCRIPT_BYTES * 2:  # room for line breaks and other characters the decoder skips
        raise BadDocument(field, f"script is larger than {MAX_SCRIPT_BYTES} bytes")
    try:
        raw = ghost_b64decode(value)
    except ValueError as error:
        raise BadDocument(field, f"not valid base64 ({error})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadDocument(field, "decoded script is not valid UTF-8") from None


_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/=]")
_B64_PAD = "="


def ghost_b64decode(text: str) -> bytes:
    """Python 2.7's lenient `base64.b64decode`, which Ghost's `b64decode_utf8` uses, rule for rule.

    Characters outside the alphabet (line breaks from `base64`, spaces, anything
    else) are skipped. A `=` ends the input only where it can pad a quantum: after
    three characters of a quantum, or after two when the next character that is
    not skipped is another `=`; any other `=` is skipped too. Input that ends
    inside a quantum is "incorrect padding". Python 2 refuses non-ASCII text
    before decoding. ValueError with the reason when Ghost's decoder raises.
    """
    if not text.isascii():
        raise ValueError("contains non-ASCII characters")
    runs = _NOT_BASE64.sub("", text).split(_B64_PAD)  # runs of the alphabet, a `=` between each two
    kept, count, ended = [runs[0]], len(runs[0]), False
    for index in range(1, len(runs)):
        quad = count % 4  # where the `=` before runs[index] falls in its quantum
        if quad == 3 or (quad == 2 and runs[index] == "" and index + 1 < len(runs)):
            ended = True
            break
        kept.append(runs[index])
        count += len(runs[index])
    data = "".join(kept)
    if ended:  # the bits of the unfinished quantum beyond its last whole byte are dropped, as padding does
        data += _B64_PAD * (4 - len(data) % 4)
    elif len(data) % 4:
        raise ValueError("incorrect padding")
    return base64.b64decode(data, validate=True)


def choose_module_script(working_copy: Path, script_name: str, stored_b64: Any, field: str = "") -> ModuleScript:
    """The script Ghost would run for a module: a file named `script_name` at the root of the clone
    wins over the stored base64 script (Ghost's `execute_module_script_on_ghost`), which is then
    not decoded at all.

    BadDocument names `field` (default: the script name) when the stored script is unusable, or
    the file when it cannot be used. A file that resolves outside the working copy (a symbolic link
    in the repository) is refused: its content would leave the host for the container.
    """
    candidate = working_copy / script_name
    if candidate.is_file():
        where = f"working copy file {script_name}"
        if working_copy.resolve() not in candidate.resolve().parents:
            raise BadDocument(where, f"resolves to {candidate.resolve()}, outside the working copy")
        try:
            data = candidate.read_bytes()
        except OSError as error:
            raise BadDocument(where, f"cannot be read ({error.strerror})") from None
        if len(data) > MAX_SCRIPT_BYTES:
            raise BadDocument(where, f"larger than {MAX_SCRIPT_BYTES} bytes")
        return ModuleScript(data, f"the file {script_name} at the root of the working copy", candidate)
    script = decode_script(stored_b64, field or script_name)
    return ModuleScript(script.encode("utf-8"), f"the module's stored {script_name}", None)


@dataclasses.dataclass(frozen=True)
class ModuleScript:
    content: bytes
    source: str  # where it came from, for the job log
    path: Path | None  # the file of the working copy it was read from, None for the stored script
