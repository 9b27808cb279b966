"""/healthz, /readyz, /metrics and `status --check` against a running daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from ghost_buildpackd.config import Config
from ghost_buildpackd.daemon import Daemon
from ghost_buildpackd.lxd import Lxd
from ghost_buildpackd.store import Store
from tests.support import lxd_service
from tests.support.daemon import DaemonProcess
from tests.support.mongo import free_port
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.lxd, pytest.mark.mongodb]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=15) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def status_check(config: Path, *options: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "ghost_buildpackd", "status", "--check", "--config", str(config), *options]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_endpoints_and_status_check_of_a_running_daemon(write_config: Callable[..., Path], tmp_path: Path) -> None:
    port = free_port()
    config = write_config(metrics={"listen": f"127.0.0.1:{port}"})
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready()
        assert get(port, "/healthz") == (200, '{"status": "ok"}\n')
        assert get(port, "/readyz") == (200, '{"status": "ok"}\n')
        for path in ("/", "/health", "/metrics/x"):
            assert get(port, path)[0] == 404, path
        code, text = get(port, "/metrics")
        assert code == 200
        assert 'ghost_buildpackd_up{system="mongodb"} 1.0' in text  # /readyz just probed both
        assert 'ghost_buildpackd_up{system="lxd"} 1.0' in text
        assert "ghost_buildpackd_build_info{" in text and "process_resident_memory_bytes" in text

        healthy = status_check(config)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert healthy.stdout.startswith("ghost-buildpackd status --check: OK (1 live instance(s) on host ")
        assert daemon.terminate() == 0

    stopped = status_check(config, "--max-lag", "10m")
    assert stopped.returncode == 1
    lines = stopped.stdout.splitlines()
    assert lines[0] == "ghost-buildpackd status --check: FAILED"
    assert lines[1].startswith("  no live instance on host ")


def test_status_check_rejects_a_bad_threshold(write_config: Callable[..., Path]) -> None:
    result = status_check(write_config(), "--max-lag", "soon")
    assert result.returncode == 2
    assert "argument --max-lag: expected a duration like 30m, got 'soon'" in result.stderr


def test_failing_answers_name_the_problem(make_config: Callable[..., Config], store: Store, lxd: Lxd) -> None:
    """The daemon's own health answers, in-process, where a stall and an outage can be staged."""
    port = free_port()
    daemon = Daemon(make_config(metrics={"listen": f"127.0.0.1:{port}"}).with_instance_id(), store, lxd)
    try:
        code, body = get(port, "/readyz")
        assert (code, json.loads(body)) == (503, {"status": "failing", "problems": ["daemon starting"]})
        assert get(port, "/healthz")[0] == 200

        daemon.phase = "running"
        assert get(port, "/readyz")[0] == 200
        daemon.source.last_tick = time.monotonic() - 1000  # the event loop stopped making progress
        code, body = get(port, "/healthz")
        assert (code, json.loads(body)["problems"]) == (503, ["events loop without progress for over 120s"])
        code, body = get(port, "/readyz")  # a stalled loop: steps may not run either
        assert (code, json.loads(body)["problems"]) == (503, ["events loop without progress for over 120s"])
        daemon.source.last_tick = time.monotonic()

        daemon.store = Store.from_uri(f"mongodb://127.0.0.1:{free_port()}/", "ghost", 1.0)
        code, body = get(port, "/readyz")
        [problem] = json.loads(body)["problems"]
        assert code == 503 and problem.startswith("mongodb does not answer: ")
        assert 'ghost_buildpackd_up{system="mongodb"} 0.0' in get(port, "/metrics")[1]
    finally:
        daemon.metrics.close()


LXD_FROZEN_AT_MOST = 16.0  # seconds: other tests on this machine share the LXD daemon


def lxd_up_metric(port: int) -> str:
    """`1.0` or `0.0`: ghost_buildpackd_up for LXD as /metrics says it now."""
    text = get(port, "/metrics")[1]
    return next(
        (line.split()[-1] for line in text.splitlines() if line.startswith('ghost_buildpackd_up{system="lxd"}')), ""
    )


@pytest.mark.slow
def test_heartbeats_go_on_while_lxd_does_not_answer(
    write_config: Callable[..., Path], store: Store, tmp_path: Path
) -> None:
    """LXD frozen (SIGSTOP: it accepts connections and answers nothing) for less than lxd.timeout: the
    heartbeat keeps its pace, and the LXD probe, bounded on its own, reports LXD down, then up again."""
    port = free_port()
    config = write_config(metrics={"listen": f"127.0.0.1:{port}"}, lxd={"timeout": "30s"})
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready()
        wait_until(lambda: lxd_up_metric(port) == "1.0", 30, "LXD reported up")
        record = lambda: store.instances.find_one({"info.pid": daemon.pid}) or {}  # noqa: E731
        seen = [record().get("seen_at")]

        def heartbeats_and_lxd_down() -> bool:
            if record().get("seen_at") != seen[-1]:
                seen.append(record().get("seen_at"))
            return len(seen) > 2 and lxd_up_metric(port) == "0.0"

        pid = lxd_service.lxd_daemon_pid()
        assert pid is not None, "no LXD daemon process found"
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_until(heartbeats_and_lxd_down, LXD_FROZEN_AT_MOST, "two heartbeats and LXD down", interval=0.2)
            code, body = get(port, "/readyz")  # the probe's last answer: /readyz does not wait on LXD either
        finally:
            os.kill(pid, signal.SIGCONT)

        [problem] = json.loads(body)["problems"]
        assert code == 503 and problem.startswith("lxd does not answer"), body
        wait_until(lambda: lxd_up_metric(port) == "1.0", 60, "LXD reported up again")
        wait_until(lambda: get(port, "/readyz")[0] == 200, 30, "ready again")
        daemon.assert_alive()
