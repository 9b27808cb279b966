"""8. The container build behind Packer: Ghost 19.08's own buildimage job, with the build run ahead and without.

Definition: Ghost 19.08's buildimage job body (tests/support/ghost_worker.py: Python 2.7, Ghost's user,
ghost/ghost-19.08.patch applied) against a production daemon (real LXD, the busybox base image, a
one-node replica set) with the daemon's defaults except the database, `container.idmap_user` and
JSON logs. Packer is stood in for by a wait of `PACKER_S` after Ghost wrote the job's Packer definition
where Ghost writes it (tests/support/ghost_driver.py); the app's pre_buildimage hook stands in for a
features install (`HOOK_S` of work). Three series, side by side, `runs` jobs each:

- `no container`: the app uses no container (no `source_container_image`): Ghost's job without a
  container build, the baseline;
- `after the AMI`: the daemon does not see Ghost's Packer definitions (`ghost.packer_dir` elsewhere), so
  it builds once Ghost's command asks, after the AMI, as before this change;
- `ahead of the AMI`: the daemon's default: the build runs while Packer runs, the AMI only publishes.

Per job: Ghost's process time. *Added* is a series' p50 minus the baseline's p50: the time the container
build adds to Ghost's buildimage job (goal: at most 2 s when Packer takes longer than the build).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

from bson import ObjectId
from tests.conftest import BASE_IMAGE
from tests.support.ghost import b64
from tests.support.ghost_worker import GHOST_DATABASE

from .common import Bench, make_ghost_dirs, running
from .ghost import (
    SlowRemote,
    daemon_config,
    ghost_app,
    ghost_database,
    ghost_tree,
    ghost_worker,
    remove_app_containers,
)

PACKER_S = 12.0  # the stand-in of Packer's run: longer than the container build
HOOK_S = 4  # the pre_buildimage hook's work: a stand-in for salt or ansible
HOOK = f"echo installing; sleep {HOOK_S}; echo installed > /installed\n"
SERIES = ("no container", "after the AMI", "ahead of the AMI")


def buildimage_app(remote: SlowRemote, series: str) -> dict[str, Any]:
    app = ghost_app(remote, "", BASE_IMAGE)
    app["build_infos"].pop("container_image")
    if series == "no container":
        app["build_infos"]["source_container_image"] = ""  # Ghost's UI: "Don't use containers"
    app["lifecycle_hooks"] = {"pre_buildimage": b64(HOOK), "post_buildimage": ""}
    return app


def measure(bench: Bench, series: str, tree: Path, runs: int) -> dict[str, Any]:
    mongo = bench.server("replica_set")
    db = ghost_database(mongo)
    base = bench.scratch / f"ghost_buildimage_{series.replace(' ', '_')}"
    dirs = make_ghost_dirs(base / "ghost")
    seen = base / "packer" if series == "ahead of the AMI" else base / "packer-not-seen"
    seen.mkdir(parents=True)
    config = daemon_config(mongo, dirs, base / "daemon.yml", packer_dir=seen)
    ghost = ghost_worker(tree, base, dirs, mongo, db, config, packer=base / "packer")
    ghost.packer_seconds = PACKER_S
    app_id: ObjectId | None = None
    jobs = []
    try:
        app_id = ghost.insert_app(buildimage_app(SlowRemote(base / "remote", ghost.home), series))
        with running(bench.daemon(config, f"ghost-buildimage-{series}", trivial=False)) as process:
            for _ in range(runs):
                job_id = ghost.insert_job(app_id, "buildimage", options=["True"])
                began = time.monotonic()
                run = ghost.run(job_id)
                jobs.append({"job_s": time.monotonic() - began, "status": run.job.get("status")})
                if run.job.get("status") != "done":
                    raise RuntimeError(f"{series}: Ghost's buildimage job ended {run.job.get('status')}: {run.log}")
            process.terminate()
        built_ahead = process.log_path.read_text(errors="replace").count('"event": "buildimage_ahead_adopted"')
        bench.remove_containers(db)
        images = [image for image in bench.lxd.list_images() if image.properties.get("ghost.app_id") == str(app_id)]
        for image in images:
            bench.lxd.delete_image(image.fingerprint)
    finally:
        if app_id is not None:
            remove_app_containers(bench, app_id)
        db.client.drop_database(GHOST_DATABASE)
        db.client.close()
    times = [job["job_s"] for job in jobs]
    return {"series": series, "jobs": jobs, "job_p50_s": statistics.median(times), "built_ahead": built_ahead}


def run(bench: Bench) -> dict[str, Any]:
    tree = ghost_tree(bench)
    runs = max(2, bench.sizes.ghost_deploys)
    load_before = os.getloadavg()
    found = [measure(bench, series, tree, runs) for series in SERIES]
    load_after = os.getloadavg()
    baseline = found[0]["job_p50_s"]
    print(f"8. Ghost's buildimage job, Packer {PACKER_S:g} s, a {HOOK_S} s hook ({runs} jobs per series, p50)")
    print(f"   {'series':<18} {'job':>8} {'added':>8}  built ahead")
    for result in found:
        result["added_s"] = result["job_p50_s"] - baseline
        print(
            f"   {result['series']:<18} {result['job_p50_s']:>7.2f}s {result['added_s']:>+7.2f}s  "
            f"{result['built_ahead']} of {len(result['jobs'])}"
        )
    print(f"   (load average {' '.join(f'{x:.2f}' for x in load_before)} before, "
          f"{' '.join(f'{x:.2f}' for x in load_after)} after)")  # fmt: skip
    return {
        "definition": __doc__,
        "packer_s": PACKER_S,
        "hook_s": HOOK_S,
        "shared_machine_load_average": {"before": load_before, "after": load_after},
        "results": found,
    }
