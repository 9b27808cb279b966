"""Configuration: one YAML file, validated as a whole before anything starts.

Every section is a frozen dataclass; each leaf field carries the parser that
validates it (`metadata={"parse": ...}`), so the dataclasses are the one
description of the schema. Validation collects every problem, each named by
its dotted key path, and unknown keys are errors so that a typo never passes
silently.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .ghost_config import (
    DEFAULT_GHOST_CONFIG,
    GHOST_DEFAULT_RQ_JOB_TIMEOUT,
    GHOST_MONGO_DBNAME,
    GhostConfigError,
    GhostSettings,
    YamlFileError,
    read_ghost_settings,
    read_yaml_file,
)
from .policy import LIMITS

DEFAULT_PATH = Path("/etc/ghost-buildpackd/config.yml")
ENV_CONFIG = "GHOST_BUILDPACKD_CONFIG"
ENV_MONGODB_URI = "GHOST_BUILDPACKD_MONGODB_URI"


class ConfigError(Exception):
    """The configuration is unusable; `problems` holds one line per mistake."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Invalid(ValueError):
    """A value failed its parser; the message is the reason, without the key."""


# --- parsers: raw YAML value -> typed value, or _Invalid(reason) -------------

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_duration(value: Any) -> float:
    """`30s`, `10m`, `1h30m`, `250ms` or a bare number of seconds -> seconds."""
    if isinstance(value, bool):
        raise _Invalid(f"expected a duration like 30m, got {value!r}")
    if isinstance(value, int | float) and value >= 0:
        return float(value)
    text = str(value).strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", text)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", "", text).strip():
        raise _Invalid(f"expected a duration like 30m, got {value!r}")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def parse_size(value: Any) -> int:
    """`2GiB`, `512MB`, `1048576` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", str(value).lower())
    if not match or isinstance(value, bool):
        raise _Invalid(f"expected a size like 2GiB, got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])


def parse_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {value!r}")
    return value


def parse_str(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"expected a non-empty string, got {value!r}")
    return value


def parse_str_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise _Invalid(f"expected a list of strings, got {value!r}")
    return tuple(value)


def parse_command_list(value: Any) -> tuple[tuple[str, ...], ...]:
    if not isinstance(value, list) or not all(isinstance(item, list) for item in value):
        raise _Invalid(f"expected a list of commands (each a list of strings), got {value!r}")
    return tuple(parse_str_list(item) for item in value)


def parse_absolute_path(value: Any) -> Path:
    text = parse_str(value)
    if not text.startswith("/"):
        raise _Invalid(f"expected an absolute path, got {value!r}")
    return Path(text)


def positive_int(minimum: int = 1, maximum: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < minimum
            or (maximum is not None and value > maximum)
        ):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
            raise _Invalid(f"expected a whole number {bound}, got {value!r}")
        return value

    return parse


def one_of(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise _Invalid(f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    return parse


def optional(parser: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        return None if value is None else parser(value)

    return parse


def parse_cpu(value: Any) -> str:
    """LXD's limits.cpu: a count (`2`) or a set (`0-1`, `0,2`)."""
    text = str(value)
    if isinstance(value, bool) or not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", text):
        raise _Invalid(f"expected a CPU count like 2 or a set like 0-1, got {value!r}")
    return text


