"""5. Footprint: the daemon process's resident memory and open file descriptors.

- trivial bodies (no LXD work; intake, records, runner): idle after start, then
  after `footprint_steps` buildimage steps have run;
- production bodies (real LXD): idle after start, then after
  `footprint_real_steps` real deploy steps (batches of 4, `workers: 4`).
Trivial bodies run in both event modes. "Idle" is read 3 s after `daemon_ready`,
"after" 3 s after the last step ended, so start-up and the last step's transient
allocations have settled; the CPU share is read over the 5 s that follow. RSS is
VmRSS of /proc/<pid>/status; descriptors are the entries of /proc/<pid>/fd;
CPU is the daemon's own utime+stime (MongoDB's and LXD's are not in it).
"""

from __future__ import annotations

import time
from typing import Any

from tests.support.ghost import finish_buildimage, make_app, make_job

from ghost_buildpackd.model import step_id

from .common import Bench, cpu_seconds, open_fds, rss_mib, running, steps_terminal, table, wait_for
from .deploy import bench_alias, deploy_app
from .throughput import one_round

SETTLE = 3.0  # seconds left to the daemon before a reading: a measurement window, not a wait for a result
CPU_WINDOW = 5.0  # seconds over which the CPU share of a quiet daemon is read


def reading(pid: int) -> dict[str, float]:
    """RSS and descriptors after SETTLE quiet seconds, and the CPU share the daemon used in the CPU_WINDOW after."""
    time.sleep(SETTLE)
    cpu = cpu_seconds(pid)
    time.sleep(CPU_WINDOW)
    used = cpu_seconds(pid) - cpu
    return {"rss_mib": rss_mib(pid), "fds": open_fds(pid), "idle_cpu_percent": used / CPU_WINDOW * 100}


def trivial(bench: Bench, count: int, mode: str) -> dict[str, Any]:
    db = bench.database(f"footprint_trivial_{mode}")
    dirs = bench.ghost_dirs(f"footprint_trivial_{mode}")
    app = make_app(db)
    config = bench.write_config(db, dirs, f"footprint-trivial-{mode}", workers=4, events={"mode": mode})
    with running(bench.daemon(config, f"footprint-trivial-{mode}", trivial=True)) as process:
        idle = reading(process.pid)
        wanted = []
        for _ in range(count):
            job = make_job(db, app)
            finish_buildimage(db, job)
            wanted.append(step_id(job, "buildimage"))
        wait_for(lambda: steps_terminal(db, wanted), 600, f"{count} steps", interval=0.2)
        after = reading(process.pid)
        process.terminate()
    return {"bodies": f"trivial, {mode}", "steps": count, "idle": idle, "after": after}


def real(bench: Bench, count: int) -> dict[str, Any]:
    db = bench.database("footprint_real")
    dirs = bench.ghost_dirs("footprint_real")
    alias = bench_alias(bench)
    try:
        app = deploy_app(db, dirs, alias)
        config = bench.write_config(db, dirs, "footprint-real", workers=4, events={"mode": "change_stream"})
        with running(bench.daemon(config, "footprint-real", trivial=False)) as process:
            idle = reading(process.pid)
            outcomes: list[str] = []
            fds_by_steps = {0: idle["fds"]}  # descriptors after each batch: growth that levels off is pooling
            for _ in range(0, count, 4):
                outcomes += one_round(db, app, 4)
                fds_by_steps[len(outcomes)] = open_fds(process.pid)
            after = reading(process.pid)
            process.terminate()
    finally:
        bench.lxd.delete_alias(alias)
    return {
        "bodies": "production, change_stream (real LXD deploys)",
        "steps": len(outcomes),
        "failed": [outcome for outcome in outcomes if outcome != "succeeded"],
        "idle": idle,
        "after": after,
        "fds_by_steps": fds_by_steps,
        "leftover_containers": bench.remove_containers(db),
    }


def run(bench: Bench) -> dict[str, Any]:
    steps = bench.sizes.footprint_steps
    results = [trivial(bench, steps, "change_stream"), trivial(bench, steps, "poll")]
    results.append(real(bench, bench.sizes.footprint_real_steps))
    rows = [
        [
            result["bodies"],
            result["steps"],
            f"{result['idle']['rss_mib']:.1f} MiB",
            f"{result['after']['rss_mib']:.1f} MiB",
            f"{result['after']['rss_mib'] / result['idle']['rss_mib']:.2f}x",
            result["idle"]["fds"],
            result["after"]["fds"],
            f"{result['idle']['idle_cpu_percent']:.1f}%",
            f"{result['after']['idle_cpu_percent']:.1f}%",
        ]
        for result in results
    ]
    print(
        table(
            "5. Footprint of the daemon process",
            ["bodies", "steps", "RSS idle", "RSS after", "ratio", "fds idle", "fds after", "CPU idle", "CPU after"],
            rows,
        )
    )
    series = results[2].get("fds_by_steps", {})
    print("   descriptors of the production daemon after n steps: " + ", ".join(f"{n}: {f}" for n, f in series.items()))
    return {"definition": __doc__, "results": results}
