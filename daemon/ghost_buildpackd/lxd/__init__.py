"""LXD adapter: the only package that talks to LXD (through pylxd), and mechanism only.

It carries out calls (images by alias or fingerprint, listings, pulls,
containers, exec) and decides nothing: which image a step uses is
`images.py`'s, what to do while LXD is away is `lxd_outages.py`'s, how a
step's container ends is `steps/release.py`'s.

- `connection.py`: the clients, the bounded wait on LXD operations, the server itself.
- `images.py`, `instances.py`: the operations on images and on containers.
- `exec.py`: a command run over LXD's exec websockets, under a deadline.
- `errors.py`: the adapter's errors and how a failure is classified (gone, shutting down, transient).
- `records.py`: what the calls take and return (`ContainerSpec`, `ImageInfo`, ...).

Importers use this package's names (`from .lxd import Lxd, ContainerSpec`), never its modules.
"""

from __future__ import annotations

from .connection import LONGEST_OPERATION_POLL
from .errors import (
    SHUTTING_DOWN_MESSAGES,
    ImagePullFailed,
    LxdError,
    LxdUnavailable,
    causes,
    is_shutting_down,
    is_unavailable,
    raised_by_lxd,
    retry_lxd,
)
from .exec import OUTPUT_DRAIN_TIMEOUT
from .images import ImageOperations
from .instances import CHANGE_TAGS_BACKOFF, CHANGE_TAGS_TRIES, InstanceOperations
from .records import (
    COPY_ON_WRITE,
    IMAGE_PROP_CLAIM,
    IMAGE_PROP_JOB,
    OWNERSHIP_KEYS,
    PROTECTION_KEY,
    REMOVING_OPERATIONS,
    TAG_APP,
    TAG_CLAIM,
    TAG_JOB,
    TAG_KIND,
    TAG_MOUNTED,
    TAG_OWNER,
    TAG_PREFIX,
    TAG_STEP,
    ContainerDetails,
    ContainerInfo,
    ContainerSpec,
    ExecResult,
    ImageInfo,
    Mount,
    claim_number,
    disk_device,
    is_mount,
)


class Lxd(InstanceOperations, ImageOperations):
    """A connection to one LXD server, with its operations on containers and images."""


__all__ = [
    "CHANGE_TAGS_BACKOFF",
    "CHANGE_TAGS_TRIES",
    "COPY_ON_WRITE",
    "IMAGE_PROP_CLAIM",
    "IMAGE_PROP_JOB",
    "LONGEST_OPERATION_POLL",
    "OUTPUT_DRAIN_TIMEOUT",
    "OWNERSHIP_KEYS",
    "PROTECTION_KEY",
    "REMOVING_OPERATIONS",
    "SHUTTING_DOWN_MESSAGES",
    "TAG_APP",
    "TAG_CLAIM",
    "TAG_JOB",
    "TAG_KIND",
    "TAG_MOUNTED",
    "TAG_OWNER",
    "TAG_PREFIX",
    "TAG_STEP",
    "ContainerDetails",
    "ContainerInfo",
    "ContainerSpec",
    "ExecResult",
    "ImageInfo",
    "ImagePullFailed",
    "Lxd",
    "LxdError",
    "LxdUnavailable",
    "Mount",
    "causes",
    "claim_number",
    "disk_device",
    "is_mount",
    "is_shutting_down",
    "is_unavailable",
    "raised_by_lxd",
    "retry_lxd",
]
