"""Instance operations: create (from an image or as a copy), start, stop, delete, tags, devices, files, exec.

Callers describe a container with a `ContainerSpec` and read one back as
`ContainerDetails`; the exec itself (websockets, deadline) is `exec.py`'s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import requests
from pylxd.exceptions import LXDAPIException, NotFound

from . import exec as lxd_exec
from .connection import Connection
from .errors import LxdError, LxdUnavailable, is_unavailable, is_update_conflict, retry_lxd
from .records import (
    PROTECTION_KEY,
    REMOVING_OPERATIONS,
    TAG_MOUNTED,
    TAG_PREFIX,
    ContainerDetails,
    ContainerInfo,
    ContainerSpec,
    ExecResult,
    Mount,
    disk_device,
    is_mount,
    lxd_time,
)

CHANGE_TAGS_TRIES = 8  # rounds of `change_tags` and `retag_container` against writers of the same container
CHANGE_TAGS_BACKOFF = 0.05  # seconds, times the round, before reading again after a refused write

T = TypeVar("T")


class InstanceOperations(Connection):
    """The containers of the LXD server."""

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
        LXD refuses to delete it from then on (`delete_container(..., unprotect=True)`), in the same write.

        A write LXD refused because another update of the container was being
        applied is made again (`_until_applied`): a step taking an idle container
        while the warm pool's own retag of it was being applied failed there.
        """

        def write() -> None:
            instance = self.client.instances.get(name)
            instance.config = {key: value for key, value in instance.config.items() if not key.startswith(TAG_PREFIX)}
            instance.config.update(tags)
            if protect:
                instance.config[PROTECTION_KEY] = "true"
            instance.save(wait=True)

        self._until_applied(name, write)

    def _until_applied(self, name: str, write: Callable[[], T]) -> T:
        """`write` (one read and one update of container `name`), made again while LXD refuses the update because
        another write of the container came first: LXD applies one update of an instance at a time, and an ETag
        (If-Match) write fails when anyone changed the container since its read."""
        for attempt in range(CHANGE_TAGS_TRIES):
            try:
                return write()
            except LXDAPIException as error:
                if not is_update_conflict(error):
                    raise
                time.sleep(CHANGE_TAGS_BACKOFF * (attempt + 1))  # the other write is still being applied
        raise LxdError(f"the tags of container {name} kept changing: {CHANGE_TAGS_TRIES} writes refused")

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

        def write() -> dict[str, str] | None:
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
            return wanted

        return self._until_applied(name, write)

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
                found.append(ContainerInfo(instance.name, instance.status, tags, lxd_time(instance.created_at)))
        return found

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
        return lxd_exec.execute(
            lambda: self.exec_client,
            self.stop,
            name,
            argv,
            env,
            on_output,
            timeout,
            cwd,
            abort,
            stop_wait=min(30.0, self.timeout),
        )
