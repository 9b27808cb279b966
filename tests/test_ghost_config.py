"""Ghost's config.yml: parsed as Ghost reads it, and which value wins over the daemon's own keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from ghost_buildpackd.config import ConfigError, config_from_mapping
from ghost_buildpackd.ghost_config import GhostConfigError, ghost_settings_from_mapping, read_ghost_settings

GHOST_SAMPLE = """\
ghost_root_path: /usr/local/share/ghost
container:
    enabled: True
    endpoint: https://lxd.example.net:8443
    timeout: 10
    debug: True
features_provisioners:
    salt:
        git_repo: git@example.net:salt-formulas.git
        git_revision: master
    ansible:
        git_repo: git@example.net:ansible-requirements.git
        git_revision: master
provisioner_log_level: debug
ami_retention: 3
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(text)
    return path


def test_reads_the_container_keys_of_ghosts_config(tmp_path):
    settings = read_ghost_settings(write(tmp_path, GHOST_SAMPLE))
    assert settings.container_enabled and settings.container_debug
    assert settings.remote_endpoint == "https://lxd.example.net:8443"
    assert list(settings.features_provisioners) == ["salt", "ansible"]
    assert settings.features_provisioners["ansible"]["git_revision"] == "master"
    assert settings.provisioner_log_level == "debug"
    assert settings.ami_retention == 3


def test_ghosts_defaults_for_missing_keys():
    settings = ghost_settings_from_mapping({"container": {"enabled": True}})
    # Ghost's code: a `container` section without an endpoint means localhost; salt alone when
    # features_provisioners is absent; log level info; 5 AMIs kept.
    assert settings.remote_endpoint is None
    assert not settings.container_debug
    assert list(settings.features_provisioners) == ["salt"]
    assert settings.provisioner_log_level == "info"
    assert settings.ami_retention == 5
    assert ghost_settings_from_mapping({"container": {"endpoint": "localhost"}}).remote_endpoint is None


def test_every_mistake_is_named_with_ghosts_key(tmp_path):
    path = write(
        tmp_path,
        "container: {debug: maybe, endpoint: 'ftp://x'}\nfeatures_provisioners: {chef: {}}\n"
        "provisioner_log_level: loud\nami_retention: 0\n",
    )
    with pytest.raises(GhostConfigError) as raised:
        read_ghost_settings(path)
    problems = "\n".join(raised.value.problems)
    for expected in (
        f"{path}: container.debug: expected true or false, got 'maybe'",
        f"{path}: container.endpoint: expected 'localhost' or an https:// URL",
        f"{path}: features_provisioners: unknown provisioner 'chef'",
        f"{path}: provisioner_log_level: expected one of",
        f"{path}: ami_retention: expected a whole number of at least 1, got 0",
    ):
        assert expected in problems


def test_the_daemons_key_wins_then_ghosts_then_the_default(tmp_path):
    ghost = str(write(tmp_path, GHOST_SAMPLE))
    from_ghost = config_from_mapping({"ghost": {"config": ghost}}, env={})
    assert from_ghost.container.debug is True
    assert from_ghost.lxd.image_server == "https://lxd.example.net:8443"
    assert from_ghost.retention.ami_retention == 3
    assert from_ghost.ghost_settings.provisioner_log_level == "debug"

    overridden = config_from_mapping(
        {
            "ghost": {"config": ghost},
            "container": {"debug": False},
            "lxd": {"image_server": None},
            "retention": {"ami_retention": 9},
        },
        env={},
    )
    assert overridden.container.debug is False
    assert overridden.lxd.image_server is None  # an explicit null keeps images local
    assert overridden.retention.ami_retention == 9

    no_ghost = config_from_mapping({"ghost": {"config": None}}, env={})
    assert no_ghost.container.debug is False and no_ghost.lxd.image_server is None
    assert no_ghost.retention.ami_retention == 5


def test_an_explicit_ghost_config_must_be_readable_and_valid(tmp_path):
    with pytest.raises(ConfigError, match=r"ghost\.config: cannot read"):
        config_from_mapping({"ghost": {"config": str(tmp_path / "absent.yml")}}, env={})
    with pytest.raises(ConfigError, match="not valid YAML"):
        config_from_mapping({"ghost": {"config": str(write(tmp_path, "container: [\n"))}}, env={})


def test_ghost_settings_is_not_a_key_of_the_daemons_file():
    with pytest.raises(ConfigError, match="ghost_settings: unknown key"):
        config_from_mapping({"ghost_settings": {}}, env={})
