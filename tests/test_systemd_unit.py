"""The unit under a real systemd: a Debian 12 system container installed as docs/install.md says.

The container (scripts/build-systemd-image) runs systemd as PID 1 and has no network: Python
packages come as a wheelhouse made on this host, LXD is this host's through a unix-socket proxy
device, MongoDB the test session's through a tcp proxy device. Shows that `systemctl start`
returns at READY, the watchdog is fed, a SIGKILLed daemon is restarted, `systemctl stop` lets a
running step finish, nothing outside ReadWritePaths is writable, and reports the unit's
`systemd-analyze security` exposure. Under load (a build and three deploys in flight, Ghost's commands
waiting in the container): `systemctl restart`, an upgrade through scripts/install and a rollback each
give every command its outcome, run each script once and leave no container or image behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

import pytest
from bson import ObjectId
from pymongo.database import Database

from ghost_buildpackd.lxd import IMAGE_PROP_JOB, Lxd
from ghost_buildpackd.model import DEPLOY, REQUESTED, RUNNING, SUCCEEDED, step_id
from ghost_buildpackd.store import Store
from tests.conftest import WORKING_COPY_IDS, leftover_containers
from tests.support.ghost import finish_buildimage, make_app, make_job, module_doc
from tests.support.mongo import MongoServer
from tests.support.steps import state_of, terminal_step
from tests.support.system_container import ROOT, SystemContainer, checkout_files, ensure_image
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.lxd, pytest.mark.mongodb]

UNIT = "ghost-buildpackd"
LXD_SOCKET = "/var/lib/lxd/unix.socket"
CLI = "/opt/ghost-buildpackd/current/bin/ghost-buildpackd"
# docs/install.md's way to run a command as the service
AS_GHOST = ["setpriv", "--reuid=ghost", "--regid=ghost", "--groups=lxd"]


def timed(phases: dict[str, float], name: str, started: float) -> None:
    phases[name] = round(time.monotonic() - started, 1)


def config_yml(database: str, extra: str = "", container_extra: str = "", shutdown_grace: str = "60s") -> str:
    return f"""\
mongodb:
  uri_file: /etc/ghost-buildpackd/mongodb-uri
  database: {database}
  timeout: 5s
lxd:
  endpoint: unix:{LXD_SOCKET}
events:
  poll_interval: 500ms
container:
  # Host ids the host's LXD may map (scripts/setup-lxd): this LXD is the host's, not the container's.
  idmap_user: "1001:1002"
  exec_timeout: 2m
{container_extra}metrics:
  listen: 127.0.0.1:9469
log:
  level: debug
