"""`ghost-buildpackd status`: what the daemons are doing, read from MongoDB, and what LXD keeps on purpose.

Daemon instances are those whose heartbeat is recent; the event lag is the
newest job change in the database minus the newest one any live instance has
seen. What LXD holds by design (template containers, `container.templates`)
is listed apart from leftovers when this user may read LXD; without it the
report says so and the rest stands. Human tables by default, `--json` for scripts.

`status --check` is the same reading turned into a verdict for monitoring:
exit 1, naming each problem, when no instance is alive on this host, one of its
loops is crash-looping, stalled or ended (as its heartbeat says), the lag is
over a threshold, or too many steps failed recently.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO, TypeVar

from pymongo.errors import PyMongoError

from .config import Config
from .lxd import Lxd
from .model import ACTIVE, FAILED, Step
from .policy import LIMITS
from .store import Store, redacted_uri, short_error, utcnow
from .upkeep.templates import kept_templates
from .upkeep.warm_pool import idle_containers

# Failed steps `status --check` looks at, at most, within its window.
FAILURES_READ = 1000
LXD_READ_TIMEOUT = 10.0  # seconds: status waits no longer for LXD, whose answer is only a part of the report

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """What `status --check` tolerates."""

    max_lag: float = 300.0  # seconds of event lag
    max_failures: int = 0  # failed steps within `window`
    window: float = 3600.0  # seconds back from now


def _read_mongodb(config: Config, out: TextIO, as_json: bool, read: Callable[[Store], T]) -> T | None:
    """`read(store)`, or None after printing why MongoDB cannot be reached."""
    store = Store.from_uri(config.mongodb.uri, config.mongodb.database, config.mongodb.timeout)
    try:
        store.ping()  # bounded by mongodb.timeout; the calls below retry through outages, this one must not
        return read(store)
    except PyMongoError as error:
        reason = f"cannot reach MongoDB at {redacted_uri(config.mongodb.uri)}: {short_error(error)}"
        if as_json:
            out.write(json.dumps({"error": reason}) + "\n")
        else:
            out.write(f"ghost-buildpackd status: {reason}\n")
        return None
    finally:
        store.db.client.close()


def show_status(config: Config, out: TextIO, as_json: bool, last: int) -> int:
    """Print the status report; 0, or 1 when MongoDB cannot be reached (with the reason)."""
    report = _read_mongodb(
        config, out, as_json, lambda store: collect_status(store, LIMITS.heartbeat_max_age(config), max(0, last))
    )
    if report is None:
        return 1
    report["kept_by_design"] = kept_by_design(config)
    out.write(json.dumps(report, indent=2) + "\n" if as_json else render_text(report))
    return 0


def kept_by_design(config: Config) -> dict[str, Any]:
    """What LXD holds on purpose: the template containers and their images, or why LXD was not read."""
    try:
        lxd = Lxd(dataclasses.replace(config.lxd, timeout=min(config.lxd.timeout, LXD_READ_TIMEOUT)))
        templates = kept_templates(lxd)
        idle = idle_containers(lxd.list_containers())
    except Exception as error:  # no lxd group, LXD away: the MongoDB part of the report stands
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return {"error": f"LXD not read ({reason[:200]}): run as a member of the lxd group to list what it keeps"}
    return {
        "bound": config.container.templates,
        "templates": [
            {
                "name": template.name,
                "image": template.image[:12],
                "image_size": template.image_size,
                "last_used": _iso(datetime.fromtimestamp(template.last_used, UTC)),
                "copies_now": template.copies,
            }
            for template in templates
        ],
        "warm_pool": {
            "per_app": config.container.warm_pool.per_app,
            "max": config.container.warm_pool.max,
            "containers": [
                {"name": c.name, "app_id": c.app_id, "image": c.image[:12], "instance": c.owner, "ready": c.ready}
                for c in idle
            ],
        },
    }


def check_status(config: Config, out: TextIO, as_json: bool, thresholds: Thresholds) -> int:
    """`status --check`: 0 when healthy, 1 naming every problem (or when MongoDB cannot be reached)."""

    def read(store: Store) -> tuple[dict[str, Any], list[Step]]:
        since = utcnow() - timedelta(seconds=thresholds.window)
        finished = store.recent_finished_steps(FAILURES_READ, since=since)
        return collect_status(store, LIMITS.heartbeat_max_age(config), 0), [s for s in finished if s.state == FAILED]

    read_back = _read_mongodb(config, out, as_json, read)
    if read_back is None:
        return 1
    report, failures = read_back
    verdict = judge(report, failures, config.host_name, thresholds)
    if as_json:
        out.write(json.dumps(verdict, indent=2) + "\n")
    elif verdict["problems"]:
        out.write("ghost-buildpackd status --check: FAILED\n" + "".join(f"  {p}\n" for p in verdict["problems"]))
    else:
        out.write(f"ghost-buildpackd status --check: OK ({verdict['summary']})\n")
    return 1 if verdict["problems"] else 0


def judge(report: dict[str, Any], failures: list[Step], host: str, thresholds: Thresholds) -> dict[str, Any]:
    """The verdict of `status --check` on a status report and the window's failed steps."""
    problems = []
    here = [item["id"] for item in report["instances"] if item["host"] == host]
    if not here:
        elsewhere = sorted({str(item["host"]) for item in report["instances"]})
        problems.append(
            f"no live instance on host {host}" + (f" (live on: {', '.join(elsewhere)})" if elsewhere else "")
        )
    for item in report["instances"]:  # a loop crash-looping, stalled or ended, as its last heartbeat said
        if item["host"] == host:
            problems += [f"instance {item['id']}: {problem}" for problem in item.get("loop_problems") or []]
    lag = report["events"]["lag_s"]
    if lag is not None and lag > thresholds.max_lag:
        problems.append(f"event lag {lag:g}s is over --max-lag {thresholds.max_lag:g}s")
    window = _duration(thresholds.window)
    if len(failures) > thresholds.max_failures:
        named = "; ".join(f"{s.id}: {(s.message or '-')[:80]}" for s in failures[:5])
        more = f" and {len(failures) - 5} more" if len(failures) > 5 else ""
        problems.append(
            f"{len(failures)} failed step(s) in the last {window} (over --max-failures {thresholds.max_failures}): "
            f"{named}{more}"
        )
    summary = (
        f"{len(here)} live instance(s) on host {host}, lag {'-' if lag is None else f'{lag:g}s'}, "
        f"{len(failures)} failed step(s) in the last {window}"
    )
    return {
        "ok": not problems,
        "problems": problems,
        "summary": summary,
        "host": host,
        "instances_on_host": here,
        "lag_s": lag,
        "failed_steps": [s.id for s in failures],
    }


