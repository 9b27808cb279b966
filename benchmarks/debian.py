"""6. Debian tier (opt-in: `scripts/bench --only debian`): builds and deploys on a real-sized image, per pool.

The image is Debian 12 minbase with bash (scripts/build-debian-image, ~116 MB
unpacked); the pools are LXD's `default` one and each copy-on-write pool
scripts/setup-bench-pools makes (btrfs on a loop file; zfs when the kernel has
it), reached through a profile of the pool's name in `container.profiles`.
Both scripts run first and do nothing when their work exists.

Builds: the daemon (production bodies) builds the app's image after a
`buildimage` job, with a pre and a post hook, publishing without compression;
next to it a minimal pylxd script on the same image and pool: create, start,
the same two hooks, stop, publish (compression none), delete. Phases from the
daemon's log: create+start (`container_creating` -> `container_ready`, with
its readiness probe), hooks (-> `image_publishing`, with pushing the scripts),
publish (-> `container_deleted`, or `container_template_adopted` when the
container is kept as its image's template: stop, publish, alias, delete or keep), total
(`buildimage_started` -> `buildimage_succeeded`, with the record).

Deploys: a buildpack `echo` through the daemon as Ghost drives it, the
request coming as the job starts (nothing hides the preparation) and after a
3 s clone; next to it the minimal pylxd script (create, start, exec,
stop+delete) on the same image and pool, also with the settings the daemon
gives a deploy container (raw.idmap, limits.processes). `prepare` is job start ->
`step_prepared` (absent when the request came first). Disk: three modules
prepared at once, each container's own disk use (dir: `du -sxb` of its
directory; btrfs: the exclusive data of its subvolume, `btrfs filesystem du`,
and how much the pool's use, data and metadata, grew), then the same with
`container.max_prepared: 1`.

Templates (upkeep/templates.py): each pool's series starts with none of the image, so
the first build and the first deploy make theirs (shown apart as "first"); the
p50s are of copies. The templates left at the end and their own disk close
the pool's column.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pylxd
import structlog
from tests.conftest import leftover_containers
from tests.support.ghost import finish_buildimage, make_app, make_job, module_doc, set_status

from ghost_buildpackd.model import READY, SUCCEEDED, step_id
from ghost_buildpackd.upkeep.templates import TAG_TEMPLATE, remove_template

from . import deploy
from .common import REPO, Bench, ms, parse_timestamp, ratio, running, steps_terminal, summary, table, wait_for

IMAGE = "ghost-buildpackd/debian-bench"
PRE_HOOK = "echo gbp-pre; bash -c 'echo bash $BASH_VERSION'; mkdir -p /opt/app; echo built > /opt/app/stamp\n"
POST_HOOK = "echo gbp-post; cat /opt/app/stamp\n"
CLONE_SECONDS = 3.0
DISK_MODULES = 3
LXD_POOLS = Path("/var/lib/lxd/storage-pools")
BUILD_EVENTS = (
    "buildimage_started",
    "container_creating",
    "container_ready",
    "image_publishing",
    "container_deleted",
    "container_template_adopted",
    "buildimage_succeeded",
)


@dataclasses.dataclass(frozen=True)
class Pool:
    name: str
    driver: str
    profiles: tuple[str, ...]  # what `container.profiles` holds to land there


def prepare_host(bench: Bench) -> list[Pool]:
    """The Debian image and the copy-on-write pools, made when missing; the pools to measure, `default` first."""
    subprocess.run([str(REPO / "scripts" / "build-debian-image"), IMAGE], check=True)
    made = subprocess.run(
        [str(REPO / "scripts" / "setup-bench-pools")], check=True, capture_output=True, text=True
    ).stdout.split()
    pools = []
    for profiles in [(), *((name,) for name in made)]:
        found = bench.lxd.root_pool(["default", *profiles])
        if found is None:
            raise SystemExit(f"profiles default {' '.join(profiles)} give containers no root disk")
        pools.append(Pool(found[0], found[1], profiles))
    return pools


def pool_config(pool: Pool, **container: Any) -> dict[str, Any]:
    return {"container": {"profiles": list(pool.profiles), "publish_compression": "none", **container}}


def label_of(pool: Pool, what: str) -> str:
    return f"debian_{what}_{pool.name}".replace("-", "_")


# --- builds ------------------------------------------------------------------------------


def daemon_builds(bench: Bench, pool: Pool, count: int) -> dict[str, Any]:
    label = label_of(pool, "build")
    db = bench.database(label)
    dirs = bench.ghost_dirs(label)
    app = make_app(db, source_container_image=IMAGE, pre_buildimage=PRE_HOOK, post_buildimage=POST_HOOK)
    config = bench.write_config(db, dirs, label, workers=2, **pool_config(pool))
    sids = []
    try:
        with running(bench.daemon(config, label, trivial=False)) as process:
            for _ in range(count):
                job = make_job(db, app)
                finish_buildimage(db, job)
                sid = step_id(job, "buildimage")
                wait_for(lambda sid=sid: steps_terminal(db, [sid]), 900, "the build", interval=0.1)
                record = db.container_steps.find_one({"_id": sid})
                if record["state"] != SUCCEEDED:
                    raise RuntimeError(f"build {sid} ended {record['state']}: {record.get('message')}")
                sids.append(sid)
            process.terminate()
        times = step_event_times(process, BUILD_EVENTS)
        sizes = [doc["size"] for doc in db.container_images.find({})]
    finally:
        bench.remove_images(db)
        bench.remove_containers(db)
    runs = [
        {
            "create_start": times[sid]["container_ready"] - times[sid]["container_creating"],
            "hooks": times[sid]["image_publishing"] - times[sid]["container_ready"],
            "publish_delete": container_gone(times[sid]) - times[sid]["image_publishing"],
            "total": times[sid]["buildimage_succeeded"] - times[sid]["buildimage_started"],
        }
        for sid in sids
    ]
    summaries = {key: summary([run[key] for run in runs]) for key in runs[0]}
    return {**summaries, "image_bytes": max(sizes), "first": runs[0]}


def container_gone(events: dict[str, float]) -> float:
    """When the build's container was deleted or kept as a template, whichever the daemon did."""
    return min(events[name] for name in ("container_deleted", "container_template_adopted") if name in events)