lease_ttl: 10s
shutdown_grace: {shutdown_grace}
{extra}"""


@pytest.fixture
def system(mongo: MongoServer, lxd: Lxd, tmp_path: Path) -> Iterator[SystemContainer]:
    ensure_image()
    container = SystemContainer(f"gbp-systemd-{os.getpid()}")
    try:
        yield container.launch()
    finally:
        container.delete()


@pytest.fixture
def privileged_system(mongo: MongoServer, lxd: Lxd, tmp_path: Path) -> Iterator[SystemContainer]:
    """The same system container, privileged: host directories inside keep their owners (working copies)."""
    ensure_image()
    container = SystemContainer(f"gbp-systemd-p-{os.getpid()}", privileged=True)
    try:
        yield container.launch()
    finally:
        container.delete()


INSTALL = ["/root/ghost-buildpackd/scripts/install", "--wheelhouse", "/root/wheels", "--lxd-socket", LXD_SOCKET]


def push_checkout_and_wheelhouse(system: SystemContainer, tmp_path: Path) -> None:
    """This checkout at /root/ghost-buildpackd and a wheelhouse made on this host at /root/wheels."""
    wheels = tmp_path / "wheels"
    subprocess.run([ROOT / "scripts/wheelhouse", wheels], check=True, capture_output=True, timeout=900)
    system.push_tree(ROOT, checkout_files(), "/root/ghost-buildpackd")
    system.push_tree(wheels, sorted(p.name for p in wheels.iterdir()), "/root/wheels")


def mongo_address(mongo: MongoServer) -> tuple[str, int]:
    mongo_url = urlparse(mongo.uri)
    if "," in (mongo_url.netloc or ""):
        pytest.skip("the container reaches one MongoDB host through one proxy device")
    return mongo_url.hostname or "127.0.0.1", mongo_url.port or 27017


def connect_and_configure(
    system: SystemContainer, mongo: MongoServer, db: Database, extra: str = "", container_extra: str = "", **more: str
) -> None:
    """The host's LXD and the session's MongoDB through proxy devices; credentials, config.yml and Ghost's
    config.yml as docs/install.md says."""
    mongo_host, mongo_port = mongo_address(mongo)
    lxd_gid = system.run("getent", "group", "lxd").stdout.split(":")[2]
    system.run("mkdir", "-p", os.path.dirname(LXD_SOCKET))
    system.add_proxy("lxd", f"unix:{LXD_SOCKET}", f"unix:{LXD_SOCKET}", uid="0", gid=lxd_gid, mode="0660")
    system.add_proxy("mongodb", "tcp:127.0.0.1:27017", f"tcp:{mongo_host}:{mongo_port}")

    # Ghost's database has its collections (the store fixture made jobs); this host's LXD (the one
    # the container reaches) may map the working-copy owner of config_yml: the container's idmap files say so too.
    system.run("sh", "-c", "echo root:1001:1 >> /etc/subuid; echo root:1002:1 >> /etc/subgid")

    # --- docs/install.md: credentials in one file, the configuration, `check` as the service's user ----------
    # One member through one proxy: a direct connection (the member's own name does not resolve inside).
    uri = "mongodb://127.0.0.1:27017/?directConnection=true"
    # As docs/install.md writes them, by a shell in the container (lxc exec's own stdin is not readable as
    # /dev/stdin there).
    system.run("bash", "-c", f"install -m 640 -g ghost /dev/stdin /etc/ghost-buildpackd/mongodb-uri <<< '{uri}'")
    system.run("bash", "-c", "install -m 640 -g ghost /dev/stdin /etc/ghost-buildpackd/config.yml <<'YAML'\n"
               f"{config_yml(db.name, extra, container_extra, **more)}YAML\n")  # fmt: skip
    # Ghost's own config.yml at its default place, as a Ghost with containers has it (the daemon's switch).
    system.run("sh", "-c", "mkdir -p /usr/local/share/ghost && printf 'container:\\n  enabled: true\\n' "
               "> /usr/local/share/ghost/config.yml")  # fmt: skip


def test_unit_under_systemd(
    system: SystemContainer,
    mongo: MongoServer,
    db: Database,
    store: Store,
    base_image: str,
    published_aliases: list[str],
    tmp_path: Path,
) -> None:
    phases: dict[str, float] = {}
    mongo_address(mongo)

    # --- docs/install.md: on a host without PyPI, a wheelhouse made elsewhere, then scripts/install ----------
    started = time.monotonic()
    push_checkout_and_wheelhouse(system, tmp_path)
    timed(phases, "wheelhouse and copy", started)

    started = time.monotonic()
    first = system.run(*INSTALL)
    assert "installing ghost-buildpackd" in first.stderr
    timed(phases, "scripts/install", started)
    again = system.run(*INSTALL)  # idempotent: nothing is rebuilt or overwritten
    assert "up to date" in again.stderr and "present, left as it is" in again.stderr
    version_dir = system.run("readlink", "/opt/ghost-buildpackd/current").stdout.strip()
    assert re.fullmatch(r"/opt/ghost-buildpackd/\d+\.\d+\.\d+\S*", version_dir), version_dir
    assert "lxd" not in system.run("id", "-nG", "ghost").stdout.split()  # the unit's SupplementaryGroups only

    app = make_app(db, source_container_image=base_image, pre_buildimage="echo started; sleep 5; echo finished")
    connect_and_configure(system, mongo, db)
    check = system.run(*AS_GHOST, CLI, "check", check=False)
    assert check.returncode == 0, check.stdout + check.stderr

    # --- `systemctl start` returns at READY: the instance is connected and recorded by then ----------
    started = time.monotonic()
    system.run("systemctl", "enable", "--now", UNIT)
    timed(phases, "systemctl start (to READY)", started)
    [instance] = store.live_instances(60)
    assert instance["info"]["host"] == system.run("hostname").stdout.strip()
    shown = system.show(UNIT, "ActiveState", "SubState", "MainPID", "NRestarts")
    assert (shown["ActiveState"], shown["SubState"], shown["NRestarts"]) == ("active", "running", "0")
    assert instance["info"]["pid"] == int(shown["MainPID"])

    # --- journald: levels become priorities; the daemon's answers on its metrics listener -----------
    journal = [json.loads(line) for line in system.run("journalctl", "-u", UNIT, "-o", "json").stdout.splitlines()]
    ready = [entry for entry in journal if '"event": "daemon_ready"' in str(entry.get("MESSAGE"))]
    assert [(e["PRIORITY"], e["MESSAGE"][0]) for e in ready] == [("6", "{")], ready
    probe = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9469{}', timeout=10).read().decode())"
    assert system.run("python3", "-c", probe.format("/readyz")).stdout.strip() == '{"status": "ok"}'
    assert system.run("python3", "-c", probe.format("/healthz")).stdout.strip() == '{"status": "ok"}'
    assert 'ghost_buildpackd_up{system="lxd"} 1.0' in system.run("python3", "-c", probe.format("/metrics")).stdout
    status_check = system.run(*AS_GHOST, CLI, "status", "--check", check=False)
    assert status_check.returncode == 0, status_check.stdout + status_check.stderr

    # --- the watchdog is fed: systemd records each WATCHDOG=1 ------------------------------------
    first_ping = system.show(UNIT, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
    assert system.show(UNIT, "WatchdogUSec")["WatchdogUSec"] in ("1min", "60s", "60000000")
    wait_until(
        lambda: system.show(UNIT, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"] != first_ping,
        30,
        "a newer watchdog ping",
        interval=0.5,
    )

    # --- hardening: the running service's own mount namespace is read-only outside ReadWritePaths ----
    pid = system.show(UNIT, "MainPID")["MainPID"]
    for path in ("/usr/probe", "/etc/probe", "/opt/ghost-buildpackd/probe", "/var/lib/probe", "/tmp/probe"):
        refused = system.run("nsenter", "-t", pid, "-m", "touch", path, check=False)
        assert refused.returncode != 0 and "Read-only file system" in refused.stderr, (path, refused.stderr)
    for path in ("/ghost/probe", "/var/log/ghost/probe"):
        system.run("nsenter", "-t", pid, "-m", "sh", "-c", f"touch {path} && rm {path}")
    hidden = system.run("nsenter", "-t", pid, "-m", "ls", "/root/ghost-buildpackd", check=False)
    assert hidden.returncode != 0  # ProtectHome: /root is not there for the service
    security = system.run("systemd-analyze", "security", "--no-pager", f"{UNIT}.service").stdout
    [score_line] = [line for line in security.splitlines() if "Overall exposure level" in line]
    score = float(re.search(r"level for \S+: (\d+\.\d+)", score_line).group(1))  # type: ignore[union-attr]
    print(f"\nsystemd-analyze security: {score_line.strip()}")

    # --- SIGKILL: systemd restarts the daemon ------------------------------------------------
    started = time.monotonic()
    system.run("systemctl", "kill", "-s", "SIGKILL", UNIT)
    system.wait_for(UNIT, 60, ActiveState="active", SubState="running", NRestarts="1")
    assert system.show(UNIT, "MainPID")["MainPID"] != pid
    timed(phases, "restart after SIGKILL", started)

    # --- `systemctl stop` drains: a step running at stop finishes within shutdown_grace ---------------
    job = make_job(db, app)
    published_aliases.append(str(job))
    finish_buildimage(db, job)
    sid = step_id(job, "buildimage")
    wait_until(lambda: state_of(store, sid) == RUNNING, 60, "the build running", interval=0.2)
    started = time.monotonic()
    system.run("systemctl", "stop", UNIT)
    timed(phases, "systemctl stop (draining one step)", started)
    step = terminal_step(store, sid)
    assert step is not None and step.state == SUCCEEDED, step
    shown = system.show(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert shown == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    messages = system.run("journalctl", "-u", UNIT, "-o", "cat").stdout
    stopping = [json.loads(line[line.index("{") :]) for line in messages.splitlines() if "daemon_stopping" in line]
    assert stopping[-1]["steps_in_flight"] == [sid]
    assert '"event": "daemon_stopped"' in messages
    outputs = [json.loads(line) for line in messages.splitlines() if '"event": "output"' in line]
    assert {(o["line"], o["job_id"], o["level"]) for o in outputs} >= {("finished", str(job), "debug")}

    print("systemd unit test phases (s): " + ", ".join(f"{name} {seconds}" for name, seconds in phases.items()))
    assert score < 5.0, score_line  # systemd's scale: below 5 is "OK" or better


# --- restart, upgrade and rollback under load ------------------------------------------------------

MODULES = ("api", "web", "worker")
GO = "go"  # the file the scripts wait for: created once the daemon is stopping, so every step is in flight then
# How long the steps stay in flight once the daemon is stopping: past the heartbeat's age limit (30 s) and a
# client's look at it (every 5 s), so a stopping daemon whose heartbeats ended would be taken for dead.
HOLD = 40.0
WAIT_FOR_GO = f"while [ ! -e {GO} ]; do sleep 0.2; done"
DEPLOY_SCRIPT = f"{WAIT_FOR_GO}; echo ran >> ran.log"  # its visible effect: one line in the working copy per run
BUILD_HOOK = f"cd /srv/salt && {WAIT_FOR_GO}; echo built"  # the job's provisioner tree, mounted at /srv/salt


@dataclasses.dataclass
class Load:
    """One build and three deploys in flight, each with Ghost's command waiting for its outcome."""

    build_job: ObjectId
    deploy_job: ObjectId
    working_copies: dict[str, Path]
    provisioner_tree: Path
    commands: dict[str, subprocess.Popen[str]]

    def all_waiting(self) -> bool:
        """True while every command waits; fails naming those that ended, with their output."""
        ended = {name: command for name, command in self.commands.items() if command.poll() is not None}
        assert not ended, {name: (c.returncode, c.communicate()) for name, c in ended.items()}
        return True

    def go(self) -> None:
        for path in (*self.working_copies.values(), self.provisioner_tree):
            (path / GO).touch()

    def outcomes(self, timeout: float) -> dict[str, tuple[int, str]]:
        deadline = time.monotonic() + timeout
        found = {}
        for name, command in self.commands.items():
            out, err = command.communicate(timeout=max(1.0, deadline - time.monotonic()))
            found[name] = (command.returncode, (out + err).strip())
        return found