# --- collecting -----------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else None


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if not isinstance(start, datetime) or not isinstance(end, datetime):
        return None
    return round((end - start).total_seconds(), 3)


def collect_status(store: Store, max_age: float, last: int) -> dict[str, Any]:
    """The whole report as plain data (what --json prints)."""
    now = utcnow()
    instances = [_instance(doc, now) for doc in store.live_instances(max_age)]
    return {
        "database": store.db.name,
        "generated_at": now.isoformat(),
        "instances": instances,
        "events": _events(store.newest_job_update(), instances),
        "steps_in_flight": [_in_flight(step, now) for step in store.steps_in_states(ACTIVE)],
        "finished_steps": [_finished(step) for step in store.recent_finished_steps(last)] if last else [],
        "images": _images(store),
    }


def _instance(doc: dict[str, Any], now: datetime) -> dict[str, Any]:
    info = doc.get("info") or {}
    return {
        "id": doc["_id"],
        "host": info.get("host"),
        "pid": info.get("pid"),
        "version": info.get("version"),
        "event_mode": info.get("event_mode"),
        "mode_reason": info.get("mode_reason"),
        "started_at": _iso(info.get("started_at")),
        "last_event_at": _iso(info.get("last_event_at")),
        "heartbeat_age_s": _seconds(doc.get("seen_at"), now),
        "steps_in_flight": info.get("steps_in_flight"),
        "loop_problems": list(info.get("loop_problems") or []),
        "_last_event": info.get("last_event_at"),
    }


def _events(newest_job: datetime | None, instances: list[dict[str, Any]]) -> dict[str, Any]:
    seen = [item.pop("_last_event") for item in instances]
    newest_seen = max((value for value in seen if isinstance(value, datetime)), default=None)
    lag = None
    if newest_job is not None and newest_seen is not None:
        lag = max(0.0, round((newest_job - newest_seen).total_seconds(), 3))
    return {
        "modes": sorted({item["event_mode"] for item in instances if item["event_mode"]}),
        "newest_job_change": _iso(newest_job),
        "newest_change_seen": _iso(newest_seen),
        "lag_s": lag,
    }


def _in_flight(step: Step, now: datetime) -> dict[str, Any]:
    expires = step.lease_expires_at
    lease = "none" if step.owner is None else ("expired" if isinstance(expires, datetime) and expires < now else "held")
    return {
        "id": step.id,
        "job_id": str(step.job_id),
        "kind": step.kind,
        "module": step.module,
        "state": step.state,
        "age_s": _seconds(step.started_at or step.created_at, now),
        "owner": step.owner,
        "lease": lease,
        "container": step.container,
        "attempts": step.attempts,
    }


