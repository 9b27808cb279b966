"""The unit under a real systemd: a Debian 12 system container installed as docs/install.md says.

The container (scripts/build-systemd-image) runs systemd as PID 1 and has no network: Python
packages come as a wheelhouse made on this host, LXD is this host's through a unix-socket proxy
device, MongoDB the test session's through a tcp proxy device. Shows that `systemctl start`
returns at READY, the watchdog is fed, a SIGKILLed daemon is restarted, `systemctl stop` lets a
running step finish, nothing outside ReadWritePaths is writable, and reports the unit's
`systemd-analyze security` exposure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from pymongo.database import Database

from ghost_buildpackd.lxd import Lxd
from ghost_buildpackd.model import RUNNING, SUCCEEDED, step_id
from ghost_buildpackd.store import Store
from tests.support.ghost import finish_buildimage, make_app, make_job
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


def config_yml(database: str) -> str:
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
metrics:
  listen: 127.0.0.1:9469
log:
  level: debug
lease_ttl: 10s
shutdown_grace: 60s
"""


@pytest.fixture
def system(mongo: MongoServer, lxd: Lxd, tmp_path: Path) -> Iterator[SystemContainer]:
    ensure_image()
    container = SystemContainer(f"gbp-systemd-{os.getpid()}")
    try:
        yield container.launch()
    finally:
        container.delete()


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
    mongo_url = urlparse(mongo.uri)
    if "," in (mongo_url.netloc or ""):
        pytest.skip("the container reaches one MongoDB host through one proxy device")
    mongo_host, mongo_port = mongo_url.hostname, mongo_url.port or 27017

    # --- docs/install.md: on a host without PyPI, a wheelhouse made elsewhere, then scripts/install ----------
    started = time.monotonic()
    wheels = tmp_path / "wheels"
    subprocess.run([ROOT / "scripts/wheelhouse", wheels], check=True, capture_output=True, timeout=900)
    system.push_tree(ROOT, checkout_files(), "/root/ghost-buildpackd")
    system.push_tree(wheels, sorted(p.name for p in wheels.iterdir()), "/root/wheels")
    timed(phases, "wheelhouse and copy", started)

    started = time.monotonic()
    install = ["/root/ghost-buildpackd/scripts/install", "--wheelhouse", "/root/wheels", "--lxd-socket", LXD_SOCKET]
    first = system.run(*install)
    assert "installing ghost-buildpackd" in first.stderr
    timed(phases, "scripts/install", started)
    again = system.run(*install)  # idempotent: nothing is rebuilt or overwritten
    assert "up to date" in again.stderr and "present, left as it is" in again.stderr
    version_dir = system.run("readlink", "/opt/ghost-buildpackd/current").stdout.strip()
    assert re.fullmatch(r"/opt/ghost-buildpackd/\d+\.\d+\.\d+\S*", version_dir), version_dir
    assert "lxd" not in system.run("id", "-nG", "ghost").stdout.split()  # the unit's SupplementaryGroups only

    # --- the host's LXD and the session's MongoDB, reached through proxy devices -------------------
    lxd_gid = system.run("getent", "group", "lxd").stdout.split(":")[2]
    system.run("mkdir", "-p", os.path.dirname(LXD_SOCKET))
    system.add_proxy("lxd", f"unix:{LXD_SOCKET}", f"unix:{LXD_SOCKET}", uid="0", gid=lxd_gid, mode="0660")
    system.add_proxy("mongodb", "tcp:127.0.0.1:27017", f"tcp:{mongo_host}:{mongo_port}")

    # Ghost's database has its collections (the store fixture made jobs); this host's LXD (the one
    # the container reaches) may map the working-copy owner of config_yml: the container's idmap files say so too.
    app = make_app(db, source_container_image=base_image, pre_buildimage="echo started; sleep 5; echo finished")
    system.run("sh", "-c", "echo root:1001:1 >> /etc/subuid; echo root:1002:1 >> /etc/subgid")

    # --- docs/install.md: credentials in one file, the configuration, `check` as the service's user ----------
    # One member through one proxy: a direct connection (the member's own name does not resolve inside).
    uri = "mongodb://127.0.0.1:27017/?directConnection=true"
    # As docs/install.md writes them, by a shell in the container (lxc exec's own stdin is not readable as
    # /dev/stdin there).
    system.run("bash", "-c", f"install -m 640 -g ghost /dev/stdin /etc/ghost-buildpackd/mongodb-uri <<< '{uri}'")
    system.run("bash", "-c", "install -m 640 -g ghost /dev/stdin /etc/ghost-buildpackd/config.yml <<'YAML'\n"
               f"{config_yml(db.name)}YAML\n")  # fmt: skip
    # Ghost's own config.yml at its default place, as a Ghost with containers has it (the daemon's switch).
    system.run("sh", "-c", "mkdir -p /usr/local/share/ghost && printf 'container:\\n  enabled: true\\n' "
               "> /usr/local/share/ghost/config.yml")  # fmt: skip
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
