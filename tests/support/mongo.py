"""The MongoDB the tests use: a real replica set when one is at hand, else nx-27017.

Order: `GHOST_BUILDPACKD_TEST_MONGODB_URI` (a real server given by the
environment), then a single-node replica set in Docker through testcontainers
when a Docker engine answers, then an `nx-27017` wire-protocol server started
here as a local process (no real mongod can be installed on build machines).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pymongo
import pytest

from .waiting import wait_until

ENV_URI = "GHOST_BUILDPACKD_TEST_MONGODB_URI"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MongoServer:
    """A MongoDB for the test session. `kind` says which; `real` whether it is real MongoDB."""

    kind = "unknown"
    real = True
    can_restart = False

    def __init__(self, uri: str):
        self.uri = uri

    def client(self, **kwargs: object) -> pymongo.MongoClient:
        return pymongo.MongoClient(self.uri, tz_aware=True, serverSelectionTimeoutMS=5000, **kwargs)

    def stop(self) -> None:
        pass

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"{self.kind} at {self.uri}"


class ExternalMongo(MongoServer):
    kind = "external (GHOST_BUILDPACKD_TEST_MONGODB_URI)"


class DockerMongo(MongoServer):
    """A single-node replica set in Docker, for change streams."""

    kind = "testcontainers (mongo:7, single-node replica set)"

    def __init__(self) -> None:
        from testcontainers.core.container import DockerContainer

        self.container = (
            DockerContainer("mongo:7").with_command("--replSet rs0 --bind_ip_all").with_exposed_ports(27017)
        )
        self.container.start()
        host = self.container.get_container_host_ip()
        port = self.container.get_exposed_port(27017)
        direct = pymongo.MongoClient(host, int(port), directConnection=True, serverSelectionTimeoutMS=30000)
        direct.admin.command("replSetInitiate", {"_id": "rs0", "members": [{"_id": 0, "host": "localhost:27017"}]})
        wait_until(lambda: direct.admin.command("hello").get("isWritablePrimary"), 60, "replica set primary")
        super().__init__(f"mongodb://{host}:{port}/?directConnection=true")

    def close(self) -> None:
        self.container.stop()


class NxMongo(MongoServer):
    """nx-27017 as a local process; restartable on the same port and data for outage tests."""

    kind = "nx-27017 (MongoDB wire-protocol stand-in on SQLite)"
    real = False
    can_restart = True

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="gbp-nx-"))
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        super().__init__(f"mongodb://127.0.0.1:{self.port}/?directConnection=true")
        self.start()

    def start(self) -> None:
        executable = shutil.which("nx-27017", path=str(Path(sys.executable).parent)) or "nx-27017"
        self.process = subprocess.Popen(
            [
                executable,
                "--data-dir",
                str(self.dir / "data"),
                "--host",
                "127.0.0.1",
                "-p",
                str(self.port),
                "--pid-file",
                str(self.dir / "nx.pid"),
                "--log-file",
                str(self.dir / "nx.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "stderr.log", "ab"),  # noqa: SIM115
            start_new_session=True,
        )
        probe = pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=500)
        try:
            wait_until(lambda: self._answers(probe), 30, "nx-27017 to answer")
        finally:
            probe.close()

    def _answers(self, client: pymongo.MongoClient) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"nx-27017 exited with {self.process.returncode}: see {self.dir}/stderr.log")
        try:
            client.admin.command("ping")
            return True
        except pymongo.errors.PyMongoError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        (self.dir / "nx.pid").unlink(missing_ok=True)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def skip_unless_restartable(mongo: MongoServer) -> None:
    """Skip a test that stops and starts MongoDB when this run's server cannot be."""
    if not mongo.can_restart:
        pytest.skip(f"this run's MongoDB ({mongo.kind}) cannot be stopped by the tests")


def docker_engine_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def start_mongo() -> MongoServer:
    if os.environ.get(ENV_URI):
        return ExternalMongo(os.environ[ENV_URI])
    if docker_engine_answers():
        return DockerMongo()
    return NxMongo()
