"""2. Deploy overhead: one trivial buildpack through the daemon, next to the same LXD work done by hand.

Three ways to run `sh -c 'echo gbp-first-output'` in a container of the busybox base image:
- the daemon (production bodies, real LXD), driven as Ghost drives it: the deploy job
  goes `started` (the daemon prepares the container), the working copy exists, then
  Ghost's client `run_buildpack` asks for the buildpack and waits for the outcome;
- a minimal pylxd script: create from alias, start, exec, stop+delete (unprivileged),
  and the same with the container settings the daemon sets (raw.idmap, limits.processes);
- the sequence Ghost's old code used: create (privileged), start, fixed 10 s sleep,
  exec, stop, delete;
- Ghost's host path: the same script run by `bash` on the host in the working copy, as
  Ghost 19.08 runs a buildpack without containers (no isolation: the floor).
The minimal script and Ghost's old sequence use pylxd directly on purpose: they are
the yardsticks, not the daemon.

Daemon figures: `prepare` = job started -> step `ready` (container launched);
`request->first output` = client call -> the buildpack's first line in Ghost's job
log (file watched every 2 ms); `request->terminal` = client call -> the record's
`times.finished` (server clock); `request->client returned` = what Ghost's worker
waits; `request->container deleted` = until the container is gone (the daemon
deletes it after recording the outcome: Ghost does not wait for that);
`daemon total` = prepare + request->terminal (container work without Ghost's
clone time in between); `with deletion` = prepare + request->container deleted,
the same work as the minimal script's.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pylxd
from tests.conftest import BASE_IMAGE, WORKING_COPY_IDS
from tests.support.ghost import make_app, make_job, module_doc, set_status

from ghost_buildpackd.ghost.client import run_buildpack
from ghost_buildpackd.lxd import ContainerSpec
from ghost_buildpackd.model import SUCCEEDED, step_id
from ghost_buildpackd.upkeep.warm_pool import idle_containers

from .common import Bench, FirstLine, log_times, ms, ratio, running, summary, table, wait_for

FIRST_OUTPUT = "gbp-first-output"
BUILD_PACK = f"echo {FIRST_OUTPUT}"
GHOST_OLD_SLEEP = 10.0  # what Ghost's old code slept after starting a container
GHOST_OLD_SETTINGS = {"security.privileged": "true"}
# What the daemon sets on a deploy container (with the config's defaults), built by the daemon's own code.
DAEMON_SETTINGS = ContainerSpec("", "", tags={}, idmap=WORKING_COPY_IDS, processes=2000).lxd_config()
MODES = ("change_stream", "poll")


def bench_alias(bench: Bench) -> str:
    """An alias of the base image for the app's `build_infos.container_image` (deleted at the end)."""
    alias = f"gbp-bench-{os.getpid()}"
    image = bench.lxd.image_by_alias(BASE_IMAGE)
    if image is None:
        raise SystemExit(f"base image {BASE_IMAGE!r} is missing: run scripts/build-base-image")
    bench.lxd.point_alias(alias, image.fingerprint, "ghost-buildpackd benchmark (temporary)")
    return alias


def deploy_app(db: Any, dirs: dict[str, Any], alias: str) -> Any:
    """An app whose image exists, with module `api` and its working copy (owned as Ghost's clones are)."""
    app = make_app(db, container_image=alias, modules=[module_doc("api", "/srv/api", BUILD_PACK)])
    working_copy = dirs["root"] / "shop" / "prod" / "web" / "api"
    working_copy.mkdir(parents=True)
    os.chown(working_copy, *WORKING_COPY_IDS)
    return app