def _finished(step: Step) -> dict[str, Any]:
    return {
        "id": step.id,
        "job_id": str(step.job_id),
        "kind": step.kind,
        "module": step.module,
        "outcome": step.state,
        "duration_s": _seconds(step.started_at or step.created_at, step.finished_at),
        "finished_at": _iso(step.finished_at),
        "exit_code": step.exit_code,
        "message": step.message,
    }


def _images(store: Store) -> dict[str, list[dict[str, Any]]]:
    per_app: dict[str, list[dict[str, Any]]] = {}
    for record in store.image_records():
        per_app.setdefault(record.app_label or str(record.app_id), []).append(
            {
                "alias": record.alias,
                "ami_id": record.ami_id,
                "base_image": record.base_image,
                "size": record.size,
                "created_at": _iso(record.created_at),
            }
        )
    return per_app


# --- rendering --------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _when(iso: str | None) -> str:
    """`2026-01-02T03:04:05.678+00:00` -> `2026-01-02 03:04:05Z` (times are UTC)."""
    return f"{iso[:19].replace('T', ' ')}Z" if iso else "-"


def _size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024  # type: ignore[assignment]
    return str(size)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, two spaces apart."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n" for row in cells)


def _section(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], empty: str) -> str:
    return f"\n{title}\n" + (table(headers, rows) if rows else f"  ({empty})\n")


def render_text(report: dict[str, Any]) -> str:
    events = report["events"]
    lag = "unknown (no live instance has seen a job change)" if events["lag_s"] is None else f"{events['lag_s']:g}s"
    text = f"ghost-buildpackd status (database {report['database']}, {_when(report['generated_at'])})\n"
    text += _section(
        "Daemon instances (live heartbeats)",
        ["INSTANCE", "HOST", "PID", "VERSION", "EVENTS", "HEARTBEAT", "IN FLIGHT"],
        [
            [
                i["id"],
                i["host"],
                i["pid"],
                i["version"],
                f"{i['event_mode']} ({i['mode_reason']})" if i["mode_reason"] else i["event_mode"],
                f"{_duration(i['heartbeat_age_s'])} ago",
                i["steps_in_flight"],
            ]
            for i in report["instances"]
        ],
        "none: no daemon has sent a heartbeat recently",
    )
    text += (
        f"\nEvents: mode {', '.join(events['modes']) or '-'}; newest job change {_when(events['newest_job_change'])}; "
        f"newest seen {_when(events['newest_change_seen'])}; lag {lag}\n"
    )
    text += _section(
        "Steps in flight",
        ["STEP", "STATE", "AGE", "OWNER", "LEASE", "CONTAINER"],
        [
            [s["id"], s["state"], _duration(s["age_s"]), s["owner"], s["lease"], s["container"]]
            for s in report["steps_in_flight"]
        ],
        "none",
    )
    text += _section(
        f"Last {len(report['finished_steps'])} finished steps",
        ["STEP", "OUTCOME", "DURATION", "FINISHED", "EXIT", "MESSAGE"],
        [
            [
                s["id"],
                s["outcome"],
                _duration(s["duration_s"]),
                _when(s["finished_at"]),
                s["exit_code"],
                s["message"][:60],
            ]
            for s in report["finished_steps"]
        ],
        "none",
    )
    rows = [
        [app, image["alias"], image["ami_id"], image["base_image"], _size(image["size"]), _when(image["created_at"])]
        for app, images in sorted(report["images"].items())
        for image in images
    ]
    text += _section("Images per app", ["APP", "ALIAS", "AMI", "BASE", "SIZE", "CREATED"], rows, "none")
    return text + render_kept(report["kept_by_design"])


def render_kept(kept: dict[str, Any]) -> str:
    title = "Kept by design in LXD (template containers: copied for new containers; not leftovers)"
    if "error" in kept:
        return f"\n{title}\n  ({kept['error']})\n"
    rows = [
        [t["name"], t["image"], "gone" if t["image_size"] is None else _size(t["image_size"]), _when(t["last_used"]),
         t["copies_now"]]
        for t in kept["templates"]
    ]  # fmt: skip
    title += f", at most {kept['bound']} (container.templates)"
    text = _section(title, ["TEMPLATE", "IMAGE", "IMAGE SIZE", "LAST USED", "COPIES NOW"], rows, "none")
    warm = kept["warm_pool"]
    title = (
        "Kept by design in LXD (warm pool: idle deploy containers, started ahead, removed at the daemon's stop), "
        f"{warm['per_app']} per app, at most {warm['max']} (container.warm_pool)"
    )
    rows = [
        [c["name"], c["app_id"], c["image"], c["instance"], "ready" if c["ready"] else "being made"]
        for c in warm["containers"]
    ]
    return text + _section(title, ["CONTAINER", "APP", "IMAGE", "INSTANCE", "STATE"], rows, "none")
