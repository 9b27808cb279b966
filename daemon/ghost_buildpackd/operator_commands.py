"""The operator's commands that change the daemon's records: `replay` and `reconcile` (called by cli.py).

Each connects on its own and prints what it did. A running daemon builds what `replay` puts back to
pending; `reconcile` runs one pass of the same reconciler as the daemon's upkeep.
"""

from __future__ import annotations

import sys
from typing import IO, TextIO

from .config import Config
from .daemon import connect_store
from .ghost.fields import BadDocument, parse_object_id
from .lxd import Lxd
from .model import BUILDIMAGE, REQUESTED, Actor, step_id
from .status import table
from .store import Store
from .upkeep.retention import Reconciler, ReconcileReport, describe_error


def replay_job(config: Config, job_id: str, out: IO[str]) -> int:
    """Put a finished buildimage step back to pending so a running daemon builds the image again."""
    try:
        job = parse_object_id(job_id, "JOB_ID")
    except BadDocument as error:
        print(f"ghost-buildpackd replay: {error}", file=out)
        return 2
    store = connect_store(config)
    sid = step_id(job, BUILDIMAGE)
    step = store.get_step(sid)
    if step is None:
        doc = store.get_job(job)
        if doc is None or doc.get("command") != BUILDIMAGE:
            print(f"ghost-buildpackd replay: no buildimage job {job_id}", file=out)
            return 1
        app = store.get_app(doc.get("app_id"))
        app_id = doc.get("app_id") if app else None
        store.create_step(job, BUILDIMAGE, app_id=app_id, state=REQUESTED, actor=Actor.REPLAY)
        print(f"step {sid} created (requested): a running daemon builds the image", file=out)
        return 0
    if not step.terminal:
        print(f"step {sid} is {step.state}: nothing to replay", file=out)
        return 1
    store.reset_step_for_replay(sid)
    print(f"step {sid} was {step.state}; now requested: a running daemon builds the image again", file=out)
    return 0


def format_report(report: ReconcileReport) -> str:
    """The table: app, alias, AMI, live or not, action, reason."""
    header = ("APP", "ALIAS", "AMI", "LIVE", "ACTION", "REASON")
    live = {True: "yes", False: "no", None: "?"}
    rows = [(row.app, row.alias, row.ami, live[row.live], row.action, row.reason) for row in report.rows]
    lines = ["dry run: nothing was changed"] if report.dry_run else []
    lines.append(table(header, rows).rstrip("\n"))
    summary = ", ".join(f"{action}: {count}" for action, count in sorted(report.counts.items())) or "no records"
    lines.append(f"{'would be' if report.dry_run else 'done'}: {summary}")
    return "\n".join(lines)


def reconcile_command(config: Config, out: TextIO, dry_run: bool, app_id: str | None) -> int:
    """`ghost-buildpackd reconcile [--dry-run] [--app APP_ID]`: 0 done, 1 facts unavailable, 2 bad --app."""
    try:
        app = parse_object_id(app_id, "--app") if app_id is not None else None
    except BadDocument as error:
        print(f"ghost-buildpackd reconcile: {error}", file=sys.stderr)
        return 2
    try:
        store = Store.from_uri(config.mongodb.uri, config.mongodb.database, config.mongodb.timeout)
        lxd = Lxd(config.lxd)
    except Exception as error:
        print(f"ghost-buildpackd reconcile: cannot connect: {describe_error(error)}", file=sys.stderr)
        return 1
    report = Reconciler(config, store, lxd).run(app, dry_run=dry_run)
    if report.error:
        print(f"ghost-buildpackd reconcile: nothing changed: {report.error}", file=sys.stderr)
        return 1
    print(format_report(report), file=out)
    return 0
