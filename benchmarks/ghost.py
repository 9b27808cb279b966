"""7. Prepared before Ghost's request: deploys run by Ghost 19.08's own worker, in poll and change-stream mode.

Definition: an app with three modules, each with a `build_pack` (`echo built`), deployed
by Ghost 19.08's own job body (tests/support/ghost_worker.py: Python 2.7, Ghost's user,
ghost/ghost-19.08.patch applied) against a production daemon (real LXD) with the daemon's
default settings except the database (Ghost's `apitest`), `container.idmap_user` (Ghost's
test user 1001:1002) and JSON logs. Poll mode is the daemon on a standalone mongod
(`events.mode: auto` chooses poll there), change-stream mode the same on a one-node
replica set. Each module's source is a git remote behind a stand-in for ssh that waits
1 s before serving (`core.sshCommand` in Ghost's user's ~/.gitconfig; Ghost's code
unchanged): every connection Ghost's clone makes to the remote takes about 1 s more (a
module's first deploy connects twice, `git clone --mirror` then `git fetch`; later
deploys once).

Per module, from the step record's stamps (`times.requested`, `times.finished`,
`created_at`) and the daemon's log (`container_creating` or `warm_container_taken`: the
launch began or an idle container of the warm pool was taken, the step is `preparing`;
`step_prepared`: the preparation ended, the step `ready` unless Ghost had asked
meanwhile; the record keeps no stamp of those two moves): *prepared* when it was ready
before Ghost's request, *late* when it was preparing when Ghost asked, *not prepared*
when Ghost asked first. `request->outcome` is `times.requested` -> `times.finished` (the
daemon's part); `request->Ghost has it` ends when the installed `ghost-buildpackd` command
Ghost's patch calls returned (the command is wrapped to time its calls). Ghost's job time
is its process from start to end, `started->done` its own stamps (`started_at`, the
`_updated` of `done`). Everything runs on this host: one clock.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from bson import ObjectId
from pymongo.database import Database
from tests.conftest import BASE_IMAGE, WORKING_COPY_IDS, leftover_containers
from tests.support.ghost import b64
from tests.support.ghost_worker import (
    GHOST_DATABASE,
    GHOST_IDS,
    GhostUnavailable,
    GhostWorker,
    ghost_config,
    ghost_runtime,
    ghost_sources,
    patched_ghost_tree,
)
from tests.support.mongo import MongoServer

from ghost_buildpackd.config import EventsConfig
from ghost_buildpackd.lxd import TAG_APP

from .common import Bench, make_ghost_dirs, ms, parse_timestamp, running, summary, table, wait_for
from .deploy import bench_alias

MODES = (("poll", "standalone"), ("change_stream", "replica_set"))  # the daemon's source, the MongoDB it reads
MODULES = ("front", "api", "worker")
BUILD_PACK = "echo built\n"
REMOTE_DELAY_S = 1.0
DEFAULT_EVENTS = EventsConfig()  # the daemon's defaults, which this benchmark runs with
PREPARED, LATE, NOT_PREPARED = "prepared", "late", "not prepared"
CLASSES = (PREPARED, LATE, NOT_PREPARED)
# The daemon's log lines that stamp a deploy step's preparation and run (first one per step is kept).
LOG_EVENTS = (
    "step_claimed",
    "container_creating",
    "warm_container_taken",
    "container_ready",
    "step_prepared",
    "deploy_container_reused",
    "deploy_container_not_prepared",
)
RUN_CLAIMED = "run_claimed"  # the first `step_claimed` of the step as `requested`: the daemon took Ghost's request


# --- counting ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepStamps:
    """When one deploy step moved, epoch seconds (None: it never did)."""

    module: str
    position: int  # 1 for the job's first module: the order Ghost deploys them in
    started: float  # Ghost's job `started_at`
    created: float | None  # the record's `created_at`
    claimed: float | None  # first `step_claimed`
    preparing: float | None  # `container_creating` or `warm_container_taken`: the step was preparing from then on
    launched: float | None  # `container_ready`
    ready: float | None  # `step_prepared`
    requested: float | None  # the record's `times.requested`
    run_claimed: float | None  # first `step_claimed` with state `requested`
    finished: float | None  # the record's `times.finished`
    reused: bool = False  # the run used the prepared container (`deploy_container_reused`)
    warm: bool = False  # the container came from the warm pool (`warm_container_taken`)
    # Ghost's side: its clone's connections to the remote (first start, last end) and its call of the command.
    clone_start: float | None = None
    clone_end: float | None = None
    called: float | None = None  # `ghost-buildpackd buildpack` started
    returned: float | None = None  # ... and exited, the outcome read


def classify(stamps: StepStamps) -> str:
    """PREPARED when the step was ready before Ghost's request, LATE when it was preparing then, else NOT_PREPARED."""
    if stamps.requested is None:
        raise ValueError(f"module {stamps.module}: the step was never requested")
    if stamps.ready is not None and stamps.ready <= stamps.requested:
        return PREPARED
    if stamps.preparing is not None and stamps.preparing <= stamps.requested:
        return LATE
    return NOT_PREPARED


