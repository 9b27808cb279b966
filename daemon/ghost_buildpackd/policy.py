"""Outage policy: how calls are retried, how loops wait out outages, and the limits that must agree.

- Retries: a MongoDB or LXD call failing with a transient error is retried
  with exponential backoff (tenacity): `MONGODB_RETRY`, `LXD_RETRY`.
- Loops riding out an outage (the event source, the dispatcher's claims) wait
  `LOOP_BACKOFF` between attempts, 0.5 s doubling to 30 s (`Pacer`).
- Limits (`LIMITS`): leases (renewal, margin, guard), heartbeats and the
  client's look at them, the watchdog's stall limit, the waits for LXD to
  come back, shutdown. The relations between them are checked here, once:
  those between constants when this module is imported, those involving
  configured values (`lease_ttl`, `mongodb.timeout`, `events.poll_interval`)
  when the configuration is loaded (`Limits.config_problems`) or by deriving
  the limit from them (`Limits.stall_after`).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import tenacity

from .logs import get_logger

if TYPE_CHECKING:  # config imports this module for its checks
    from .config import Config

log = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Exponential waits between attempts: `first` seconds, doubling, never above `longest`."""

    first: float
    longest: float

    def wait(self, failures: int) -> float:
        """The wait after `failures` failed attempts in a row (1 for the first)."""
        return min(self.first * 2.0 ** min(failures - 1, 64), self.longest)


@dataclasses.dataclass(frozen=True)
class Retry:
    """A call retried through transient errors: `attempts` attempts at most, `backoff` between them."""

    attempts: int
    backoff: Backoff

    def waits(self) -> float:
        """Seconds spent waiting between attempts when every attempt fails."""
        return sum(self.backoff.wait(failures) for failures in range(1, self.attempts))

    def longest(self, attempt: float) -> float:
        """The longest a retried call lasts when each attempt lasts at most `attempt` seconds."""
        return self.attempts * attempt + self.waits()


# Against an unreachable server each attempt lasts mongodb.timeout (server selection):
# 8 attempts and 31.75 s of waits, 112 s in all with the default 10 s (measured).
MONGODB_RETRY = Retry(attempts=8, backoff=Backoff(first=0.25, longest=30))
LXD_RETRY = Retry(attempts=5, backoff=Backoff(first=0.2, longest=10))
LOOP_BACKOFF = Backoff(first=0.5, longest=30)

# The MongoDB servers the daemon is tested against and supports: 4.2 (the oldest build that runs here,
# and what Ghost 19.08's docker-compose's unpinned `mongo` gave in 2019) to 6.0 (the newest build that
# runs here). pymongo 4.17 is the last driver line whose floor is 4.2 (4.18 needs 4.4).
MONGODB_OLDEST = (4, 2)
MONGODB_NEWEST_TESTED = (6, 0)


def retrying(transient: Callable[[BaseException], bool], event: str, retry: Retry) -> Any:
    """A decorator retrying calls that fail with a transient error, logging `event` before each wait."""
    return tenacity.retry(
        retry=tenacity.retry_if_exception(transient),
        wait=lambda state: retry.backoff.wait(state.attempt_number),
        stop=tenacity.stop_after_attempt(retry.attempts),
        before_sleep=lambda state: log.warning(
            event,
            attempt=state.attempt_number,
            error=str(state.outcome.exception()) if state.outcome else None,
        ),
        reraise=True,
    )


class Pacer:
    """The waits of a loop riding out an outage: `backoff`, lengthening with each wait, reset by a success."""

    def __init__(self, backoff: Backoff = LOOP_BACKOFF):
        self.backoff = backoff
        self.waited = 0

    @property
    def delay(self) -> float:
        """Seconds the next wait lasts."""
        return self.backoff.wait(self.waited + 1)

    def succeeded(self) -> None:
        self.waited = 0

    def pause(self, wake: threading.Event) -> None:
        """Wait `delay` (or until `wake` is set); the next wait is longer."""
        wake.wait(self.delay)
        self.waited += 1


