"""Container output, line by line, into Ghost's job log and the structured log.

In the daemon's own log, output lines are `debug`: they are in full in Ghost's
job log, and a chatty buildpack at `info` would trip journald's rate limit.

Ghost's web UI streams `{ghost.log_dir}/{job_id}.txt`; appending to it is how
users see what ran in the container. Output is bounded: the first
`output_head` bytes are written as they come, then only a tail of
`output_tail` bytes is kept in memory and written when the command ends, so a
command printing gigabytes costs neither disk nor daemon memory.

Lines follow Ghost's own format (`ghost_log.py`): each message of the daemon
starts with Ghost's timestamp prefix (`2026/11/30 01:36:15 GMT: `), which Ghost's
UI turns into the heading of a group; a command's output follows its `$ command`
line unprefixed, as Ghost's `gcall` writes output, so it is grouped under it.
Every line also carries the step's marker (`[container buildimage]`).
"""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path

import structlog

from .logs import Logger, Secrets, get_logger

log = get_logger(__name__)
TAIL_FOR_RECORD = 2000  # characters of output kept on the step record for the client
RECENT_LINES = 40
LONGEST_LINE = 64 << 10  # bytes of a line without newline before it is written anyway


def ghost_timestamp() -> str:
    """Ghost's prefix: the host's local time, labelled GMT as Ghost labels it (`datetime.now()` in
    `ghost_log.log`), so the daemon's lines sort with Ghost's own on any host."""
    return time.strftime("%Y/%m/%d %H:%M:%S GMT")


class JobLog:
    """Appends marked lines to one Ghost job log; never fails the step it serves."""

    def __init__(self, log_dir: Path, job_id: str, marker: str):
        self.path = log_dir / f"{job_id}.txt"
        self.marker = marker
        self.problem = ""  # why the log could not be written, if it could not
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        """A message of the daemon: a heading in Ghost's UI (its first line carries Ghost's timestamp)."""
        self._append(f"{ghost_timestamp()}: {self._marked([text])}")

    def write_lines(self, texts: list[str]) -> None:
        """Append command output as marked lines, with one open of the file for all of them."""
        if texts:
            self._append(self._marked(texts))

    def _marked(self, texts: list[str]) -> str:
        return "".join(f"[{self.marker}] {line}\n" for text in texts for line in text.splitlines() or [""])

    def _append(self, lines: str) -> None:
        with self._lock:
            if self.problem:
                return
            try:
                with self.path.open("a", encoding="utf-8", errors="replace") as handle:
                    handle.write(lines)
            except OSError as error:
                self.problem = f"cannot write Ghost job log {self.path}: {error.strerror or error}"
                log.error("job_log_unwritable", path=str(self.path), error=str(error))


class OutputCollector:
    """Receives raw output chunks from a command and routes complete lines."""

    def __init__(self, job_log: JobLog, logger: Logger, head_bytes: int, tail_bytes: int):
        self.job_log = job_log
        # Output arrives on LXD's reader thread, outside the step's context: carry job_id, step... along.
        self.log = logger.bind(**structlog.contextvars.get_contextvars())
        self.head_bytes = head_bytes
        self.total = 0
        self.written = 0
        self._partial = b""
        self._tail: collections.deque[str] = collections.deque()
        self._tail_size = 0
        self._tail_limit = tail_bytes
        self._recent: collections.deque[str] = collections.deque(maxlen=RECENT_LINES)
        self._lock = threading.Lock()

    def __call__(self, chunk: bytes) -> None:
        if isinstance(chunk, str):
            chunk = chunk.encode("utf-8", "replace")
        with self._lock:
            self.total += len(chunk)
            data = self._partial + chunk
            *lines, self._partial = data.split(b"\n")
            if len(self._partial) > LONGEST_LINE:  # a "line" without newline must not grow unbounded
                # Cut where no secret straddles the cut; what may begin one stays for the next chunk.
                cut = Secrets.safe_cut(self._partial, len(self._partial) - max(0, Secrets.longest() - 1))
                if cut:
                    lines.append(self._partial[:cut])
                    self._partial = self._partial[cut:]
            self.job_log.write_lines([line for raw in lines if (line := self._route(raw)) is not None])

    def _route(self, raw: bytes) -> str | None:
        """The line, when it belongs to the head (the caller writes it to the job log); else kept in the tail."""
        line = Secrets.redact(raw.decode("utf-8", "replace").rstrip("\r"))
        self._recent.append(line[:TAIL_FOR_RECORD])
        if self.written < self.head_bytes:
            self.written += len(raw) + 1
            self.log.debug("output", line=line)
            return line
        self._tail.append(line)
        self._tail_size += len(line) + 1
        while self._tail_size > self._tail_limit and self._tail:
            self._tail_size -= len(self._tail.popleft()) + 1
        return None

    def finish(self) -> None:
        """Flush the last partial line and the kept tail."""
        with self._lock:
            pending: list[str] = []
            if self._partial:
                head_line = self._route(self._partial)
                if head_line is not None:
                    pending.append(head_line)
                self._partial = b""
            if self._tail:
                omitted = self.total - self.written - self._tail_size
                if omitted > 0:
                    pending.append(f"... {omitted} bytes of output omitted (kept the first and last part) ...")
                    self.log.warning("output_truncated", omitted_bytes=omitted, total_bytes=self.total)
                for line in self._tail:
                    self.log.debug("output", line=line)
                pending += self._tail
                self.written += self._tail_size
                self._tail.clear()
                self._tail_size = 0
            self.job_log.write_lines(pending)

    def tail_text(self, limit: int = TAIL_FOR_RECORD) -> str:
        """The last lines of output, at most `limit` characters (for the step record)."""
        return "\n".join(self._recent)[-limit:]
