"""Ghost's own config.yml: what Ghost's operators already configured, read once at start.

Ghost 19.08 reads `{ghost_root_path}/config.yml` (`/usr/local/share/ghost/config.yml` by
default). The daemon reads the keys that concern container steps from the same file, so one
setting is made in one place: `container.enabled`, `container.endpoint`, `container.debug`,
`ami_retention`, `features_provisioners`, `provisioner_log_level`, `mongo_host` and
`rq_worker_job_timeout`. Ghost's defaults apply to
missing keys, as in Ghost's code. The daemon's own configuration overrides each value
(`config.resolve_ghost_settings` says which key wins).

Pure parsing: `read_ghost_settings` does the one file read; `ghost_settings_from_mapping`
validates, reporting every problem with Ghost's key path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from ..value_parsers import one_of, positive_int

DEFAULT_GHOST_CONFIG = Path("/usr/local/share/ghost/config.yml")
# Ghost's `container.endpoint` meaning "this host's LXD": images are local.
LOCAL_ENDPOINT = "localhost"
GHOST_DEFAULT_AMI_RETENTION = 5
GHOST_DEFAULT_LOG_LEVEL = "info"
GHOST_LOG_LEVELS = ("error", "warning", "info", "debug", "trace")
GHOST_PROVISIONERS = ("salt", "ansible")
# settings.py: MONGO_HOST (environment) wins over config.yml's mongo_host; port and database are hard-coded.
GHOST_MONGO_HOST_ENV = "MONGO_HOST"
GHOST_DEFAULT_MONGO_HOST = "localhost"
GHOST_MONGO_PORT = 27017
GHOST_MONGO_DBNAME = "apitest"
# settings.RQ_JOB_TIMEOUT: rq kills a whole Ghost job (a deploy and every command it runs) after this long.
GHOST_DEFAULT_RQ_JOB_TIMEOUT = 3600


class GhostConfigError(ValueError):
    """Ghost's config.yml cannot be used; `problems` holds one line per mistake."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclasses.dataclass(frozen=True)
class GhostSettings:
    """The container-related settings of Ghost's config.yml, Ghost's defaults filled in."""

    path: Path | None = None  # None: no file read, Ghost's defaults
    container_enabled: bool = False
    # `localhost` or a remote LXD (`https://host:8443`) that Ghost's UI lists base images from.
    # Without a `container` section Ghost 19.08 keeps containers off (and would name its own
    # public image server, long gone): the daemon then uses local images.
    container_endpoint: str = LOCAL_ENDPOINT
    container_debug: bool = False
    ami_retention: int = GHOST_DEFAULT_AMI_RETENTION
    # Provisioner name -> its settings, in the file's order. Ghost runs every one listed here.
    features_provisioners: Mapping[str, Mapping[str, Any]] = dataclasses.field(
        default_factory=lambda: MappingProxyType({"salt": MappingProxyType({})})
    )
    provisioner_log_level: str = GHOST_DEFAULT_LOG_LEVEL
    mongo_host: str = GHOST_DEFAULT_MONGO_HOST
    rq_worker_job_timeout: int = GHOST_DEFAULT_RQ_JOB_TIMEOUT

    def mongodb_uri(self, env: Mapping[str, str]) -> str:
        """The MongoDB Ghost's processes use: MONGO_HOST from `env`, else `mongo_host`, port 27017
        (pymongo's `MongoClient(host=..., port=27017)`: a host may be a whole mongodb:// URI, or carry a port)."""
        host = (env.get(GHOST_MONGO_HOST_ENV) or self.mongo_host).strip()
        if host.startswith(("mongodb://", "mongodb+srv://")):
            return host
        return f"mongodb://{host}/" if ":" in host else f"mongodb://{host}:{GHOST_MONGO_PORT}/"

    @property
    def remote_endpoint(self) -> str | None:
        """The remote LXD that base images are pulled from, or None when Ghost uses local images."""
        return None if self.container_endpoint == LOCAL_ENDPOINT else self.container_endpoint


class YamlFileError(ValueError):
    """A YAML file could not be read (`unreadable` names the OS error) or parsed (`unreadable` is None)."""

    def __init__(self, reason: str, unreadable: str | None):
        self.unreadable = unreadable
        super().__init__(reason)


