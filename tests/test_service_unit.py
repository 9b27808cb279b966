"""The systemd unit's restart, reload and stop settings against what the daemon does."""

from __future__ import annotations

from pathlib import Path

from ghost_buildpackd.cli import EXIT_CONFIG
from ghost_buildpackd.config import Config
from ghost_buildpackd.policy import LIMITS
from ghost_buildpackd.value_parsers import parse_duration

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "ghost-buildpackd.service"


def service_settings() -> dict[str, str]:
    settings, section = {}, ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def test_a_configuration_error_is_not_restarted_forever():
    assert service_settings()["RestartPreventExitStatus"] == str(EXIT_CONFIG)


def test_reload_sends_sighup_which_the_daemon_survives():
    assert service_settings()["ExecReload"] == "/bin/kill -HUP $MAINPID"


def test_the_stop_timeout_is_above_the_daemons_own_stop_bound_with_the_default_settings():
    """The daemon leaves by itself (stop_bound, past the longest stop) before systemd's SIGKILL."""
    timeout = parse_duration(service_settings()["TimeoutStopSec"])
    assert LIMITS.stop_bound(Config()) > LIMITS.longest_stop(Config())
    assert timeout > LIMITS.stop_bound(Config()) + 30, f"TimeoutStopSec={timeout:g}s leaves too little margin"


def test_a_waiting_client_allows_for_the_units_restart_pause_and_start():
    settings = service_settings()
    assert parse_duration(settings["RestartSec"]) == LIMITS.restart_delay
    assert parse_duration(settings["TimeoutStartSec"].replace("min", "m")) >= LIMITS.start_budget
    assert LIMITS.restart_grace(Config()) >= LIMITS.restart_delay + LIMITS.start_budget
