"""The warm pool: idle deploy containers, made, id-shifted and started ahead of the jobs that will use them.

Why: a deploy whose request comes as its job starts leaves the preparation
no time to hide the container's launch (a file copy of the whole image on a
`dir` pool: seconds for a Debian image). A container that is already running
costs the step a change of tags.

What is kept: for the apps deployed most recently, `container.warm_pool.per_app`
containers of the app's current image, shaped as its next deploy step's
container will be (the same id mapping, limits, profiles and disk: `warm_key`),
`container.warm_pool.max` over all apps and at most `max_disk` bytes (on a pool
that copies files, each costs its image's size; on btrfs/zfs next to nothing). A step takes one (`take_idle`) by
rewriting its tags to the step's, in one write: from then on it is that step's
container, removed as any other. The pool replaces it at once.

Whose: each instance keeps its own and hands out only its own (the tag
`warm-owner`), so one lock in the process orders takes against the pool's
removals. A clean stop removes them (`drain`); those of an instance that died
are removed by another instance of the same database once that one's
heartbeat is gone. What is not an app of this database is not judged.

Memory: none is made while the host has less than
`container.warm_pool.min_free_memory` available, and the idle ones go when it
falls below half of that: a step's own container matters more than a spare.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

from bson import ObjectId
from bson.errors import InvalidId

from ..config import Config
from ..logs import Logger, get_logger
from ..lxd import TAG_APP, TAG_PREFIX, ContainerInfo, ContainerSpec, Lxd
from ..store import Store
from ..supervise import Supervised

log = get_logger(__name__)

TAG_WARM = TAG_PREFIX + "warm"  # on an idle container ready to be taken: its `warm_key`
TAG_WARM_OWNER = TAG_PREFIX + "warm-owner"  # the instance keeping it, from its making on
TAG_WARM_IMAGE = TAG_PREFIX + "warm-image"  # its image's fingerprint (status, check)
# How long an instance's heartbeat may be silent before its idle containers are another's to remove.
DEAD_AFTER = 300.0

_guard = threading.Lock()  # orders takes against the pool's removals in this process
_taken = threading.Event()  # a take happened: the pool replaces the container now


@dataclasses.dataclass(frozen=True)
class WarmTarget:
    """An app the pool keeps containers for: the spec of its next deploy container (name and tags aside)."""

    app_id: ObjectId
    app: str  # label, for logs
    spec: ContainerSpec
    disk: int = 0  # bytes one idle container takes: its image's size where the pool copies files, 0 on a snapshot


@dataclasses.dataclass(frozen=True)
class IdleContainer:
    """A container the pool keeps (status and check list them as kept by design)."""

    name: str
    app_id: str
    image: str
    owner: str
    key: str  # `warm_key` once it runs commands and may be taken; empty while it is being made

    @property
    def ready(self) -> bool:
        return bool(self.key)


def enabled(config: Config) -> bool:
    """Whether `container.warm_pool` keeps any idle container."""
    return config.container.warm_pool.per_app > 0 and config.container.warm_pool.max > 0


def warm_key(spec: ContainerSpec) -> str:
    """What a step's container must share with an idle one to take it: everything but its name, tags, mounts."""
    shape = (
        spec.image,
        spec.privileged,
        spec.idmap,
        spec.cpu,
        spec.memory,
        spec.disk,
        spec.processes,
        ",".join(spec.profiles),
    )
    return f"{zlib.crc32(repr(shape).encode()):08x}"


def idle_containers(containers: Iterable[ContainerInfo]) -> list[IdleContainer]:
    """The pool's containers among `containers` (of every instance), ready or being made."""
    return [
        IdleContainer(
            name=c.name,
            app_id=c.tags.get(TAG_APP, ""),
            image=c.tags.get(TAG_WARM_IMAGE, ""),
            owner=c.tags[TAG_WARM_OWNER],
            key=c.tags.get(TAG_WARM, ""),
        )
        for c in containers
        if TAG_WARM_OWNER in c.tags
    ]


def take_idle(lxd: Lxd, spec: ContainerSpec, owner: str, log: Logger) -> str | None:
    """Hand an idle running container shaped as `spec` to the step `spec` is for: its tags become `spec.tags`.

    Returns its name, or None when this instance keeps none of that shape.
    """
    key = warm_key(spec)
    with _guard:
        for container in lxd.list_containers():
            tags = container.tags
            if tags.get(TAG_WARM) != key or tags.get(TAG_WARM_OWNER) != owner or container.status != "Running":
                continue
            lxd.retag_container(container.name, spec.tags)
            _taken.set()
            log.info("warm_container_taken", container=container.name, image=spec.image[:12])
            return container.name
    return None