def step_event_times(process: Any, events: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """{step: {event: epoch seconds of its first occurrence}} from the daemon's JSON log."""
    found: dict[str, dict[str, float]] = {}
    for item in process.events():
        if item.get("event") in events and "step" in item:
            found.setdefault(item["step"], {}).setdefault(item["event"], parse_timestamp(item["timestamp"]))
    return found


def minimal_build(pool: Pool, name: str) -> dict[str, float]:
    """create, start, the two hooks, stop, publish (compression none), delete; the image's size."""
    client = pylxd.Client(timeout=900)
    t0 = time.time()
    container = deploy.create_from_alias(client, name, IMAGE, pool.profiles, {})
    fingerprint = None
    try:
        t_created = time.time()
        container.start(wait=True)
        t_started = time.time()
        for hook in (PRE_HOOK, POST_HOOK):
            result = container.execute(["sh", "-c", hook])
            if result.exit_code != 0:
                raise RuntimeError(f"hook in {name} failed: {result.exit_code} {result.stderr!r}")
        t_hooks = time.time()
        container.stop(wait=True)
        response = client.api.images.post(
            json={"public": False, "source": {"type": "instance", "name": name}, "compression_algorithm": "none"}
        )
        operation = client.operations.wait_for_operation(response.json()["operation"])
        fingerprint = operation.metadata["fingerprint"]
    finally:
        if container.status == "Running":
            container.stop(force=True, wait=True)
        container.delete(wait=True)
    t_end = time.time()
    image = client.images.get(fingerprint)
    size = image.size
    image.delete(wait=True)
    return {
        "create": t_created - t0,
        "start": t_started - t_created,
        "create_start": t_started - t0,
        "hooks": t_hooks - t_started,
        "publish_delete": t_end - t_hooks,
        "total": t_end - t0,
        "image_bytes": size,
    }


def minimal_builds(pool: Pool, count: int) -> dict[str, Any]:
    runs = [minimal_build(pool, f"gbp-bench-{os.getpid()}-build-{pool.name}-{i}") for i in range(count)]
    return {key: summary([run[key] for run in runs]) for key in runs[0]}


# --- deploys -----------------------------------------------------------------------------


def daemon_deploys(bench: Bench, pool: Pool, clone: float, count: int, warm: bool = False) -> dict[str, Any]:
    label = label_of(pool, f"deploy_{int(clone)}s" + ("_warm" if warm else ""))
    return deploy.deploys_after_clone(bench, label, IMAGE, clone, count, warm, **pool_config(pool))


def prepared_disk(bench: Bench, pool: Pool, max_prepared: int | None) -> dict[str, Any]:
    """Three modules of one deploy prepared at once: the containers launched ahead and the disk each uses."""
    label = label_of(pool, f"disk_{max_prepared}")
    db = bench.database(label)
    dirs = bench.ghost_dirs(label)
    modules = [f"m{i}" for i in range(DISK_MODULES)]
    app = make_app(db, container_image=IMAGE, modules=[module_doc(m, f"/srv/{m}", deploy.BUILD_PACK) for m in modules])
    config = bench.write_config(db, dirs, label, workers=4, **pool_config(pool, max_prepared=max_prepared))
    sids = []
    try:
        with running(bench.daemon(config, label, trivial=False)) as process:
            before = pool_used(pool)
            job = make_job(db, app, command="deploy", modules=modules)
            set_status(db, job, "started")
            sids = [step_id(job, "deploy", m) for m in modules]
            wait_for(
                lambda: db.container_steps.count_documents({"_id": {"$in": sids}, "state": READY}) == len(sids),
                900,
                "every module prepared",
                interval=0.1,
            )
            names = [doc.get("container") for doc in db.container_steps.find({"_id": {"$in": sids}})]
            launched = [name for name in names if name and bench.lxd.container_status(name) == "Running"]
            used = [container_disk(pool, name) for name in launched]
            grown = pool_used(pool) - before if before is not None else None
            set_status(db, job, "done")
            wait_for(lambda: not leftover_containers(bench.lxd, db), 300, "prepared containers removed", interval=0.1)
            process.terminate()
    finally:
        bench.remove_containers(db)
    return {
        "modules": len(modules),
        "launched": len(launched),
        "bytes_each": used,
        "bytes_total": sum(used),
        "pool_growth_bytes": grown,
    }


def pool_used(pool: Pool) -> int | None:
    """Bytes a btrfs pool uses, data and metadata (only this benchmark uses the pool); None on other drivers."""
    if pool.driver != "btrfs":
        return None
    out = subprocess.run(
        ["btrfs", "filesystem", "usage", "-b", str(LXD_POOLS / pool.name)], check=True, capture_output=True, text=True
    ).stdout
    return next(int(line.split()[1]) for line in out.splitlines() if line.strip().startswith("Used:"))


def container_disk(pool: Pool, name: str) -> int:
    """Bytes the container's own volume uses: shared image extents are not counted on btrfs."""
    path = LXD_POOLS / pool.name / "containers" / name
    if pool.driver == "btrfs":
        out = subprocess.run(
            ["btrfs", "filesystem", "du", "-s", "--raw", str(path)], check=True, capture_output=True, text=True
        ).stdout.splitlines()
        return int(out[-1].split()[1])  # Total, Exclusive, Set shared, Filename
    out = subprocess.run(["du", "-sxb", str(path)], check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def minimal_deploys(pool: Pool, count: int, settings: dict[str, str]) -> dict[str, Any]:
    disk: list[int] = []
    runs = deploy.script_runs(
        f"debian-{pool.name}-{len(settings)}",
        count,
        settings,
        sleep=0,
        warm_up=True,
        image=IMAGE,
        profiles=pool.profiles,
        on_started=lambda name: disk.append(container_disk(pool, name)),
    )
    return {**runs, "container_bytes": max(disk)}


# --- the tier ----------------------------------------------------------------------------


def image_templates(bench: Bench, pool: Pool) -> list[str]:
    """The daemon's template containers of the Debian image on this pool (upkeep/templates.py)."""
    image = bench.lxd.image_by_alias(IMAGE)
    assert image is not None
    on_pool = {path.name for path in (LXD_POOLS / pool.name / "containers").iterdir()}
    templates = [c.name for c in bench.lxd.list_containers() if c.tags.get(TAG_TEMPLATE) == image.fingerprint]
    return [name for name in templates if name in on_pool]


def remove_image_templates(bench: Bench, pool: Pool) -> None:
    """So the first build and the first deploy of the pool's series make their template, as on a new host."""
    for name in image_templates(bench, pool):  # protected: removed as the daemon removes them (holds honoured)
        remove_template(bench.lxd, name, "the benchmark starts the pool's series", structlog.get_logger("bench"))


def measure_pool(bench: Bench, pool: Pool) -> dict[str, Any]:
    sizes = bench.sizes
    print(f"   {pool.name} ({pool.driver}): builds", flush=True)
    result: dict[str, Any] = {"pool": pool.name, "driver": pool.driver, "profiles": list(pool.profiles)}
    remove_image_templates(bench, pool)
    result["build_minimal"] = minimal_builds(pool, sizes.debian_runs)
    result["build_daemon"] = daemon_builds(bench, pool, sizes.debian_runs)
    print(f"   {pool.name} ({pool.driver}): deploys", flush=True)
    result["deploy_minimal"] = minimal_deploys(pool, sizes.debian_runs, {})
    result["deploy_minimal_daemon_settings"] = minimal_deploys(pool, sizes.debian_runs, deploy.DAEMON_SETTINGS)
    result["deploy_at_start"] = daemon_deploys(bench, pool, 0.0, sizes.debian_runs)
    result["deploy_at_start_warm"] = daemon_deploys(bench, pool, 0.0, sizes.debian_runs, warm=True)
    result["deploy_after_clone"] = daemon_deploys(bench, pool, CLONE_SECONDS, sizes.debian_runs)
    print(f"   {pool.name} ({pool.driver}): disk of prepared containers", flush=True)
    result["disk_unbounded"] = prepared_disk(bench, pool, None)
    result["disk_max_prepared_1"] = prepared_disk(bench, pool, 1)
    templates = image_templates(bench, pool)
    result["templates"] = {"count": len(templates), "bytes": sum(container_disk(pool, name) for name in templates)}
    return result


def p50(result: dict[str, Any], *path: str) -> float:
    value: Any = result
    for key in path:
        value = value[key]
    return value["p50"]


def mib(value: float) -> str:
    return f"{value / (1 << 20):.1f} MiB"


def run(bench: Bench) -> dict[str, Any]:
    pools = prepare_host(bench)
    results = [measure_pool(bench, pool) for pool in pools]
    host = deploy.host_runs(bench.sizes.baseline_runs, bench.ghost_dirs("debian_host")["root"])
    heads = [f"{r['pool']} ({r['driver']})" for r in results]
    rows = []

    def row(label: str, cell: Any) -> None:
        rows.append([label, *[cell(r) for r in results]])

    row(
        "build, minimal: create / start",
        lambda r: f"{ms(p50(r, 'build_minimal', 'create'))} / {ms(p50(r, 'build_minimal', 'start'))}",
    )
    phases = (("create_start", "create+start"), ("hooks", "hooks"), ("publish_delete", "publish+delete or keep"))
    for phase, label in phases:
        row(
            f"build, {label}: daemon / minimal",
            lambda r, phase=phase: f"{ms(p50(r, 'build_daemon', phase))} / {ms(p50(r, 'build_minimal', phase))}",
        )
    row(
        "build, total: daemon / minimal (goal <= 1.0x)",
        lambda r: (
            f"{ms(p50(r, 'build_daemon', 'total'))} / {ms(p50(r, 'build_minimal', 'total'))} = "
            + ratio(p50(r, "build_daemon", "total"), p50(r, "build_minimal", "total"))
        ),
    )
    row(
        "build, first of the series (from the image; its template made after its outcome): total",
        lambda r: ms(r["build_daemon"]["first"]["total"]),
    )
    row(
        "image size: daemon / minimal",
        lambda r: f"{mib(r['build_daemon']['image_bytes'])} / {mib(r['build_minimal']['image_bytes']['max'])}",
    )
    row(
        "deploy, minimal: create+start / exec / stop+delete",
        lambda r: " / ".join(ms(p50(r, "deploy_minimal", key)) for key in ("create_start", "exec", "stop_delete")),
    )
    cases = (
        ("deploy_at_start", "request at job start"),
        ("deploy_at_start_warm", "request at job start, warm pool"),
        ("deploy_after_clone", "after a 3 s clone"),
    )
    for case, label in cases:
        row(
            f"deploy, {label}: prepare / req->1st output",
            lambda r, case=case: f"{ms(p50(r, case, 'prepare'))} / {ms(p50(r, case, 'request_to_first_output'))}",
        )
        row(
            f"deploy, {label}: req->outcome vs minimal; over the host path"
            + (" (goal <= 0.2x; <= +0.3 s)" if case.startswith("deploy_at_start") else " (goal <= +0.2 s)"),
            lambda r, case=case: (
                f"{ms(p50(r, case, 'request_to_terminal'))} = "
                + ratio(p50(r, case, "request_to_terminal"), p50(r, "deploy_minimal", "total"))
                + f"; +{ms(p50(r, case, 'request_to_terminal') - host['total']['p50'])}"
            ),
        )
        row(
            f"deploy, {label}: req->deleted vs minimal",
            lambda r, case=case: (
                f"{ms(p50(r, case, 'request_to_container_deleted'))} = "
                + ratio(p50(r, case, "request_to_container_deleted"), p50(r, "deploy_minimal", "total"))
            ),
        )
    row(
        "deploy, request at job start, first (makes the template): prepare / req->outcome",
        lambda r: (
            f"{ms(r['deploy_at_start']['first']['prepare'])} / "
            f"{ms(r['deploy_at_start']['first']['request_to_terminal'])}"
        ),
    )
    row("deploy, minimal total", lambda r: ms(p50(r, "deploy_minimal", "total")))
    row("deploy, Ghost's host path (bash on the host, no container)", lambda r: ms(host["total"]["p50"]))
    row(
        "deploy, minimal with the daemon's settings: create+start / total",
        lambda r: (
            f"{ms(p50(r, 'deploy_minimal_daemon_settings', 'create_start'))} / "
            f"{ms(p50(r, 'deploy_minimal_daemon_settings', 'total'))}"
        ),
    )
    row("disk of one container (minimal)", lambda r: mib(r["deploy_minimal"]["container_bytes"]))
    for key, label in (("disk_unbounded", "no bound"), ("disk_max_prepared_1", "max_prepared: 1")):
        row(
            f"disk, {DISK_MODULES} modules prepared ({label})",
            lambda r, key=key: (
                f"{r[key]['launched']} launched, {mib(r[key]['bytes_total'])}"
                + ("" if r[key]["pool_growth_bytes"] is None else f" (pool +{mib(r[key]['pool_growth_bytes'])})")
            ),
        )
    row("templates of the image kept, disk", lambda r: f"{r['templates']['count']}, {mib(r['templates']['bytes'])}")
    print(table("6. Debian tier: builds and deploys on Debian 12 minbase, per pool (p50)", ["", *heads], rows))
    return {"definition": __doc__, "image": IMAGE, "pools": results, "host_path": host}
