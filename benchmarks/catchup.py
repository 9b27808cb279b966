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

What the history adds: start->scan done against the history minus the same
against a history of one qualifying job (a daemon started the same way), next
to one bulk read of the same jobs (`list(jobs.find({}))`, one query, in this
process). Round trips per scanned job are counted with a pymongo
CommandListener on an in-process intake over a copy of the history: one job at
a time (how the scan read before batches, and what a change-stream event still
costs) and in batches (the scan now).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from datetime import timedelta
from typing import Any

from pymongo import monitoring
from pymongo.database import Database
from tests.support.ghost import make_app

from ghost_buildpackd.events import COMMANDS, Intake
from ghost_buildpackd.model import step_id
from ghost_buildpackd.store import Store, utcnow

from .common import Bench, log_times, parse_timestamp, percentile, running, table, wait_for

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


def seeded(bench: Bench, name: str, jobs: int, qualifying: int) -> tuple[Database, list[dict[str, Any]], Any]:
    """A database holding the history (same seed every time) and the checkpoint before it."""
    db = bench.database(name)
    store = Store(db)
    store.ensure_indexes()
    app = make_app(db)
    legacy = make_app(db, name="legacy", source_container_image=None)
    docs = history(app, legacy, jobs, qualifying, random.Random(4))
    db.jobs.insert_many(docs)
    checkpoint = utcnow() - timedelta(minutes=55)
    store.save_stream_checkpoint(None, checkpoint)
    store.save_poll_checkpoint(checkpoint, checkpoint)
    return db, docs, app


def measure(bench: Bench, mode: str, jobs: int, qualifying: int, label: str) -> dict[str, Any]:
    inserted_at = time.monotonic()
    db, docs, app = seeded(bench, f"catchup_{mode}_{label}", jobs, qualifying)
    insert_seconds = time.monotonic() - inserted_at
    dirs = bench.ghost_dirs(f"catchup_{mode}_{label}")
    ids = [doc["_id"] for doc in docs]
    wanted = [
        step_id(job_id, "buildimage")
        for job_id, doc in zip(ids, docs, strict=True)
        if doc["app_id"] == app and doc["command"] == "buildimage" and doc["status"] == "done"
    ]
    config = bench.write_config(db, dirs, f"catchup-{mode}-{label}", events={"mode": mode}, workers=4)
    process = bench.daemon(config, f"catchup-{mode}-{label}", trivial=True)
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
    bulk_read_at = time.monotonic()
    read = len(list(db.jobs.find({})))
    bulk_read_seconds = time.monotonic() - bulk_read_at
    return {
        "mode": mode,
        "jobs": len(docs),
        "bulk_read_s": bulk_read_seconds,
        "bulk_read_jobs": read,
        "qualifying": len(wanted),
        "insert_many_seconds": insert_seconds,
        "steps_created": len([sid for sid in wanted if sid in created]),
        "jobs_read_by_scan": scan.get("jobs_read"),
        "start_to_ready_s": ready - started,
        "start_to_catch_up_done_s": parse_timestamp(scan["timestamp"]) - started if scan else None,
        "start_to_all_steps_s": last_created - started,
    }


class CommandCounter(monitoring.CommandListener):
    """Every command a client sends: one round trip each."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.sent[event.command_name] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def round_trips(bench: Bench, batched: bool) -> dict[str, Any]:
    """Round trips of an in-process intake scanning the history, one job at a time or in batches."""
    label = "batched" if batched else "one_by_one"
    db, _docs, _app = seeded(bench, f"catchup_trips_{label}", bench.sizes.catchup_jobs, bench.sizes.catchup_qualifying)
    since = utcnow() - timedelta(minutes=55)
    counter = CommandCounter()
    client = bench.mongo.client(event_listeners=[counter])
    try:
        store = Store(client[db.name])
        intake = Intake(store, on_new_steps=lambda: None, on_job_ended=lambda _job: None)
        began = time.monotonic()
        if batched:
            scanned = intake.catch_up(since)
        else:
            scanned = 0
            for doc in store.jobs_changed_since(since, COMMANDS):
                intake.handle_job(doc)
                scanned += 1
        seconds = time.monotonic() - began
    finally:
        client.close()
    sent = dict(counter.sent)
    sent.pop("endSessions", None)
    total = sum(sent.values())
    return {"scanned": scanned, "commands": sent, "round_trips": total, "per_job": total / scanned, "seconds": seconds}


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run whose `key` is the median (the lower one of an even count)."""
    return dict(sorted(runs, key=lambda run: run[key])[(len(runs) - 1) // 2])


def run(bench: Bench) -> dict[str, Any]:
    sizes = bench.sizes
    results = []
    for mode in MODES:
        fulls, singles = [], []
        for repeat in range(sizes.catchup_repeats):
            fulls.append(measure(bench, mode, sizes.catchup_jobs, sizes.catchup_qualifying, f"history{repeat}"))
            singles.append(measure(bench, mode, 1, 1, f"single{repeat}"))
        full = median_run(fulls, "start_to_catch_up_done_s")
        single = median_run(singles, "start_to_catch_up_done_s")
        full["runs"] = len(fulls)
        full["single_job_start_to_catch_up_done_s"] = single["start_to_catch_up_done_s"]
        full["added_by_history_s"] = full["start_to_catch_up_done_s"] - single["start_to_catch_up_done_s"]
        full["bulk_read_s"] = percentile([run["bulk_read_s"] for run in fulls], 0.5)
        full["added_vs_bulk_read"] = full["added_by_history_s"] / full["bulk_read_s"]
        results.append(full)
    base = results[0]["start_to_all_steps_s"]
    rows = [
        [
            result["mode"],
            f"{result['jobs']} ({result['qualifying']} qualify)",
            result["jobs_read_by_scan"],
            f"{result['start_to_ready_s']:.2f} s",
            f"{result['start_to_catch_up_done_s']:.2f} s",
            f"{result['start_to_all_steps_s']:.2f} s",
            f"{result['start_to_all_steps_s'] / base:.2f}x",
            f"{result['added_by_history_s']:.2f} s",
            f"{result['bulk_read_s']:.2f} s",
            f"{result['added_vs_bulk_read']:.2f}x (goal <= 3x)",
        ]
        for result in results
    ]
    print(
        table(
            f"4. Catch-up: daemon start against historical jobs (trivial bodies, median of {results[0]['runs']})",
            [
                *["mode", "jobs", "scanned", "start->ready", "start->scan done", "start->all steps", "vs stream"],
                *["added by history", "one bulk read", "added vs bulk read"],
            ],
            rows,
        )
    )
    print(f"   (insert_many of the history took {results[0]['insert_many_seconds']:.2f} s)")
    trips = {label: round_trips(bench, batched) for label, batched in (("one_by_one", False), ("batched", True))}
    print(
        table(
            "   round trips of the scan (in-process intake, pymongo CommandListener)",
            ["scan", "jobs", "round trips", "per job", "commands", "time"],
            [
                [
                    label.replace("_", " "),
                    trip["scanned"],
                    trip["round_trips"],
                    f"{trip['per_job']:.3f}",
                    " ".join(f"{name}:{count}" for name, count in sorted(trip["commands"].items())),
                    f"{trip['seconds']:.2f} s",
                ]
                for label, trip in trips.items()
            ],
        )
    )
    return {"definition": __doc__, "results": results, "round_trips": trips}
