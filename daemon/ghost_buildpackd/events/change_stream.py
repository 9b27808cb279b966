"""The change-stream source (replica sets, sharded clusters): `jobs` watched, the resume token saved only
once the event became step records; a catch-up scan at each (re)open, a safety scan every `rescan_interval`."""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from pymongo.errors import OperationFailure, PyMongoError

from ..logs import get_logger
from ..store import in_transition, next_change, utcnow
from .source import Source

log = get_logger(__name__)

# The server no longer has the history the token points into, or the token cannot resume.
TOKEN_UNUSABLE = {286, 280, 260, 9}
STREAM_ENDING = ("invalidate", "drop", "rename", "dropDatabase")
CHECKPOINT_EVERY = 5.0  # seconds between saves of the post-batch token on a quiet collection


class ChangeStreamSource(Source):
    name = "change_stream"

    def run_once(self) -> None:
        checkpoint = self.store.load_checkpoint()
        token = checkpoint.resume_token
        stream = self._open(token)
        if stream is None:
            token = None
            stream = self._open(None)
        opened_at = utcnow()
        # The stream is open before the scan: whatever changes during the scan is in the stream too.
        since = self.catch_up_since(checkpoint.caught_up_at)
        try:
            read = self.intake.catch_up(since, progress=self.tick)
        except BaseException:
            stream.close()  # the source runs again: no cursor left open on the server per attempt
            raise
        log.info("catch_up_done", source=self.name, since=since.isoformat(), jobs_read=read)
        if token is None:
            self.store.save_stream_checkpoint(stream.resume_token, opened_at)
        self._consume(stream, opened_at)

    def _open(self, token: Mapping[str, Any] | None) -> Any:
        try:
            stream = self.store.watch_jobs(token, max_await=1.0)
            # Some servers only reject a token on the first getMore: surface that now, keep the change.
            first = stream.try_next() if token is not None else None
            return _Prefetched(stream, first)
        except OperationFailure as error:
            if token is not None and self._token_is_the_problem(error):
                log.error(
                    "resume_token_unusable_catching_up",
                    code=error.code,
                    error=str(error),
                    consequence="history lost; a catch-up scan from the last checkpoint finds the jobs missed",
                )
                return None
            raise

    def _token_is_the_problem(self, error: OperationFailure) -> bool:
        """Whether a stream the server refused with our token would open without it.

        Known codes say so at once; otherwise the server is asked (a garbled token
        gives whatever its parser hit, e.g. 15 Overflow on MongoDB 6.0).
        """
        if error.code in TOKEN_UNUSABLE or "resume" in str(error).lower():
            return True
        if in_transition(error):  # a primary change or a shutdown: the token is fine, the server is not yet
            return False
        try:
            self.store.watch_jobs(None, max_await=0.01).close()
        except PyMongoError:
            return False
        return True

    def _consume(self, stream: _Prefetched, scanned_at: datetime) -> None:
        """Handle changes as they come; every `rescan_interval`, a safety scan of recent jobs.

        The checkpoint's `caught_up_at` only ever says what a scan has read (the
        stream's start, then each safety scan), so a stream that stalls without
        an error (it happens on some servers after a failover) costs at most one
        interval, never a job.
        """
        last_save = time.monotonic()
        next_scan = time.monotonic() + self.config.events.rescan_interval
        saved_token = stream.resume_token
        with stream:
            while not self.stop.is_set():
                self.tick()
                if time.monotonic() >= next_scan:
                    scanned_at = self._safety_scan(scanned_at)
                    next_scan = time.monotonic() + self.config.events.rescan_interval
                    self.store.save_stream_checkpoint(stream.resume_token, scanned_at)
                    saved_token, last_save = stream.resume_token, time.monotonic()
                try:
                    change = next_change(stream, self.stop)
                except OperationFailure as error:
                    self._fall_back_to_scan(error, scanned_at)
                    return
                if change is None:
                    if stream.resume_token != saved_token and time.monotonic() - last_save >= CHECKPOINT_EVERY:
                        self.store.save_stream_checkpoint(stream.resume_token, scanned_at)
                        saved_token, last_save = stream.resume_token, time.monotonic()
                    continue
                operation = change.get("operationType")
                if operation in STREAM_ENDING:
                    log.error("change_stream_ended", operation=operation, consequence="reopening with a catch-up scan")
                    self.store.save_stream_checkpoint(None, scanned_at)
                    return
                job_id = (change.get("documentKey") or {}).get("_id")
                self.intake.handle_job_id(job_id)
                self.seen(change.get("wallTime") or utcnow())
                # Durable step records first, then the token that says "done up to here".
                self.store.save_stream_checkpoint(stream.resume_token, scanned_at)
                saved_token, last_save = stream.resume_token, time.monotonic()

    def _fall_back_to_scan(self, error: OperationFailure, scanned_at: datetime) -> None:
        """A stream error intake does not know (an event too large, say): drop the token, scan instead.

        Resuming at the same token would meet the same error forever; the
        reopened stream starts now and the catch-up scan from the last scan
        reads what lay between, jobs included whatever their size.
        """
        log.error(
            "change_stream_failed_catching_up",
            code=error.code,
            error=str(error)[:500],
            consequence="reopening the stream without its token, with a catch-up scan",
        )
        self.store.save_stream_checkpoint(None, scanned_at)

    def _safety_scan(self, scanned_at: datetime) -> datetime:
        started = utcnow()
        read = self.intake.catch_up(scanned_at - timedelta(seconds=self.config.events.overlap), progress=self.tick)
        log.debug("safety_scan_done", jobs_read=read)
        return started


class _Prefetched:
    """A change stream whose first `try_next` already happened (to validate the token)."""

    def __init__(self, stream: Any, first: Any):
        self.stream = stream
        self._first = first

    def try_next(self) -> Any:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return self.stream.try_next()

    @property
    def resume_token(self) -> Any:
        return self.stream.resume_token

    def __enter__(self) -> _Prefetched:
        return self

    def close(self) -> None:
        self.stream.close()

    def __exit__(self, *exc: object) -> None:
        self.close()
