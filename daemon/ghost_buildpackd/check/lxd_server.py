"""The LXD checks: the server, its storage, what bounds a container, the metadata address, and a probe
container created, started and deleted (named `gbp-check-<random>`, always deleted)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable

from ..config import Config
from ..ghost.documents import NO_SOURCE_IMAGE
from ..images import ImageNotFound, is_job_alias, local_base_image
from ..lxd import COPY_ON_WRITE, ContainerSpec, ImageInfo, Lxd
from ..steps import idmap_user_ids
from ..store import Store
from ..upkeep.templates import kept_templates
from ..upkeep.warm_pool import enabled as warm_pool_enabled
from ..upkeep.warm_pool import idle_containers
from .host import SUBGID, SUBUID, subid_allows
from .result import CheckResult, fail, ok, warn

PROJECT_IMAGE_PREFIX = "ghost-buildpackd/"  # base images built by scripts/build-base-image
METADATA_ADDRESS = "169.254.169.254"  # the cloud's instance metadata service (on EC2: the host's IAM role)
# Storage drivers that enforce a root disk size; `dir` does only on a filesystem with project quotas.
SIZED_STORAGE = ("btrfs", "zfs", "lvm", "ceph")


def lxd_checks(config: Config, store: Store | None, report: Callable[[CheckResult], None]) -> None:
    """Server reachable, storage pool, and a probe container created, started and deleted."""
    endpoint = config.lxd.endpoint
    try:
        lxd = Lxd(config.lxd)
        info = lxd.server_info()
        pools = lxd.storage_pools()
    except Exception as error:
        report(
            fail(
                "lxd",
                f"cannot reach LXD at {endpoint}: {error}",
                "start LXD (lxd waitready), and for `local` add this user to the lxd group "
                "(the unit does it with SupplementaryGroups=lxd)",
            )
        )
        report(fail("lxd container", "not checked: LXD is unreachable", "fix the lxd check first"))
        return
    report(ok("lxd", f"reachable at {endpoint} (LXD {info['version']}, storage driver {info['storage']})"))
    root = read_root_pool(config, lxd)
    if not pools:
        report(fail("lxd storage", "no storage pool", "create one, e.g. `lxc storage create default dir`"))
    else:
        report(ok("lxd storage", f"pools: {', '.join(pools)}"))
        report(storage_cost_check(config, root, read_loop_size(lxd, root)))
    # A server may hold several pools: what a container costs and what bounds its disk is the one its profiles name.
    driver = root[1] if isinstance(root, tuple) else info["storage"]
    report(kept_templates_check(config, lxd))
    report(warm_pool_check(config, lxd, driver))
    report(probe_container_check(config, lxd, store))
    report(limits_check(config, driver))
    report(metadata_check(config, lxd))


def read_root_pool(config: Config, lxd: Lxd) -> tuple[str, str] | Exception | None:
    """(pool, driver) of the root disk the daemon's containers get; None without one; the error if unreadable."""
    try:
        return lxd.root_pool(["default", *config.container.profiles])
    except Exception as error:  # storage_cost_check reports it
        return error


def read_loop_size(lxd: Lxd, root: tuple[str, str] | Exception | None) -> str | None:
    """LXD's `size` of the root disk's pool when the pool lives on a loop file LXD made (`source` is its
    `disks/<pool>.img`); None otherwise, or when unreadable (the pool line is then still worth printing)."""
    if not isinstance(root, tuple):
        return None
    try:
        pool_config = lxd.storage_pool_config(root[0])
    except Exception:
        return None
    size, source = pool_config.get("size"), pool_config.get("source", "")
    return size if size and source.endswith(".img") else None


