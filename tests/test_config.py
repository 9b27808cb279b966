"""Config validation: every problem at once, each named by key path and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from ghost_buildpackd.cli import main
from ghost_buildpackd.config import (
    ConfigError,
    config_from_mapping,
    config_path,
    load_config,
    parse_duration,
    parse_size,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "config.example.yml"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("10m", 600), ("1h30m", 5400), ("250ms", 0.25), (45, 45), ("2d", 172800)],
)
def test_durations_in_human_form(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [("2GiB", 2 << 30), ("512MB", 512 * 10**6), (1024, 1024), ("1kib", 1024)])
def test_sizes_in_human_form(text, size):
    assert parse_size(text) == size


def test_defaults_are_valid_and_as_documented():
    config = config_from_mapping({}, env={})
    assert config.ghost.root == Path("/ghost")
    assert config.ghost.log_dir == Path("/var/log/ghost")
    assert config.events.mode == "auto"
    assert config.container.privileged is False
    assert config.container.idmap_user == "ghost"
    assert config.workers == 4


def test_three_mistakes_give_three_precise_errors():
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"container": {"exec_timeout": "soon", "limits": {"memory": "lots"}}, "workerz": 2}, env={})
    assert sorted(caught.value.problems) == sorted(
        [
            "container.exec_timeout: expected a duration like 30m, got 'soon'",
            "container.limits.memory: expected a size like 2GiB, got 'lots'",
            "workerz: unknown key (known keys here: buildpack, container, events, ghost, host, instance_id, lease_ttl, "
            "log, lxd, metrics, mongodb, retention, shutdown_grace, sweep_interval, workers)",
        ]
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"events": {"mode": "push"}}, "events.mode: expected one of auto, change_stream, poll, got 'push'"),
        ({"workers": 0}, "workers: expected a whole number from 1 to 256, got 0"),
        ({"workers": "4"}, "workers: expected a whole number from 1 to 256, got '4'"),
        ({"ghost": {"root": "ghost"}}, "ghost.root: expected an absolute path, got 'ghost'"),
        ({"container": {"debug": "yes"}}, "container.debug: expected true or false, got 'yes'"),
        ({"lxd": {"endpoint": "http://x"}}, "lxd.endpoint: expected 'local' or an https:// URL, got 'http://x'"),
        ({"container": {"profiles": "net"}}, "container.profiles: expected a list of strings, got 'net'"),
        ({"container": {"limits": {"cpu": "many"}}}, "container.limits.cpu: expected a CPU count like 2"),
        ({"mongodb": ["uri"]}, "mongodb: expected a mapping of keys, got ['uri']"),
        ({"metrics": {"listen": "9469"}}, "metrics.listen: expected host:port like 127.0.0.1:9469, got '9469'"),
    ],
)
def test_each_bad_value_is_named(raw, message):
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(raw, env={})
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(message)


def test_environment_overrides_uri_and_path():
    config = config_from_mapping(
        {"mongodb": {"uri": "mongodb://file/"}}, env={"GHOST_BUILDPACKD_MONGODB_URI": "mongodb://env/"}
    )
    assert config.mongodb.uri == "mongodb://env/"
    assert config_path(None, env={"GHOST_BUILDPACKD_CONFIG": "/x.yml"}) == Path("/x.yml")
    assert config_path("/cli.yml", env={"GHOST_BUILDPACKD_CONFIG": "/x.yml"}) == Path("/cli.yml")
    assert config_path(None, env={}) == Path("/etc/ghost-buildpackd/config.yml")


def test_example_config_is_valid_and_documents_every_key():
    config = load_config(EXAMPLE, env={})
    assert config.mongodb.database == "ghost"
    text = EXAMPLE.read_text()
    for key in (
        "uri",
        "database",
        "endpoint",
        "cert",
        "key",
        "verify",
        "root",
        "log_dir",
        "provisioner_tree",
        "venv",
        "salt_bootstrap",
        "mode",
        "poll_interval",
        "debug",
        "privileged",
        "idmap_user",
        "cpu",
        "memory",
        "exec_timeout",
        "profiles",
        "ami_retention",
        "interval",
        "workers",
    ):
        assert f"{key}:" in text, key


def test_cli_exits_2_with_every_problem(tmp_path, capsys):
    path = tmp_path / "bad.yml"
    path.write_text("container:\n  exec_timeout: soon\n  debug: maybe\nworkerz: 3\n")
    assert main(["--config", str(path), "check"]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    assert "container.exec_timeout: expected a duration like 30m, got 'soon'" in err
    assert "container.debug: expected true or false, got 'maybe'" in err
    assert "workerz: unknown key" in err


def test_cli_reports_unreadable_and_invalid_yaml(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "missing.yml"), "check"]) == 2
    assert "cannot read the configuration file" in capsys.readouterr().err
    path = tmp_path / "broken.yml"
    path.write_text("mongodb: [unclosed\n")
    assert main(["--config", str(path), "check"]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("ghost-buildpackd ")
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "reconcile" in capsys.readouterr().out
