"""The connection to one LXD server: its clients, the wait on LXD's background operations, and what the
server says of itself (version, pid, pools, profiles).

Every call has a bounded wait: the HTTP client has a timeout (`lxd.timeout`);
long operations (create, start, stop, delete, publish) are waited on as LXD
operations, in polls each shorter than that timeout, up to their own deadline
(`lxd.operation_timeout`), so a big image is never cut off by one HTTP read.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import pylxd
import requests
from pylxd.exceptions import LXDAPIException

from ..config import LxdConfig
from ..logs import get_logger
from .errors import LxdError, retry_lxd
from .records import describe_nic

log = get_logger(__name__)

LONGEST_OPERATION_POLL = 30  # seconds one wait on an operation may last (below lxd.timeout, too)


class Connection:
    """A connection to one LXD server; the operations on images and instances build on it."""

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

    @retry_lxd
    def storage_pools(self) -> list[str]:
        return [pool.name for pool in self.client.storage_pools.all()]

    @retry_lxd
    def storage_pool_config(self, name: str) -> dict[str, str]:
        """Pool `name`'s configuration as LXD keeps it (e.g. `size` and `source` of a loop file)."""
        return dict(self.client.storage_pools.get(name).config or {})

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
        return [describe_nic(name, device) for name, device in sorted(devices.items()) if device.get("type") == "nic"]

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