def limits_check(config: Config, storage: str) -> CheckResult:
    """What bounds one container's memory and disk, and whether this LXD's storage enforces the disk bound."""
    limits = config.container.limits
    memory = limits.memory or "unlimited"
    if limits.memory and limits.memory.endswith("%"):
        memory = f"{limits.memory} of the host's memory each (workers: {config.workers})"
    detail = f"memory {memory}, root disk {_size(limits.disk)}, processes {limits.processes or 'unlimited'}"
    if not limits.memory:
        return warn("container limits", detail, "set container.limits.memory: one buildpack can take the host down")
    if limits.disk and storage not in SIZED_STORAGE:
        return warn(
            "container limits",
            f"{detail}; the {storage} storage driver does not enforce the root disk size "
            "(on `dir`, LXD says 'skipping set quota' unless the filesystem has project quotas)",
            "bound the disk with a btrfs, zfs or lvm storage pool (`lxc storage create ...`) used by the default "
            "profile or one of container.profiles",
        )
    return ok("container limits", detail)


def _size(value: int | None) -> str:
    if not value:
        return "unlimited"
    return f"{value / (1 << 30):g}GiB" if value >= 1 << 30 else f"{value / (1 << 20):g}MiB"


def metadata_check(config: Config, lxd: Lxd) -> CheckResult:
    """Whether containers get a network device, over which they could reach the cloud metadata address."""
    profiles = ("default", *config.container.profiles)
    try:
        nics = lxd.network_devices(profiles)
    except Exception as error:
        return fail("metadata address", f"cannot read profiles {', '.join(profiles)}: {error}", "check LXD's log")
    if not nics:
        return ok(
            "metadata address", f"no network device: metadata address unreachable (profiles {', '.join(profiles)})"
        )
    described = ", ".join(nics)
    return warn(
        "metadata address",
        f"containers get network devices from profiles {', '.join(profiles)}: {described}; unless something blocks "
        f"it, a buildpack can reach {METADATA_ADDRESS} (on EC2: the credentials of the host's IAM role)",
        f"drop forwarded traffic to {METADATA_ADDRESS} from the containers' bridge on the host "
        "(docs/operations.md: Blocking the metadata address)",
    )


def storage_cost_check(
    config: Config, found: tuple[str, str] | Exception | None, loop_size: str | None = None
) -> CheckResult:
    """Which pool the daemon's containers land on (`found`, from read_root_pool), its driver (and its size when
    on a loop file: `loop_size`, from read_loop_size), and what a container costs there."""
    profiles = ["default", *config.container.profiles]
    if isinstance(found, Exception):
        return fail("lxd storage pool", f"cannot read profiles {', '.join(profiles)}: {found}", "create them")
    if found is None:
        return fail(
            "lxd storage pool",
            f"no root disk in profiles {', '.join(profiles)}",
            "add one, e.g. `lxc profile device add default root disk path=/ pool=default`",
        )
    pool, driver = found
    kept = config.container.templates
    on = f"{driver} on a {loop_size} loop file" if loop_size else driver
    if driver in COPY_ON_WRITE:
        source = f"its template (container.templates: {kept})" if kept else "its image (container.templates: 0)"
        return ok("lxd storage pool", f"{pool}: {on}, a container is a snapshot of {source}")
    if kept:
        cost = f"is a full copy of its template's files (container.templates: {kept}, each a whole root filesystem"
    else:
        cost = "unpacks the whole image (container.templates: 0"
    return ok(
        "lxd storage pool",
        f"{pool}: {on}, every container {cost}; btrfs/zfs make it a snapshot; "
        "container.max_prepared bounds the containers launched ahead)",
    )


def kept_templates_check(config: Config, lxd: Lxd) -> CheckResult:
    """What LXD holds on purpose: the template containers (kept, not leftovers), their images and sizes."""
    try:
        templates = kept_templates(lxd)
    except Exception as error:  # the probe container check says whether LXD answers at all
        return warn("lxd kept", f"cannot list the template containers: {error}", "see the lxd checks")
    if not templates:
        return ok("lxd kept", f"no template container yet (at most {config.container.templates}: container.templates)")
    images = sorted({(t.image[:12], t.image_size) for t in templates})
    sizes = ", ".join(f"{image} ({'gone' if size is None else f'{size / 2**20:.1f} MiB'})" for image, size in images)
    return ok(
        "lxd kept",
        f"{len(templates)} template containers kept by design (at most {config.container.templates}: "
        f"container.templates), copied for new containers, not leftovers; of images {sizes}",
    )