class LimitsDisagree(Exception):
    """Two limits contradict each other; the message names them and the relation they break."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Every timing limit another one depends on, in seconds, with the relations they must keep."""

    # Leases: renewed every lease_ttl/3, each renewal one attempt bounded by that; the holder stops
    # counting on its lease `lease_margin` before it expires, noticed by a guard every `guard_every`.
    min_lease_ttl: float = 3.0
    min_lease_margin: float = 1.0
    guard_every: float = 0.2
    # Heartbeats: the daemon writes its instance record every `heartbeat_every`; an instance is alive
    # while the record is younger than `heartbeat_max_age`; a waiting client looks every `liveness_every`.
    heartbeat_every: float = 5.0
    min_heartbeat_age: float = 30.0
    heartbeats_missed: int = 5  # in a row, before a live instance can be taken for dead
    liveness_every: float = 5.0
    # Loops: a free worker looks for work unprompted every `idle_wait`; a loop (events, dispatcher)
    # without progress for `stall_after` (at least `min_stall_after`) stops feeding the watchdog.
    idle_wait: float = 1.0
    min_stall_after: float = 120.0
    stall_margin: float = 15.0  # the loop's own work between two marks of progress, on a busy host
    # LXD going away under a step: asked every `lxd_probe_every` whether it is back, for at most
    # `lxd_outage_wait`; the step fails the `max_lxd_outages`-th time instead of waiting again.
    lxd_probe_every: float = 1.0
    lxd_outage_wait: float = 600.0
    max_lxd_outages: int = 3
    # Health (metrics.listen): LXD is asked every `lxd_health_every` whether it answers, each probe waiting at
    # most `lxd_health_wait` (or lxd.timeout if shorter); /metrics and /readyz say the last answer.
    lxd_health_every: float = 5.0
    lxd_health_wait: float = 5.0
    # Shutdown: aborted steps get at least `min_cleanup_wait` (else lxd.timeout) to remove their containers.
    min_cleanup_wait: float = 30.0
    # Then the warm pool's loop gets `warm_pool_stop` to give up a container it is making, and the idle
    # containers are removed (upkeep/warm_pool.py).
    warm_pool_stop: float = 15.0
    # Past the longest stop plus `stop_exit_margin` (logging, the interpreter's exit), a stopping daemon
    # leaves at once: a worker stuck in a retried call must not hold it until systemd's SIGKILL.
    stop_exit_margin: float = 10.0
    # Ghost's `buildpack` and `buildimage` commands re-read their step this often where MongoDB has no change
    # streams (one read by _id): the outcome reaches Ghost's job within it, where events.poll_interval (5 s) cost
    # every module up to 2 s (benchmarks/ghost.py).
    client_poll: float = 0.2
    # A build run ahead of the AMI waits this long for Ghost's Packer definition of its job (written once the
    # provisioner trees are made: git clones of the features' repositories), looking every `build_inputs_poll`;
    # past it the build is made once the AMI is built. It holds a worker meanwhile.
    build_inputs_wait: float = 300.0
    build_inputs_poll: float = 0.5
    # Restarts: a stopping daemon heartbeats until its process ends, then marks its record stopped; a
    # waiting client takes its host for one restarting while the mark is younger than `restart_grace`:
    # the unit's RestartSec (`restart_delay`, systemd's pause before an automatic restart), a start
    # (`start_budget`: Python, LXD, the event mode, the first heartbeat; 0.6 to 2.1 s from one
    # daemon's end to the next one's READY under systemd on 2 shared cores, tests/test_systemd_unit.py:
    # the budget is for a host far busier than that) and its one MongoDB ping (mongodb.timeout).
    restart_delay: float = 5.0
    start_budget: float = 60.0
    mongodb_retry: Retry = MONGODB_RETRY
    loop_backoff: Backoff = LOOP_BACKOFF

    # --- derived from the configuration ----------------------------------------------------

    @staticmethod
    def renew_every(ttl: float) -> float:
        """How often a holder renews its leases; each renewal is one attempt bounded by this too."""
        return ttl / 3

    def lease_margin(self, ttl: float) -> float:
        """How long before the lease's expiry its holder stops counting on it.

        Covers the error of the server-clock estimate, a renewal's round trip and
        the time the holder takes to notice.
        """
        return max(self.min_lease_margin, ttl / 5)

    def heartbeat_max_age(self, config: Config) -> float:
        """Age past which an instance's record says it is dead (never under three lease TTLs)."""
        return max(self.min_heartbeat_age, 3 * config.lease_ttl)

    def longest_quiet_loop(self, config: Config) -> float:
        """The longest a loop goes without progress while riding out a MongoDB outage.

        One call retried to its end (each attempt bounded by mongodb.timeout),
        then the loop's longest wait: its backoff after an idle look for a free
        worker (dispatcher), or the poll interval (poll source).
        """
        call = self.mongodb_retry.longest(config.mongodb.timeout)
        return call + max(self.idle_wait + self.loop_backoff.longest, config.events.poll_interval)

    def stall_after(self, config: Config) -> float:
        """How long a loop may go without progress before it counts as stalled (and the watchdog starves)."""
        return max(self.min_stall_after, math.ceil(self.longest_quiet_loop(config) + self.stall_margin))

    def lxd_health_probe_wait(self, config: Config) -> float:
        """How long one health probe of LXD waits for its answer."""
        return min(self.lxd_health_wait, config.lxd.timeout)

    def cleanup_wait(self, config: Config) -> float:
        """At shutdown, how long aborted steps get to remove their containers and put their records back."""
        return max(self.min_cleanup_wait, config.lxd.timeout)

    def longest_stop(self, config: Config) -> float:
        """The most a stop (SIGTERM) can take: grace for running steps, their clean-up, the warm pool, the instance
        record.

        The unit's TimeoutStopSec must stay above it for the default settings.
        """
        return config.shutdown_grace + self.cleanup_wait(config) + self.warm_pool_stop + config.mongodb.timeout

    def stop_bound(self, config: Config) -> float:
        """Seconds after SIGTERM at which a daemon still running leaves with os._exit.

        The stop itself is bounded (`longest_stop`); what can outlast it is a
        worker thread stuck in a retried MongoDB or LXD call, which Python
        would join at exit. The unit's TimeoutStopSec must stay above it, so
        the daemon leaves, and says why, before systemd's SIGKILL.
        """
        return self.longest_stop(config) + self.stop_exit_margin

    def restart_grace(self, config: Config) -> float:
        """How long a waiting client takes a host whose daemon stopped for one restarting.

        From the stopped daemon's last write to the next instance's first
        heartbeat: systemd's pause before an automatic restart, a start, and
        its MongoDB ping. A stop that is not followed by a start costs a
        waiting Ghost job this long before it fails.
        """
        return self.restart_delay + self.start_budget + config.mongodb.timeout

    # --- relations -------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """The relations between these limits that do not hold, each said with the limits it names."""
        ttl = self.min_lease_ttl
        relations = [
            (
                2 * self.renew_every(ttl) <= ttl - self.lease_margin(ttl),
                f"min_lease_ttl {ttl:g}s: a renewal sent lease_ttl/3 after the last one and bounded by lease_ttl/3 "
                f"must end before the holder stops counting on its lease (lease_ttl minus "
                f"{self.lease_margin(ttl):g}s)",
            ),
            (
                self.guard_every <= self.min_lease_margin / 2,
                f"guard_every {self.guard_every:g}s: the guard must notice a passed deadline within half the "
                f"smallest lease margin ({self.min_lease_margin:g}s)",
            ),
            (
                self.min_heartbeat_age >= (self.heartbeats_missed + 1) * self.heartbeat_every,
                f"min_heartbeat_age {self.min_heartbeat_age:g}s: a live instance must miss "
                f"{self.heartbeats_missed} heartbeats in a row (one every {self.heartbeat_every:g}s) before it "
                "counts as dead",
            ),
            (
                self.liveness_every <= self.heartbeat_every,
                f"liveness_every {self.liveness_every:g}s: a waiting client must look at the heartbeat at least as "
                f"often as it is written ({self.heartbeat_every:g}s)",
            ),
            (
                self.min_stall_after > self.idle_wait + self.loop_backoff.longest,
                f"min_stall_after {self.min_stall_after:g}s: a loop's own longest wait "
                f"({self.idle_wait + self.loop_backoff.longest:g}s) must not count as a stall",
            ),
            (
                self.restart_delay + self.start_budget >= self.min_heartbeat_age,
                f"restart_delay {self.restart_delay:g}s + start_budget {self.start_budget:g}s: a client must wait "
                f"for a restart at least as long as for a late heartbeat ({self.min_heartbeat_age:g}s)",
            ),
            (
                self.lxd_probe_every < self.lxd_outage_wait,
                f"lxd_probe_every {self.lxd_probe_every:g}s: a wait for LXD ({self.lxd_outage_wait:g}s) must ask "
                "more than once",
            ),
        ]
        return [message for holds, message in relations if not holds]

    def config_problems(self, config: Config) -> list[str]:
        """The configured values these limits cannot work with, as configuration problems (key: reason)."""
        if config.lease_ttl < self.min_lease_ttl:
            return [f"lease_ttl: expected at least {self.min_lease_ttl:g}s, got {config.lease_ttl:g}s"]
        return []

    def check(self) -> Limits:
        problems = self.problems()
        if problems:
            raise LimitsDisagree("limits that must agree do not: " + "; ".join(problems))
        return self


LIMITS = Limits().check()