def choose_targets(
    candidates: Iterable[WarmTarget], per_app: int, maximum: int, max_disk: int
) -> dict[str, tuple[WarmTarget, int]]:
    """How many idle containers of each shape to keep: `per_app` for each candidate in order, `maximum` and
    `max_disk` bytes in all (a candidate that would pass the disk bound is left out, a smaller one may follow)."""
    wanted: dict[str, tuple[WarmTarget, int]] = {}
    left, disk_left = maximum, max_disk
    for target in candidates:
        key = warm_key(target.spec)
        count = min(per_app, left)
        if target.disk:
            count = min(count, disk_left // target.disk)
        if key in wanted or count <= 0:
            continue
        wanted[key] = (target, count)
        left -= count
        disk_left -= count * target.disk
    return wanted


def memory_available() -> int | None:
    """MemAvailable of this host in bytes (None when /proc/meminfo does not say)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class WarmPool:
    """Keeps the idle containers `choose_targets` asks for, in one supervised thread."""

    def __init__(
        self,
        config: Config,
        store: Store,
        lxd: Lxd,
        stop: threading.Event,
        candidates: Callable[[], list[WarmTarget]],
        launch: Callable[[ContainerSpec], None],
        memory: Callable[[], int | None] = memory_available,
    ):
        self.config = config
        self.settings = config.container.warm_pool
        self.interval = config.sweep_interval
        self.owner = config.instance_id or ""
        self.store = store
        self.lxd = lxd
        self.stop = stop
        self.candidates = candidates  # apps deployed lately, newest first, as step containers would be shaped
        self.launch = launch  # create, start, wait until it runs commands (as a step's container)
        self.memory = memory
        self._paused_for_memory = False
        self.loop = Supervised("warm-pool", self._loop, stop)

    def kick(self) -> None:
        """Look again now: an image was built, a job ended."""
        _taken.set()

    def _loop(self) -> None:
        while not self.stop.is_set():
            _taken.clear()  # before looking: a take from now on is seen by the next pass
            try:
                more = self.reconcile()
            except Exception:  # LXD away, an image that does not start: a spare is worth no crash-loop
                log.exception("warm_pool_failed", retry_in_s=self.interval)
                more = False
            if not more:
                _taken.wait(self.interval)  # the daemon's stop kicks it too

    def reconcile(self) -> bool:
        """Remove what is not wanted, then make at most one missing container; True when more are missing."""
        settings = self.settings
        wanted = {}
        if enabled(self.config):
            wanted = choose_targets(self.candidates(), settings.per_app, settings.max, settings.max_disk)
        kept = self.remove_unwanted(idle_containers(self.lxd.list_containers()), wanted)
        if self._memory_short():
            return False
        missing = next((target for key, (target, count) in wanted.items() if kept.get(key, 0) < count), None)
        if missing is None or self.stop.is_set():
            return False
        self.make(missing)
        return True

    def remove_unwanted(self, idle: list[IdleContainer], wanted: dict[str, tuple[WarmTarget, int]]) -> dict[str, int]:
        """Remove ours beyond what is wanted (another image, app, shape; over the count), and those of dead
        instances; how many ready ones of ours are kept, per shape."""
        kept: dict[str, int] = {}
        dead = self._dead_owners(idle)
        for container in idle:
            if container.owner == self.owner:
                key = container.key
                if container.ready and key in wanted and kept.get(key, 0) < wanted[key][1]:
                    kept[key] = kept.get(key, 0) + 1
                    continue
                self._remove(container, "no longer wanted" if container.ready else "left half made")
            elif container.owner in dead:
                self._remove(container, f"its instance {container.owner} stopped")
        return kept

    def close(self, within: float) -> None:
        """At the daemon's stop: the loop ends (a container being made is given up), then ours go."""
        _taken.set()
        if self.loop.thread.is_alive():
            self.loop.thread.join(within)
        try:
            removed = self.drain()
        except Exception as error:  # LXD away: another instance, or this one's next start, removes them
            log.warning("warm_pool_not_drained", error=f"{type(error).__name__}: {error}")
            return
        if removed:
            log.info("warm_pool_drained", removed=removed)

    def drain(self) -> int:
        """Remove every container this instance keeps (a clean stop); how many were removed."""
        removed = 0
        for container in idle_containers(self.lxd.list_containers()):
            if container.owner == self.owner:
                removed += self._remove(container, "the daemon is stopping")
        return removed

    def make(self, target: WarmTarget) -> None:
        """Launch one idle container for `target`; only once it runs commands can a step take it."""
        spec = target.spec
        name = f"gbp-warm-{spec.image[:12]}-{warm_key(spec)}-{uuid.uuid4().hex[:6]}"
        making = {TAG_WARM_OWNER: self.owner, TAG_APP: str(target.app_id), TAG_WARM_IMAGE: spec.image}
        try:
            self.launch(dataclasses.replace(spec, name=name, tags=making, mounts={}))
            self.lxd.retag_container(name, making | {TAG_WARM: warm_key(spec)})
        except BaseException:
            self.lxd.delete_container(name)
            raise
        log.info("warm_container_ready", container=name, app=target.app, image=spec.image[:12])

    def _memory_short(self) -> bool:
        """True while the host is short of memory for a spare; below half the floor, the idle ones go."""
        available, floor = self.memory(), self.settings.min_free_memory
        short = available is not None and available < floor
        if short != self._paused_for_memory:
            self._paused_for_memory = short
            event = "warm_pool_paused_low_memory" if short else "warm_pool_resumed"
            log.warning(event, available_bytes=available, min_free_memory=floor)
        if available is not None and available < floor / 2:
            self.drain()
        return short

    def _dead_owners(self, idle: list[IdleContainer]) -> set[str]:
        """Owners of idle containers of this database's apps whose instance no longer beats."""
        others = {c.owner for c in idle if c.owner != self.owner and self._known_app(c.app_id)}
        if not others:
            return set()
        live = {doc.get("_id") for doc in self.store.live_instances(DEAD_AFTER)}
        return {owner for owner in others if owner not in live}

    def _known_app(self, app_id: str) -> bool:
        try:
            return self.store.get_app(ObjectId(app_id)) is not None
        except InvalidId:
            return False

    def _remove(self, container: IdleContainer, reason: str) -> int:
        with _guard:  # never under a take: the container may be a step's by now
            current = self.lxd.describe_container(container.name)
            if current is None or TAG_WARM_OWNER not in current.config:
                return 0
            removed = self.lxd.delete_container(container.name)
        if removed:
            log.info("warm_container_removed", container=container.name, reason=reason)
        return int(removed)
