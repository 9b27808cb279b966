"""1. Event latency: from Ghost's status update of a job to a worker taking the step.

Definition: t0 is the wall clock just before Ghost's `update_one` marking a
buildimage job `done` is sent (tests/support/ghost.finish_buildimage, as
Ghost's worker writes it); the end is the timestamp of the daemon's
`step_claimed` log line for that job's step: a worker holds the lease and the
next thing the body does is its first LXD call. The bodies are trivial
(tests/support/trivial_daemon.py, no simulated work), so what is measured is
the intake (change stream or poll query, app lookup, record insert) and the
dispatcher's claim, not LXD. `step_created` is reported too. Same clock: the
daemon runs on this machine.

Jobs arrive one at a time at random gaps (50-250 ms), like a busy Ghost, not
as a burst: queueing is not what this measures.
"""

from __future__ import annotations

import random
import time
from typing import Any

from tests.support.ghost import finish_buildimage, make_app, make_job

from ghost_buildpackd.model import step_id

from .common import Bench, log_times, ms, running, steps_terminal, summary, table, wait_for

MODES = ("change_stream", "poll")


def measure(bench: Bench, mode: str, count: int) -> dict[str, Any]:
    db = bench.database(f"latency_{mode}")
    dirs = bench.ghost_dirs(f"latency_{mode}")
    app = make_app(db)
    config = bench.write_config(db, dirs, f"latency-{mode}", events={"mode": mode}, workers=4)
    rng = random.Random(8)
    sent: dict[str, float] = {}
    with running(bench.daemon(config, f"latency-{mode}", trivial=True)) as process:
        for _ in range(count):
            job = make_job(db, app)
            sent[step_id(job, "buildimage")] = time.time()
            finish_buildimage(db, job)
            time.sleep(rng.uniform(0.05, 0.25))  # arrival gap of the load, not a wait for a result
        wait_for(lambda: steps_terminal(db, sent), 120, f"{count} steps to finish", interval=0.1)
        process.terminate()
    created, claimed = log_times(process, "step_created"), log_times(process, "step_claimed")
    return {
        "mode": mode,
        "jobs": count,
        "poll_interval_s": bench.poll_interval if mode == "poll" else None,
        "to_step_created": summary([created[sid] - t for sid, t in sent.items() if sid in created]),
        "to_step_claimed": summary([claimed[sid] - t for sid, t in sent.items() if sid in claimed]),
    }


def run(bench: Bench) -> dict[str, Any]:
    results = [measure(bench, mode, bench.sizes.latency_jobs) for mode in MODES]
    base = results[0]["to_step_claimed"]["p50"]
    rows = []
    for result in results:
        created, claimed = result["to_step_created"], result["to_step_claimed"]
        label = result["mode"] + (f" (poll every {result['poll_interval_s']:g}s)" if result["poll_interval_s"] else "")
        rows.append(
            [
                label,
                claimed["n"],
                ms(created["p50"]),
                ms(created["p99"]),
                ms(claimed["p50"]),
                ms(claimed["p99"]),
                ms(claimed["max"]),
                f"{claimed['p50'] / base:.1f}x" if base else "-",
            ]
        )
    print(
        table(
            "1. Event latency: job status update -> step record created / step claimed by a worker (trivial bodies)",
            ["mode", "jobs", "created p50", "created p99", "claimed p50", "claimed p99", "claimed max", "vs stream"],
            rows,
        )
    )
    return {"definition": __doc__.split("\n\n")[1].replace("\n", " "), "results": results}
