"""4. Catch-up: a daemon starts against a history of Ghost jobs it has not seen.

The history (inserted with one insert_many, `_updated` spread over the last
50 minutes, the checkpoint placed 55 minutes back so the scan covers all of
it): `catchup_qualifying` buildimage jobs `done` on an app with a
`source_container_image` (each needs a step), mixed at random among the rest:
40% deploy jobs `done` (the daemon cancels their leftover steps), 30%
buildimage `done` on an app without container steps, 20% buildimage `failed`,
10% other commands (not in the scanned index range). Trivial bodies: this
measures intake. Times are counted from the daemon process's start (exec) to the
last `step_created` log line, and to the `catch_up_done` line (end of the scan);
the daemon's indexes exist already (as after any earlier start).
"""

from __future__ import annotations

import random
import time
from datetime import timedelta
from typing import Any

from tests.support.ghost import make_app

from ghost_buildpackd.store import Store, step_id, utcnow

from .common import Bench, log_times, parse_timestamp, running, table, wait_for

MODES = ("change_stream", "poll")


def history(app: Any, legacy_app: Any, total: int, qualifying: int, rng: random.Random) -> list[dict[str, Any]]:
    """Ghost-shaped jobs, oldest first; the qualifying ones at random places."""
    kinds = ["qualifying"] * qualifying
    rest = total - qualifying
    kinds += ["deploy_done"] * int(rest * 0.4) + ["legacy_buildimage"] * int(rest * 0.3)
    kinds += ["buildimage_failed"] * int(rest * 0.2)
    kinds += ["other"] * (total - len(kinds))
    rng.shuffle(kinds)
    start = utcnow() - timedelta(minutes=50)
    step = timedelta(minutes=48) / total
    docs = []
    for index, kind in enumerate(kinds):
        command, status, app_id = {
            "qualifying": ("buildimage", "done", app),
            "deploy_done": ("deploy", "done", app),
            "legacy_buildimage": ("buildimage", "done", legacy_app),
            "buildimage_failed": ("buildimage", "failed", app),
            "other": (rng.choice(["executescript", "createinstance", "redeploy"]), "done", app),
        }[kind]
        when = start + step * index
        doc = {
            "command": command,
            "app_id": app_id,
            "status": status,
            "message": "Build image OK: [ami-0123abcd]" if status == "done" and command == "buildimage" else "",
            "user": "history",
            "options": [],
            "_created": when,
            "_updated": when,
        }
        if command == "deploy":
            doc["modules"] = [{"name": "app", "rev": "main"}]
        docs.append(doc)
    return docs


def measure(bench: Bench, mode: str) -> dict[str, Any]:
    sizes = bench.sizes
    db = bench.database(f"catchup_{mode}")
    dirs = bench.ghost_dirs(f"catchup_{mode}")
    store = Store(db)
    store.ensure_indexes()
    app = make_app(db)
    legacy = make_app(db, name="legacy", source_container_image=None)
    docs = history(app, legacy, sizes.catchup_jobs, sizes.catchup_qualifying, random.Random(4))
    inserted_at = time.monotonic()
    ids = db.jobs.insert_many(docs).inserted_ids
    insert_seconds = time.monotonic() - inserted_at
    wanted = [
        step_id(job_id, "buildimage")
        for job_id, doc in zip(ids, docs, strict=True)
        if doc["app_id"] == app and doc["command"] == "buildimage" and doc["status"] == "done"
    ]
    checkpoint = utcnow() - timedelta(minutes=55)
    store.save_stream_checkpoint(None, checkpoint)
    store.save_poll_checkpoint(checkpoint, checkpoint)
    config = bench.write_config(db, dirs, f"catchup-{mode}", events={"mode": mode}, workers=4)
    process = bench.daemon(config, f"catchup-{mode}", trivial=True)
    started = time.time()
    with running(process):
        wait_for(lambda: db.container_steps.count_documents({"_id": {"$in": wanted}}) == len(wanted), 600, "steps")
        # The scan goes on past the last qualifying job: its end is in the log.
        wait_for(lambda: process.saw("catch_up_done", source=mode), 600, "the end of the catch-up scan", interval=0.1)
        process.terminate()
    created = log_times(process, "step_created")
    ready = parse_timestamp(process.saw("daemon_ready")["timestamp"])
    scan = process.saw("catch_up_done", source=mode) or {}
    last_created = max(created[sid] for sid in wanted)
    return {
        "mode": mode,
        "jobs": len(docs),
        "qualifying": len(wanted),
        "insert_many_seconds": insert_seconds,
        "steps_created": len([sid for sid in wanted if sid in created]),
        "jobs_read_by_scan": scan.get("jobs_read"),
        "start_to_ready_s": ready - started,
        "start_to_catch_up_done_s": parse_timestamp(scan["timestamp"]) - started if scan else None,
        "start_to_all_steps_s": last_created - started,
    }


def run(bench: Bench) -> dict[str, Any]:
    results = [measure(bench, mode) for mode in MODES]
    base = results[0]["start_to_all_steps_s"]
    rows = [
        [
            result["mode"],
            f"{result['jobs']} ({result['qualifying']} qualify)",
            result["jobs_read_by_scan"],
            f"{result['start_to_ready_s']:.2f} s",
            "-" if result["start_to_catch_up_done_s"] is None else f"{result['start_to_catch_up_done_s']:.2f} s",
            f"{result['start_to_all_steps_s']:.2f} s",
            f"{result['start_to_all_steps_s'] / base:.2f}x",
        ]
        for result in results
    ]
    print(
        table(
            "4. Catch-up: daemon start against historical jobs (trivial bodies)",
            ["mode", "jobs", "scanned", "start->ready", "start->scan done", "start->all steps", "vs stream"],
            rows,
        )
    )
    print(f"   (insert_many of the history took {results[0]['insert_many_seconds']:.2f} s)")
    return {"definition": __doc__, "results": results}
