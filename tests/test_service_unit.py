"""The systemd unit's restart, reload and stop settings against what the daemon does."""

from __future__ import annotations

from pathlib import Path

from ghost_buildpackd.cli import EXIT_CONFIG
from ghost_buildpackd.config import Config, parse_duration
from ghost_buildpackd.policy import LIMITS

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


def test_the_stop_timeout_is_above_the_longest_stop_with_the_default_settings():
    timeout = parse_duration(service_settings()["TimeoutStopSec"])
    assert timeout > LIMITS.longest_stop(Config()) + 30, f"TimeoutStopSec={timeout:g}s leaves too little margin"
