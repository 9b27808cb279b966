"""3. Throughput: 1, 2, 4, 8 deploy steps in parallel, `workers` set to match.

Each round starts N deploy jobs at once; for each, as soon as its container is
prepared (`ready`), Ghost's client asks for the buildpack (`echo`) and waits.
Rounds follow each other until the level has run `throughput_steps` steps
(rounded up to whole rounds). Steps per minute = steps / wall time of all rounds
(job started -> every step terminal, prepare included). CPU seconds are the
daemon process's own utime+stime over the same window (/proc/<pid>/stat):
LXD's own work is not in it.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from tests.support.ghost import make_job, set_status

from ghost_buildpackd.ghost.client import run_buildpack
from ghost_buildpackd.model import SUCCEEDED, step_id

from .common import Bench, cpu_seconds, running, table, wait_for
from .deploy import bench_alias, deploy_app

LEVELS = (1, 2, 4, 8)


def deploy_and_request(db: Any, job: Any, outcomes: list[str]) -> None:
    """Ghost's worker for one job: start the deploy, then ask for the buildpack once the container is ready."""
    sid = step_id(job, "deploy", "api")
    set_status(db, job, "started")
    try:
        wait_for(lambda: (s := db.container_steps.find_one({"_id": sid})) and s["state"] == "ready", 120, "ready")
        result = run_buildpack(db, job, "api", timeout=120)
        outcomes.append(result.state if result.state == SUCCEEDED else f"{sid} {result.state}: {result.message}")
    except Exception as error:  # counted as a failed step, with the reason
        step = db.container_steps.find_one({"_id": sid}) or {}
        outcomes.append(f"{sid}: {error}; record: {step.get('state')} {step.get('message')!r}")
    set_status(db, job, "done")


def one_round(db: Any, app: Any, parallel: int) -> list[str]:
    jobs = [make_job(db, app, command="deploy", modules=["api"]) for _ in range(parallel)]
    outcomes: list[str] = []
    threads = [threading.Thread(target=deploy_and_request, args=(db, job, outcomes)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def level(bench: Bench, alias: str, parallel: int) -> dict[str, Any]:
    db = bench.database(f"throughput_{parallel}")
    dirs = bench.ghost_dirs(f"throughput_{parallel}")
    app = deploy_app(db, dirs, alias)
    config = bench.write_config(db, dirs, f"throughput-{parallel}", workers=parallel)
    rounds = math.ceil(bench.sizes.throughput_steps / parallel)
    with running(bench.daemon(config, f"throughput-{parallel}", trivial=False)) as process:
        one_round(db, app, 1)  # warm-up, not counted
        cpu_before, started = cpu_seconds(process.pid), time.monotonic()
        outcomes = [outcome for _ in range(rounds) for outcome in one_round(db, app, parallel)]
        elapsed, cpu = time.monotonic() - started, cpu_seconds(process.pid) - cpu_before
        process.terminate()
    failures = [outcome for outcome in outcomes if outcome != SUCCEEDED]
    return {
        "parallel": parallel,
        "workers": parallel,
        "steps": len(outcomes),
        "failed": failures,
        "seconds": elapsed,
        "steps_per_minute": len(outcomes) / elapsed * 60,
        "daemon_cpu_seconds": cpu,
        "daemon_cpu_seconds_per_step": cpu / len(outcomes),
        "leftover_containers": bench.remove_containers(db),
    }


def run(bench: Bench) -> dict[str, Any]:
    alias = bench_alias(bench)
    try:
        results = [level(bench, alias, parallel) for parallel in LEVELS]
    finally:
        bench.lxd.delete_alias(alias)
    base = results[0]["steps_per_minute"]
    rows = [
        [
            result["parallel"],
            result["steps"],
            len(result["failed"]),
            f"{result['seconds']:.1f} s",
            f"{result['steps_per_minute']:.1f}",
            f"{result['steps_per_minute'] / base:.2f}x",
            f"{result['daemon_cpu_seconds']:.2f} s",
            f"{result['daemon_cpu_seconds_per_step'] * 1000:.0f} ms",
        ]
        for result in results
    ]
    print(
        table(
            "3. Throughput: deploy steps in parallel (workers = parallel), real LXD",
            ["parallel", "steps", "failed", "wall", "steps/min", "vs 1", "daemon CPU", "CPU/step"],
            rows,
        )
    )
    return {"definition": __doc__, "results": results}
