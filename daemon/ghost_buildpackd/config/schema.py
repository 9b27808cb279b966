"""The configuration's schema: every section a frozen dataclass, each leaf key declared with
`field(default, parser)` so the dataclasses are the one description of the keys (loader.py reads them).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..ghost.config_yml import GHOST_DEFAULT_RQ_JOB_TIMEOUT, GHOST_MONGO_DBNAME, GhostSettings
from ..value_parsers import (
    UNIX_ENDPOINT,
    Invalid,
    one_of,
    optional,
    parse_absolute_path,
    parse_bool,
    parse_command_list,
    parse_cpu,
    parse_duration,
    parse_endpoint,
    parse_listen,
    parse_memory,
    parse_size,
    parse_str,
    parse_str_list,
    positive_int,
)

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
        raise Invalid(
            f"{path} is a system directory; it is mounted at the same path in build containers and would hide "
            "the image's own (give Ghost's virtualenv, e.g. /usr/local/share/ghost/venv)"
        )
    return path


@dataclasses.dataclass(frozen=True)
class GhostPaths:
    root: Path = field(Path("/ghost"), parse_absolute_path)
    log_dir: Path = field(Path("/var/log/ghost"), parse_absolute_path)
    provisioner_tree: Path = field(Path("/tmp/ghost-features-provisioner"), parse_absolute_path)
    # Where Ghost writes each buildimage job's Packer definition ({packer_dir}/{job_id}/aws_builder.json), once
    # the job's provisioner trees exist: the container build starts then (Ghost 19.08's PACKER_JSON_PATH).
    packer_dir: Path = field(Path("/tmp/packer"), parse_absolute_path)
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


@dataclasses.dataclass(frozen=True)
class WarmPoolConfig:
    """Idle deploy containers kept started ahead of the jobs that will use them (upkeep/warm_pool.py)."""

    per_app: int = field(1, positive_int(minimum=0))  # for each app deployed lately, from its current image; 0: none
    max: int = field(4, positive_int(minimum=0))  # over all apps, for the apps deployed most recently
    # What they may take on disk, over all apps: on a pool that copies files (dir) each costs its image's size.
    max_disk: int = field(10 << 30, parse_size)
    # None is made while the host has less memory available than this (idle ones go below half of it).
    min_free_memory: int = field(1 << 30, parse_size)


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
    templates: int = field(8, positive_int(minimum=0))  # template containers kept (upkeep/templates.py); 0: none
    warm_pool: WarmPoolConfig = dataclasses.field(default_factory=WarmPoolConfig)
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