def one_deploy(
    bench: Bench, db: Any, dirs: dict[str, Any], app: Any, clone: float | None = None, process: Any = None
) -> dict[str, float]:
    """Job started -> ready -> client request -> terminal; seconds of each phase.

    With `clone`, the request comes that many seconds after the job started
    (Ghost's clone of the module) whether the step is ready or not, and
    `prepare` is read from the daemon's `step_prepared` log line (`process`).
    """
    job = make_job(db, app, command="deploy", modules=["api"])
    sid = step_id(job, "deploy", "api")
    started = time.time()
    set_status(db, job, "started")
    if clone is None:
        wait_for(lambda: (s := db.container_steps.find_one({"_id": sid})) and s["state"] == "ready", 600, "step ready")
    else:
        time.sleep(clone)  # Ghost cloning the module: what the preparation may hide behind
    ready = time.time()
    with FirstLine(dirs["log_dir"] / f"{job}.txt", FIRST_OUTPUT) as first:
        requested = time.time()
        result = run_buildpack(db, job, "api", timeout=600)
        returned = time.time()
        if result.state != SUCCEEDED:
            set_status(db, job, "failed")
            raise RuntimeError(f"deploy step {sid} ended {result.state}: {result.message}")
        container = db.container_steps.find_one({"_id": sid})["container"]
        wait_for(lambda: bench.lxd.container_status(container) is None, 120, "the container deleted", interval=0.005)
        deleted = time.time()
        wait_for(lambda: first.seen_at is not None, 10, "the first output line in the job log")
    set_status(db, job, "done")
    finished = db.container_steps.find_one({"_id": sid})["times"]["finished"].timestamp()
    prepared = log_times(process, "step_prepared").get(sid) if clone is not None else ready
    return {
        "prepare": (prepared or float("nan")) - started,
        "request_to_first_output": (first.seen_at or float("nan")) - requested,
        "request_to_terminal": finished - requested,
        "request_to_client_returned": returned - requested,
        "request_to_container_deleted": deleted - requested,
        "daemon_total": (ready - started) + (finished - requested),
        "with_deletion": (ready - started) + (deleted - requested),
    }


def deploys_after_clone(
    bench: Bench, label: str, image: str, clone: float, count: int, warm: bool, **overrides: Any
) -> dict[str, Any]:
    """Deploys through the daemon whose request comes `clone` seconds after the job started; with `warm`, a warm
    pool of one idle container for the app, each counted deploy starting once the pool holds it (after a deploy
    of the app, as between two deploys of one app). `overrides`: the daemon's configuration."""
    db = bench.database(label)
    dirs = bench.ghost_dirs(label)
    app = deploy_app(db, dirs, image)
    overrides.setdefault("container", {})["warm_pool"] = {"per_app": 1, "max": 4} if warm else {"per_app": 0}
    config = bench.write_config(db, dirs, label, workers=4, **overrides)
    try:
        with running(bench.daemon(config, label, trivial=False)) as process:
            if warm:
                one_deploy(bench, db, dirs, app, clone=clone, process=process)  # the app is deployed lately
            runs = []
            for _ in range(count):
                if warm:
                    wait_for(lambda: idle_ready(bench, app), 900, "the warm pool's idle container of the app")
                runs.append(one_deploy(bench, db, dirs, app, clone=clone, process=process))
            process.terminate()
    finally:
        bench.remove_containers(db)
    for run in runs:
        run["job_start_to_terminal"] = clone + run["request_to_terminal"]
    summaries = {key: summary([run[key] for run in runs if run[key] == run[key]]) for key in runs[0]}
    return {**summaries, "first": runs[0]}


def idle_ready(bench: Bench, app: Any) -> bool:
    return any(c.ready and c.app_id == str(app) for c in idle_containers(bench.lxd.list_containers()))


def daemon_runs(bench: Bench, mode: str, alias: str, count: int) -> dict[str, Any]:
    db = bench.database(f"deploy_{mode}")
    dirs = bench.ghost_dirs(f"deploy_{mode}")
    app = deploy_app(db, dirs, alias)
    config = bench.write_config(db, dirs, f"deploy-{mode}", events={"mode": mode}, workers=4)
    runs = []
    with running(bench.daemon(config, f"deploy-{mode}", trivial=False)) as process:
        one_deploy(bench, db, dirs, app)  # warm-up (first connections, first idmap of the image), not counted
        runs = [one_deploy(bench, db, dirs, app) for _ in range(count)]
        process.terminate()
    leftovers = bench.remove_containers(db)
    return {
        "mode": mode,
        "poll_interval_s": bench.poll_interval if mode == "poll" else None,
        "leftover_containers": leftovers,
        **{key: summary([run[key] for run in runs]) for key in runs[0]},
    }


def quiet_pylxd_teardown(args: Any) -> None:
    """pylxd's `execute` (the yardsticks only) leaves a websocket manager thread failing on its closed poller."""
    if getattr(args.thread, "name", "") == "WebSocketManager" and isinstance(args.exc_value, ValueError):
        return
    threading.__excepthook__(args)


