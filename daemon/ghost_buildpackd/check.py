"""`ghost-buildpackd check`: can this host do the daemon's work? One line per check, OK or FAIL with the fix.

WARN lines name a risk that does not stop the daemon (the exit code stays 0).

Every wait is bounded by the configured timeouts. The probe container is
named `gbp-check-<random>` and is always deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import pymongo

from .config import PUBLISH_COMPRESSORS, Config, buildpack_waits, waits_fit
from .ghost.config_yml import DEFAULT_GHOST_CONFIG, GHOST_MONGO_DBNAME
from .ghost.documents import NO_SOURCE_IMAGE
from .images import ImageNotFound, is_job_alias, local_base_image
from .lxd import ContainerSpec, ImageInfo, Lxd
from .model import FAILED
from .policy import MONGODB_NEWEST_TESTED, MONGODB_OLDEST
from .steps import UNPRIVILEGED_HINT, idmap_user_ids
from .store import Store, redacted_uri, short_error

SUBUID, SUBGID = Path("/etc/subuid"), Path("/etc/subgid")
GHOST_COLLECTIONS = ("jobs", "apps")
PROJECT_IMAGE_PREFIX = "ghost-buildpackd/"  # base images built by scripts/build-base-image
METADATA_ADDRESS = "169.254.169.254"  # the cloud's instance metadata service (on EC2: the host's IAM role)
# Storage drivers that enforce a root disk size; `dir` does only on a filesystem with project quotas.
SIZED_STORAGE = ("btrfs", "zfs", "lvm", "ceph")


@dataclasses.dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False  # ok, but with a risk worth acting on

    def render(self) -> str:
        label = "FAIL" if not self.ok else "WARN" if self.warning else "OK  "
        line = f"{label}  {self.name}: {self.detail}\n"
        return line + (f"      fix: {self.fix}\n" if (not self.ok or self.warning) and self.fix else "")


def ok(name: str, detail: str) -> CheckResult:
    return CheckResult(name, True, detail)


def fail(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, False, detail, fix)


def warn(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, True, detail, fix, warning=True)


def run_checks(config: Config, out: TextIO) -> int:
    """Run every check, print one line each; 0 only when all pass."""
    results: list[CheckResult] = []

    def report(result: CheckResult) -> None:
        results.append(result)
        out.write(result.render())
        out.flush()

    store = mongo_checks(config, report)
    lxd_checks(config, store, report)
    if store is not None:
        report(unprivileged_failures_check(config, store))
        store.db.client.close()
    report(idmap_check(config))
    for name, path in (("ghost.root", config.ghost.root), ("ghost.log_dir", config.ghost.log_dir)):
        report(writable_dir_check(name, path))
    report(compressor_check(config))
    report(venv_check(config))
    report(containers_enabled_check(config))
    report(buildpack_waits_check(config))
    failed = sum(not result.ok for result in results)
    warned = sum(result.warning for result in results)
    out.write(f"\n{len(results) - failed - warned} OK, {warned} WARN, {failed} FAIL\n")
    return 0 if failed == 0 else 1


# --- MongoDB -----------------------------------------------------------------------


def mongo_checks(config: Config, report: Callable[[CheckResult], None]) -> Store | None:
    """Reachable and authenticated, event mode, Ghost's collections; the Store when reachable."""
    where = redacted_uri(config.mongodb.uri)
    store = Store.from_uri(config.mongodb.uri, config.mongodb.database, config.mongodb.timeout)
    try:
        store.ping()
        server = store.server_info()
        version = server["version"]
    except Exception as error:
        store.db.client.close()
        if "wire version" in str(error):  # pymongo refuses a server older than its floor before any command
            report(mongodb_version_check(None, "unknown"))
        report(
            fail(
                "mongodb",
                f"cannot reach or authenticate to {where} within {config.mongodb.timeout:g}s: {short_error(error)}",
                "check mongodb.uri or mongodb.uri_file (or GHOST_BUILDPACKD_MONGODB_URI; left out: MONGO_HOST, else "
                "mongo_host of Ghost's config.yml, port 27017), that MongoDB listens there, and the credentials",
            )
        )
        for name in ("mongodb events", "ghost collections"):
            report(fail(name, "not checked: MongoDB is unreachable", "fix the mongodb check first"))
        return None
    report(ok("mongodb", f"reachable and authenticated at {where} (MongoDB {version})"))
    report(mongodb_version_check(server["max_wire_version"], version))
    report(events_check(config, store))
    report(collections_check(config, store))
    return store


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def mongodb_version_check(max_wire_version: int | None, version: str) -> CheckResult:
    """The server against the supported range (policy.MONGODB_OLDEST to MONGODB_NEWEST_TESTED)."""
    oldest, newest = (".".join(map(str, v)) for v in (MONGODB_OLDEST, MONGODB_NEWEST_TESTED))
    supported = f"supported: MongoDB {oldest} to {newest} (pymongo {pymongo.version})"
    found = version_tuple(version) if version != "unknown" else ()
    if not found or found < MONGODB_OLDEST:
        wire = max_wire_version if max_wire_version is not None else "unknown"
        return fail(
            "mongodb version",
            f"MongoDB {version} (wire version {wire}) is older than the oldest supported; {supported}",
            f"upgrade MongoDB to {oldest} or newer (an in-place upgrade one release at a time, as MongoDB documents)",
        )
    if found > MONGODB_NEWEST_TESTED:
        return warn(
            "mongodb version",
            f"MongoDB {version} is newer than the newest tested ({newest}); {supported}",
            "nothing to do if it works; report what does not",
        )
    return ok("mongodb version", f"MongoDB {version}; {supported}")


