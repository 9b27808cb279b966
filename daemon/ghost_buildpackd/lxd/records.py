"""What the adapter's calls take and return: container specs and descriptions, images, exec results, tags.

LXD's own configuration keys (`raw.idmap`, `security.privileged`, `limits.*`,
device keys) stay in the adapter: callers describe a container with a
`ContainerSpec` and read one back as `ContainerDetails`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

TAG_PREFIX = "user.ghost-buildpackd."
TAG_STEP = TAG_PREFIX + "step"
TAG_JOB = TAG_PREFIX + "job"
TAG_APP = TAG_PREFIX + "app"
TAG_OWNER = TAG_PREFIX + "owner"
TAG_KIND = TAG_PREFIX + "kind"
TAG_CLAIM = TAG_PREFIX + "claim"  # the claim number of the step attempt that made the container
# Set in the same write that first attaches a host directory, and never cleared: detaching the directory
# later (releasing the container) must not make a container something ran in look untouched.
TAG_MOUNTED = TAG_PREFIX + "mounted"
# Property of images the daemon publishes (the job id): such images are never picked as a base by os/release.
IMAGE_PROP_JOB = "ghost-buildpackd.job"
IMAGE_PROP_CLAIM = "ghost-buildpackd.claim"  # the claim number of the step attempt that published it


def lxd_time(value: str | None) -> datetime | None:
    """A timestamp as LXD writes it (RFC 3339 with nanoseconds); None when absent or unreadable."""
    if not value:
        return None
    whole, _, rest = value.partition(".")
    zone = rest.lstrip("0123456789") if rest else value[19:]
    try:
        return datetime.fromisoformat(whole[:19] + (zone.replace("Z", "+00:00") or "+00:00"))
    except ValueError:
        return None


def claim_number(value: str | None) -> int:
    """A claim number as LXD stores it (a config or property string); 0 when absent."""
    return int(value) if value and value.isdigit() else 0


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    fingerprint: str
    aliases: tuple[str, ...]
    properties: Mapping[str, str]
    size: int
    created_at: str

    @property
    def claim(self) -> int:
        """The claim number of the step attempt that published it (0 when it does not say)."""
        return claim_number(self.properties.get(IMAGE_PROP_CLAIM))

    @property
    def os_release(self) -> str:
        return f"{self.properties.get('os', '?')}/{self.properties.get('release', '?')}"

    def describe(self) -> str:
        names = ", ".join(self.aliases) or "no alias"
        return f"{self.fingerprint[:12]} ({names}; {self.os_release})"


@dataclasses.dataclass(frozen=True)
class ContainerInfo:
    name: str
    status: str
    tags: Mapping[str, str]
    created_at: datetime | None = None

    @property
    def step_id(self) -> str | None:
        return self.tags.get(TAG_STEP)

    @property
    def claim(self) -> int:
        """The claim number of the attempt that made it (0 for containers made before claims were tagged)."""
        return claim_number(self.tags.get(TAG_CLAIM))


# Storage drivers that make a container a snapshot of its source (else a container is a full copy of its files).
COPY_ON_WRITE = ("btrfs", "zfs", "lvm", "ceph")

PROTECTION_KEY = "security.protection.delete"
# Descriptions LXD gives its running operations that take an instance away.
REMOVING_OPERATIONS = ("Deleting instance", "Renaming instance")

# Container settings that decide who owns what a command in it writes to a mounted directory.
OWNERSHIP_KEYS = ("raw.idmap", "security.privileged")


@dataclasses.dataclass(frozen=True)
class ContainerDetails:
    status: str
    config: Mapping[str, str]
    devices: Mapping[str, Mapping[str, str]]  # the container's own, not its profiles'

    @property
    def mounts(self) -> list[str]:
        """Its devices that mount a host directory (not, say, its root disk with a size)."""
        return sorted(name for name, device in self.devices.items() if is_mount(device))

    @property
    def ever_mounted(self) -> bool:
        """Whether a host directory was ever attached to it (`add_mount`), even if detached since."""
        return self.config.get(TAG_MOUNTED) == "true"

    def maps_ownership_as(self, spec: ContainerSpec) -> bool:
        """Whether files written in it get the owner they would in a container made from `spec`."""
        wanted = spec.lxd_config()
        return all(self.config.get(key) == wanted.get(key) for key in OWNERSHIP_KEYS)


@dataclasses.dataclass(frozen=True)
class Mount:
    """A host directory mounted into the container."""

    source: Path
    path: str
    readonly: bool = False


@dataclasses.dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str  # fingerprint
    tags: Mapping[str, str]
    privileged: bool = False
    # Host (uid, gid) mapped into the container as the same ids (the working copy's owner), so that container
    # root may write where it does and hand files back to it.
    idmap: tuple[int, int] | None = None
    cpu: str | None = None
    memory: int | str | None = None  # bytes, or a share of the host's memory (`20%`)
    disk: int | None = None  # bytes of the root disk, where the storage driver enforces it
    processes: int | None = None
    profiles: tuple[str, ...] = ()
    mounts: Mapping[str, Mount] = dataclasses.field(default_factory=dict)
    protected: bool = False  # LXD refuses to delete it until `delete_container(..., unprotect=True)`

    def lxd_config(self) -> dict[str, str]:
        config = {key: str(value) for key, value in self.tags.items()}
        if self.privileged:
            config["security.privileged"] = "true"
        elif self.idmap:
            uid, gid = self.idmap
            config["raw.idmap"] = f"uid {uid} {uid}\ngid {gid} {gid}"
        if self.cpu:
            config["limits.cpu"] = self.cpu
        if self.memory:
            config["limits.memory"] = str(self.memory)
        if self.processes:
            config["limits.processes"] = str(self.processes)
        if self.protected:
            config[PROTECTION_KEY] = "true"
        return config


@dataclasses.dataclass(frozen=True)
class ExecResult:
    exit_code: int | None  # None when the command did not finish (timeout, abort, lost container)
    timed_out: bool = False
    aborted: bool = False
    error: str = ""
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def is_mount(device: Mapping[str, str]) -> bool:
    """Whether an LXD device mounts a host directory (a disk with a source)."""
    return device.get("type") == "disk" and bool(device.get("source"))


def describe_nic(name: str, device: Mapping[str, str]) -> str:
    """`eth0 (bridged lxdbr0)`, plus the ACLs it carries."""
    link = " ".join(filter(None, (device.get("nictype"), device.get("network") or device.get("parent"))))
    acls = f" with ACLs {device['security.acls']}" if device.get("security.acls") else ""
    return f"{name} ({link or 'nic'}){acls}"


def disk_device(mount: Mount) -> dict[str, str]:
    device = {"type": "disk", "source": str(mount.source), "path": mount.path}
    if mount.readonly:
        device["readonly"] = "true"
    return device
