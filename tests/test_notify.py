"""SystemdNotifier against a real unix datagram socket, as systemd listens."""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ghost_buildpackd.model import BUILDIMAGE, step_id
from ghost_buildpackd.notify import SystemdNotifier
from ghost_buildpackd.store import Store
from tests.support.daemon import DaemonProcess
from tests.support.ghost import finish_buildimage, make_app, make_job
from tests.support.mongo import skip_unless_restartable
from tests.support.waiting import wait_until


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


def test_messages_reach_the_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.ready()
    assert receive(sock) == f"READY=1\nMAINPID={os.getpid()}"
    assert notifier.status("watching jobs\n(change streams)")
    assert receive(sock) == "STATUS=watching jobs (change streams)"
    assert notifier.watchdog()
    assert receive(sock) == "WATCHDOG=1"
    assert notifier.stopping()
    assert receive(sock) == "STOPPING=1"


def test_abstract_namespace_socket() -> None:
    name = f"gbp-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert receive(sock) == "WATCHDOG=1"


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = SystemdNotifier({"WATCHDOG_USEC": "30000000"})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False
    assert notifier.watchdog_interval() is None


def test_a_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.ready() is False
    assert notifier.watchdog() is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None, tmp_path: Path) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "n.sock"), **env})
    assert notifier.watchdog_interval() == expected


# --- the daemon's notifications, from a real process ----------------------------------------------------


def finished(db, job) -> bool:
    step = Store(db).get_step(step_id(job, BUILDIMAGE))
    return step is not None and step.terminal


class Received:
    """Every datagram the socket receives, with its arrival time, collected by a thread."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.items: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.items.append((time.monotonic(), data.decode()))

    def times_of(self, message: str) -> list[float]:
        return [at for at, text in list(self.items) if text == message]

    def statuses(self) -> list[str]:
        return [text for _at, text in list(self.items) if text.startswith("STATUS=")]

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)


def notified_daemon(write_config, tmp_path: Path, path: str, **env: str) -> DaemonProcess:
    config = write_config(workers=2, events={"mode": "poll", "poll_interval": "200ms"})
    extra = {"NOTIFY_SOCKET": path, **env}
    return DaemonProcess(config, tmp_path / "daemon.log", extra_env=extra, trivial_bodies=True)


WATCHDOG_USEC = 4_000_000  # systemd would kill the daemon after 4 s without WATCHDOG=1
OUTAGE = 45.0


@pytest.mark.slow
@pytest.mark.lxd  # a daemon process connects to LXD at start
def test_the_watchdog_is_fed_throughout_a_45s_mongodb_outage(mongo, write_config, tmp_path, listener):
    skip_unless_restartable(mongo)
    sock, path = listener
    received = Received(sock)
    with notified_daemon(write_config, tmp_path, path, WATCHDOG_USEC=str(WATCHDOG_USEC)) as process:
        process.wait_ready()
        wait_until(lambda: len(received.times_of("WATCHDOG=1")) >= 2, 30, "the first keep-alives")
        mongo.stop()
        outage_started = time.monotonic()
        try:
            wait_until(
                lambda: (
                    any(at >= outage_started + OUTAGE for at in received.times_of("WATCHDOG=1")) or not process.alive()
                ),
                OUTAGE + 30,
                "keep-alives through the whole outage",
                interval=0.5,
            )
        finally:
            mongo.start()
        outage_ended = time.monotonic()
        assert process.alive(), "the daemon died during the outage"
        assert process.saw("event_source_mongodb_unavailable") or process.saw("mongodb_unavailable_retrying")
        assert process.terminate() == 0
    received.close()

    during = [at for at in received.times_of("WATCHDOG=1") if outage_started - 5 <= at <= outage_ended]
    gaps = [later - earlier for earlier, later in itertools.pairwise(during)]
    assert during and during[-1] >= outage_started + OUTAGE
    # systemd's deadline is WATCHDOG_USEC; the daemon sends every half of it.
    assert max(gaps) < WATCHDOG_USEC / 1e6, f"the watchdog paused for {max(gaps):.1f}s during the outage"


@pytest.mark.slow
@pytest.mark.lxd  # a daemon process connects to LXD at start
def test_sighup_is_logged_and_survived_and_status_shows_busy_workers_and_lag(db, write_config, tmp_path, listener):
    sock, path = listener
    received = Received(sock)
    app = make_app(db)
    with notified_daemon(write_config, tmp_path, path, TEST_WORK_SECONDS="4") as process:
        process.wait_ready()
        process.process.send_signal(signal.SIGHUP)
        wait_until(lambda: process.saw("sighup_ignored"), 30, "the SIGHUP logged")
        job = make_job(db, app)
        finish_buildimage(db, job)
        wait_until(
            lambda: any("workers busy: 1/2" in status for status in received.statuses()), 30, "a busy worker in STATUS"
        )
        wait_until(lambda: finished(db, job), 30, "the step to finish after the SIGHUP")
        wait_until(lambda: "workers busy: 0/2" in received.statuses()[-1], 30, "STATUS updated again")
        assert process.alive()
        assert process.terminate() == 0
    received.close()

    last = received.statuses()[-1]
    assert "workers busy: 0/2" in last
    assert re.search(r"event lag: \d+\.\ds", last), last
