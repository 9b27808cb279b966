"""What every benchmark shares: the MongoDB and LXD of the run, daemon processes, logs, figures, tables.

The MongoDB is the one the tests use (tests/support/mongo.py: a URI from the
environment, else a real mongod as a one-node replica set), so figures and
tests speak of the same server. Each benchmark gets a database of its own, dropped afterwards,
and deletes every container, image alias and directory it made.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from pymongo.database import Database
from tests.conftest import BASE_IMAGE, leftover_containers, raw_config, remove_job_images
from tests.support.daemon import DaemonProcess
from tests.support.mongo import MongoServer, MongoServers
from tests.support.waiting import wait_until

from ghost_buildpackd.config import LxdConfig
from ghost_buildpackd.lxd import Lxd
from ghost_buildpackd.model import TERMINAL
from ghost_buildpackd.store import Store

REPO = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much work each benchmark does: `--quick` or the full run."""

    latency_jobs: int
    deploys_per_mode: int
    baseline_runs: int
    ghost_old_runs: int
    throughput_steps: int  # steps per parallelism level (rounded up to a multiple of it)
    catchup_jobs: int
    catchup_qualifying: int
    catchup_repeats: int  # daemon starts per mode and history (the median is kept)
    debian_runs: int  # builds and deploys per pool and case in the Debian tier
    footprint_steps: int
    footprint_real_steps: int
    ghost_deploys: int  # deploys per mode run by Ghost 19.08's worker (`--deploys N`)
    fleet_apps: int  # apps deploying at once in the fleet benchmark
    fleet_modules: int  # modules (build_packs) of each

    @classmethod
    def quick(cls) -> Sizes:
        return cls(30, 3, 3, 1, 8, 1000, 50, 1, 1, 60, 4, 2, 5, 4)

    @classmethod
    def full(cls) -> Sizes:
        return cls(200, 10, 10, 3, 8, 10_000, 50, 3, 3, 500, 12, 5, 50, 4)


class Bench:
    """The run's MongoDB, LXD and scratch space; hands out databases, configs and daemons."""

    def __init__(self, sizes: Sizes, poll_interval: float):
        self.sizes = sizes
        self.poll_interval = poll_interval
        self.scratch = Path(tempfile.mkdtemp(prefix="gbp-bench-"))
        self._servers = MongoServers()
        self.mongo: MongoServer = self._servers.get("replica_set")
        self.lxd = Lxd(LxdConfig(timeout=60))
        self._databases: list[str] = []

    def close(self, keep_logs: bool = False) -> None:
        """Drop the databases and stop the MongoDB; the scratch space (daemon logs) is kept when asked."""
        client = self.mongo.client()
        for name in self._databases:
            client.drop_database(name)
        client.close()
        self._servers.close()
        if keep_logs:
            print(f"daemon logs and configs kept in {self.scratch}")
        else:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def server(self, topology: str) -> MongoServer:
        """The run's MongoDB of `topology` ("replica_set", "standalone"), started on first use."""
        return self._servers.get(topology)

    def environment(self) -> dict[str, Any]:
        """Where the figures come from: cores, LXD, MongoDB."""
        lxd = self.lxd.server_info()
        probe = Store(self.mongo.client()["ghost_buildpackd_bench_probe"])  # watch is refused on admin
        streams, why = probe.change_streams_supported()
        info = probe.server_info()
        probe.db.client.close()
        return {
            "cores": os.cpu_count(),
            "kernel": lxd["kernel"],
            "lxd_version": lxd["version"],
            "lxd_storage": lxd["storage"],
            "base_image": BASE_IMAGE,
            "mongodb": self.mongo.kind,
            "mongodb_version": info["version"],
            "mongodb_change_streams": f"{'yes' if streams else 'no'} ({why})",
            "load_average_at_start": os.getloadavg(),
        }

    # --- per benchmark ----------------------------------------------------------------

    def database(self, name: str) -> Database:
        """A fresh database for one benchmark (dropped at the end of the run)."""
        full = f"bench_{name}_{os.getpid()}"
        client = self.mongo.client()
        client.drop_database(full)
        self._databases.append(full)
        return client[full]

    def ghost_dirs(self, name: str) -> dict[str, Path]:
        return make_ghost_dirs(self.scratch / name)

    def write_config(self, db: Database, dirs: dict[str, Path], name: str, **overrides: Any) -> Path:
        """A daemon config like the tests' (tests/conftest.py raw_config), logging at info."""
        overrides.setdefault("log", {"format": "json", "level": "info"})
        overrides.setdefault("events", {})
        overrides["events"].setdefault("poll_interval", self.poll_interval)
        raw = raw_config(self.mongo, db, dirs, **overrides)
        path = dirs["root"].parent / f"{name}.yml"
        path.write_text(yaml.safe_dump(raw))
        return path

    def daemon(self, config: Path, name: str, trivial: bool) -> DaemonProcess:
        """A daemon process: the production one, or the same daemon with trivial step bodies (no LXD)."""
        # Trivial bodies do no simulated work here: the figures are the intake's and the runner's.
        env = {"TEST_WORK_SECONDS": "0"} if trivial else {}
        return DaemonProcess(config, config.parent / f"{name}.log", extra_env=env, trivial_bodies=trivial)

    def remove_images(self, db: Database) -> None:
        """Delete the images the daemon built for this database's jobs."""
        remove_job_images(self.lxd, db)

    def remove_containers(self, db: Database) -> list[str]:
        """Delete containers tagged with this database's jobs (none should remain: say so if some did)."""
        names = leftover_containers(self.lxd, db)
        for name in names:
            self.lxd.delete_container(name)
        return names


