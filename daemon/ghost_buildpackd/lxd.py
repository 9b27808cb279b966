"""LXD adapter: the only module that talks to LXD (through pylxd), and mechanism only.

It carries out calls (images by alias or fingerprint, listings, pulls,
containers, exec) and never decides which image a step uses (`images.py`
does). LXD's own configuration keys (`raw.idmap`, `security.privileged`,
`limits.*`, device keys) stay here: callers describe a container with a
`ContainerSpec` and read one back as `ContainerDetails`.

Every call has a bounded wait: the HTTP client has a timeout (`lxd.timeout`);
long operations (create, start, stop, delete, publish) are waited on as LXD
operations, in polls each shorter than that timeout, up to their own deadline
(`lxd.operation_timeout`), so a big image is never cut off by one HTTP read;
command execution has a deadline enforced from outside pylxd (a force stop of
the container), since pylxd's `execute` has none and its websocket handling
can hang.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import pylxd
import requests
from pylxd.exceptions import ClientConnectionFailed, LXDAPIException, NotFound
from ws4py.client import WebSocketBaseClient

from .config import LxdConfig
from .logs import get_logger
from .policy import LIMITS, LXD_RETRY, retrying

log = get_logger(__name__)

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


LONGEST_OPERATION_POLL = 30  # seconds one wait on an operation may last (below lxd.timeout, too)
CHANGE_TAGS_TRIES = 8  # compare-and-set rounds of `change_tags` against writers of the same container
CHANGE_TAGS_BACKOFF = 0.05  # seconds, times the round, before `change_tags` reads again after a refused write
KILL_TIMEOUT = 30.0  # for the kill that ends a container's processes; past it, the container is force-stopped


class LxdError(Exception):
    """An LXD operation failed in a way the caller should report."""


class ImagePullFailed(LxdError):
    """Copying an image from another LXD server failed; the text says why."""


class LxdUnavailable(LxdError):
    """LXD itself went away (stopped, restarting, shutting down), as opposed to refusing a request."""


def _causes(error: BaseException | None) -> Iterator[BaseException]:
    """`error` and the errors it was raised from or while handling (bounded: the chain is short)."""
    for _ in range(10):
        if error is None:
            return
        yield error
        error = error.__cause__ or error.__context__


# Set on an error once a wait saw LXD come back after it (`Lxd.wait_until_back`).
LXD_BACK_AFTER = "_ghost_buildpackd_lxd_back_after"
# What LXD answers while it stops: refusing changes, then (its database closed first) failing what it still takes.
SHUTTING_DOWN_MESSAGES = ("shutting down", "database is closed")


def is_shutting_down(error: BaseException | None) -> bool:
    """LXD refused or failed a request because it is shutting down (it still answers some meanwhile)."""
    return any(
        isinstance(e, LXDAPIException) and any(words in str(e).lower() for words in SHUTTING_DOWN_MESSAGES)
        for e in _causes(error)
    )


def is_unavailable(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, says LXD could not be reached or is shutting down."""
    unreachable = (LxdUnavailable, requests.ConnectionError, ClientConnectionFailed)
    return any(isinstance(e, unreachable) for e in _causes(error)) or is_shutting_down(error)


def raised_by_lxd(error: BaseException | None) -> bool:
    """Whether LXD failed the call `error` comes from (an API error, a failed operation, a lost connection):
    `error`, or an error it was raised from or while handling, is LXD's or this module's."""
    failures = (LxdError, LXDAPIException, ClientConnectionFailed, requests.RequestException)
    return any(isinstance(e, failures) for e in _causes(error))


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, requests.ConnectionError | requests.Timeout):
        return True
    if isinstance(error, LXDAPIException) and not isinstance(error, NotFound):
        text = str(error).lower()
        transient = ("timeout", "connection reset", "try again", "busy", *SHUTTING_DOWN_MESSAGES)
        return any(words in text for words in transient)
    return False


def _is_update_conflict(error: LXDAPIException) -> bool:
    """A write to an instance refused because another write changed it since the read (ETag) or is under way."""
    return error.response.status_code == 412 or "non-reusable operation" in str(error)