def warm_pool_check(config: Config, lxd: Lxd, driver: str) -> CheckResult:
    """What the warm pool keeps (idle deploy containers, running) and what each costs on this storage."""
    settings = config.container.warm_pool
    if not warm_pool_enabled(config):
        return ok("lxd warm pool", "off (container.warm_pool): a deploy's container is launched at its job's start")
    try:
        now = len(idle_containers(lxd.list_containers()))
    except Exception as error:
        return warn("lxd warm pool", f"cannot list the idle containers: {error}", "see the lxd checks")
    cost = "a snapshot of its template" if driver in COPY_ON_WRITE else "a full copy of its image's files"
    return ok(
        "lxd warm pool",
        f"up to {settings.max} idle deploy containers ({settings.per_app} per app deployed lately: "
        f"container.warm_pool), each running and on {driver} {cost}, {settings.max_disk / 2**30:g} GiB of "
        "copies at most (max_disk); none made while the host has less than "
        f"{settings.min_free_memory / 2**20:.0f} MiB available; {now} now",
    )


def pick_probe_image(lxd: Lxd, store: Store | None) -> ImageInfo | None:
    """An image an app's builds start from, else the project's base image, else any aliased image (smallest first)."""
    images = lxd.list_images()
    if store is not None:
        for app in store.all_apps():
            ref = (app.get("build_infos") or {}).get("source_container_image")
            if not isinstance(ref, str) or ref.strip() in NO_SOURCE_IMAGE:
                continue
            with contextlib.suppress(ImageNotFound):  # an ambiguous prefix: the build would refuse it too
                if image := local_base_image(ref.strip(), images):
                    return image
    aliased = sorted((image for image in images if image.aliases), key=lambda image: image.size)
    for image in aliased:
        if any(alias.startswith(PROJECT_IMAGE_PREFIX) for alias in image.aliases):
            return image
    # Images the daemon published (aliased by job id) may be deleted by retention at any time.
    stable = [image for image in aliased if not all(is_job_alias(alias) for alias in image.aliases)]
    return stable[0] if stable else None


def probe_container_check(config: Config, lxd: Lxd, store: Store | None) -> CheckResult:
    name = f"gbp-check-{uuid.uuid4().hex[:8]}"
    try:
        image = pick_probe_image(lxd, store)
    except Exception as error:
        return fail("lxd container", f"cannot list images: {error}", "check LXD's log")
    if image is None:
        return fail(
            "lxd container",
            "no LXD image with an alias to probe with",
            "import a base image: scripts/build-base-image, or `lxc image import <meta> <rootfs> --alias NAME`",
        )
    spec = ContainerSpec(
        name=name,
        image=image.fingerprint,
        tags={},  # untagged: the sweep never mistakes the probe for a step's container
        privileged=config.container.privileged,
        idmap=_probe_idmap(config),
    )
    try:
        lxd.create_container(spec)
        lxd.start(name)
        lxd.wait_ready(name, config.lxd.timeout)
    except Exception as error:
        return fail(
            "lxd container",
            f"cannot create and start a container from {image.describe()}: {error}" + _delete_probe(lxd, name),
            "see LXD's log (lxc monitor --type=logging --pretty, or /var/log/lxd/lxd.log) and the idmap check below",
        )
    problem = _delete_probe(lxd, name)
    if problem:
        return fail("lxd container", f"created and started {name}{problem}", "check LXD's log")
    mapped = " with raw.idmap" if spec.idmap else (" privileged" if spec.privileged else "")
    return ok("lxd container", f"created, started{mapped} and deleted {name} from {image.describe()}")


def _probe_idmap(config: Config) -> tuple[int, int] | None:
    if config.container.privileged:
        return None
    try:
        ids = idmap_user_ids(config.container.idmap_user)
    except KeyError:
        return None
    if 0 in ids:
        return None
    return ids if all(subid_allows(path, i) for path, i in zip((SUBUID, SUBGID), ids, strict=True)) else None


def _delete_probe(lxd: Lxd, name: str) -> str:
    """Always remove the probe; the text to append to the result when that failed."""
    try:
        lxd.delete_container(name)
    except Exception as error:
        return f"; could not delete it ({error}): run `lxc delete --force {name}`"
    return ""
