"""The server's clock: leases are reckoned on it, read from `hello` and carried forward by this host's
monotonic clock, so a host whose own clock is skewed, or steps, neither steals a healthy lease nor keeps an
expired one.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from ..logs import get_logger
from .connection import Connection, utcnow

log = get_logger(__package__)

# A reading of the server's clock is off by up to half its round trip: a slower one does not replace a
# reading already taken (the lease margin, at least 1 s, covers half of this).
CLOCK_READING_MAX_ROUND_TRIP = 0.5
CLOCK_MOVED = 1.0  # seconds between a new reading and the running estimate worth a log line


@dataclasses.dataclass(frozen=True)
class ServerClock:
    """The server's time at one instant of this host's monotonic clock, and how long the reading took.

    The host's wall clock plays no part: an NTP step or `date -s` on this host
    moves neither the estimate nor any lease decision made from it.
    """

    server_time: datetime
    at: float  # this host's monotonic clock when the server read its time (midpoint of the round trip)
    round_trip: float

    def now(self, monotonic_now: float) -> datetime:
        return self.server_time + timedelta(seconds=monotonic_now - self.at)


class Clock(Connection):
    """The server's time, as the lease decisions need it."""

    _server_clock: ServerClock | None = None  # measured at the first need

    def measure_server_clock(self) -> datetime:
        """Read the server's clock (the `localTime` of its `hello` reply); returns the server's time now.

        The reply was made between sending and receiving, so the midpoint of
        the round trip, on this host's monotonic clock, is when the server read
        it: the error is at most half the round trip, which the lease margin
        covers. A reading slower than CLOCK_READING_MAX_ROUND_TRIP, and slower
        than the one held, is dropped. A later reading that disagrees with the
        running estimate means the server's clock moved (this host's wall
        clock is not involved): it is taken, and logged.
        """
        sent = self._monotonic()
        reply = self._hello()
        received = self._monotonic()
        server_time = reply.get("localTime")
        if isinstance(server_time, datetime):
            if server_time.tzinfo is None:
                server_time = server_time.replace(tzinfo=UTC)
            self._take_reading(ServerClock(server_time, sent + (received - sent) / 2, received - sent))
        elif self._server_clock is None:  # a server that does not say its time: this host's clock, read once
            self._server_clock = ServerClock(utcnow(), self._monotonic(), 0.0)
        return self.server_now()

    def _take_reading(self, reading: ServerClock) -> None:
        held = self._server_clock
        if held is not None:
            if reading.round_trip > max(CLOCK_READING_MAX_ROUND_TRIP, held.round_trip):
                return
            moved = (reading.server_time - held.now(reading.at)).total_seconds()
            if abs(moved) > CLOCK_MOVED:
                log.warning(
                    "mongodb_clock_moved",
                    by_s=round(moved, 3),
                    consequence="lease expiry is reckoned on MongoDB's clock as read now",
                )
        self._server_clock = reading

    def server_now(self) -> datetime:
        """The server's time now, carried from its last reading by this host's monotonic clock (read first if it
        never was): what lease expiry is reckoned on."""
        if self._server_clock is None:
            self.measure_server_clock()
        assert self._server_clock is not None
        return self._server_clock.now(self._monotonic())
