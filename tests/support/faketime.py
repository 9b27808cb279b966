"""Stepping the wall clock of a child process, as an NTP step or an operator's `date -s` would (libfaketime).

The child is started with libfaketime preloaded, reading its offset from a
file it re-reads at every call (FAKETIME_NO_CACHE), so the test steps the
clock of a running process by rewriting the file. The monotonic clock is left
alone (FAKETIME_DONT_FAKE_MONOTONIC): a real step of the wall clock does not
move CLOCK_MONOTONIC either.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest


def libfaketime() -> str:
    """The preload library (Debian's libfaketime package, installed by scripts/setup); skips the test without it."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        pytest.skip("libfaketime is not installed (scripts/setup installs it: apt-get install libfaketime)")
    return found[0]


class SteppedClock:
    """The wall clock of the processes started with `env`: the real one plus an offset the test sets."""

    def __init__(self, offset_file: Path, offset: float = 0.0):
        self.offset_file = offset_file
        self.offset = 0.0
        self.library = libfaketime()
        self.set(offset)

    def env(self) -> dict[str, str]:
        return {
            "LD_PRELOAD": self.library,
            "FAKETIME_TIMESTAMP_FILE": str(self.offset_file),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }

    def set(self, offset: float) -> None:
        """From now on the processes' wall clock reads the real time plus `offset` seconds."""
        self.offset = offset
        # Replaced whole: a process reading a half-written file would see no offset for a moment.
        written = self.offset_file.with_suffix(".new")
        written.write_text(f"{offset:+g}\n")
        os.replace(written, self.offset_file)

    def step(self, seconds: float) -> None:
        """Step the clock by `seconds` (negative: backwards)."""
        self.set(self.offset + seconds)