def events_check(config: Config, store: Store) -> CheckResult:
    supported, reason = store.change_streams_supported()
    picked = "change_stream" if supported else "poll"
    if config.events.mode == "change_stream" and not supported:
        return fail(
            "mongodb events",
            f"events.mode is change_stream but {reason}",
            "run MongoDB as a replica set (a single-node one will do), or set events.mode: auto",
        )
    if config.events.mode == "poll":
        return ok("mongodb events", f"events.mode poll (every {config.events.poll_interval:g}s); {reason}")
    return ok("mongodb events", f"{reason}: events.mode {config.events.mode} uses {picked}")


GHOST_DATABASE_HINT = (
    f"Ghost's database is {GHOST_MONGO_DBNAME!r} (settings.py hard-codes it) on the host of MONGO_HOST, else of "
    "mongo_host in Ghost's config.yml, port 27017: leave mongodb.uri and mongodb.database out to use those, "
    "or set them to where Ghost's apps live"
)


def collections_check(config: Config, store: Store) -> CheckResult:
    """Ghost's collections. Eve makes a collection at its first insert: a Ghost that never ran a job has no
    `jobs`, one without an app has no `apps` either (then this may as well be another database: a warning)."""
    names = set(store.collection_names())
    database = config.mongodb.database
    if "apps" not in names:
        return warn(
            "ghost collections",
            f"database {database!r} has no apps collection: not Ghost's database, or a Ghost without any app yet",
            GHOST_DATABASE_HINT,
        )
    if "jobs" not in names:
        return ok("ghost collections", f"database {database!r} holds apps, no job yet (Eve makes jobs at the first)")
    return ok("ghost collections", f"database {database!r} holds {', '.join(GHOST_COLLECTIONS)}")


# --- LXD -----------------------------------------------------------------------------


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
        report(storage_cost_check(config, root))
    report(probe_container_check(config, lxd, store))
    # A server may hold several pools: what bounds a container's disk is the one its profiles name.
    report(limits_check(config, root[1] if isinstance(root, tuple) else info["storage"]))
    report(metadata_check(config, lxd))


def read_root_pool(config: Config, lxd: Lxd) -> tuple[str, str] | Exception | None:
    """(pool, driver) of the root disk the daemon's containers get; None without one; the error if unreadable."""
    try:
        return lxd.root_pool(["default", *config.container.profiles])
    except Exception as error:  # storage_cost_check reports it
        return error


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


COPY_ON_WRITE = ("btrfs", "zfs", "lvm", "ceph")  # LXD drivers that make a container a snapshot of its source