def second_version(tmp_path: Path) -> tuple[Path, str]:
    """This checkout with its version's last number raised, as a newer release would be."""
    tree = tmp_path / "second-version"
    for name in checkout_files():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    pyproject = tree / "pyproject.toml"
    text = pyproject.read_text()
    current = re.search(r'^version = "(\d+)\.(\d+)\.(\d+)"$', text, re.MULTILINE)
    assert current is not None
    major, minor, patch = current.groups()
    version = f"{major}.{minor}.{int(patch) + 1}"
    pyproject.write_text(text.replace(current.group(0), f'version = "{version}"'))
    return tree, version


def put_load(
    system: SystemContainer, db: Database, store: Store, ghost: dict[str, Path], builder: ObjectId, phase: str
) -> Load:
    """A build running, two deploys running and one requested (three workers), all waiting for GO."""
    app = make_app(
        db,
        name=f"shop{phase}",
        container_image=load_image(db, builder),
        modules=[module_doc(module, f"/srv/{module}", DEPLOY_SCRIPT) for module in MODULES],
    )
    working_copies = {}
    for module in MODULES:
        path = ghost["root"] / f"shop{phase}" / "prod" / "web" / module
        path.mkdir(parents=True)
        os.chown(path, *WORKING_COPY_IDS)
        working_copies[module] = path
    build = make_job(db, builder, status="started")
    tree = ghost["provisioner_tree"] / f"salt-{build}"
    tree.mkdir()
    commands = {"build": system.popen(*AS_GHOST, CLI, "buildimage", str(build))}
    wait_until(lambda: state_of(store, step_id(build, "buildimage")) == RUNNING, 120, f"{phase}: the build running")
    deploy = make_job(db, app, command="deploy", status="started", modules=list(MODULES))
    for module in MODULES:
        commands[module] = system.popen(*AS_GHOST, CLI, "buildpack", str(deploy), module)
    wait_until(
        lambda: (
            sorted(state_of(store, step_id(deploy, DEPLOY, m)) or "" for m in MODULES) == [REQUESTED, RUNNING, RUNNING]
        ),
        120,
        f"{phase}: two deploys running, one requested",
        interval=0.2,
    )
    return Load(build, deploy, working_copies, tree, commands)