def create_from_alias(
    client: pylxd.Client, name: str, image: str, profiles: tuple[str, ...], config: dict[str, str]
) -> Any:
    """The yardsticks' container: from an image alias, with the `default` profile then `profiles`."""
    return client.instances.create(
        {
            "name": name,
            "type": "container",
            "source": {"type": "image", "alias": image},
            "config": config,
            "profiles": ["default", *profiles],
        },
        wait=True,
    )


def pylxd_sequence(
    name: str,
    config: dict[str, str],
    sleep: float,
    image: str = BASE_IMAGE,
    profiles: tuple[str, ...] = (),
    on_started: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """create from alias, start, [sleep], exec, stop, delete: seconds of each part.

    `on_started` (not timed) sees the container's name once it runs, e.g. to measure its disk.
    """
    client = pylxd.Client(timeout=600)
    t0 = time.time()
    container = create_from_alias(client, name, image, profiles, config)
    try:
        container.start(wait=True)
        t_started = time.time()
        if sleep:
            time.sleep(sleep)  # Ghost's old fixed wait after start: the behaviour being measured
        t_exec = time.time()
        result = container.execute(["sh", "-c", BUILD_PACK])
        t_ran = time.time()
        if result.exit_code != 0 or FIRST_OUTPUT not in result.stdout:
            raise RuntimeError(f"exec in {name} failed: {result.exit_code} {result.stderr!r}")
        if on_started is not None:
            on_started(name)
        t_resumed = time.time()
    finally:
        container.stop(force=True, wait=True)
        container.delete(wait=True)
    t_end = time.time()
    return {
        "create_start": t_started - t0,
        "exec": t_ran - t_exec,
        "stop_delete": t_end - t_resumed,
        "total": t_end - t0 - (t_resumed - t_ran),  # without the time `on_started` took
    }


def script_runs(
    label: str, count: int, config: dict[str, str], sleep: float, warm_up: bool, **where: Any
) -> dict[str, Any]:
    """`count` runs of the sequence (after one not counted with `warm_up`); `where`: image, profiles, on_started."""
    runs = [
        pylxd_sequence(f"gbp-bench-{os.getpid()}-{label}-{i}", config, sleep, **where) for i in range(count + warm_up)
    ]
    runs = runs[1:] if warm_up else runs
    return {key: summary([run[key] for run in runs]) for key in runs[0]}


def host_runs(count: int, workdir: Path) -> dict[str, Any]:
    """Ghost's host path: `bash` runs the buildpack in the working copy, as Ghost 19.08 without containers."""
    script = workdir / "build_pack"
    script.write_text(BUILD_PACK + "\n")
    runs = []
    for _ in range(count):
        t0 = time.time()
        result = subprocess.run(["bash", str(script)], cwd=workdir, capture_output=True, text=True, check=False)
        runs.append({"total": time.time() - t0})
        if result.returncode != 0 or FIRST_OUTPUT not in result.stdout:
            raise RuntimeError(f"the host path failed: {result.returncode} {result.stderr!r}")
    return {"total": summary([run["total"] for run in runs])}


def run(bench: Bench) -> dict[str, Any]:
    sizes = bench.sizes
    alias = bench_alias(bench)
    try:
        daemons = [daemon_runs(bench, mode, alias, sizes.deploys_per_mode) for mode in MODES]
        at_start = [
            {
                "mode": mode,
                "warm_pool": warm,
                **deploys_after_clone(
                    bench, f"at_start_{mode}_{warm}", alias, 0.0, sizes.deploys_per_mode, warm, events={"mode": mode}
                ),
            }
            for mode in MODES
            for warm in (False, True)
        ]
    finally:
        bench.lxd.delete_alias(alias)
    threading.excepthook = quiet_pylxd_teardown
    minimal = script_runs("minimal", sizes.baseline_runs, {}, sleep=0, warm_up=True)
    # The same with the container settings the daemon uses (id mapping of the working copy's owner, limits):
    # tells what the settings cost apart from what the daemon does around them.
    settings = script_runs("settings", sizes.baseline_runs, DAEMON_SETTINGS, sleep=0, warm_up=True)
    ghost_old = script_runs("ghost-old", sizes.ghost_old_runs, GHOST_OLD_SETTINGS, GHOST_OLD_SLEEP, warm_up=False)
    host = host_runs(sizes.baseline_runs, bench.ghost_dirs("deploy_host")["root"])
    base = minimal["total"]["p50"]
    base_run = minimal["exec"]["p50"] + minimal["stop_delete"]["p50"]
    rows = [
        ["minimal pylxd (create, start, exec, delete)", minimal["total"]["n"], *["-"] * 5, ms(base), "1.00x"],
    ]
    for result in daemons:
        label = (
            "daemon, "
            + result["mode"]
            + (f" (poll {result['poll_interval_s']:g}s)" if result["poll_interval_s"] else "")
        )
        rows.append(
            [
                label,
                result["prepare"]["n"],
                ms(result["prepare"]["p50"]),
                ms(result["request_to_first_output"]["p50"]),
                ms(result["request_to_terminal"]["p50"]),
                ms(result["request_to_client_returned"]["p50"]),
                ms(result["request_to_container_deleted"]["p50"]),
                ms(result["daemon_total"]["p50"]),
                ratio(result["daemon_total"]["p50"], base),
            ]
        )
    rows.append(
        [
            "Ghost's old sequence (privileged, 10 s sleep)",
            ghost_old["total"]["n"],
            *["-"] * 5,
            ms(ghost_old["total"]["p50"]),
            ratio(ghost_old["total"]["p50"], base),
        ]
    )
    print(
        table(
            "2. Deploy overhead, buildpack `echo` in the busybox image (p50)",
            [
                *["run", "n", "prepare", "req->1st output", "req->terminal"],
                *["req->client", "req->deleted", "total", "vs minimal"],
            ],
            rows,
        )
    )
    parts = [
        [
            "minimal, daemon's settings (raw.idmap, limits)",
            ms(settings["create_start"]["p50"]),
            ms(settings["exec"]["p50"]),
            ms(settings["stop_delete"]["p50"]),
        ],
        [
            "minimal pylxd",
            ms(minimal["create_start"]["p50"]),
            ms(minimal["exec"]["p50"]),
            ms(minimal["stop_delete"]["p50"]),
        ],
        [
            "Ghost's old sequence",
            ms(ghost_old["create_start"]["p50"]),
            ms(ghost_old["exec"]["p50"]),
            ms(ghost_old["stop_delete"]["p50"]),
        ],
    ]
    print(
        table(
            "   yardsticks by part (p50; Ghost's old adds its 10 s sleep)",
            ["run", "create+start", "exec", "stop+delete"],
            parts,
        )
    )
    targets = [
        [
            result["mode"],
            f"{result['request_to_client_returned']['p50'] - host['total']['p50']:+.2f} s"
            f" (host path {ms(host['total']['p50'])})",
            ratio(result["request_to_terminal"]["p50"], base_run),
            f"{(result['daemon_total']['p50'] / base - 1) * 100:+.0f}% (target <= +10%)",
            f"{(result['with_deletion']['p50'] / base - 1) * 100:+.0f}%",
            f"{ms(result['request_to_first_output']['p50'])} / p99 {ms(result['request_to_first_output']['p99'])}"
            " (target < 300 ms)",
        ]
        for result in daemons
    ]
    print(
        table(
            "   targets",
            [
                "mode",
                "req->client vs Ghost's host path",
                "req->terminal vs minimal exec+delete",
                "daemon total vs minimal",
                "with deletion vs minimal",
                "req->1st output p50",
            ],
            targets,
        )
    )
    print(
        table(
            "   request as the job starts (nothing hides the preparation), without and with the warm pool (p50)",
            ["mode", "warm pool", "n", "req->1st output", "req->terminal", "vs minimal", "over Ghost's host path"],
            [
                [
                    result["mode"],
                    "on" if result["warm_pool"] else "off",
                    result["request_to_terminal"]["n"],
                    ms(result["request_to_first_output"]["p50"]),
                    ms(result["request_to_terminal"]["p50"]),
                    ratio(result["request_to_terminal"]["p50"], base) + " (goal <= 0.2x)",
                    f"{result['request_to_terminal']['p50'] - host['total']['p50']:+.2f} s (goal <= +0.3 s)",
                ]
                for result in at_start
            ],
        )
    )
    return {
        "definition": __doc__,
        "daemon": daemons,
        "request_at_job_start": at_start,
        "minimal_pylxd": minimal,
        "minimal_pylxd_daemon_settings": settings,
        "ghost_old": ghost_old,
        "ghost_host_path": host,
    }