retry_lxd = retrying(_is_transient, "lxd_transient_error_retrying", LXD_RETRY)


def _lxd_time(value: str | None) -> datetime | None:
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


def _describe_nic(name: str, device: Mapping[str, str]) -> str:
    """`eth0 (bridged lxdbr0)`, plus the ACLs it carries."""
    link = " ".join(filter(None, (device.get("nictype"), device.get("network") or device.get("parent"))))
    acls = f" with ACLs {device['security.acls']}" if device.get("security.acls") else ""
    return f"{name} ({link or 'nic'}){acls}"


def disk_device(mount: Mount) -> dict[str, str]:
    device = {"type": "disk", "source": str(mount.source), "path": mount.path}
    if mount.readonly:
        device["readonly"] = "true"
    return device


OUTPUT_DRAIN_TIMEOUT = 10.0  # after the command exits, how long LXD may take to flush its output streams


class _InputStream(WebSocketBaseClient):
    """An exec's stdin websocket: closed with an empty message right after the handshake."""

    def __init__(self, url: str, **kwargs: Any):
        super().__init__(url, exclude_headers=["origin"], **kwargs)  # LXD refuses a ws+unix Origin

    def handshake_ok(self) -> None:
        self.send(b"", binary=False)


class _OutputStream(WebSocketBaseClient):
    """An exec's stdout or stderr websocket, read by its own thread once connected.

    Chunks go to `on_output`; `ended` is set when LXD ends the stream (an empty
    message, then the close). The thread starts only after `connect()` has
    processed what came with the handshake, so two readers never race.
    """

    def __init__(self, url: str, on_output: Callable[[bytes], None], **kwargs: Any):
        super().__init__(url, exclude_headers=["origin"], **kwargs)
        self.on_output = on_output
        self.ended = threading.Event()
        self.reader = threading.Thread(target=self.run, name="exec-output", daemon=True)

    def open(self) -> None:
        self.connect()
        self.reader.start()

    def received_message(self, message: Any) -> None:
        if not message.data:  # LXD's end-of-stream marker
            self.ended.set()
            return
        self.on_output(bytes(message.data))

    def closed(self, code: int, reason: str | None = None) -> None:
        self.ended.set()

    def unhandled_error(self, error: Exception) -> None:
        # LXD may reset the connection right after its end-of-stream marker.
        self.ended.set()

    def _write(self, data: bytes) -> None:
        # Only protocol replies (pongs, close) are written on an output stream; once LXD has
        # ended it they cannot be delivered and need not be.
        with contextlib.suppress(OSError, RuntimeError):
            super()._write(data)


