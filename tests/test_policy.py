"""The outage policy: the retries' and loops' waits, and the limits that must agree."""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import tenacity
from pymongo.errors import AutoReconnect, OperationFailure

from ghost_buildpackd.config import Config, ConfigError, MongoConfig, config_from_mapping
from ghost_buildpackd.events import Source
from ghost_buildpackd.policy import (
    LIMITS,
    LOOP_BACKOFF,
    LXD_RETRY,
    MONGODB_RETRY,
    Backoff,
    LimitsDisagree,
    Retry,
    retrying,
)
from ghost_buildpackd.runner import Runner


@pytest.mark.parametrize(
    ("retry", "multiplier", "max_wait"),
    [(MONGODB_RETRY, 0.25, 30), (LXD_RETRY, 0.2, 10)],
)
def test_the_retries_wait_as_tenacitys_exponential_backoff_did(retry: Retry, multiplier: float, max_wait: float):
    before = tenacity.wait_exponential(multiplier=multiplier, max=max_wait)
    for failures in range(1, 40):
        assert retry.backoff.wait(failures) == before(SimpleNamespace(attempt_number=failures))


def test_the_mongodb_retry_lasts_about_two_minutes_against_an_unreachable_server():
    assert MONGODB_RETRY.waits() == 0.25 + 0.5 + 1 + 2 + 4 + 8 + 16
    assert MONGODB_RETRY.longest(MongoConfig().timeout) == 8 * 10 + 31.75


def test_a_retried_call_waits_the_policys_backoff_and_gives_up_after_its_attempts():
    calls = []

    @retrying(lambda error: isinstance(error, ConnectionError), "test_retrying", Retry(3, Backoff(0.01, 0.015)))
    def flaky() -> None:
        calls.append(1)
        raise ConnectionError("down")

    with pytest.raises(ConnectionError, match="down"):
        flaky()
    assert len(calls) == 3
    assert flaky.statistics["idle_for"] == pytest.approx(0.01 + 0.015)


def test_a_permanent_error_is_not_retried():
    calls = []

    @retrying(lambda error: isinstance(error, ConnectionError), "test_retrying", Retry(3, Backoff(0.01, 0.01)))
    def refused() -> None:
        calls.append(1)
        raise ValueError("bad request")

    with pytest.raises(ValueError):
        refused()
    assert len(calls) == 1


def old_event_loop_waits(outcomes: list[str]) -> list[float]:
    """The event source's waits as its hand-rolled loop computed them, one per outcome of `run_once`."""
    waits, delay = [], 0.5
    for outcome in outcomes:
        if outcome == "ok":
            delay = 0.5
        waits.append(delay)
        delay = min(delay * 2, 30.0)
    return waits


def old_dispatcher_waits(outcomes: list[str]) -> list[float]:
    """The dispatcher's waits as its hand-rolled loop computed them, one per claim ("ok": nothing to claim)."""
    waits, delay = [], 0.5
    for outcome in outcomes:
        if outcome == "ok":
            delay = 0.5
            waits.append(1.0)  # the idle wait
        elif outcome == "outage":
            waits.append(delay)
            delay = min(delay * 2, 30.0)
        else:
            waits.append(delay)
    return waits


