"""Ghost's config.yml: parsed as Ghost reads it, and which value wins over the daemon's own keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from ghost_buildpackd.check import buildpack_waits_check, collections_check, containers_enabled_check
from ghost_buildpackd.config import ConfigError, config_from_mapping
from ghost_buildpackd.ghost.config_yml import GhostConfigError, ghost_settings_from_mapping, read_ghost_settings
from ghost_buildpackd.store import Store

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


@pytest.mark.parametrize(("value", "enabled"), [(True, True), ("false", True), (1, True), (0, False), ("", False)])
def test_container_enabled_is_read_as_ghost_tests_it(value, enabled):
    """Ghost 19.08 and the patch test `container.enabled` for truth: the daemon decides the same, never refuses it."""
    assert ghost_settings_from_mapping({"container": {"enabled": value}}).container_enabled is enabled


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


# --- what a stock Ghost 19.08 install says: containers, MongoDB, the RQ job timeout -------------------------


def test_containers_are_on_only_when_ghosts_config_says_container_enabled(tmp_path):
    assert read_ghost_settings(write(tmp_path, GHOST_SAMPLE)).container_enabled is True
    assert read_ghost_settings(write(tmp_path, "ami_retention: 3\n")).container_enabled is False  # 19.08's default
    assert read_ghost_settings(write(tmp_path, "container: {enabled: false}\n")).container_enabled is False
    assert config_from_mapping({"ghost": {"config": None}}, env={}).ghost_settings.container_enabled is False
    assert containers_enabled_check(config_from_mapping({}, env={})).warning
    on = config_from_mapping({"ghost": {"config": str(write(tmp_path, GHOST_SAMPLE))}}, env={})
    assert not containers_enabled_check(on).warning and on.ghost_settings.container_enabled


def test_mongodb_defaults_are_ghosts_own(tmp_path):
    ghost = str(write(tmp_path, "mongo_host: db.internal\n"))
    config = config_from_mapping({"ghost": {"config": ghost}}, env={})
    assert (config.mongodb.uri, config.mongodb.database) == ("mongodb://db.internal:27017/", "apitest")
    # settings.py: MONGO_HOST from the environment wins over mongo_host
    assert config_from_mapping({"ghost": {"config": ghost}}, env={"MONGO_HOST": "mongo"}).mongodb.uri == (
        "mongodb://mongo:27017/"
    )
    assert config_from_mapping({}, env={}).mongodb.uri == "mongodb://localhost:27017/"
    mine = config_from_mapping(
        {"ghost": {"config": ghost}, "mongodb": {"uri": "mongodb://mine/", "database": "other"}},
        env={"MONGO_HOST": "mongo"},
    )
    assert (mine.mongodb.uri, mine.mongodb.database) == ("mongodb://mine/", "other")
    assert config_from_mapping(
        {}, env={"GHOST_BUILDPACKD_MONGODB_URI": "mongodb://env/", "MONGO_HOST": "x"}
    ).mongodb.uri == ("mongodb://env/")


def test_buildpack_waits_default_to_shares_of_ghosts_rq_job_timeout(tmp_path):
    default = config_from_mapping({}, env={})
    assert (default.buildpack.timeout, default.buildpack.build_wait) == (2400, 600)  # of Ghost's 3600 s
    assert default.buildpack.timeout + default.buildpack.build_wait < 3600
    longer = config_from_mapping({"ghost": {"config": str(write(tmp_path, "rq_worker_job_timeout: 7200\n"))}}, env={})
    assert (longer.buildpack.timeout, longer.buildpack.build_wait) == (4800, 1200)
    assert not buildpack_waits_check(longer).warning
    too_long = config_from_mapping({"buildpack": {"timeout": "40m", "build_wait": "30m"}}, env={})  # the old defaults
    result = buildpack_waits_check(too_long)
    assert result.ok and result.warning and "rq_worker_job_timeout 3600s" in result.detail
    assert "then 2400s and 600s" in result.fix


def test_check_takes_a_ghost_database_without_jobs_and_names_ghosts_real_keys(db):
    store = Store(db)  # no ensure_indexes: the database as Ghost's Eve leaves it
    config = config_from_mapping({"mongodb": {"database": db.name}}, env={})
    empty = collections_check(config, store)
    assert empty.ok and empty.warning and "mongo_dbname" not in empty.fix
    assert "'apitest'" in empty.fix and "MONGO_HOST" in empty.fix and "mongo_host" in empty.fix
    db.apps.insert_one({"name": "shop"})  # Eve makes a collection at its first insert: no job yet
    first_app = collections_check(config, store)
    assert first_app.ok and not first_app.warning and "no job yet" in first_app.detail
