"""Building a Config from the YAML file: every problem at once, each named by its dotted key path.

Unknown keys are errors, so that a typo never passes silently. Ghost's own config.yml is read here
too (`resolve_ghost_settings` says which value wins), so every command sees the same values.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..ghost.config_yml import (
    DEFAULT_GHOST_CONFIG,
    GhostConfigError,
    GhostSettings,
    YamlFileError,
    read_ghost_settings,
    read_yaml_file,
)
from ..policy import LIMITS
from ..value_parsers import Invalid
from .schema import Config, buildpack_waits

DEFAULT_PATH = Path("/etc/ghost-buildpackd/config.yml")
ENV_CONFIG = "GHOST_BUILDPACKD_CONFIG"
ENV_MONGODB_URI = "GHOST_BUILDPACKD_MONGODB_URI"


class ConfigError(Exception):
    """The configuration is unusable; `problems` holds one line per mistake."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


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
            except Invalid as error:
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
    Ghost's `container.enabled` has no daemon key: off, no container step is made (`ghost.documents.containers_off`).
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