class Recorder(threading.Event):
    """An event whose waits are recorded instead of waited; once `calls` is exhausted, `on_last` ends the loop."""

    def __init__(self, calls: int, on_last: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.waits: list[float] = []
        self.calls = calls
        self.on_last = on_last or self.set

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.waits.append(timeout)
        if len(self.waits) == self.calls:
            self.on_last()
        return False


def scripted(outcomes: list[str]) -> Callable[..., None]:
    """A MongoDB call answering as `outcomes` says: "ok", "outage" (transient) or "error" (any other)."""
    pending = iter(outcomes)

    def call(*_args: Any, **_kwargs: Any) -> None:
        outcome = next(pending)
        if outcome == "outage":
            raise AutoReconnect("connection refused")
        if outcome == "error":
            raise OperationFailure("not authorized")

    return call


def outcomes_with_long_outages(choices: list[str], weights: list[int]) -> list[str]:
    return random.Random(17).choices(choices, weights=weights, k=300)  # runs of outages reach the 30 s ceiling


def test_the_event_source_waits_as_before_through_outages_and_recoveries():
    outcomes = outcomes_with_long_outages(["ok", "outage", "error"], [2, 8, 1])
    stop = Recorder(len(outcomes))
    source = Source(config_with(), None, None, stop)  # type: ignore[arg-type]
    source.run_once = scripted(outcomes)  # type: ignore[method-assign]
    source.run()
    assert stop.waits == old_event_loop_waits(outcomes)
    assert max(stop.waits) == LOOP_BACKOFF.longest


def test_the_dispatcher_waits_as_before_through_outages_and_other_claim_errors():
    outcomes = outcomes_with_long_outages(["ok", "outage", "error"], [2, 8, 1])
    store = SimpleNamespace(claim_step=scripted(outcomes))
    runner = Runner(config_with().with_instance_id(), store, None)  # type: ignore[arg-type]
    runner._wake = Recorder(len(outcomes), on_last=runner._accepting.clear)
    runner._accepting.set()
    runner._dispatch_loop()
    assert runner._wake.waits == old_dispatcher_waits(outcomes)
    assert max(runner._wake.waits) == LOOP_BACKOFF.longest


def test_a_days_long_outage_keeps_the_longest_wait():
    assert LOOP_BACKOFF.wait(100_000) == 30.0


def test_the_limits_agree():
    assert LIMITS.problems() == []


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"min_lease_ttl": 2.5}, "min_lease_ttl 2.5s: a renewal sent lease_ttl/3 after the last one"),
        ({"guard_every": 0.6}, "guard_every 0.6s: the guard must notice a passed deadline"),
        ({"heartbeat_every": 6.0}, "min_heartbeat_age 30s: a live instance must miss 5 heartbeats in a row"),
        ({"liveness_every": 10.0}, "liveness_every 10s: a waiting client must look at the heartbeat"),
        ({"min_stall_after": 30.0}, "min_stall_after 30s: a loop's own longest wait (31s) must not count"),
        ({"lxd_probe_every": 600.0}, "lxd_probe_every 600s: a wait for LXD (600s) must ask more than once"),
    ],
)
def test_limits_that_disagree_are_refused_with_the_relation_they_break(change: dict[str, float], named: str):
    limits = dataclasses.replace(LIMITS, **change)
    [problem] = limits.problems()
    assert problem.startswith(named)
    with pytest.raises(LimitsDisagree, match="limits that must agree do not: "):
        limits.check()


@pytest.mark.parametrize("ttl", [3, 3.5, 4, 5, 7, 10, 30, 90, 600, 3600])
def test_every_lease_ttl_the_configuration_accepts_renews_before_the_holders_deadline(ttl: float):
    config = config_from_mapping({"lease_ttl": ttl}, env={})
    interval = LIMITS.renew_every(config.lease_ttl)
    # A renewal sent one interval after the last and bounded by one interval ends before the deadline.
    assert 2 * interval <= ttl - LIMITS.lease_margin(ttl)


def test_a_lease_ttl_below_the_minimum_is_a_configuration_problem():
    with pytest.raises(ConfigError) as raised:
        config_from_mapping({"lease_ttl": "2s"}, env={})
    assert raised.value.problems == ["lease_ttl: expected at least 3s, got 2s"]


def config_with(mongodb_timeout: float = 10.0, poll_interval: float = 5.0) -> Config:
    return config_from_mapping(
        {"mongodb": {"timeout": mongodb_timeout}, "events": {"poll_interval": poll_interval}}, env={}
    )


@pytest.mark.parametrize(
    ("mongodb_timeout", "poll_interval"), [(10, 5), (1, 0.2), (30, 5), (120, 5), (10, 600), (5, 0.2)]
)
def test_the_stall_limit_outlasts_a_loop_riding_out_a_mongodb_outage(mongodb_timeout: float, poll_interval: float):
    config = config_with(mongodb_timeout, poll_interval)
    quiet = LIMITS.longest_quiet_loop(config)
    assert quiet >= MONGODB_RETRY.longest(mongodb_timeout) + max(LIMITS.idle_wait + LOOP_BACKOFF.longest, poll_interval)
    assert LIMITS.stall_after(config) >= quiet + LIMITS.stall_margin


def test_the_stall_limit_with_the_default_settings_and_its_floor():
    # 8 attempts of 10 s, 31.75 s of waits, then the dispatcher's idle look and longest backoff (31 s).
    assert LIMITS.stall_after(config_with()) == 158
    assert LIMITS.stall_after(config_with(mongodb_timeout=1)) == LIMITS.min_stall_after == 120


def test_the_heartbeat_age_limit_outlasts_missed_heartbeats_and_three_leases():
    assert LIMITS.heartbeat_max_age(config_from_mapping({"lease_ttl": "5s"}, env={})) == 30
    assert LIMITS.heartbeat_max_age(config_from_mapping({"lease_ttl": "30s"}, env={})) == 90