def load_image(db: Database, builder: ObjectId) -> str:
    """The image deploys run: the builder app's last one (set by the first build)."""
    return db.apps.find_one({"_id": builder})["build_infos"]["container_image"]


def disrupt_under_load(system: SystemContainer, load: Load, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run `argv` in the container (it restarts the unit); once the daemon is stopping, let the steps finish."""
    before = system.show(UNIT, "MainPID")["MainPID"]
    command = system.popen(*argv)
    wait_until(
        lambda: system.show(UNIT, "ActiveState")["ActiveState"] == "deactivating" or command.poll() is not None,
        600,
        f"{' '.join(argv)}: the daemon stopping",
        interval=0.2,
    )
    stopping_since = time.monotonic()
    wait_until(
        lambda: time.monotonic() - stopping_since > HOLD and load.all_waiting(),
        HOLD + 10,
        f"{HOLD:g}s of stopping with every command still waiting",
        interval=1,
    )
    load.go()
    out, err = command.communicate(timeout=600)
    assert command.returncode == 0, out + err
    assert system.show(UNIT, "MainPID")["MainPID"] != before
    return subprocess.CompletedProcess(argv, 0, out, err)


def gaps_between_instances(messages: str) -> list[float]:
    """Seconds from each `daemon_stopped` to the next `daemon_ready`: what a waiting client's restart grace covers."""
    events = [json.loads(line[line.index("{") :]) for line in messages.splitlines() if '"event": "daemon_' in line]
    gaps, stopped = [], None
    for event in events:
        at = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
        if event["event"] == "daemon_stopped":
            stopped = at
        elif event["event"] == "daemon_ready" and stopped is not None:
            gaps.append(round((at - stopped).total_seconds(), 1))
            stopped = None
    return gaps


def daemon_version(store: Store, host: str) -> str:
    [instance] = [doc for doc in store.live_instances(60) if doc["info"]["host"] == host]
    return instance["info"]["version"]


def test_restart_upgrade_and_rollback_under_load(
    privileged_system: SystemContainer,
    mongo: MongoServer,
    db: Database,
    store: Store,
    lxd: Lxd,
    base_image: str,
    ghost_dirs: dict[str, Path],
    published_aliases: list[str],
    lxd_cleanup: None,
    tmp_path: Path,
) -> None:
    """`systemctl restart`, an upgrade through scripts/install, then a rollback (docs/install.md: repoint `current`,
    restart), each while a build and three deploys are in flight with Ghost's commands waiting: every command
    gets its outcome (exit 0), each script's effect happens once, and no container or image is left."""
    system = privileged_system
    phases: dict[str, float] = {}
    push_checkout_and_wheelhouse(system, tmp_path)
    system.run(*INSTALL)
    first_dir = system.run("readlink", "/opt/ghost-buildpackd/current").stdout.strip()
    first_version = first_dir.rsplit("/", 1)[1]
    tree, version = second_version(tmp_path)
    system.push_tree(tree, checkout_files(), "/root/ghost-buildpackd-next")
    # The working copies and provisioner trees at the same path inside and on the host: the daemon inside
    # names them, the host's LXD mounts them into the step containers.
    system.add_disk("ghost", tmp_path)
    ghost_paths = "ghost:\n" + "".join(f"  {key}: {ghost_dirs[key]}\n" for key in ("root", "provisioner_tree"))
    salt = "  provisioner_commands:\n    salt: [sh, -c, echo features installed]\n"
    # A grace long enough for the steps to wait HOLD seconds, then finish: 90 s, and the stop bound (90 s, 120 s of
    # clean-up, 15 s of warm pool, 5 s of MongoDB, 10 s) stays under TimeoutStopSec.
    extra = ghost_paths + "workers: 3\n"
    connect_and_configure(system, mongo, db, extra=extra, container_extra=salt, shutdown_grace="90s")
    system.run("systemctl", "enable", "--now", UNIT)
    host = system.run("hostname").stdout.strip()
    assert daemon_version(store, host) == first_version

    builder = make_app(
        db,
        name="builder",
        source_container_image=base_image,
        pre_buildimage=BUILD_HOOK,
        features=[{"name": "nginx", "version": "1", "provisioner": "salt"}],
    )
    db.apps.update_one({"_id": builder}, {"$set": {"build_infos.container_image": base_image}})
    # docs/install.md's rollback: point the link at the previous version (atomically, as scripts/install does),
    # then restart.
    rollback = f"ln -sfn {first_dir} {first_dir}.link && mv -T {first_dir}.link /opt/ghost-buildpackd/current"
    disruptions = {  # each with the version running after it
        "restart": (["systemctl", "restart", UNIT], first_version),
        "upgrade": (["/root/ghost-buildpackd-next/scripts/install", *INSTALL[1:]], version),
        "rollback": (["sh", "-c", f"{rollback} && systemctl restart {UNIT}"], first_version),
    }
    for phase, (argv, expected_version) in disruptions.items():
        load = put_load(system, db, store, ghost_dirs, builder, phase)
        published_aliases.append(str(load.build_job))
        started = time.monotonic()
        disrupt_under_load(system, load, *argv)
        timed(phases, f"{phase} under load (to the next instance's READY)", started)
        outcomes = load.outcomes(300)
        timed(phases, f"{phase}: every command's outcome", started)
        assert {name: code for name, (code, _) in outcomes.items()} == dict.fromkeys(outcomes, 0), outcomes
        assert all(text.endswith("exit 0") and len(text.splitlines()) == 1 for _, text in outcomes.values()), outcomes
        assert daemon_version(store, host) == expected_version
        finish_buildimage(db, load.build_job)  # Ghost's buildimage job ends once its command returned
        for module, path in load.working_copies.items():
            assert (path / "ran.log").read_text() == "ran\n", f"{phase}: {module} ran more than once, or never"
        images = [image for image in lxd.list_images() if image.properties.get(IMAGE_PROP_JOB) == str(load.build_job)]
        assert len(images) == 1 and images[0].aliases == (str(load.build_job),), images

    # Each stop had steps in flight and drained them (exit 0, no stop bound reached).
    messages = system.run("journalctl", "-u", UNIT, "-o", "cat").stdout
    stopping = [json.loads(line[line.index("{") :]) for line in messages.splitlines() if "daemon_stopping" in line]
    assert len(stopping) == 3 and all(len(event["steps_in_flight"]) == 3 for event in stopping), stopping
    assert "stop_bound_reached_exiting" not in messages
    print(f"from a daemon's end to the next one's READY (s): {gaps_between_instances(messages)}")
    wait_until(lambda: not leftover_containers(lxd, db), 120, "no container of the test's jobs left")
    print("restart under load phases (s): " + ", ".join(f"{name} {seconds}" for name, seconds in phases.items()))
