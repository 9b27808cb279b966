"""Config validation: every problem at once, each named by key path and reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ghost_buildpackd.cli import main
from ghost_buildpackd.config import (
    ConfigError,
    config_from_mapping,
    config_path,
    load_config,
)
from ghost_buildpackd.value_parsers import parse_duration, parse_memory, parse_size

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


@pytest.mark.parametrize(("text", "limit"), [("20%", "20%"), ("12.5 %", "12.5%"), ("2GiB", str(2 << 30)), (512, "512")])
def test_memory_limits_as_a_size_or_a_share_of_the_host(text, limit):
    assert parse_memory(text) == limit


def test_defaults_bound_every_container_and_every_wait():
    container = config_from_mapping({}, env={}).container
    assert container.limits.memory == "20%" and container.limits.disk == 20 << 30
    assert container.limits.processes == 2000
    assert container.ready_timeout == 120 and container.prepared_max_age == 7200
    assert config_from_mapping({}, env={}).lxd.operation_timeout == 1800


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
            "container.limits.memory: expected a size like 2GiB or a share of the host's memory like 20%, got 'lots'",
            "workerz: unknown key (known keys here: base_images_interval, buildpack, container, events, ghost, host, "
            "instance_id, lease_ttl, "
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
        (
            {"lxd": {"endpoint": "http://x"}},
            "lxd.endpoint: expected 'local', unix:/path/to/unix.socket or an https:// URL, got 'http://x'",
        ),
        ({"container": {"profiles": "net"}}, "container.profiles: expected a list of strings, got 'net'"),
        ({"container": {"limits": {"cpu": "many"}}}, "container.limits.cpu: expected a CPU count like 2"),
        ({"mongodb": ["uri"]}, "mongodb: expected a mapping of keys, got ['uri']"),
        ({"container": {"limits": {"memory": "150%"}}}, "container.limits.memory: expected a size like 2GiB or a"),
        ({"container": {"limits": {"disk": "big"}}}, "container.limits.disk: expected a size like 2GiB, got 'big'"),
        ({"container": {"ready_timeout": 0}}, "container.ready_timeout: expected a duration above zero"),
        ({"container": {"prepared_max_age": "0s"}}, "container.prepared_max_age: expected a duration above zero"),
        ({"lxd": {"operation_timeout": "never"}}, "lxd.operation_timeout: expected a duration like 30m"),
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
    assert config.mongodb.database == "apitest"  # Ghost's, the file leaves it out
    text = EXAMPLE.read_text()
    for key in (
        "uri",
        "uri_file",
        "database",
        "endpoint",
        "cert",
        "key",
        "verify",
        "root",
        "log_dir",
        "provisioner_tree",
        "operation_timeout",
        "ready_timeout",
        "prepared_max_age",
        "disk",
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


def uri_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "mongodb-uri"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_uri_file_holds_the_credentials(tmp_path):
    path = uri_file(tmp_path, "\nmongodb://ghost:s3cret@db:27017/ghost?authSource=admin\n", mode=0o640)
    config = config_from_mapping({"mongodb": {"uri_file": str(path)}}, env={})
    assert config.mongodb.uri == "mongodb://ghost:s3cret@db:27017/ghost?authSource=admin"
    # The environment still wins, as for mongodb.uri (a one-off command against another server).
    env = {"GHOST_BUILDPACKD_MONGODB_URI": "mongodb://env/"}
    assert config_from_mapping({"mongodb": {"uri_file": str(path)}}, env=env).mongodb.uri == "mongodb://env/"


@pytest.mark.parametrize(
    ("text", "mode", "extra", "message"),
    [
        ("mongodb://u:p@h/", 0o644, {}, "is readable by every user (mode 0644): chmod 0640 or 0600"),
        ("u:p@h", 0o600, {}, "must hold a mongodb:// or mongodb+srv:// URI on its first line"),
        ("", 0o600, {}, "must hold a mongodb:// or mongodb+srv:// URI on its first line"),
        ("mongodb://u:p@h/", 0o600, {"uri": "mongodb://x/"}, "set mongodb.uri or mongodb.uri_file, not both"),
    ],
)
def test_bad_uri_file_is_named_without_its_content(tmp_path, text, mode, extra, message):
    path = uri_file(tmp_path, text, mode)
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"mongodb": {"uri_file": str(path), **extra}}, env={})
    [problem] = caught.value.problems
    assert problem.startswith("mongodb.uri_file: ") and problem.endswith(message)
    assert "u:p" not in problem  # the file's content, credentials maybe, is never echoed


def test_missing_uri_file_is_named(tmp_path):
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"mongodb": {"uri_file": str(tmp_path / "none")}}, env={})
    assert caught.value.problems == [f"mongodb.uri_file: cannot read {tmp_path / 'none'} (No such file or directory)"]


@pytest.mark.mongodb
@pytest.mark.lxd  # reconcile reads LXD's images
def test_every_subcommand_sees_the_uri_file(tmp_path, mongo, db, capsys):
    """The daemon and the commands an operator or Ghost runs read one source: no environment needed."""
    path = uri_file(tmp_path, mongo.uri + "\n")
    config = tmp_path / "config.yml"
    config.write_text(f"mongodb:\n  uri_file: {path}\n  database: {db.name}\n  timeout: 5s\n")
    assert main(["--config", str(config), "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["database"] == db.name
    assert main(["--config", str(config), "reconcile", "--dry-run"]) == 0
    assert "dry run: nothing was changed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("endpoint", "socket_path", "on_this_host"),
    [
        ("local", None, True),
        ("unix:/var/snap/lxd/common/lxd/unix.socket", "/var/snap/lxd/common/lxd/unix.socket", True),
        ("https://lxd:8443", None, False),
    ],
)
def test_lxd_endpoints(endpoint, socket_path, on_this_host):
    lxd = config_from_mapping({"lxd": {"endpoint": endpoint}}, env={}).lxd
    assert (lxd.socket_path, lxd.on_this_host) == (socket_path, on_this_host)


def test_unix_endpoint_needs_an_absolute_path():
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"lxd": {"endpoint": "unix:lxd.socket"}}, env={})
    assert caught.value.problems == [
        "lxd.endpoint: expected unix: followed by an absolute socket path, got 'unix:lxd.socket'"
    ]


@pytest.mark.lxd
def test_unix_endpoint_reaches_lxd():
    from ghost_buildpackd.lxd import Lxd

    socket_path = "/var/lib/lxd/unix.socket"  # Debian's package; the snap's is /var/snap/lxd/common/lxd/unix.socket
    if not Path(socket_path).is_socket():
        pytest.skip(f"no LXD socket at {socket_path}")
    lxd = Lxd(config_from_mapping({"lxd": {"endpoint": f"unix:{socket_path}", "timeout": "10s"}}, env={}).lxd)
    assert lxd.server_info()["version"]
    assert lxd.answering_pid() is not None
    lxd.server_pid = -1  # as if another server had answered before: a health probe must not change it
    assert lxd.answers() and lxd.server_pid == -1