class Lxd:
    """A connection to one LXD server."""

    def __init__(self, config: LxdConfig):
        self.config = config
        self.timeout = config.timeout
        self.client = self._client(timeout=config.timeout)
        self.server_pid: int | None = None  # of the LXD daemon last seen answering
        # Exec waits for as long as the command runs; its deadline is enforced by `execute`.
        self._exec_client: pylxd.Client | None = None

    def _client(self, timeout: float | None) -> pylxd.Client:
        if self.config.endpoint == "local":
            return pylxd.Client(timeout=timeout)
        if self.config.socket_path:
            # pylxd takes a bare path only when the socket exists already; its URL form always works.
            return pylxd.Client(endpoint=f"http+unix://{quote(self.config.socket_path, safe='')}", timeout=timeout)
        cert = (str(self.config.cert), str(self.config.key)) if self.config.cert else None
        return pylxd.Client(endpoint=self.config.endpoint, cert=cert, verify=self.config.verify, timeout=timeout)

    @property
    def exec_client(self) -> pylxd.Client:
        if self._exec_client is None:
            self._exec_client = self._client(timeout=None)
        return self._exec_client

    # --- server ---------------------------------------------------------------------

    @retry_lxd
    def server_info(self) -> dict[str, Any]:
        info = self.client.api.get().json()["metadata"]
        env = info.get("environment", {})
        self.server_pid = env.get("server_pid")
        return {
            "version": env.get("server_version", "unknown"),
            "storage": env.get("storage", "unknown"),
            "kernel": env.get("kernel_version", "unknown"),
            "idmap_supported": "idmapped_mounts" in env.get("kernel_features", {}),
        }

    def _answering_environment(self, within: float | None = None) -> dict[str, Any] | None:
        """One unretried call: the answering server's environment, None when none answers (or it fails).

        `within`: seconds the call may wait for the answer (default: lxd.timeout)."""
        try:
            return self.client.api.get(timeout=within or self.timeout).json()["metadata"]["environment"]
        except Exception as error:
            log.debug("lxd_not_answering", error=str(error))
            return None

    def answering_pid(self) -> int | None:
        """The pid of the LXD daemon answering (remembered as `server_pid`), None when none does."""
        environment = self._answering_environment()
        if environment is None:
            return None
        pid = environment.get("server_pid")
        self.server_pid = pid
        return pid if pid is not None else 0  # a server not saying its pid still answers

    def answers(self, within: float | None = None) -> bool:
        """Whether LXD answers now (within `within` seconds, default lxd.timeout), for health probes: unlike
        answering_pid, it leaves `server_pid` alone (an outage wait compares it with the pid of the server
        that went away)."""
        return self._answering_environment(within) is not None

    def wait_until_back(self, error: BaseException, abort: threading.Event, limit: float) -> bool:
        """After `error` said LXD went away: True once it answers again, False on `abort` or after `limit` s.

        A server shutting down still answers reads until it exits, so after a
        refusal for that reason LXD is back only when another server answers.
        An error another wait already saw LXD come back after (a clean-up that
        waited before re-raising it) is over: the server answering now is the
        next one, and waiting for yet another would wait out `limit` for nothing.
        """
        if any(getattr(cause, LXD_BACK_AFTER, False) for cause in _causes(error)):
            return True
        leaving = self.server_pid if is_shutting_down(error) else None
        started = time.monotonic()
        while not abort.wait(LIMITS.lxd_probe_every):
            pid = self.answering_pid()
            if pid is not None and (leaving is None or pid != leaving):
                log.info("lxd_available_again", waited_s=round(time.monotonic() - started, 1))
                for cause in _causes(error):
                    with contextlib.suppress(AttributeError):  # a few built-in exceptions take no attributes
                        setattr(cause, LXD_BACK_AFTER, True)
                return True
            if time.monotonic() - started > limit:
                return False
        return False

    @retry_lxd
    def storage_pools(self) -> list[str]:
        return [pool.name for pool in self.client.storage_pools.all()]

    # --- images ---------------------------------------------------------------------

    @staticmethod
    def _image_info(item: Mapping[str, Any]) -> ImageInfo:
        """An image as LXD's API describes it."""
        return ImageInfo(
            fingerprint=item["fingerprint"],
            aliases=tuple(alias["name"] for alias in item.get("aliases") or []),
            properties=dict(item.get("properties") or {}),
            size=int(item.get("size") or 0),
            created_at=str(item.get("created_at") or item.get("uploaded_at") or ""),
        )

    def _image(self, fingerprint: str) -> ImageInfo:
        """One image by its full fingerprint; NotFound when there is none."""
        return self._image_info(self.client.api.images[fingerprint].get().json()["metadata"])

    @retry_lxd
    def list_images(self) -> list[ImageInfo]:
        """Every image in one API call (recursion=1).

        Fetching each image in turn would break half-way on an image deleted
        meanwhile (by another step, another daemon); one call cannot.
        """
        found = self.client.api.images.get(params={"recursion": "1"}).json()["metadata"] or []
        return [self._image_info(item) for item in found]

    @retry_lxd
    def image_by_alias(self, alias: str) -> ImageInfo | None:
        try:
            return self._image(self.client.api.images.aliases[alias].get().json()["metadata"]["target"])
        except NotFound:
            return None

    @retry_lxd
    def image_by_fingerprint(self, fingerprint: str) -> ImageInfo | None:
        try:
            return self._image(fingerprint)
        except NotFound:
            return None

    def pull_image(self, server: str, key: str, ref: str) -> ImageInfo:
        """Copy the image whose `key` (`fingerprint` or `alias`) is `ref` from the LXD at `server`, over LXD's protocol.

        LXD keeps the copy under the same fingerprint. ImagePullFailed says why when it fails.
        """
        source = {"type": "image", "mode": "pull", "protocol": "lxd", "server": server, key: ref}
        log.info("image_pull_started", server=server, **{key: ref})
        try:
            response = self.client.api.images.post(json={"public": False, "auto_update": False, "source": source})
            operation = self._wait_operation(response, f"pulling {key} {ref} from {server}")
            return self._image(operation["metadata"]["fingerprint"])
        except (LXDAPIException, LxdError, requests.RequestException) as error:
            log.warning("image_pull_failed", server=server, image=ref, error=str(error))
            raise ImagePullFailed(str(error)) from error

    @retry_lxd
    def delete_alias(self, alias: str) -> None:
        with contextlib.suppress(NotFound):
            self.client.api.images.aliases[alias].delete()

    @retry_lxd
    def delete_alias_if(self, alias: str, fingerprint: str) -> bool:
        """Delete `alias` only while it points at `fingerprint`; whether it was deleted.

        LXD has no conditional delete of an alias: between this read and the
        delete lies one round trip, not the caller's whole pause.
        """
        try:
            target = self.client.api.images.aliases[alias].get().json()["metadata"]["target"]
            if target != fingerprint:
                return False
            self.client.api.images.aliases[alias].delete()
        except NotFound:
            return False
        return True

    @retry_lxd
    def move_alias_if(self, alias: str, fingerprint: str, expected: str) -> bool:
        """Point `alias` at `fingerprint` only while it points at `expected` (LXD checks the alias's ETag)."""
        try:
            current = self.client.api.images.aliases[alias].get()
        except NotFound:
            return False
        alias_info = current.json()["metadata"]
        if alias_info["target"] != expected:
            return False
        body = {"target": fingerprint, "description": alias_info.get("description") or ""}
        try:
            self.client.api.images.aliases[alias].put(json=body, headers={"If-Match": current.headers["ETag"]})
        except LXDAPIException as error:
            if error.response.status_code in (404, 412):  # gone, or changed since the read
                return False
            raise
        return True

    @retry_lxd
    def delete_image(self, fingerprint: str) -> None:
        with contextlib.suppress(NotFound):
            self._wait_operation(self.client.api.images[fingerprint].delete(), f"deleting image {fingerprint[:12]}")

    @retry_lxd
    def point_alias(self, alias: str, fingerprint: str, description: str = "") -> None:
        """Create `alias` or move it to `fingerprint`."""
        try:
            self.client.api.images.aliases[alias].put(json={"target": fingerprint, "description": description})
        except NotFound:
            self.client.api.images.aliases.post(json={"name": alias, "target": fingerprint, "description": description})

    def publish(self, name: str, properties: Mapping[str, str], compression: str) -> ImageInfo:
        """Publish a stopped container as a private image (no alias yet)."""
        response = self.client.api.images.post(
            json={
                "public": False,
                "source": {"type": "instance", "name": name},
                "properties": {key: str(value) for key, value in properties.items()},
                "compression_algorithm": compression,
            }
        )
        operation = self._wait_operation(response, f"publishing {name}")
        return self._image(operation["metadata"]["fingerprint"])

    def _wait_operation(self, response: requests.Response, what: str) -> dict[str, Any]:
        """Wait for the background operation `response` started; its final state.

        Waited on in polls that each end before the HTTP read timeout, until
        the operation ends or `lxd.operation_timeout` passes. A failed
        operation raises LXDAPIException (its text says why), as pylxd does.
        """
        operation_id = response.json()["operation"].rsplit("/", 1)[-1]
        limit = self.config.operation_timeout
        started = time.monotonic()
        poll = max(0, min(LONGEST_OPERATION_POLL, int(self.timeout) - 1))
        while True:
            left = limit - (time.monotonic() - started)
            if left <= 0:
                raise LxdError(
                    f"{what}: the LXD operation did not finish within lxd.operation_timeout ({limit:g}s); "
                    f"LXD may still be working on it (operation {operation_id})"
                )
            seconds = min(poll, int(left))
            waited = self._poll_operation(operation_id, seconds)
            state = waited.json()["metadata"]
            if state["status"] == "Success":
                return state
            if state["status"] in ("Failure", "Cancelled") or not 100 <= int(state.get("status_code") or 0) < 300:
                raise LXDAPIException(waited)
            if seconds == 0:  # LXD answered at once: no whole second left, or lxd.timeout under 2 s
                time.sleep(min(0.25, left))

    @retry_lxd
    def _poll_operation(self, operation_id: str, seconds: int) -> requests.Response:
        """One wait of up to `seconds` on an operation; it answers with the operation's state, finished or not."""
        return self.client.api.operations[operation_id].wait.get(params={"timeout": seconds})

    # --- containers ------------------------------------------------------------------

    def create_container(self, spec: ContainerSpec, copy_of: str | None = None) -> None:
        """Create the container from its image, or as a copy of the stopped container `copy_of`.

        A copy lands on the source's pool (a snapshot on copy-on-write pools),
        keeps the source's id-shifted root filesystem, and has exactly the
        spec's configuration: keys of the source that the spec does not set are
        cleared rather than inherited.
        """
        devices = {name: disk_device(mount) for name, mount in spec.mounts.items()}
        if spec.disk:
            root = self.profile_devices(("default", *spec.profiles)).get("root")
            if root is not None and root.get("type") == "disk" and root.get("path") == "/":
                devices["root"] = {**root, "size": str(spec.disk)}
        config = spec.lxd_config()
        source: dict[str, Any] = {"type": "image", "fingerprint": spec.image}
        if copy_of:
            source = {"type": "copy", "source": copy_of, "instance_only": True}
            inherited = self.client.api.instances[copy_of].get().json()["metadata"]["config"]
            # LXD keeps the source's volatile state (its id shift) and `image.*` (the files' origin).
            config = {key: "" for key in inherited if not key.startswith(("volatile.", "image."))} | config
        response = self.client.api.instances.post(
            json={
                "name": spec.name,
                "type": "container",
                "source": source,
                "config": config,
                "devices": devices,
                "profiles": ["default", *spec.profiles],
            }
        )
        self._wait_operation(response, f"creating container {spec.name}")

    def retag_container(self, name: str, tags: Mapping[str, str], protect: bool = False) -> None:
        """Replace the daemon's tags on a container with `tags` (its other configuration stays); with `protect`,
        LXD refuses to delete it from then on (`delete_container(..., unprotect=True)`), in the same write."""
        instance = self.client.instances.get(name)
        instance.config = {key: value for key, value in instance.config.items() if not key.startswith(TAG_PREFIX)}
        instance.config.update(tags)
        if protect:
            instance.config[PROTECTION_KEY] = "true"
        instance.save(wait=True)

    @retry_lxd
    def being_removed(self, name: str) -> bool:
        """Whether a running LXD operation is deleting or renaming the container (LXD removes a container's
        files before its record: it is listed until the deletion ends)."""
        running = self.client.api.operations.get(params={"recursion": "1"}).json()["metadata"].get("running") or []
        path = f"/1.0/instances/{name}"
        return any(
            operation.get("description") in REMOVING_OPERATIONS
            and path in ((operation.get("resources") or {}).get("instances") or [])
            for operation in running
        )

    @retry_lxd
    def change_tags(
        self, name: str, change: Callable[[dict[str, str]], dict[str, str] | None]
    ) -> dict[str, str] | None:
        """Compare-and-set on a container's daemon tags (its other configuration stays).

        `change` gets the current tags and returns the tags to have, or None to
        leave them. The write carries the ETag of the read (If-Match): when
        anyone changed the container in between, LXD refuses it and `change`
        is asked again on what is there now. Returns the tags the container
        has after the call, or None when `change` declined or the container is
        gone. LXD checks the ETag before it applies the write, not under a
        lock with it: two writes racing within that moment can both pass, and
        the last one applied wins; callers that depend on the outcome read it
        back.
        """
        for attempt in range(CHANGE_TAGS_TRIES):
            try:
                response = self.client.api.instances[name].get()
            except NotFound:
                return None
            current = response.json()["metadata"]
            tags = {key: value for key, value in current["config"].items() if key.startswith(TAG_PREFIX)}
            wanted = change(dict(tags))
            if wanted is None or wanted == tags:
                return wanted
            config = {key: value for key, value in current["config"].items() if not key.startswith(TAG_PREFIX)}
            body = {key: current[key] for key in ("architecture", "ephemeral", "profiles", "stateful", "description")}
            body |= {"config": config | wanted, "devices": current["devices"]}
            try:
                put = self.client.api.instances[name].put(json=body, headers={"If-Match": response.headers["ETag"]})
                self._wait_operation(put, f"changing the tags of {name}")
            except NotFound:
                return None
            except LXDAPIException as error:
                if not _is_update_conflict(error):
                    raise
                time.sleep(CHANGE_TAGS_BACKOFF * (attempt + 1))  # the other write is still being applied
                continue
            return wanted
        raise LxdError(f"the tags of container {name} kept changing: {CHANGE_TAGS_TRIES} writes refused")

    def rename_container(self, name: str, new_name: str) -> None:
        """Rename a stopped container; LXDAPIException when `new_name` is taken."""
        response = self.client.api.instances[name].post(json={"name": new_name})
        self._wait_operation(response, f"renaming container {name} to {new_name}")

    @retry_lxd
    def container_status(self, name: str) -> str | None:
        """`Running`, `Stopped`, ...; None when there is no such container."""
        try:
            return self.client.instances.get(name).status
        except NotFound:
            return None

    @retry_lxd
    def describe_container(self, name: str) -> ContainerDetails | None:
        """Status, config and the container's own devices in one call; None when there is no such container."""
        try:
            instance = self.client.instances.get(name)
        except NotFound:
            return None
        return ContainerDetails(instance.status, dict(instance.config), dict(instance.devices))

    def start(self, name: str) -> None:
        self._change_state(name, "start")

    def _change_state(self, name: str, action: str) -> None:
        """Start or force-stop a container, waiting on the operation."""
        request = {"action": action, "force": action == "stop"}
        self._wait_operation(self.client.api.instances[name].state.put(json=request), f"{action} of {name}")

    def wait_ready(
        self,
        name: str,
        timeout: float,
        probe: Sequence[str] = ("true",),
        abort: threading.Event | None = None,
    ) -> None:
        """Wait until `probe`, a command, runs and exits 0 in the container: a check, never a fixed sleep.

        Each probe runs under what is left of `timeout` and stops on `abort`
        (`execute` force-stops the container): an image whose command hangs
        cannot hold the caller past the deadline.
        """
        deadline = time.monotonic() + timeout
        stop = abort or threading.Event()
        delay = 0.02
        last_error = ""
        last_exception: BaseException | None = None
        command = " ".join(probe)
        while time.monotonic() < deadline:
            try:
                instance = self.client.instances.get(name)
                if instance.status == "Running":
                    remaining = max(0.1, deadline - time.monotonic())
                    result = self.execute(name, list(probe), {}, lambda _chunk: None, remaining, abort=abort)
                    if result.ok:
                        return
                    if result.timed_out:
                        raise LxdError(
                            f"container {name} not ready: the readiness probe `{command}` did not finish "
                            f"within {timeout:g}s (the container was stopped)"
                        )
                    if result.aborted:
                        raise LxdError(f"container {name} not ready: the readiness probe `{command}` was interrupted")
                    last_error = result.error or f"`{command}` exited {result.exit_code}"
                else:
                    last_error = f"status {instance.status}"
            except (LXDAPIException, requests.RequestException, OSError) as error:
                # OSError: the exec websocket can break (EPIPE) while the container is still starting.
                last_error = f"{type(error).__name__}: {error}"
                last_exception = error
            if stop.wait(delay):  # a backoff between checks, not a wait for readiness
                raise LxdError(f"container {name} not ready: interrupted ({last_error})")
            delay = min(delay * 2, 0.5)
        if is_unavailable(last_exception):
            raise LxdUnavailable(f"container {name} not ready: LXD went away ({last_error})") from last_exception
        raise LxdError(f"container {name} not ready after {timeout:g}s ({last_error})")

    def add_mount(self, name: str, device: str, mount: Mount) -> None:
        """Attach a host directory to a (running) container, marking it as having had one (`TAG_MOUNTED`)."""
        instance = self.client.instances.get(name)
        instance.devices = {**instance.devices, device: disk_device(mount)}
        instance.config = {**instance.config, TAG_MOUNTED: "true"}  # one write: never mounted without the mark
        instance.save(wait=True)

    def remove_devices(self, name: str) -> None:
        """Detach every host directory mounted in the container (its other devices stay)."""
        instance = self.client.instances.get(name)
        kept = {device: config for device, config in instance.devices.items() if not is_mount(config)}
        if kept != instance.devices:
            instance.devices = kept
            instance.save(wait=True)

    def push_file(self, name: str, path: str, content: bytes, mode: int = 0o755) -> None:
        """Write a file into the container as root; its directory must exist (`launch`'s probe makes it)."""
        headers = {"X-LXD-uid": "0", "X-LXD-gid": "0", "X-LXD-mode": oct(mode)[2:], "X-LXD-type": "file"}
        self.client.api.instances[name].files.post(params={"path": path}, data=content, headers=headers)

    def end_processes(self, name: str) -> None:
        """SIGKILL every process of a running container but its init; a stop when no command can start.

        One kill(-1): the kernel signals every process of the container's PID
        namespace in one pass that no fork escapes. It takes a few tens of
        milliseconds where a stop takes over half a second. A container at its
        process limit (a fork bomb) cannot start the kill: it is stopped.
        """
        try:
            result = self.execute(name, ["sh", "-c", "kill -9 -1; true"], {}, lambda _chunk: None, KILL_TIMEOUT)
            if result.ok or result.timed_out:  # past its deadline, `execute` force-stopped the container
                return
            reason = result.error or f"the kill command exited {result.exit_code}"
        except LxdUnavailable:
            raise
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
        log.info("container_stopped_to_end_processes", container=name, reason=reason)
        self.stop(name)

    @retry_lxd
    def stop(self, name: str) -> None:
        try:
            instance = self.client.instances.get(name)
        except NotFound:
            return
        if instance.status != "Stopped":
            self._change_state(name, "stop")

    @retry_lxd
    def delete_container(self, name: str, unprotect: bool = False) -> bool:
        """Force-stop and delete; False when there was nothing to delete. A protected container (`protected`)
        is deleted only with `unprotect`: LXD refuses otherwise."""
        try:
            instance = self.client.instances.get(name)
        except NotFound:
            return False
        if unprotect and instance.config.get(PROTECTION_KEY):
            instance.config = {key: value for key, value in instance.config.items() if key != PROTECTION_KEY}
            instance.save(wait=True)
        if instance.status != "Stopped":
            self._change_state(name, "stop")
        try:
            self._wait_operation(self.client.api.instances[name].delete(), f"deleting container {name}")
        except NotFound:
            return False
        return True

    @retry_lxd
    def list_containers(self) -> list[ContainerInfo]:
        """Containers carrying the daemon's tags (others are never touched)."""
        found = []
        # One listing with the config inline: fetching each one after would race with deletions.
        for instance in self.client.instances.all(recursion=1):
            tags = {key: value for key, value in instance.config.items() if key.startswith(TAG_PREFIX)}
            if tags:
                found.append(ContainerInfo(instance.name, instance.status, tags, _lxd_time(instance.created_at)))
        return found

    @retry_lxd
    def profile_devices(self, profiles: Sequence[str]) -> dict[str, dict[str, str]]:
        """The devices a container with `profiles` gets from them (a later profile's device wins by name)."""
        devices: dict[str, dict[str, str]] = {}
        for name in profiles:
            devices |= self.client.api.profiles[name].get().json()["metadata"].get("devices") or {}
        return devices

    def network_devices(self, profiles: Sequence[str]) -> list[str]:
        """The network devices a container with `profiles` gets, described: `eth0 (bridged lxdbr0) with ACLs x`."""
        devices = self.profile_devices(profiles)
        return [_describe_nic(name, device) for name, device in sorted(devices.items()) if device.get("type") == "nic"]

    @retry_lxd
    def root_pool(self, profiles: Sequence[str]) -> tuple[str, str] | None:
        """(pool, driver) of the root disk a container with these profiles gets (the last profile naming one wins)."""
        pool = None
        for device in self.profile_devices(profiles).values():
            if device.get("type") == "disk" and device.get("path") == "/":
                pool = device.get("pool", pool)
        if pool is None:
            return None
        return pool, self.client.storage_pools.get(pool).driver

    def _exec_streaming(
        self, name: str, argv: list[str], env: Mapping[str, str], on_output: Callable[[bytes], None], cwd: str | None
    ) -> int:
        """One exec operation with its stdout/stderr websockets; returns the exit code.

        Unlike pylxd's `execute`, which closes the output websockets as soon as
        the command has exited (dropping output still in flight, seen under
        load) and then polls every 100 ms, this waits for LXD to end each
        stream itself once it has sent everything.
        """
        client = self.exec_client
        response = client.api.instances[name].exec.post(
            json={"command": list(argv), "environment": dict(env), "wait-for-websocket": True,
                  "interactive": False, "cwd": cwd}
        ).json()  # fmt: skip
        fds = response["metadata"]["metadata"]["fds"]
        path = urlparse(response["operation"]).path + "/websocket"  # the operation's URL, as LXD gave it
        streams: list[_OutputStream] = []
        stdin = _InputStream(client.websocket_url, ssl_options=client.ssl_options)
        try:
            stdin.resource = f"{path}?secret={fds['0']}"
            stdin.connect()  # sends end-of-input at once: commands get no stdin
            for fd in ("1", "2"):
                stream = _OutputStream(client.websocket_url, on_output, ssl_options=client.ssl_options)
                stream.resource = f"{path}?secret={fds[fd]}"
                stream.open()
                streams.append(stream)
            operation = client.operations.wait_for_operation(response["operation"])
            deadline = time.monotonic() + OUTPUT_DRAIN_TIMEOUT
            for stream in streams:
                stream.ended.wait(max(0.0, deadline - time.monotonic()))
            return int(operation.metadata["return"])
        finally:
            websockets: list[WebSocketBaseClient] = [stdin, *streams]
            for websocket in websockets:
                with contextlib.suppress(Exception):
                    websocket.close()

    def execute(
        self,
        name: str,
        argv: list[str],
        env: Mapping[str, str],
        on_output: Callable[[bytes], None],
        timeout: float,
        cwd: str | None = None,
        abort: threading.Event | None = None,
    ) -> ExecResult:
        """Run `argv` in the container, streaming output chunks to `on_output`.

        The deadline (and `abort`) are enforced by force-stopping the container:
        that ends every process in it, so the exec operation returns.
        """
        outcome: dict[str, Any] = {}
        done = threading.Event()
        started = time.monotonic()

        def run() -> None:
            try:
                outcome["exit_code"] = self._exec_streaming(name, argv, env, on_output, cwd)
            except Exception as error:  # reported to the caller as a lost command
                outcome["error"] = f"{type(error).__name__}: {error}"
                outcome["exception"] = error
            finally:
                done.set()

        worker = threading.Thread(target=run, name=f"exec-{name}", daemon=True)
        worker.start()
        deadline = started + timeout
        reason = ""
        while not done.wait(min(0.25, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                reason = "timeout"
                break
            if abort is not None and abort.is_set():
                reason = "aborted"
                break
        if reason:
            log.warning("exec_interrupted_stopping_container", container=name, reason=reason)
            try:
                self.stop(name)
            except Exception as error:
                log.error("force_stop_failed", container=name, error=str(error))
            done.wait(min(30.0, self.timeout))
        elif is_unavailable(outcome.get("exception")):
            raise LxdUnavailable(f"LXD went away while `{argv[0]}` ran in {name}: {outcome['error']}")
        return ExecResult(
            exit_code=None if reason else outcome.get("exit_code"),
            timed_out=reason == "timeout",
            aborted=reason == "aborted",
            error=outcome.get("error", ""),
            duration=time.monotonic() - started,
        )