def read_yaml_file(path: Path) -> Any:
    """The YAML document in `path` (the daemon's configuration and Ghost's config.yml alike)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise YamlFileError(str(error.strerror), error.strerror) from error
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise YamlFileError(str(error), None) from error


def read_ghost_settings(path: Path) -> GhostSettings:
    """Read and validate Ghost's config.yml at `path`."""
    try:
        raw = read_yaml_file(path)
    except YamlFileError as error:
        if error.unreadable is not None:
            raise GhostConfigError([f"ghost.config: cannot read {path} ({error.unreadable})"]) from error
        raise GhostConfigError([f"ghost.config: {path} is not valid YAML ({error})"]) from error
    return ghost_settings_from_mapping(raw, path)


def ghost_settings_from_mapping(raw: Any, path: Path | None = None) -> GhostSettings:
    """Validate the loaded YAML of Ghost's config.yml; every problem is named `{path}: {key}: {reason}`."""
    where = str(path) if path else "Ghost's config.yml"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise GhostConfigError([f"{where}: expected a mapping of keys, got {type(raw).__name__}"])
    problems: list[str] = []
    values: dict[str, Any] = {"path": path}

    def take(key: str, parse: Any, into: str, source: Mapping[str, Any] = raw, prefix: str = "") -> None:
        if key not in source or source[key] is None:
            return
        try:
            values[into] = parse(source[key])
        except ValueError as error:
            problems.append(f"{where}: {prefix}{key}: {error}")

    container = raw.get("container")
    if container is not None and not isinstance(container, Mapping):
        problems.append(f"{where}: container: expected a mapping, got {type(container).__name__}")
    elif container is not None:
        # With a `container` section, Ghost's code defaults the endpoint to localhost.
        take("enabled", _ghost_truth, "container_enabled", container, "container.")
        take("endpoint", _endpoint, "container_endpoint", container, "container.")
        take("debug", _ghost_bool, "container_debug", container, "container.")
    take("ami_retention", positive_int(), "ami_retention")
    take("features_provisioners", _provisioners, "features_provisioners")
    take("provisioner_log_level", one_of(*GHOST_LOG_LEVELS), "provisioner_log_level")
    take("mongo_host", _host, "mongo_host")
    take("rq_worker_job_timeout", positive_int(), "rq_worker_job_timeout")
    if problems:
        raise GhostConfigError(problems)
    return GhostSettings(**values)


def _ghost_truth(value: Any) -> bool:
    """`container.enabled` as Ghost 19.08 and the patch test it (`if container_config.get('enabled', False)`):
    any true value, even the text 'false', so the daemon and Ghost never disagree on whether containers run."""
    return bool(value)


def _ghost_bool(value: Any) -> bool:
    """Ghost reads these with YAML's booleans and tests them for truth; strings like 'True' are seen too."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.strip().lower() in ("true", "yes", "on", "1")
    raise ValueError(f"expected true or false, got {value!r}")


def _host(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a host name, got {value!r}")
    return value.strip()


def _endpoint(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected 'localhost' or an https:// URL, got {value!r}")
    text = value.strip().rstrip("/")
    if text != LOCAL_ENDPOINT and not text.startswith("https://"):
        raise ValueError(f"expected 'localhost' or an https:// URL, got {value!r}")
    return text


def _provisioners(value: Any) -> Mapping[str, Mapping[str, Any]]:
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"expected a mapping of provisioners (salt, ansible), got {value!r}")
    unknown = [name for name in value if name not in GHOST_PROVISIONERS]
    if unknown:
        # Ghost's image builder fails every build with "Invalid features provisioner type" here.
        raise ValueError(f"unknown provisioner {unknown[0]!r} (Ghost knows {', '.join(GHOST_PROVISIONERS)})")
    settings = {}
    for name, options in value.items():
        if options is not None and not isinstance(options, Mapping):
            raise ValueError(f"{name}: expected a mapping of settings, got {type(options).__name__}")
        settings[name] = MappingProxyType(dict(options or {}))
    return MappingProxyType(settings)