def make_ghost_dirs(base: Path) -> dict[str, Path]:
    """ghost.root/log_dir/provisioner_tree under `base`; traversable: LXD mounts working copies from below root."""
    dirs = {key: base / key for key in ("root", "log_dir", "provisioner_tree")}
    for path in dirs.values():
        path.mkdir(parents=True)
    for path in (base, *base.parents):
        if path == Path("/"):
            break
        path.chmod(path.stat().st_mode | 0o011)
    return dirs


# --- daemon processes -------------------------------------------------------------------


@contextmanager
def running(process: DaemonProcess, ready_timeout: float = 60) -> Iterator[DaemonProcess]:
    with process:
        process.wait_ready(ready_timeout)
        yield process


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process itself (fields 14 and 15 of /proc/<pid>/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def log_times(process: DaemonProcess, event: str, key: str = "step") -> dict[str, float]:
    """First occurrence of `event` per value of `key` in the daemon's JSON log -> epoch seconds."""
    found: dict[str, float] = {}
    for item in process.events():
        if item.get("event") == event and key in item and item[key] not in found:
            found[item[key]] = parse_timestamp(item["timestamp"])
    return found


def parse_timestamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def steps_terminal(db: Database, ids: Iterable[str]) -> bool:
    wanted = list(ids)
    return db.container_steps.count_documents({"_id": {"$in": wanted}, "state": {"$in": list(TERMINAL)}}) == len(wanted)


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> Any:
    return wait_until(condition, timeout, what, interval=interval)


class FirstLine:
    """Watches a file for the first line containing `needle`; `seen_at` is when it appeared (2 ms resolution)."""

    def __init__(self, path: Path, needle: str):
        self.path = path
        self.needle = needle
        self.seen_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> FirstLine:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            try:
                text = self.path.read_text(errors="replace")
            except FileNotFoundError:
                continue
            if self.needle in text:
                self.seen_at = time.time()
                return


# --- figures and tables -------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, p50, p99, mean, min, max of a list of seconds."""
    return {
        "n": len(values),
        "p50": percentile(values, 0.5),
        "p99": percentile(values, 0.99),
        "mean": sum(values) / len(values) if values else float("nan"),
        "min": min(values) if values else float("nan"),
        "max": max(values) if values else float("nan"),
    }


def ms(seconds: float | None) -> str:
    return "-" if seconds is None or seconds != seconds else f"{seconds * 1000:.0f} ms"


def ratio(value: float | None, base: float | None) -> str:
    if not value or not base or value != value or base != base:
        return "-"
    return f"{value / base:.2f}x"


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned table for the terminal."""
    cells = [list(map(str, header))] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells[1:]]
    return "\n".join(lines)


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)
