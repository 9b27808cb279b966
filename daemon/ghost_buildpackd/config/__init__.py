"""Configuration: one YAML file, validated as a whole before anything starts.

Every section is a frozen dataclass; each leaf field carries the parser that
validates it (`metadata={"parse": ...}`), so the dataclasses are the one
description of the schema. Validation collects every problem, each named by
its dotted key path, and unknown keys are errors so that a typo never passes
silently.

- `schema.py`: the sections and their keys (`Config`), the buildpack waits' shares;
- `loader.py`: the file -> `Config`, with Ghost's config.yml (`load_config`, `resolve_ghost_settings`);
- the value parsers (`parse_duration`, ...) live in `value_parsers.py`, beside this package, as
  Ghost's config.yml reader uses them too.

Every name is importable from `ghost_buildpackd.config`, as the rest of the daemon does.
"""

from .loader import (
    DEFAULT_PATH,
    ENV_CONFIG,
    ENV_MONGODB_URI,
    POSITIVE_CONTAINER_DURATIONS,
    ConfigError,
    config_from_mapping,
    config_path,
    load_config,
    resolve_ghost_settings,
)
from .schema import (
    BUILD_WAIT_SHARE,
    PLACEHOLDER_ANSIBLE_VERBOSITY,
    PLACEHOLDER_LOG_LEVEL,
    PLACEHOLDER_VENV,
    PUBLISH_COMPRESSORS,
    SYSTEM_PREFIXES,
    TIMEOUT_SHARE,
    BuildpackConfig,
    Config,
    ContainerConfig,
    EventsConfig,
    GhostPaths,
    LimitsConfig,
    LogConfig,
    LxdConfig,
    MetricsConfig,
    MongoConfig,
    ProvisionerCommands,
    RetentionConfig,
    WarmPoolConfig,
    buildpack_waits,
    field,
    parse_venv,
    waits_fit,
)

__all__ = [
    "BUILD_WAIT_SHARE",
    "DEFAULT_PATH",
    "ENV_CONFIG",
    "ENV_MONGODB_URI",
    "PLACEHOLDER_ANSIBLE_VERBOSITY",
    "PLACEHOLDER_LOG_LEVEL",
    "PLACEHOLDER_VENV",
    "POSITIVE_CONTAINER_DURATIONS",
    "PUBLISH_COMPRESSORS",
    "SYSTEM_PREFIXES",
    "TIMEOUT_SHARE",
    "BuildpackConfig",
    "Config",
    "ConfigError",
    "ContainerConfig",
    "EventsConfig",
    "GhostPaths",
    "LimitsConfig",
    "LogConfig",
    "LxdConfig",
    "MetricsConfig",
    "MongoConfig",
    "ProvisionerCommands",
    "RetentionConfig",
    "WarmPoolConfig",
    "buildpack_waits",
    "config_from_mapping",
    "config_path",
    "field",
    "load_config",
    "parse_venv",
    "resolve_ghost_settings",
    "waits_fit",
]