def storage_cost_check(config: Config, found: tuple[str, str] | Exception | None) -> CheckResult:
    """Which pool the daemon's containers land on (`found`, from read_root_pool), and what a container costs there."""
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
    if driver in COPY_ON_WRITE:
        source = f"its template (container.templates: {kept})" if kept else "its image (container.templates: 0)"
        return ok("lxd storage pool", f"{pool}: {driver}, a container is a snapshot of {source}")
    if kept:
        cost = f"is a full copy of its template's files (container.templates: {kept}, each a whole root filesystem"
    else:
        cost = "unpacks the whole image (container.templates: 0"
    return ok(
        "lxd storage pool",
        f"{pool}: {driver}, every container {cost}; btrfs/zfs make it a snapshot; "
        "container.max_prepared bounds the containers launched ahead)",
    )


def venv_check(config: Config) -> CheckResult:
    """Ghost's virtualenv, where ansible runs from, when Ghost's features_provisioners lists ansible."""
    venv = config.ghost.venv
    if "ansible" not in config.ghost_settings.features_provisioners:
        return ok("ghost.venv", "not needed: Ghost's features_provisioners does not list ansible")
    playbook = venv / "bin" / "ansible-playbook"
    if not playbook.is_file():
        return fail(
            "ghost.venv",
            f"{playbook} does not exist: every build would fail at the ansible features install",
            "set ghost.venv to Ghost's virtualenv (python -c 'import sys; print(sys.exec_prefix)' "
            "with the python of Ghost's worker)",
        )
    return ok("ghost.venv", f"{playbook} exists")


def containers_enabled_check(config: Config) -> CheckResult:
    """Ghost's container.enabled: off, the daemon makes no step (as 19.08's lxd_is_available gate)."""
    ghost = config.ghost_settings
    if ghost.container_enabled:
        return ok("ghost container.enabled", f"true in {ghost.path}")
    where = f"in {ghost.path}" if ghost.path else f"no Ghost config.yml read (ghost.config; no {DEFAULT_GHOST_CONFIG})"
    return warn(
        "ghost container.enabled",
        f"not true ({where}): no container step is made; Ghost runs module scripts on its host",
        "set container.enabled: true in Ghost's config.yml (ghost.config names it), then restart the daemon",
    )


def buildpack_waits_check(config: Config) -> CheckResult:
    """The buildpack command's longest life must fit in Ghost's RQ job timeout, which kills the whole job."""
    timeout, build_wait = config.buildpack.timeout, config.buildpack.build_wait
    limit = config.ghost_settings.rq_worker_job_timeout
    waits = f"buildpack.build_wait {build_wait:g}s + buildpack.timeout {timeout:g}s = {build_wait + timeout:g}s"
    if waits_fit(timeout, build_wait, limit):
        return ok("buildpack waits", f"{waits} per module script, within Ghost's rq_worker_job_timeout {limit}s")
    derived_timeout, derived_wait = buildpack_waits(limit)
    return warn(
        "buildpack waits",
        f"{waits} per module script: more than five sixths of Ghost's rq_worker_job_timeout {limit}s, which "
        "leaves too little to the rest of the deploy: rq may kill the whole job first, the script still running",
        f"leave buildpack.timeout and buildpack.build_wait out (then {derived_timeout:g}s and {derived_wait:g}s), "
        "lower them, or raise rq_worker_job_timeout in Ghost's config.yml",
    )


RECENT_STEPS = 50  # finished steps read for failures an unprivileged container caused


