"""The real MongoDB servers the tests, the demo and the benchmarks run.

`mongod` builds come from `scripts/setup-mongodb` (6.0.5, the newest supported line, by default;
GHOST_BUILDPACKD_TEST_MONGODB_VERSION=4.2.6 runs the oldest). Each server listens on port 27017 at
a loopback address of its own (127.27.x.y): Ghost 19.08 hard-codes that port, so its worker can
reach any of them through MONGO_HOST. `GHOST_BUILDPACKD_TEST_MONGODB_URI` points the whole run at
an external server instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pymongo
import pytest
from pymongo.errors import PyMongoError

from .waiting import wait_until

ENV_URI = "GHOST_BUILDPACKD_TEST_MONGODB_URI"
ENV_VERSION = "GHOST_BUILDPACKD_TEST_MONGODB_VERSION"
ENV_CACHE = "GHOST_BUILDPACKD_MONGODB_CACHE"
DEFAULT_VERSION = "6.0.5"
OLDEST_VERSION = "4.2.6"
PORT = 27017  # Ghost 19.08's settings.py: MONGO_PORT = 27017, whatever MONGO_HOST says
REPLICA_SET = "rs0"
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class MongodBuild:
    """One installed `mongod`, with the private libraries its build needs."""

    version: str
    mongod: Path
    lib: Path | None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.lib is not None:
            env["LD_LIBRARY_PATH"] = str(self.lib)  # this process only: OpenSSL 1.1 for the 4.2 build
        return env


def mongod_build(version: str | None = None) -> MongodBuild:
    version = version or os.environ.get(ENV_VERSION) or DEFAULT_VERSION
    root = Path(os.environ.get(ENV_CACHE, "/var/cache/ghost-buildpackd/mongodb")) / version
    mongod = root / "bin" / "mongod"
    if not mongod.is_file():
        raise RuntimeError(f"MongoDB {version} is not installed at {root}: run scripts/setup-mongodb {version}")
    lib = root / "lib"
    return MongodBuild(version, mongod, lib if lib.is_dir() else None)


def free_port() -> int:
    """A port nothing listens on (for tests of unreachable servers and local listeners)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_loopback_address(taken: set[str] = frozenset()) -> str:  # type: ignore[assignment]
    """A 127.27.x.y address whose port 27017 is free (every address in 127/8 is this host's loopback)."""
    base = os.getpid() % 250
    for step in range(250 * 250):
        address = f"127.27.{(base + step // 250) % 250 + 1}.{step % 250 + 1}"
        if address in taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((address, PORT))
            except OSError:
                continue
        return address
    raise RuntimeError("no loopback address with a free port 27017")