def shares(stamps: Sequence[StepStamps]) -> dict[str, float]:
    """Percent of the steps in each class."""
    counted = [classify(item) for item in stamps]
    return {name: 100.0 * counted.count(name) / len(counted) if counted else float("nan") for name in CLASSES}


def between(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


def spans(stamps: StepStamps) -> dict[str, float | None]:
    """Where a step's time went, seconds: from Ghost's `started` to each move, and the parts between."""
    return {
        "started_to_created": between(stamps.started, stamps.created),
        "created_to_claimed": between(stamps.created, stamps.claimed),
        "claimed_to_launching": between(stamps.claimed, stamps.preparing),
        "launch": between(stamps.preparing, stamps.launched),
        "launched_to_ready": between(stamps.launched, stamps.ready),
        "started_to_ready": between(stamps.started, stamps.ready),
        "started_to_requested": between(stamps.started, stamps.requested),
        "ready_ahead_of_request": between(stamps.ready, stamps.requested),
        "request_to_outcome": between(stamps.requested, stamps.finished),
        "request_to_run_claimed": between(stamps.requested, stamps.run_claimed),
        "run_claimed_to_outcome": between(stamps.run_claimed, stamps.finished),
        "clone": between(stamps.clone_start, stamps.clone_end),
        "clone_to_called": between(stamps.clone_end, stamps.called),
        "called_to_requested": between(stamps.called, stamps.requested),
        "outcome_to_returned": between(stamps.finished, stamps.returned),
        "request_to_returned": between(stamps.requested, stamps.returned),
    }


def stamps_of(
    record: Mapping[str, Any],
    position: int,
    started: float,
    events: Mapping[str, Mapping[str, float]],
    connections: Sequence[Timed],
    call: Timed | None,
) -> StepStamps:
    """A step's stamps from its record, the daemon's log (`events`: event -> step id -> first time), the
    module's connections to the remote during its deploy and Ghost's call of the command."""
    times = record.get("times") or {}
    sid = record["_id"]
    return StepStamps(
        module=record["module"],
        position=position,
        started=started,
        created=epoch(record.get("created_at")),
        claimed=events["step_claimed"].get(sid),
        preparing=earliest(events["container_creating"].get(sid), events["warm_container_taken"].get(sid)),
        launched=events["container_ready"].get(sid),
        ready=events["step_prepared"].get(sid),
        requested=epoch(times.get("requested")),
        run_claimed=events[RUN_CLAIMED].get(sid),
        finished=epoch(times.get("finished")),
        reused=sid in events["deploy_container_reused"],
        warm=sid in events["warm_container_taken"],
        clone_start=min((c.start for c in connections), default=None),
        clone_end=max((c.end for c in connections), default=None),
        called=call.start if call else None,
        returned=call.end if call else None,
    )


def earliest(*times: float | None) -> float | None:
    return min((t for t in times if t is not None), default=None)


def epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def log_objects(text: str) -> tuple[list[dict[str, Any]], int]:
    """The JSON objects of a daemon log, and how many lines held more than one.

    Two threads logging at once (the daemon's own line and a library's through the stdlib handler) can
    glue two objects on one line; reading each object keeps the stamps such a line holds.
    """
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    glued = 0
    for line in text.splitlines():
        at, objects = 0, 0
        while at < len(line):
            try:
                item, at = decoder.raw_decode(line, at)
            except ValueError:
                break
            found.append(item)
            objects += 1
        glued += objects > 1
    return found, glued


def first_times(lines: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """event -> step id -> time of its first line, for LOG_EVENTS and RUN_CLAIMED."""
    found: dict[str, dict[str, float]] = {event: {} for event in (*LOG_EVENTS, RUN_CLAIMED)}
    for line in lines:
        event, sid = line.get("event"), line.get("step")
        if event not in found or not sid:
            continue
        at = parse_timestamp(line["timestamp"])
        found[event].setdefault(sid, at)
        if event == "step_claimed" and line.get("state") == "requested":
            found[RUN_CLAIMED].setdefault(sid, at)
    return found


# --- Ghost's side, timed ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timed:
    """One run of a timed script: start and end (epoch seconds), its arguments."""

    start: float
    end: float
    args: str


def timed_script(path: Path, log: Path, body: str) -> None:
    """A shell script running `body` and appending its start, end and arguments to `log` (writable by Ghost)."""
    path.write_text(
        "#!/bin/sh\n"
        "start=$(date +%s.%N)\n"
        f"{body}\n"
        "status=$?\n"
        f'echo "$start $(date +%s.%N) $*" >> {shlex.quote(str(log))}\n'
        "exit $status\n"
    )
    path.chmod(0o755)
    log.touch()
    os.chown(log, *GHOST_IDS)


def timed_runs(log: Path) -> list[Timed]:
    runs = []
    for line in log.read_text().splitlines():
        start, end, args = [*line.split(" ", 2), ""][:3]
        runs.append(Timed(float(start), float(end), args))
    return runs


def time_the_command(ghost: GhostWorker) -> Path:
    """The installed `ghost-buildpackd` Ghost's patch calls, timed: when Ghost called it and when it returned."""
    command = ghost.opt / "current" / "bin" / "ghost-buildpackd"
    log = ghost.work / "command-calls.log"
    timed_script(command, log, f'{shlex.quote(str(Path(sys.executable).parent / "ghost-buildpackd"))} "$@"')
    return log


def call_of(calls: Sequence[Timed], job_id: ObjectId, module: str) -> Timed | None:
    """Ghost's `buildpack --script build_pack -- JOB MODULE` call for this module of this job."""
    wanted = f"-- {job_id} {module}"
    return next((call for call in calls if call.args.endswith(wanted)), None)


# --- the slow remote -------------------------------------------------------------------------


class SlowRemote:
    """Bare git repositories served over a stand-in for ssh that waits REMOTE_DELAY_S before each connection.

    Ghost clones `ssh://gbp-bench-remote/<path>` with its own `git` commands; `core.sshCommand` in Ghost's
    user's ~/.gitconfig names the stand-in, which sleeps, runs the git command it is given locally (as
    ssh would on the remote) and appends the connection's start and end to its log.
    """

    HOST = "gbp-bench-remote"

    def __init__(self, base: Path, home: Path):
        self.base = base
        self.log = base / "connections.log"
        self.command = base / "slow-ssh"
        base.mkdir(parents=True)
        # ssh.variant simple: git passes the host, then the command to run there.
        timed_script(self.command, self.log, f'sleep {REMOTE_DELAY_S:g}\nsh -c "$2"')
        gitconfig = home / ".gitconfig"
        gitconfig.write_text(f"[core]\n\tsshCommand = {self.command}\n[ssh]\n\tvariant = simple\n")
        os.chown(gitconfig, *GHOST_IDS)

    def repository(self, name: str) -> str:
        """A bare repository with one commit on branch main, readable by Ghost's user; its URL over the stand-in."""
        work = self.base / "sources" / name
        work.mkdir(parents=True)
        (work / "README").write_text(f"{name}\n")
        git = ["git", "-c", "user.name=Bench", "-c", "user.email=bench@example.invalid"]
        subprocess.run([*git, "init", "-q", "-b", "main"], cwd=work, check=True)
        subprocess.run([*git, "add", "."], cwd=work, check=True)
        subprocess.run([*git, "commit", "-q", "-m", "first"], cwd=work, check=True)
        bare = self.base / "repos" / f"{name}.git"
        subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
        subprocess.run(["chown", "-R", "{}:{}".format(*GHOST_IDS), str(bare)], check=True)
        return f"ssh://{self.HOST}{bare}"

    def connections(self) -> list[Timed]:
        """Each connection served; its args: host, then e.g. `git-upload-pack '/path/front.git'`."""
        return timed_runs(self.log)


def connections_of(connections: Sequence[Timed], module: str, began: float, ended: float) -> list[Timed]:
    """The connections to `module`'s repository between `began` and `ended`."""
    return [c for c in connections if f"/{module}.git'" in c.args and began <= c.start <= ended]


# --- one mode ----------------------------------------------------------------------------------


def ghost_app(remote: SlowRemote, alias: str, base_image: str) -> dict[str, Any]:
    """Three modules with a build_pack each, as Ghost's UI posts the app (scripts base64)."""
    return {
        "name": "shop",
        "env": "prod",
        "role": "web",
        "region": "eu-west-1",
        "provider": "aws",
        "instance_type": "t2.micro",
        "vpc_id": "vpc-0bench",
        "build_infos": {
            "source_ami": "ami-0base",
            "subnet_id": "subnet-0bench",
            "ssh_username": "admin",
            "source_container_image": base_image,
            "container_image": alias,
        },
        "env_vars": [],
        "features": [],
        "lifecycle_hooks": {"pre_buildimage": "", "post_buildimage": ""},
        "autoscale": {"name": ""},
        "environment_infos": {"instance_tags": []},
        "modules": [
            {
                "name": name,
                "path": f"/srv/{name}",
                "scope": "code",
                "git_repo": remote.repository(name),
                "uid": WORKING_COPY_IDS[0],
                "gid": WORKING_COPY_IDS[1],
                "build_pack": b64(BUILD_PACK),
            }
            for name in MODULES
        ],
    }


def daemon_config(mongo: MongoServer, dirs: dict[str, Path], path: Path, packer_dir: Path | None = None) -> Path:
    """The daemon's defaults, except the database, the working copies' owner, JSON logs (read back here) and,
    when given, where Ghost's Packer definitions are."""
    ghost_yml = dirs["root"].parent / "ghost-config.yml"
    ghost_yml.write_text(yaml.safe_dump(ghost_config()))
    raw = {
        "mongodb": {"uri": mongo.uri, "database": GHOST_DATABASE},
        "ghost": {**{key: str(dirs[key]) for key in ("root", "log_dir", "provisioner_tree")}, "config": str(ghost_yml)},
        "container": {"idmap_user": "{}:{}".format(*WORKING_COPY_IDS)},
        "log": {"format": "json", "level": "info"},
    }
    if packer_dir is not None:
        raw["ghost"]["packer_dir"] = str(packer_dir)
    path.write_text(yaml.safe_dump(raw))
    return path


def ghost_database(mongo: MongoServer) -> Database:
    """Ghost's database (its name is hard-coded in Ghost), emptied first."""
    if f"{mongo.host}:27017" not in mongo.uri:
        raise RuntimeError(f"Ghost 19.08 reaches MongoDB on port 27017 only; this run's is {mongo.describe()}")
    client = mongo.client()
    client.drop_database(GHOST_DATABASE)
    return client[GHOST_DATABASE]


def one_deploy(bench: Bench, ghost: GhostWorker, app_id: ObjectId) -> dict[str, Any]:
    """Ghost's deploy of every module, to its end; then its containers gone."""
    job_id = ghost.insert_job(app_id, "deploy", modules=[{"name": name} for name in MODULES])
    began = time.time()
    run = ghost.run(job_id)
    ended = time.time()
    if run.job.get("status") != "done":
        raise RuntimeError(f"Ghost's deploy {job_id} ended {run.job.get('status')}:\n{run.output}\n{run.log[-3000:]}")
    wait_for(lambda: not leftover_containers(bench.lxd, ghost.db), 120, "the deploy's containers to go", interval=0.2)
    return {
        "job_id": job_id,
        "began": began,
        "ended": ended,
        "job_s": ended - began,
        "started_to_done_s": run.job["_updated"].timestamp() - run.job["started_at"].timestamp(),
        "started": run.job["started_at"].timestamp(),
    }


def measure(bench: Bench, mode: str, topology: str, alias: str, tree: Path, deploys: int) -> dict[str, Any]:
    mongo = bench.server(topology)
    db = ghost_database(mongo)
    base = bench.scratch / f"ghost_{mode}"
    dirs = make_ghost_dirs(base / "ghost")
    config = daemon_config(mongo, dirs, base / "daemon.yml")
    ghost = ghost_worker(tree, base, dirs, mongo, db, config)
    remote = SlowRemote(base / "remote", ghost.home)
    calls = time_the_command(ghost)
    app_id = None
    try:
        app_id = ghost.insert_app(ghost_app(remote, alias, BASE_IMAGE))
        with running(bench.daemon(config, f"ghost-{mode}", trivial=False)) as process:
            runs = [one_deploy(bench, ghost, app_id) for _ in range(deploys)]
            process.terminate()
        lines, glued = log_objects(process.log_path.read_text(errors="replace"))
        records = {(r["job_id"], r["module"]): r for r in db.container_steps.find({})}
        leftovers = bench.remove_containers(db)
    finally:
        idle_left = remove_app_containers(bench, app_id) if app_id else []
        db.client.drop_database(GHOST_DATABASE)
        db.client.close()
    found = results(mode, mongo, runs, records, lines, remote.connections(), timed_runs(calls), leftovers)
    return {**found, "daemon_log_lines_glued": glued, "warm_pool_containers_left": idle_left}


def ghost_worker(
    tree: Path, base: Path, dirs: dict[str, Path], mongo: MongoServer, db: Database, config: Path, **more: Any
) -> GhostWorker:
    """Ghost's worker for one series: its work under `base`, the ghost directories and database of its daemon."""
    return GhostWorker(
        runtime=ghost_runtime(),
        tree=tree,
        work=base / "ghost-worker",
        ghost_root=dirs["root"],
        log_dir=dirs["log_dir"],
        mongo_host=mongo.host,
        database=db,
        daemon_config=config,
        **more,
    )


def remove_app_containers(bench: Bench, app_id: ObjectId) -> list[str]:
    """Delete containers still tagged with the app once its daemon stopped (its warm pool's, if the stop left
    any; none should remain: say so if some did)."""
    names = [c.name for c in bench.lxd.list_containers() if c.tags.get(TAG_APP) == str(app_id)]
    for name in names:
        bench.lxd.delete_container(name)
    return names


def results(
    mode: str,
    mongo: MongoServer,
    runs: list[dict[str, Any]],
    records: Mapping[tuple[ObjectId, str], Mapping[str, Any]],
    lines: list[dict[str, Any]],
    connections: list[Timed],
    calls: list[Timed],
    leftovers: list[str],
) -> dict[str, Any]:
    events = first_times(lines)
    steps: list[StepStamps] = []
    for run in runs:
        for position, name in enumerate(MODULES, 1):
            record = records.get((run["job_id"], name))
            if record is None:
                raise RuntimeError(f"deploy {run['job_id']}: no step for module {name}")
            served = connections_of(connections, name, run["began"], run["ended"])
            call = call_of(calls, run["job_id"], name)
            steps.append(stamps_of(record, position, run["started"], events, served, call))
    sources = sorted({line["source"] for line in lines if line.get("event") == "catch_up_done"})
    clones = [c.end - c.start for c in connections]
    return {
        "mode": mode,
        "mongodb": mongo.kind,
        "daemon_source": sources,
        "events_defaults": {
            "poll_interval_s": DEFAULT_EVENTS.poll_interval,
            "probe_interval_s": DEFAULT_EVENTS.probe_interval,
        },
        "deploys": len(runs),
        "steps": len(steps),
        "shares_percent": shares(steps),
        "by_position": {
            str(position): {
                "shares_percent": shares([s for s in steps if s.position == position]),
                **span_summaries([s for s in steps if s.position == position]),
            }
            for position in range(1, len(MODULES) + 1)
        },
        **span_summaries(steps),
        "reused_prepared_container": sum(s.reused for s in steps),
        "from_warm_pool": sum(s.warm for s in steps),
        "ghost_job_s": summary([run["job_s"] for run in runs]),
        "ghost_started_to_done_s": summary([run["started_to_done_s"] for run in runs]),
        "remote_connections": len(connections),
        "remote_connection_s": summary(clones),
        "leftover_containers": leftovers,
        "per_step": [{**dataclasses.asdict(s), "class": classify(s)} for s in steps],
        "runs": [{k: (str(v) if k == "job_id" else v) for k, v in run.items()} for run in runs],
    }


def span_summaries(steps: Sequence[StepStamps]) -> dict[str, dict[str, float]]:
    """summary() of each of spans(), over the steps where both ends happened."""
    if not steps:
        return {}
    measured = [spans(s) for s in steps]
    return {key: summary([m[key] for m in measured if m[key] is not None]) for key in measured[0]}


# --- the benchmark -------------------------------------------------------------------------------


def ghost_tree(bench: Bench) -> Path:
    """Ghost's tree with the project's patch, once for the run (both modes, both Ghost benchmarks)."""
    try:
        ghost_runtime()
        sources = ghost_sources()
    except GhostUnavailable as missing:
        raise SystemExit(f"the ghost benchmark needs Ghost 19.08 and its runtime: {missing}") from missing
    tree = bench.scratch / "ghost-tree" / "cloud-deploy"
    if tree.exists():  # made by the other Ghost benchmark of this run
        return tree
    tree.parent.mkdir()
    return patched_ghost_tree(sources, tree)


def p50_max(value: Mapping[str, float]) -> str:
    return f"{ms(value.get('p50'))} / {ms(value.get('max'))}"


def run(bench: Bench) -> dict[str, Any]:
    tree = ghost_tree(bench)
    alias = bench_alias(bench)
    load_before = os.getloadavg()
    try:
        found = [measure(bench, mode, topology, alias, tree, bench.sizes.ghost_deploys) for mode, topology in MODES]
    finally:
        bench.lxd.delete_alias(alias)
    load_after = os.getloadavg()
    print(shares_table(found))
    print(where_time_goes(found))
    print(ghosts_side(found))
    glued = {r["mode"]: r["daemon_log_lines_glued"] for r in found if r["daemon_log_lines_glued"]}
    if glued:
        print(f"   (daemon log lines holding two JSON objects, both read: {glued})")
    print(
        f"   (shared machine: {os.cpu_count()} cores and LXD shared with other engineers' runs; load average "
        f"{' '.join(f'{x:.2f}' for x in load_before)} before, {' '.join(f'{x:.2f}' for x in load_after)} after)"
    )
    return {
        "definition": __doc__,
        "shared_machine_load_average": {"before": load_before, "after": load_after},
        "results": found,
    }


def shares_table(found: list[dict[str, Any]]) -> str:
    defaults = DEFAULT_EVENTS
    title = (
        f"7. Prepared before Ghost's request: Ghost 19.08's worker, {len(MODULES)} modules, build_pack `echo built`,"
        f" git remote {REMOTE_DELAY_S:g} s away (a stand-in for ssh), daemon defaults"
        f" (events.poll_interval {defaults.poll_interval:g}s, probe_interval {defaults.probe_interval:g}s)"
    )
    rows = [
        [
            f"{r['mode']} ({r['mongodb']})",
            r["deploys"],
            r["steps"],
            f"{r['shares_percent'][PREPARED]:.0f}%",
            f"{r['shares_percent'][LATE]:.0f}%",
            f"{r['shares_percent'][NOT_PREPARED]:.0f}%",
            p50_max(r["request_to_outcome"]),
            p50_max(r["request_to_returned"]),
            f"{r['ghost_job_s']['p50']:.1f} / {r['ghost_job_s']['max']:.1f} s",
            f"{r['from_warm_pool']} of {r['steps']}",
        ]
        for r in found
    ]
    header = [
        *["mode", "deploys", "modules", "prepared before request", "late", "not prepared"],
        *["request->outcome p50/max", "request->Ghost has it p50/max", "Ghost job p50/max", "from warm pool"],
    ]
    return table(title, header, rows)


def where_time_goes(found: list[dict[str, Any]]) -> str:
    """The daemon's side: p50 / max of each span per mode and module position (Ghost deploys them in order)."""
    rows = []
    for r in found:
        for position, part in r["by_position"].items():
            share = part["shares_percent"]
            rows.append(
                [
                    r["mode"],
                    f"{position} ({MODULES[int(position) - 1]})",
                    f"{share[PREPARED]:.0f}/{share[LATE]:.0f}/{share[NOT_PREPARED]:.0f}%",
                    p50_max(part["started_to_created"]),
                    p50_max(part["created_to_claimed"]),
                    p50_max(part["launch"]),
                    p50_max(part["started_to_ready"]),
                    p50_max(part["started_to_requested"]),
                    f"{ms(part['ready_ahead_of_request']['p50'])} / {ms(part['ready_ahead_of_request']['min'])}",
                ]
            )
    return table(
        "   the daemon's side, per module position (p50 / max; from Ghost's `started_at`)",
        [
            *["mode", "module", "prep/late/not %", "started->step created", "created->claimed"],
            *["container launch", "started->ready", "started->request", "ready ahead of request p50/min"],
        ],
        rows,
    )


def ghosts_side(found: list[dict[str, Any]]) -> str:
    """Ghost's side: its clone, its call of the command, the wait for the outcome (p50 / max)."""
    rows = [
        [
            r["mode"],
            f"{position} ({MODULES[int(position) - 1]})",
            p50_max(part["clone"]),
            p50_max(part["clone_to_called"]),
            p50_max(part["called_to_requested"]),
            p50_max(part["request_to_run_claimed"]),
            p50_max(part["request_to_outcome"]),
            p50_max(part["outcome_to_returned"]),
        ]
        for r in found
        for position, part in r["by_position"].items()
    ]
    return table(
        "   Ghost's side, per module position (p50 / max)",
        [
            *["mode", "module", "clone (remote connections)", "clone end->command start"],
            *["command start->request", "request->run claimed", "request->outcome", "outcome->command returned"],
        ],
        rows,
    )