def unprivileged_failures_check(config: Config, store: Store) -> CheckResult:
    """Recent steps that failed on an operation an unprivileged container refuses (see steps.looks_unprivileged)."""
    name = "container.privileged"
    if config.container.privileged:
        return ok(name, "true: containers are privileged")
    try:
        steps = store.recent_finished_steps(RECENT_STEPS)
    except Exception as error:
        return fail(name, f"cannot read recent steps: {short_error(error)}", "fix the mongodb check first")
    failed = [step for step in steps if step.state == FAILED and UNPRIVILEGED_HINT in step.message]
    if not failed:
        return ok(name, f"false; none of the last {len(steps)} finished steps failed for being unprivileged")
    return fail(
        name,
        f"{len(failed)} of the last {len(steps)} finished steps failed on an operation unprivileged containers "
        f"refuse: {', '.join(step.id for step in failed[:3])}",
        "make the hook, feature or buildpack work without it, or set container.privileged: true "
        "(Ghost's own default; containers then run as root on this host)",
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
    return ids if all(_subid_allows(path, i) for path, i in zip((SUBUID, SUBGID), ids, strict=True)) else None


def _delete_probe(lxd: Lxd, name: str) -> str:
    """Always remove the probe; the text to append to the result when that failed."""
    try:
        lxd.delete_container(name)
    except Exception as error:
        return f"; could not delete it ({error}): run `lxc delete --force {name}`"
    return ""


# --- host ------------------------------------------------------------------------------


def _subid_allows(path: Path, host_id: int) -> bool:
    """Whether `path` (subuid/subgid) lets root map `host_id` (`root:<id>:1` or a range holding it)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in ("root", "0") and parts[1].isdigit() and parts[2].isdigit():
            start, count = int(parts[1]), int(parts[2])
            if start <= host_id < start + count:
                return True
    return False


def idmap_check(config: Config) -> CheckResult:
    user = config.container.idmap_user
    if config.container.privileged:
        return ok("idmap", "container.privileged is true: no raw.idmap needed")
    try:
        uid, gid = idmap_user_ids(user)
    except KeyError:
        return fail(
            "idmap",
            f"container.idmap_user {user!r} is no user on this host",
            "create the user (systemd/sysusers.d/ghost-buildpackd.conf), or give `uid:gid`",
        )
    if uid == 0 or gid == 0:
        return fail(
            "idmap",
            f"container.idmap_user {user!r} ({uid}:{gid}) is root's: mapped into containers, it would make their "
            "processes root on this host (steps refuse it)",
            "set container.idmap_user to Ghost's user",
        )
    missing = [
        f"root:{value}:1 in {path}" for path, value in ((SUBUID, uid), (SUBGID, gid)) if not _subid_allows(path, value)
    ]
    if missing:
        return fail(
            "idmap",
            f"container.idmap_user {user!r} ({uid}:{gid}) cannot be mapped: missing {' and '.join(missing)}",
            f"echo root:{uid}:1 >> {SUBUID}; echo root:{gid}:1 >> {SUBGID}; then restart LXD",
        )
    return ok("idmap", f"root may map {uid}:{gid} ({user}) into containers ({SUBUID}, {SUBGID})")


def _current_user() -> str:
    # By uid, not $USER: `setpriv`/`runuser` may keep the caller's environment.
    try:
        return f"{pwd.getpwuid(os.getuid()).pw_name} (uid {os.getuid()})"
    except KeyError:
        return f"uid {os.getuid()}"


def writable_dir_check(name: str, path: Path) -> CheckResult:
    """The directory exists and the user running this check can write in it."""
    who = _current_user()
    hint = (
        "run the check as the daemon's user to test what the service sees "
        "(`setpriv --reuid=ghost --regid=ghost --groups=lxd ghost-buildpackd check`)"
    )
    if not path.is_dir():
        return fail(
            name, f"{path} does not exist", f"create it (systemd/tmpfiles.d/ghost-buildpackd.conf) or fix {name}"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        return fail(name, f"{path} is not writable by {who}", f"give the daemon's user write access to {path}; {hint}")
    return ok(name, f"{path} exists and is writable by {who}, the user this check runs as")


def compressor_check(config: Config) -> CheckResult:
    compression = config.container.publish_compression
    if compression == "none":
        return ok("publish compression", "none: images are published uncompressed")
    binary = PUBLISH_COMPRESSORS[compression]
    if not config.lxd.on_this_host:
        return ok("publish compression", f"{compression}: LXD at {config.lxd.endpoint} runs {binary} (not checked)")
    found = shutil.which(binary)
    if not found:
        return fail(
            "publish compression",
            f"container.publish_compression is {compression} but {binary} is not on PATH",
            f"install {binary} (LXD runs it when publishing) or set container.publish_compression: none",
        )
    return ok("publish compression", f"{compression}: {found}")