class Mongod:
    """One `mongod` process on ADDRESS:27017, restartable on the same data."""

    def __init__(
        self, build: MongodBuild, address: str, workdir: Path, replica_set: str | None, extra: tuple[str, ...] = ()
    ):
        self.build = build
        self.address = address
        self.dir = workdir
        self.replica_set = replica_set
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None
        (self.dir / "data").mkdir(parents=True, exist_ok=True)

    @property
    def host(self) -> str:
        return f"{self.address}:{PORT}"

    def command_line(self) -> list[str]:
        args = [str(self.build.mongod), "--bind_ip", self.address, "--port", str(PORT)]
        args += ["--dbpath", str(self.dir / "data"), "--logpath", str(self.dir / "mongod.log"), "--logappend"]
        # Small and quiet: a 10 MB journal instead of 300 MB preallocated, a 256 MB cache, no FTDC.
        args += ["--wiredTigerCacheSizeGB", "0.25"]
        args += ["--wiredTigerEngineConfigString", "log=(file_max=10MB,prealloc=false)"]
        args += ["--setParameter", "diagnosticDataCollectionEnabled=false"]
        if self.replica_set:
            args += ["--replSet", self.replica_set]
        return args + list(self.extra)

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command_line(),
            env=self.build.env(),
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "stderr.log", "ab"),  # noqa: SIM115 (the child keeps it)
            start_new_session=True,
        )
        probe = self.direct_client(serverSelectionTimeoutMS=500)
        try:
            wait_until(lambda: self._answers(probe), START_TIMEOUT, f"mongod at {self.host} to answer")
        finally:
            probe.close()

    def _answers(self, client: pymongo.MongoClient) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"mongod exited with {self.process.returncode}: see {self.dir}/mongod.log")
        try:
            client.admin.command("ping")
            return True
        except PyMongoError:
            return False

    def direct_client(self, **kwargs: object) -> pymongo.MongoClient:
        return pymongo.MongoClient(self.host, directConnection=True, tz_aware=True, **kwargs)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        self._signal(signal.SIGTERM, 60)

    def kill(self) -> None:
        self._signal(signal.SIGKILL, 10)

    def freeze(self) -> None:
        """SIGSTOP: the member stops answering (a network partition, as far as the others can tell)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        if self.running():
            assert self.process is not None
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


class MongoServer:
    """A MongoDB for the tests: `uri`, `host` (address Ghost's MONGO_HOST names, port 27017), `kind`."""

    kind = "unknown"
    topology = "unknown"  # "replica_set" or "standalone"
    can_restart = False

    def __init__(self, uri: str, host: str = "127.0.0.1", version: str = "unknown"):
        self.uri = uri
        self.host = host
        self.version = version

    def client(self, **kwargs: object) -> pymongo.MongoClient:
        return pymongo.MongoClient(self.uri, tz_aware=True, serverSelectionTimeoutMS=10000, **kwargs)

    def stop(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"{self.kind} at {self.uri}"


class ExternalMongo(MongoServer):
    kind = "external (GHOST_BUILDPACKD_TEST_MONGODB_URI)"

    def __init__(self, uri: str):
        super().__init__(uri)
        with pymongo.MongoClient(uri, serverSelectionTimeoutMS=10000) as client:
            hello = client.admin.command("ismaster")
            self.version = client.server_info()["version"]
        self.topology = "replica_set" if hello.get("setName") else "standalone"


class StandaloneMongo(MongoServer):
    """One mongod without a replica set: what Ghost's docker-compose runs; the daemon polls it."""

    topology = "standalone"
    can_restart = True

    def __init__(self, build: MongodBuild, workdir: Path):
        self.node = Mongod(build, free_loopback_address(), workdir, replica_set=None)
        self.kind = f"mongod {build.version}, standalone"
        super().__init__(f"mongodb://{self.node.host}/", self.node.address, build.version)
        self.node.start()

    def stop(self) -> None:
        self.node.stop()

    def start(self) -> None:
        self.node.start()

    def close(self) -> None:
        self.node.stop()
        shutil.rmtree(self.node.dir, ignore_errors=True)


class ReplicaSetMongo(MongoServer):
    """A replica set of `size` mongod processes on loopback; the driver follows its primary."""

    topology = "replica_set"
    can_restart = True

    def __init__(self, build: MongodBuild, workdir: Path, size: int = 1, extra: tuple[str, ...] = ()):
        taken: set[str] = set()
        self.nodes: list[Mongod] = []
        for index in range(size):
            address = free_loopback_address(taken)
            taken.add(address)
            self.nodes.append(Mongod(build, address, workdir / f"node{index}", REPLICA_SET, extra))
        self.workdir = workdir
        self.kind = f"mongod {build.version}, {size}-node replica set"
        hosts = ",".join(node.host for node in self.nodes)
        super().__init__(f"mongodb://{hosts}/?replicaSet={REPLICA_SET}", self.nodes[0].address, build.version)
        for node in self.nodes:
            node.start()
        self._initiate()

    def _initiate(self) -> None:
        members = [{"_id": index, "host": node.host} for index, node in enumerate(self.nodes)]
        with self.nodes[0].direct_client() as direct:
            direct.admin.command("replSetInitiate", {"_id": REPLICA_SET, "members": members})
        self.wait_for_primary()

    def primary(self) -> Mongod | None:
        for node in self.nodes:
            if not node.running():
                continue
            try:
                with node.direct_client(serverSelectionTimeoutMS=1000) as direct:
                    if direct.admin.command("ismaster").get("ismaster"):
                        return node
            except PyMongoError:
                continue
        return None

    def wait_for_primary(self, timeout: float = START_TIMEOUT) -> Mongod:
        return wait_until(self.primary, timeout, f"a primary in {self.kind}", interval=0.1)

    def step_down(self, seconds: int = 10) -> Mongod:
        """Ask the primary to step down (an election follows); returns the old primary."""
        old = self.wait_for_primary()
        # Servers before 4.2 close every connection when they step down, this one too.
        with old.direct_client() as direct, contextlib.suppress(pymongo.errors.AutoReconnect):
            direct.admin.command("replSetStepDown", seconds, secondaryCatchUpPeriodSecs=5)
        return old

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def start(self) -> None:
        for node in self.nodes:
            if not node.running():
                node.start()
        self.wait_for_primary()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class AuthenticatedReplicaSet(ReplicaSetMongo):
    """A one-node replica set with access control (a key file, a `root` user made through the localhost
    exception); `user_uri` gives the URI of a user with only the privileges asked."""

    def __init__(self, build: MongodBuild, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        key = workdir / "keyfile"
        key.write_text(secrets.token_hex(48))  # the base64 alphabet a key file needs
        key.chmod(0o400)
        super().__init__(build, workdir, size=1, extra=("--auth", "--keyFile", str(key)))
        self.kind = f"mongod {build.version}, 1-node replica set with access control"
        with self.nodes[0].direct_client() as direct:  # the localhost exception: the first user
            direct.admin.command("createUser", "root", pwd="root-pw", roles=["root"])
        self.uri = f"mongodb://root:root-pw@{self.nodes[0].host}/?replicaSet={REPLICA_SET}"

    def user_uri(self, database: str, user: str, actions: list[str]) -> str:
        """A user of `database` allowed `actions` on its collections, and nothing else."""
        with self.client() as root:
            role = f"{user}_role"
            root[database].command(
                "createRole",
                role,
                privileges=[{"resource": {"db": database, "collection": ""}, "actions": actions}],
                roles=[],
            )
            root[database].command("createUser", user, pwd=f"{user}-pw", roles=[role])
        return f"mongodb://{user}:{user}-pw@{self.nodes[0].host}/{database}?replicaSet={REPLICA_SET}"


class MongoServers:
    """The session's servers, each started on first use: a one-node replica set, a standalone server
    and, for the failover tests, a three-node replica set."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="gbp-mongo-"))
        self._servers: dict[str, MongoServer] = {}
        self.external = os.environ.get(ENV_URI)

    def get(self, topology: str) -> MongoServer:
        if self.external:
            return self._servers.setdefault("external", ExternalMongo(self.external))
        if topology not in self._servers:
            self._servers[topology] = self._start(topology)
        return self._servers[topology]

    def _start(self, topology: str) -> MongoServer:
        build = mongod_build()
        if topology == "replica_set":
            return ReplicaSetMongo(build, self.workdir / "replica_set", size=1)
        if topology == "standalone":
            return StandaloneMongo(build, self.workdir / "standalone")
        if topology == "authenticated":
            return AuthenticatedReplicaSet(build, self.workdir / "authenticated")
        if topology == "three_node":  # the failover tests' (slow suite)
            return ReplicaSetMongo(build, self.workdir / "three_node", size=3)
        raise ValueError(f"unknown MongoDB topology {topology!r}")

    def describe(self) -> str:
        return "; ".join(server.describe() for server in self._servers.values()) or "none started"

    def close(self) -> None:
        for server in self._servers.values():
            server.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def skip_unless_restartable(mongo: MongoServer) -> None:
    """Skip a test that stops and starts MongoDB when this run's server cannot be (an external one)."""
    if not mongo.can_restart:
        pytest.skip(f"this run's MongoDB ({mongo.kind}) cannot be stopped by the tests")


def server_version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])
