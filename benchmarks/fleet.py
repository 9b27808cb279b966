"""7. Fleet: `fleet_apps` apps with `fleet_modules` modules each deploying at once on one daemon, `workers: 4`.

Setup: each app has its own name (so its own working copies, owned as Ghost's
clones are) and modules whose build_pack is `echo built > out.txt`; every
app's container image is an alias of the busybox base image. One production
daemon (real LXD) in change-stream mode with the benchmarks' config (the tests'
`raw_config`: their id mapping, `exec_timeout: 60s`, `lease_ttl: 5s`), the
project's default container settings otherwise, and the daemon's default warm
pool (`per_app: 1`, `max: 4`; the tests' config turns it off).

Load: every deploy job is set `started` at once; then one thread per job plays
Ghost's worker: its modules one after the other, each after a 0.5 s "clone",
through `ghost.client.run_buildpack`; the job goes `done` (`failed` at its
first failed module, as Ghost's deploy stops there).

Figures:
- steps terminal / succeeded: the step records at the end (a failed one is
  listed with its message);
- wall: first `started` -> the last `times.finished` of the records (same host
  clock); steps per minute = steps / wall;
- request -> outcome: `times.requested` -> `times.finished` of each record
  (both the server's clock), p50 / p90 / max, over all steps and by module
  (m1 is asked 0.5 s after the start, m4 after three modules of its job);
- job started -> its last outcome: how long each of Ghost's deploys waited
  for its modules, p50 / p90 / max;
- prepared before request: the step's `step_prepared` line in the daemon's log
  (the record keeps no time of `ready`) is earlier than its `times.requested`;
  the log's `deploy_container_reused` / `deploy_container_not_prepared` count
  how each run found its container (a preparation under way at the request is
  reused without having been prepared before it);
- daemon RSS: VmRSS of /proc/<pid>/status sampled every 0.5 s, the peak; CPU:
  the daemon's own utime+stime over the wall (LXD's work is not in it);
- containers: this run's containers in LXD (tagged with one of its jobs, or
  the warm pool's idle ones of its apps), sampled every 0.5 s, the peak;
- disk: the sum of `du -sxb` of this run's containers' directories in the
  pool (sampled every 2 s, the peak; a `dir` pool copies the image into each);
- host memory: MemAvailable of /proc/meminfo, the lowest sample;
- load average at the start and at the end (the machine is shared).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bson import ObjectId
from pymongo.database import Database
from tests.conftest import WORKING_COPY_IDS, idle_containers_of_apps, job_ids
from tests.support.ghost import make_app, make_job, module_doc, set_status

from ghost_buildpackd.config import LxdConfig
from ghost_buildpackd.ghost.client import run_buildpack
from ghost_buildpackd.lxd import TAG_APP, TAG_JOB, Lxd
from ghost_buildpackd.model import READY, SUCCEEDED, TERMINAL, step_id

from .common import Bench, cpu_seconds, log_times, percentile, rss_mib, running, table, wait_for
from .deploy import bench_alias

BUILD_PACK = "echo built > out.txt"
CLONE_SECONDS = 0.5  # Ghost's clone of a module before it asks for the module's buildpack
STEP_TIMEOUT = 1800.0  # the client's wait for one step: a stall shows as a slow figure, not a hang
WORKERS = 4
WARM_POOL = {"per_app": 1, "max": 4}  # the daemon's defaults, said here because the tests' config sets per_app 0
SAMPLE_EVERY = 0.5
DISK_EVERY = 2.0
LXD_POOLS = Path("/var/lib/lxd/storage-pools")
COUNTED_EVENTS = (
    "step_prepared",
    "deploy_container_reused",
    "deploy_container_not_prepared",
    "deploy_container_recreated",
    "deploy_container_recreated_for_new_image",
    "deploy_container_recreated_for_owner",
    "container_copied_from_template",
    "warm_container_ready",
    "warm_container_taken",
    "warm_container_removed",
    "warm_pool_paused_low_memory",
)


def fleet_app(db: Database, root: Path, alias: str, index: int, modules: list[str]) -> ObjectId:
    """An app of its own name, its modules' working copies owned as Ghost's clones are."""
    name = f"fleet{index:03d}"
    docs = [module_doc(module, f"/srv/{module}", BUILD_PACK) for module in modules]
    app = make_app(db, name=name, container_image=alias, modules=docs)
    for module in modules:
        working_copy = root / name / "prod" / "web" / module
        working_copy.mkdir(parents=True)
        os.chown(working_copy, *WORKING_COPY_IDS)
    return app


def ghost_worker(db: Database, job: ObjectId, modules: list[str], outcomes: dict[str, str]) -> None:
    """Ghost's worker for one started deploy job: each module in turn after its clone; the job's end."""
    status = "done"
    for module in modules:
        time.sleep(CLONE_SECONDS)  # the clone: what the daemon's preparation may hide behind
        sid = step_id(job, "deploy", module)
        try:
            result = run_buildpack(db, job, module, timeout=STEP_TIMEOUT)
            outcomes[sid] = result.state if result.state == SUCCEEDED else f"{result.state}: {result.message}"
        except Exception as error:  # a failed step, with the reason
            outcomes[sid] = f"client error: {type(error).__name__}: {error}"
        if outcomes[sid] != SUCCEEDED:
            status = "failed"
            break
    set_status(db, job, status)


class Sampler:
    """The daemon's RSS, this run's containers, their disk and the host's MemAvailable, sampled in threads."""

    def __init__(self, db: Database, pid: int, pool: str):
        self.db, self.pid, self.pool = db, pid, pool
        # A client of its own: pylxd's pool keeps one connection, so threads sharing one make urllib3 warn.
        self.lxd = Lxd(LxdConfig(timeout=60))
        self.rss_peak_mib = 0.0
        self.containers_peak = 0
        self.ready_peak = 0
        self.disk_peak_bytes = 0
        self.disk_peak_containers = 0
        self.disk_samples = 0
        self.mem_available_low = float("inf")
        self.names: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._often, daemon=True), threading.Thread(target=self._disk)]

    def __enter__(self) -> Sampler:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _often(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self.rss_peak_mib = max(self.rss_peak_mib, rss_mib(self.pid))
            self.mem_available_low = min(self.mem_available_low, mem_available_mib())
            self.names = self.run_containers()
            self.containers_peak = max(self.containers_peak, len(self.names))
            self.ready_peak = max(self.ready_peak, self.db.container_steps.count_documents({"state": READY}))

    def _disk(self) -> None:
        while not self._stop.wait(DISK_EVERY):
            names = list(self.names)
            used = directories_bytes([LXD_POOLS / self.pool / "containers" / name for name in names])
            self.disk_samples += 1
            if used > self.disk_peak_bytes:
                self.disk_peak_bytes, self.disk_peak_containers = used, len(names)

    def run_containers(self) -> list[str]:
        """This run's containers: tagged with one of its jobs, or kept idle for one of its apps."""
        jobs = job_ids(self.db)
        apps = {str(doc["_id"]) for doc in self.db.apps.find({}, {"_id": 1})}
        return [
            c.name
            for c in self.lxd.list_containers()
            if c.tags.get(TAG_JOB) in jobs or (c.tags.get(TAG_APP) in apps and TAG_JOB not in c.tags)
        ]


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def directories_bytes(paths: list[Path]) -> int:
    """`du -sxbc` of the directories: a container deleted meanwhile is left out, not an error."""
    if not paths:
        return 0
    out = subprocess.run(["du", "-sxbc", *map(str, paths)], capture_output=True, text=True, check=False).stdout
    totals = [line for line in out.splitlines() if line.endswith("\ttotal")]
    return int(totals[-1].split()[0]) if totals else 0


def step_figures(db: Database, prepared_at: dict[str, float]) -> dict[str, Any]:
    """From the records: outcomes, request -> outcome, and whether the step was prepared before its request."""
    records = list(db.container_steps.find({"kind": "deploy"}))
    terminal = [r for r in records if r["state"] in TERMINAL]
    waits: list[tuple[str, float]] = []
    early = 0
    for record in terminal:
        times = record.get("times") or {}
        requested, finished = times.get("requested"), times.get("finished")
        if requested and finished:
            waits.append((record["module"], (finished - requested).total_seconds()))
        prepared = prepared_at.get(record["_id"])
        if requested and prepared is not None and prepared < requested.timestamp():
            early += 1
    finished_at = [r["times"]["finished"].timestamp() for r in terminal if (r.get("times") or {}).get("finished")]
    jobs_ended: dict[Any, float] = {}
    for record in terminal:
        ended = record["times"]["finished"].timestamp()
        jobs_ended[record["job_id"]] = max(jobs_ended.get(record["job_id"], ended), ended)
    return {
        "records": len(records),
        "terminal": len(terminal),
        "succeeded": sum(r["state"] == SUCCEEDED for r in terminal),
        "not_succeeded": [
            f"{r['_id']} {r['state']}: {r.get('message', '')}" for r in records if r["state"] != SUCCEEDED
        ],
        "request_to_outcome_s": spread([wait for _, wait in waits]),
        "request_to_outcome_by_module_s": {
            module: spread([wait for each, wait in waits if each == module])
            for module in sorted({each for each, _ in waits})
        },
        "job_last_outcomes": sorted(jobs_ended.values()),
        "prepared_before_request": early,
        "last_outcome": max(finished_at, default=float("nan")),
    }


def spread(values: list[float]) -> dict[str, float]:
    """n, p50, p90, max of a list of seconds."""
    return {
        "n": len(values),
        "p50": percentile(values, 0.5),
        "p90": percentile(values, 0.9),
        "max": max(values, default=float("nan")),
    }


def built_working_copies(root: Path) -> int:
    """Working copies where the buildpack left its file: it ran in the mounted clone."""
    return sum(1 for path in root.glob("*/prod/web/*/out.txt") if path.read_text().strip() == "built")


def fleet(bench: Bench, alias: str) -> dict[str, Any]:
    sizes = bench.sizes
    db = bench.database("fleet")
    dirs = bench.ghost_dirs("fleet")
    modules = [f"m{i}" for i in range(1, sizes.fleet_modules + 1)]
    apps = [fleet_app(db, dirs["root"], alias, i, modules) for i in range(sizes.fleet_apps)]
    jobs = [make_job(db, app, command="deploy", modules=modules) for app in apps]
    config = bench.write_config(
        db, dirs, "fleet", workers=WORKERS, events={"mode": "change_stream"}, container={"warm_pool": WARM_POOL}
    )
    pool = (bench.lxd.root_pool(["default"]) or ("default", "dir"))[0]
    outcomes: dict[str, str] = {}
    load_start = os.getloadavg()
    with running(bench.daemon(config, "fleet", trivial=False)) as process:
        with Sampler(db, process.pid, pool) as sampler:
            cpu_before, started = cpu_seconds(process.pid), time.time()
            for job in jobs:
                set_status(db, job, "started")
            threads = [threading.Thread(target=ghost_worker, args=(db, job, modules, outcomes)) for job in jobs]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            cpu = cpu_seconds(process.pid) - cpu_before
            wait_for(lambda: not step_containers(bench, db), 600, "the steps' containers deleted", interval=0.5)
        events = Counter(e.get("event") for e in process.events())
        problems = Counter(
            f"{e.get('level')} {e.get('event')}" for e in process.events() if e.get("level") in ("warning", "error")
        )
        first_problems = first_of_each_problem(process.events())
        prepared_at = log_times(process, "step_prepared")
        process.terminate()
    load_end = os.getloadavg()
    steps = step_figures(db, prepared_at)
    wall = steps["last_outcome"] - started
    steps["job_started_to_last_outcome_s"] = spread([ended - started for ended in steps.pop("job_last_outcomes")])
    idle_left = idle_containers_of_apps(bench.lxd, db)
    for name in idle_left:
        bench.lxd.delete_container(name)
    return {
        "apps": len(apps),
        "modules_per_app": len(modules),
        "workers": WORKERS,
        "warm_pool": WARM_POOL,
        "clone_s": CLONE_SECONDS,
        "steps": len(apps) * len(modules),
        **steps,
        "client_outcomes_not_succeeded": sorted(o for o in outcomes.values() if o != SUCCEEDED),
        "failed": steps["not_succeeded"],
        "working_copies_built": built_working_copies(dirs["root"]),
        "wall_s": wall,
        "steps_per_minute": steps["terminal"] / wall * 60,
        "daemon_rss_peak_mib": sampler.rss_peak_mib,
        "daemon_cpu_seconds": cpu,
        "containers_peak": sampler.containers_peak,
        "ready_steps_peak": sampler.ready_peak,
        "disk_peak_bytes": sampler.disk_peak_bytes,
        "disk_peak_containers": sampler.disk_peak_containers,
        "disk_samples": sampler.disk_samples,
        "disk_measured": f"sum of du -sxb of this run's container directories in pool {pool!r}",
        "mem_available_low_mib": sampler.mem_available_low,
        "load_average_start": load_start,
        "load_average_end": load_end,
        "log_events": {name: events.get(name, 0) for name in COUNTED_EVENTS},
        "log_warnings_errors": dict(problems),
        "log_first_warning_error_of_each": first_problems,
        "leftover_containers": bench.remove_containers(db),
        "leftover_idle_containers": idle_left,
    }


def first_of_each_problem(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The first warning or error line of each event: what a count alone does not say."""
    first: dict[str, dict[str, Any]] = {}
    for event in events:
        if event.get("level") in ("warning", "error"):
            first.setdefault(str(event.get("event")), {k: v for k, v in event.items() if k != "exception"})
    return first


def step_containers(bench: Bench, db: Database) -> list[str]:
    jobs = job_ids(db)
    return [c.name for c in bench.lxd.list_containers() if c.tags.get(TAG_JOB) in jobs]


def run(bench: Bench) -> dict[str, Any]:
    alias = bench_alias(bench)
    try:
        result = fleet(bench, alias)
    finally:
        bench.lxd.delete_alias(alias)
    wait = result["request_to_outcome_s"]
    events = result["log_events"]
    jobs = result["job_started_to_last_outcome_s"]
    rows = [
        ["steps terminal / succeeded", f"{result['terminal']} of {result['steps']} / {result['succeeded']}"],
        ["working copies the buildpack wrote in", result["working_copies_built"]],
        ["wall, first started -> last outcome", f"{result['wall_s']:.1f} s"],
        ["steps per minute", f"{result['steps_per_minute']:.1f}"],
        ["request -> outcome p50 / p90 / max", f"{wait['p50']:.2f} s / {wait['p90']:.2f} s / {wait['max']:.2f} s"],
        *[
            [f"   {module}", f"{by['p50']:.2f} s / {by['p90']:.2f} s / {by['max']:.2f} s"]
            for module, by in result["request_to_outcome_by_module_s"].items()
        ],
        [
            "job started -> its last outcome p50 / p90 / max",
            f"{jobs['p50']:.1f} s / {jobs['p90']:.1f} s / {jobs['max']:.1f} s",
        ],
        [
            "prepared before request",
            f"{result['prepared_before_request'] / result['steps']:.0%} ({result['prepared_before_request']} of"
            f" {result['steps']}); runs reused {events['deploy_container_reused']}, launched"
            f" {events['deploy_container_not_prepared']}",
        ],
        [
            "warm pool: made / taken / removed",
            f"{events['warm_container_ready']} / {events['warm_container_taken']} / {events['warm_container_removed']}",
        ],
        ["daemon RSS peak", f"{result['daemon_rss_peak_mib']:.1f} MiB"],
        [
            "daemon CPU",
            f"{result['daemon_cpu_seconds']:.1f} s ({result['daemon_cpu_seconds'] / result['steps']:.3f} s/step)",
        ],
        ["containers of the run at once, peak", result["containers_peak"]],
        ["steps ready (prepared, not asked) at once, peak", result["ready_steps_peak"]],
        [
            "disk of the run's containers, peak",
            f"{result['disk_peak_bytes'] / 2**20:.1f} MiB in {result['disk_peak_containers']} containers"
            f" ({result['disk_samples']} samples)",
        ],
        ["host MemAvailable, lowest", f"{result['mem_available_low_mib']:.0f} MiB"],
        [
            "load average start -> end",
            " ".join(f"{x:.2f}" for x in result["load_average_start"])
            + " -> "
            + " ".join(f"{x:.2f}" for x in result["load_average_end"]),
        ],
        [
            "containers left (steps / idle)",
            f"{len(result['leftover_containers'])} / {len(result['leftover_idle_containers'])}",
        ],
    ]
    print(
        table(
            f"7. Fleet: {result['apps']} apps x {result['modules_per_app']} modules deploying at once,"
            f" one daemon, workers {WORKERS}, warm pool per_app {WARM_POOL['per_app']} / max {WARM_POOL['max']}",
            ["figure", "value"],
            rows,
        )
    )
    for line in result["failed"][:10]:
        print(f"   not succeeded: {line}")
    if result["log_warnings_errors"]:
        print("   daemon warnings/errors: " + ", ".join(f"{k} x{v}" for k, v in result["log_warnings_errors"].items()))
    for event, line in result["log_first_warning_error_of_each"].items():
        said = line.get("error") or line.get("reason") or ""
        if said:
            print(f"   first {event}: {str(said)[:300]}")
    return {"definition": __doc__, **result}