def parse_memory(value: Any) -> str:
    """LXD's limits.memory: a size (`2GiB`, bytes) or a share of the host's memory (`20%`)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", str(value))
    if match and not isinstance(value, bool) and 0 < float(match.group(1)) <= 100:
        return f"{match.group(1)}%"
    try:
        return str(parse_size(value))
    except _Invalid:
        raise _Invalid(f"expected a size like 2GiB or a share of the host's memory like 20%, got {value!r}") from None


UNIX_ENDPOINT = "unix:"


def parse_endpoint(value: Any) -> str:
    """`local`, `unix:/path/to/unix.socket` (the snap's socket, say) or an https:// URL."""
    text = parse_str(value)
    if text.startswith(UNIX_ENDPOINT):
        if not text[len(UNIX_ENDPOINT) :].startswith("/"):
            raise _Invalid(f"expected unix: followed by an absolute socket path, got {value!r}")
        return text
    if text != "local" and not text.startswith("https://"):
        raise _Invalid(f"expected 'local', unix:/path/to/unix.socket or an https:// URL, got {value!r}")
    return text


def parse_listen(value: Any) -> tuple[str, int]:
    match = re.fullmatch(r"(.+):(\d{1,5})", str(value))
    if not match or not 0 < int(match.group(2)) < 65536:
        raise _Invalid(f"expected host:port like 127.0.0.1:9469, got {value!r}")
    return match.group(1), int(match.group(2))


# LXD's publish compression algorithms, with the host command each needs (`check` looks for it).
PUBLISH_COMPRESSORS = {
    "gzip": "gzip",
    "zstd": "zstd",
    "xz": "xz",
    "bzip2": "bzip2",
    "lzma": "lzma",
    "squashfs": "mksquashfs",
}


def field(default: Any, parse: Callable[[Any], Any]) -> Any:
    """A leaf key: its default (immutable) and the parser that validates a given value."""
    return dataclasses.field(default=default, metadata={"parse": parse})


# --- schema -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MongoConfig:
    # Left out: Ghost's own (MONGO_HOST, else its config.yml's mongo_host, port 27017): resolve_ghost_settings.
    uri: str = field("mongodb://localhost:27017/", parse_str)
    # A file holding the URI (with its credentials), read by every command: see `_uri_from_file`.
    uri_file: Path | None = field(None, optional(parse_absolute_path))
    database: str = field(GHOST_MONGO_DBNAME, parse_str)  # Ghost's settings.py hard-codes it
    timeout: float = field(10.0, parse_duration)


@dataclasses.dataclass(frozen=True)
class LxdConfig:
    endpoint: str = field("local", parse_endpoint)
    cert: Path | None = field(None, optional(parse_absolute_path))
    key: Path | None = field(None, optional(parse_absolute_path))
    verify: bool = field(True, parse_bool)
    image_server: str | None = field(None, optional(parse_str))
    timeout: float = field(120.0, parse_duration)
    operation_timeout: float = field(1800.0, parse_duration)

    @property
    def socket_path(self) -> str | None:
        """The unix socket of a `unix:` endpoint (None for `local`, which lets pylxd find the socket)."""
        return self.endpoint[len(UNIX_ENDPOINT) :] if self.endpoint.startswith(UNIX_ENDPOINT) else None

    @property
    def on_this_host(self) -> bool:
        """LXD runs on this host (reached through a unix socket), not behind https."""
        return not self.endpoint.startswith("https://")


# Host directories that hold a system's own programs: mounting one over the container's replaces the image's.
SYSTEM_PREFIXES = ("/", "/usr", "/usr/local", "/bin", "/lib", "/etc", "/var", "/opt", "/sbin")


def parse_venv(value: Any) -> Path:
    path = parse_absolute_path(value)
    if str(path).rstrip("/") in SYSTEM_PREFIXES or str(path) == "/":
        raise _Invalid(
            f"{path} is a system directory; it is mounted at the same path in build containers and would hide "
            "the image's own (give Ghost's virtualenv, e.g. /usr/local/share/ghost/venv)"
        )
    return path


@dataclasses.dataclass(frozen=True)
class GhostPaths:
    root: Path = field(Path("/ghost"), parse_absolute_path)
    log_dir: Path = field(Path("/var/log/ghost"), parse_absolute_path)
    provisioner_tree: Path = field(Path("/tmp/ghost-features-provisioner"), parse_absolute_path)
    config: Path | None = field(None, optional(parse_absolute_path))
    # Ghost's virtualenv (its worker's sys.exec_prefix): mounted at the same path when ansible runs.
    venv: Path = field(Path("/usr/local/share/ghost/venv"), parse_venv)


@dataclasses.dataclass(frozen=True)
class EventsConfig:
    mode: str = field("auto", one_of("auto", "change_stream", "poll"))
    poll_interval: float = field(5.0, parse_duration)
    probe_interval: float = field(0.25, parse_duration)
    overlap: float = field(120.0, parse_duration)
    initial_lookback: float = field(3600.0, parse_duration)
    rescan_interval: float = field(30.0, parse_duration)


@dataclasses.dataclass(frozen=True)
class LimitsConfig:
    cpu: str | None = field(None, optional(parse_cpu))
    memory: str | None = field("20%", optional(parse_memory))  # with the default 4 workers, 80% of the host at most
    disk: int | None = field(20 << 30, optional(parse_size))
    processes: int | None = field(2000, optional(positive_int()))


# Placeholders of provisioner_commands, replaced in each argument when a build runs.
PLACEHOLDER_LOG_LEVEL = "{log_level}"  # Ghost's provisioner_log_level
PLACEHOLDER_ANSIBLE_VERBOSITY = "{ansible_verbosity}"  # its ansible flag (-v...); the argument goes when empty
PLACEHOLDER_VENV = "{venv}"  # ghost.venv


@dataclasses.dataclass(frozen=True)
class ProvisionerCommands:
    """The commands Ghost's image builder runs in the container, as it runs them."""

    salt: tuple[str, ...] = field(
        (
            "salt-call",
            "state.highstate",
            "--file-root=/srv/salt/salt",
            "--pillar-root=/srv/salt/pillar",
            "--local",
            "-l",
            PLACEHOLDER_LOG_LEVEL,
        ),
        parse_str_list,
    )
    ansible: tuple[str, ...] = field(
        (
            f"{PLACEHOLDER_VENV}/bin/ansible-playbook",
            "-i",
            "localhost,",
            "--connection=local",
            "/srv/ansible/main.yml",
            PLACEHOLDER_ANSIBLE_VERBOSITY,
        ),
        parse_str_list,
    )
    # Before the pre hook, unless the job's options[0] is true (Ghost's "skip salt bootstrap"): commands run in turn.
    salt_bootstrap: tuple[tuple[str, ...], ...] = field(
        (("wget", "-O", "bootstrap-salt.sh", "https://bootstrap.saltstack.com"), ("sh", "bootstrap-salt.sh")),
        parse_command_list,
    )


@dataclasses.dataclass(frozen=True)
class ContainerConfig:
    debug: bool = field(False, parse_bool)
    privileged: bool = field(False, parse_bool)
    idmap_user: str = field("ghost", parse_str)
    limits: LimitsConfig = dataclasses.field(default_factory=LimitsConfig)
    exec_timeout: float = field(1800.0, parse_duration)
    ready_timeout: float = field(120.0, parse_duration)
    prepared_max_age: float = field(7200.0, parse_duration)
    profiles: tuple[str, ...] = field((), parse_str_list)
    publish_compression: str = field("none", one_of("none", *PUBLISH_COMPRESSORS))
    max_prepared: int | None = field(None, optional(positive_int(minimum=0)))
    templates: int = field(8, positive_int(minimum=0))  # template containers kept (templates.py); 0: none
    provisioner_commands: ProvisionerCommands = dataclasses.field(default_factory=ProvisionerCommands)
    output_head: int = field(1 << 20, parse_size)
    output_tail: int = field(64 << 10, parse_size)


@dataclasses.dataclass(frozen=True)
class RetentionConfig:
    inventory: str = field("ghost", one_of("ghost", "ec2"))
    ami_retention: int | None = field(None, optional(positive_int()))
    interval: float = field(3600.0, parse_duration)


# Left out, the buildpack command's waits are shares of Ghost's RQ job timeout (rq kills the whole job
# after it): the two together take five sixths of it, the last sixth is the rest of the deploy (clone,
# packaging, instances). With Ghost's default 3600 s: 40 min and 10 min.
TIMEOUT_SHARE, BUILD_WAIT_SHARE = 4 / 6, 1 / 6


def buildpack_waits(rq_job_timeout: float) -> tuple[float, float]:
    """Default (buildpack.timeout, buildpack.build_wait) for Ghost's `rq_worker_job_timeout`."""
    return rq_job_timeout * TIMEOUT_SHARE, rq_job_timeout * BUILD_WAIT_SHARE


def waits_fit(timeout: float, build_wait: float, rq_job_timeout: float) -> bool:
    """Whether the command's longest life leaves the rest of the deploy its sixth of the RQ job timeout."""
    return timeout + build_wait <= rq_job_timeout * (TIMEOUT_SHARE + BUILD_WAIT_SHARE) + 1e-6


_DEFAULT_TIMEOUT, _DEFAULT_BUILD_WAIT = buildpack_waits(GHOST_DEFAULT_RQ_JOB_TIMEOUT)


@dataclasses.dataclass(frozen=True)
class BuildpackConfig:
    """`ghost-buildpackd buildpack`, the command Ghost's worker runs for a module script."""

    timeout: float = field(_DEFAULT_TIMEOUT, parse_duration)  # above container.exec_timeout plus a container start
    build_wait: float = field(_DEFAULT_BUILD_WAIT, parse_duration)  # longest wait for the app's build in flight


@dataclasses.dataclass(frozen=True)
class LogConfig:
    format: str = field("auto", one_of("auto", "json", "console"))
    level: str = field("info", one_of("debug", "info", "warning", "error"))


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    listen: tuple[str, int] | None = field(None, optional(parse_listen))


@dataclasses.dataclass(frozen=True)
class Config:
    mongodb: MongoConfig = dataclasses.field(default_factory=MongoConfig)
    lxd: LxdConfig = dataclasses.field(default_factory=LxdConfig)
    ghost: GhostPaths = dataclasses.field(default_factory=GhostPaths)
    events: EventsConfig = dataclasses.field(default_factory=EventsConfig)
    container: ContainerConfig = dataclasses.field(default_factory=ContainerConfig)
    retention: RetentionConfig = dataclasses.field(default_factory=RetentionConfig)
    buildpack: BuildpackConfig = dataclasses.field(default_factory=BuildpackConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    workers: int = field(4, positive_int(1, 256))
    lease_ttl: float = field(30.0, parse_duration)
    shutdown_grace: float = field(60.0, parse_duration)
    sweep_interval: float = field(300.0, parse_duration)
    # How often the base images Ghost's UI offers are listed into MongoDB (daemon.BaseImagesRefresh).
    base_images_interval: float = field(60.0, parse_duration)
    instance_id: str | None = field(None, optional(parse_str))
    host: str | None = field(None, optional(parse_str))
    # Not a key of the daemon's file: what Ghost's own config.yml says (see resolve_ghost_settings).
    ghost_settings: GhostSettings = dataclasses.field(default_factory=GhostSettings, metadata={"derived": True})

    @property
    def host_name(self) -> str:
        """The host a deploy request is bound to (the disk holding working copies)."""
        return self.host or socket.gethostname()

    def with_instance_id(self) -> Config:
        """A copy with a unique instance id, for the daemon instance being started."""
        if self.instance_id:
            return self
        return dataclasses.replace(self, instance_id=f"{self.host_name}:{os.getpid()}:{uuid.uuid4().hex[:8]}")


# --- building a Config from raw data ---------------------------------------------


def _build(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    """Instantiate dataclass `cls` from `raw`, appending problems instead of raising."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.append(f"{path or '(top level)'}: expected a mapping of keys, got {raw!r}")
        raw = {}
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("derived")}
    for key in raw:
        if key not in fields:
            where = f"{path}.{key}" if path else str(key)
            known = ", ".join(sorted(fields))
            problems.append(f"{where}: unknown key (known keys here: {known})")
    values = {}
    for name, spec in fields.items():
        where = f"{path}.{name}" if path else name
        if "parse" not in spec.metadata:  # a nested section, declared with default_factory=Section
            section = spec.default_factory
            assert isinstance(section, type), f"{where}: a section is declared with default_factory=Section"
            values[name] = _build(section, raw.get(name), where, problems)
        elif name in raw:
            try:
                values[name] = spec.metadata["parse"](raw[name])
            except _Invalid as error:
                problems.append(f"{where}: {error}")
    return cls(**values)


POSITIVE_CONTAINER_DURATIONS = ("exec_timeout", "ready_timeout", "prepared_max_age")


def _cross_checks(config: Config, problems: list[str]) -> None:
    if not config.lxd.on_this_host and (config.lxd.cert is None) != (config.lxd.key is None):
        problems.append("lxd.cert: lxd.cert and lxd.key go together (client certificate and its key)")
    problems += LIMITS.config_problems(config)
    durations = {
        "lxd.operation_timeout": config.lxd.operation_timeout,
        "base_images_interval": config.base_images_interval,
    }
    durations |= {f"container.{key}": getattr(config.container, key) for key in POSITIVE_CONTAINER_DURATIONS}
    problems += [f"{key}: expected a duration above zero" for key, value in durations.items() if value <= 0]


def _uri_from_file(path: Path, problems: list[str]) -> str | None:
    """The MongoDB URI held in `path` (first non-empty line), or None with the problem recorded.

    The file holds credentials: it must not be readable by every user (0600 or 0640 root:ghost).
    """
    where = "mongodb.uri_file"
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        problems.append(f"{where}: cannot read {path} ({error.strerror})")
        return None
    if mode & 0o004:
        problems.append(f"{where}: {path} is readable by every user (mode {mode & 0o777:04o}): chmod 0640 or 0600")
        return None
    uri = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not uri.startswith(("mongodb://", "mongodb+srv://")):
        problems.append(f"{where}: {path} must hold a mongodb:// or mongodb+srv:// URI on its first line")
        return None
    return uri


def _mongodb_uri(config: Config, raw: Any, env: Mapping[str, str], problems: list[str]) -> Config:
    """GHOST_BUILDPACKD_MONGODB_URI, else mongodb.uri_file, else mongodb.uri."""
    mongodb = config.mongodb
    if env.get(ENV_MONGODB_URI):
        return dataclasses.replace(config, mongodb=dataclasses.replace(mongodb, uri=env[ENV_MONGODB_URI]))
    if mongodb.uri_file is None:
        return config
    if isinstance(raw, Mapping) and isinstance(raw.get("mongodb"), Mapping) and "uri" in raw["mongodb"]:
        problems.append("mongodb.uri_file: set mongodb.uri or mongodb.uri_file, not both")
        return config
    uri = _uri_from_file(mongodb.uri_file, problems)
    return config if uri is None else dataclasses.replace(config, mongodb=dataclasses.replace(mongodb, uri=uri))


def config_from_mapping(raw: Any, env: Mapping[str, str] | None = None) -> Config:
    """Validate raw data (as loaded from YAML) into a Config, or raise ConfigError with every problem.

    Ghost's config.yml (`ghost.config`) is read here too, so every command sees the same values.
    """
    problems: list[str] = []
    env = os.environ if env is None else env
    config = _build(Config, raw, "", problems)
    config = _mongodb_uri(config, raw, env, problems)
    _cross_checks(config, problems)
    if problems:
        raise ConfigError(problems)
    try:
        ghost = _read_ghost_settings(config.ghost.config)
    except GhostConfigError as error:
        raise ConfigError(error.problems) from error
    return resolve_ghost_settings(config, ghost, raw if isinstance(raw, Mapping) else {}, env)


def _read_ghost_settings(path: Path | None) -> GhostSettings:
    """An explicit `ghost.config` must be readable; Ghost's default path is read when it exists."""
    if path is not None:
        return read_ghost_settings(path)
    if DEFAULT_GHOST_CONFIG.is_file():
        return read_ghost_settings(DEFAULT_GHOST_CONFIG)
    return GhostSettings()


def resolve_ghost_settings(
    config: Config, ghost: GhostSettings, raw: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> Config:
    """Fill the daemon's keys that Ghost's config.yml also sets: a key in the daemon's file wins,
    else Ghost's value, else the default. The one place that says which value wins:

    | daemon key                   | Ghost's config.yml key            | when neither is set     |
    | container.debug              | container.debug                   | false                   |
    | lxd.image_server             | container.endpoint                | local images only       |
    | retention.ami_retention      | ami_retention                     | 5                       |
    | mongodb.uri (and uri_file)   | MONGO_HOST (environment), mongo_host, port 27017 | localhost:27017 |
    | buildpack.timeout            | rq_worker_job_timeout x 4/6       | 40m (of 3600 s)         |
    | buildpack.build_wait         | rq_worker_job_timeout x 1/6       | 10m (of 3600 s)         |

    `mongodb.database` is Ghost's `apitest` unless the daemon's file sets it (settings.py hard-codes it).
    Ghost's `container.enabled` has no daemon key: off, no container step is made (`ghost.containers_off`).
    """
    env = {} if env is None else env
    container, lxd, retention, mongodb, buildpack = (
        config.container,
        config.lxd,
        config.retention,
        config.mongodb,
        config.buildpack,
    )
    if not _given(raw, "container", "debug"):
        container = dataclasses.replace(container, debug=ghost.container_debug)
    if not _given(raw, "lxd", "image_server"):
        lxd = dataclasses.replace(lxd, image_server=ghost.remote_endpoint)
    if retention.ami_retention is None:
        retention = dataclasses.replace(retention, ami_retention=ghost.ami_retention)
    if not (env.get(ENV_MONGODB_URI) or mongodb.uri_file or _given(raw, "mongodb", "uri")):
        mongodb = dataclasses.replace(mongodb, uri=ghost.mongodb_uri(env))
    timeout, build_wait = buildpack_waits(ghost.rq_worker_job_timeout)
    if not _given(raw, "buildpack", "timeout"):
        buildpack = dataclasses.replace(buildpack, timeout=timeout)
    if not _given(raw, "buildpack", "build_wait"):
        buildpack = dataclasses.replace(buildpack, build_wait=build_wait)
    return dataclasses.replace(
        config,
        container=container,
        lxd=lxd,
        retention=retention,
        mongodb=mongodb,
        buildpack=buildpack,
        ghost_settings=ghost,
    )


def _given(raw: Mapping[str, Any], section: str, key: str) -> bool:
    inner = raw.get(section)
    return isinstance(inner, Mapping) and key in inner


def config_path(cli_path: str | None, env: Mapping[str, str] | None = None) -> Path:
    """--config wins over GHOST_BUILDPACKD_CONFIG, which wins over the default path."""
    env = os.environ if env is None else env
    return Path(cli_path or env.get(ENV_CONFIG) or DEFAULT_PATH)


def load_config(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the YAML file at `path`."""
    try:
        raw = read_yaml_file(path)
    except YamlFileError as error:
        if error.unreadable is not None:
            raise ConfigError([f"{path}: cannot read the configuration file ({error.unreadable})"]) from error
        raise ConfigError([f"{path}: not valid YAML ({error})"]) from error
    return config_from_mapping(raw, env)
