"""5. Footprint: the daemon process's resident memory and open file descriptors.

- trivial bodies (no LXD work; intake, records, runner): idle after start, then
  after `footprint_steps` buildimage steps have run;
- production bodies (real LXD): idle after start, then after
  `footprint_real_steps` real deploy steps (batches of 4, `workers: 4`).
"Idle" is read 3 s after `daemon_ready`, "after" 3 s after the last step ended,
so start-up and the last step's transient allocations have settled. RSS is
VmRSS of /proc/<pid>/status; descriptors are the entries of /proc/<pid>/fd.
"""

from __future__ import annotations

import time
from typing import Any

from tests.support.ghost import finish_buildimage, make_app, make_job

from ghost_buildpackd.store import step_id

from .common import Bench, open_fds, rss_mib, running, steps_terminal, table, wait_for
from .deploy import bench_alias, deploy_app
from .throughput import one_round

SETTLE = 3.0  # seconds left to the daemon before a reading: a measurement window, not a wait for a result


def reading(pid: int) -> dict[str, float]:
    time.sleep(SETTLE)
    return {"rss_mib": rss_mib(pid), "fds": open_fds(pid)}


def trivial(bench: Bench, count: int) -> dict[str, Any]:
    db = bench.database("footprint_trivial")
    dirs = bench.ghost_dirs("footprint_trivial")
    app = make_app(db)
    config = bench.write_config(db, dirs, "footprint-trivial", workers=4)
    with running(bench.daemon(config, "footprint-trivial", trivial=True)) as process:
        idle = reading(process.pid)
        wanted = []
        for _ in range(count):
            job = make_job(db, app)
            finish_buildimage(db, job)
            wanted.append(step_id(job, "buildimage"))
        wait_for(lambda: steps_terminal(db, wanted), 600, f"{count} steps", interval=0.2)
        after = reading(process.pid)
        process.terminate()
    return {"bodies": "trivial", "steps": count, "idle": idle, "after": after}


def real(bench: Bench, count: int) -> dict[str, Any]:
    db = bench.database("footprint_real")
    dirs = bench.ghost_dirs("footprint_real")
    alias = bench_alias(bench)
    try:
        app = deploy_app(db, dirs, alias)
        config = bench.write_config(db, dirs, "footprint-real", workers=4)
        with running(bench.daemon(config, "footprint-real", trivial=False)) as process:
            idle = reading(process.pid)
            outcomes = [outcome for _ in range(0, count, 4) for outcome in one_round(db, app, 4)]
            after = reading(process.pid)
            process.terminate()
    finally:
        bench.lxd.delete_alias(alias)
    return {
        "bodies": "production (real LXD deploy steps)",
        "steps": len(outcomes),
        "failed": [outcome for outcome in outcomes if outcome != "succeeded"],
        "idle": idle,
        "after": after,
        "leftover_containers": bench.remove_containers(db),
    }


def run(bench: Bench) -> dict[str, Any]:
    results = [trivial(bench, bench.sizes.footprint_steps), real(bench, bench.sizes.footprint_real_steps)]
    rows = [
        [
            result["bodies"],
            result["steps"],
            f"{result['idle']['rss_mib']:.1f} MiB",
            f"{result['after']['rss_mib']:.1f} MiB",
            f"{result['after']['rss_mib'] / result['idle']['rss_mib']:.2f}x",
            result["idle"]["fds"],
            result["after"]["fds"],
        ]
        for result in results
    ]
    print(
        table(
            "5. Footprint of the daemon process",
            ["bodies", "steps", "RSS idle", "RSS after", "ratio", "fds idle", "fds after"],
            rows,
        )
    )
    return {"definition": __doc__, "results": results}
