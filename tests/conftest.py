"""Test harness: the session's MongoDB, the real LXD, and per-test databases and directories."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from pymongo.database import Database

from ghost_buildpackd.config import Config, LxdConfig, config_from_mapping
from ghost_buildpackd.lxd import IMAGE_PROP_JOB, TAG_JOB, Lxd
from ghost_buildpackd.store import Store
from ghost_buildpackd.upkeep.templates import remove_templates_of
from ghost_buildpackd.upkeep.warm_pool import idle_containers
from tests.support.daemon import Daemons
from tests.support.mongo import ENV_URI, MongoServer, MongoServers, mongod_build

BASE_IMAGE = os.environ.get("GHOST_BUILDPACKD_TEST_IMAGE", "ghost-buildpackd/busybox")
WORKING_COPY_IDS = (1001, 1002)  # owner of test working copies; /etc/subuid allows mapping it (scripts/setup-lxd)

_servers: MongoServers | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _servers
    if config.option.collectonly or _distributes_tests(config):
        return
    # One set of servers per process that runs tests: each xdist worker has its own mongod processes
    # (on loopback addresses of their own), so workers share nothing but LXD.
    _servers = MongoServers()
    _servers.get("replica_set")  # fail fast: every run needs it


def _distributes_tests(config: pytest.Config) -> bool:
    """This process is xdist's controller: it hands tests to workers and runs none itself."""
    return not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", None))


def pytest_unconfigure(config: pytest.Config) -> None:
    if _servers is not None:
        _servers.close()


def pytest_report_header(config: pytest.Config) -> list[str]:
    if _distributes_tests(config):
        external = os.environ.get(ENV_URI)
        served = f"the external server {external}" if external else f"mongod {mongod_build().version}"
        lines = [f"MongoDB: {served}; each worker starts its own servers (loopback addresses of their own)"]
    else:
        lines = [f"MongoDB: {_servers.describe() if _servers else 'not started'}"]
    try:
        info = Lxd(LxdConfig(timeout=10)).server_info()
        lines.append(f"LXD: {info['version']} (storage {info['storage']}), base image {BASE_IMAGE}")
    except Exception as error:  # reported, and the LXD tests fail on their own
        lines.append(f"LXD: unreachable ({error})")
    return lines


# Fixtures that reach the real LXD: a test using any of them (directly or through another fixture)
# is marked `lxd`, so `-m "not lxd"` runs no test that drives LXD. Tests reaching LXD otherwise (a
# daemon process connects to it at start) carry the mark themselves.
LXD_FIXTURES = frozenset({"lxd", "base_image", "image_alias", "lxd_cleanup", "published_aliases"})


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by mark
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if LXD_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.lxd)


def session_mongo(topology: str) -> MongoServer:
    assert _servers is not None, "the MongoDB of the test session did not start"
    return _servers.get(topology)


@pytest.fixture(scope="session")
def replica_set_mongo() -> MongoServer:
    """The session's one-node replica set (change streams), for fixtures wider than a test."""
    return session_mongo("replica_set")


@pytest.fixture
def mongo(request: pytest.FixtureRequest) -> MongoServer:
    """The MongoDB of this test: the one-node replica set, or the standalone server when the test
    asks with `@pytest.mark.parametrize("mongo", ["standalone"], indirect=True)`."""
    return session_mongo(getattr(request, "param", "replica_set"))


@pytest.fixture
def db(mongo: MongoServer, request: pytest.FixtureRequest) -> Iterator[Database]:
    """A database of its own for each test (Ghost's collections and the daemon's)."""
    name = "t_" + re.sub(r"[^A-Za-z0-9]", "_", request.node.name)[:40] + f"_{os.getpid()}"
    client = mongo.client()
    client.drop_database(name)
    yield client[name]
    client.drop_database(name)
    client.close()


@pytest.fixture
def store(db: Database) -> Store:
    store = Store(db)
    store.ensure_indexes()
    return store


@pytest.fixture(scope="session")
def lxd() -> Lxd:
    client = Lxd(LxdConfig(timeout=60))
    client.server_info()
    return client


@pytest.fixture(scope="session")
def base_image(lxd: Lxd) -> str:
    if lxd.image_by_alias(BASE_IMAGE) is None:
        pytest.fail(f"base image {BASE_IMAGE!r} is missing: run scripts/build-base-image")
    return BASE_IMAGE


@pytest.fixture
def image_alias(lxd: Lxd, base_image: str) -> Iterator[str]:
    """An alias of the base image standing for "the app's last built image"; removed afterwards."""
    alias = f"gbp-test-{uuid.uuid4().hex[:10]}"
    base = lxd.image_by_alias(base_image)
    assert base is not None
    lxd.point_alias(alias, base.fingerprint, "ghost-buildpackd tests")
    yield alias
    lxd.delete_alias(alias)


@pytest.fixture
def ghost_dirs(tmp_path: Path) -> dict[str, Path]:
    """ghost.root, ghost.log_dir, ghost.provisioner_tree and ghost.packer_dir in a temporary directory.

    The root is world-traversable: LXD mounts working copies from below it into
    unprivileged containers.
    """
    dirs = {name: tmp_path / name for name in ("root", "log_dir", "provisioner_tree", "packer_dir")}
    for path in dirs.values():
        path.mkdir()
    for path in (tmp_path, *tmp_path.parents):
        if path == Path("/"):
            break
        path.chmod(path.stat().st_mode | 0o011)
    return dirs


@pytest.fixture
def make_config(mongo: MongoServer, db: Database, ghost_dirs: dict[str, Path]) -> Callable[..., Config]:
    """Build a validated Config for this test; keyword arguments are raw overrides, nested as in YAML."""

    def build(**overrides: Any) -> Config:
        return config_from_mapping(raw_config(mongo, db, ghost_dirs, **overrides), env={})

    return build


# Ghost's config.yml as a Ghost with containers has it: without `container.enabled: true` no step is made.
GHOST_CONFIG_WITH_CONTAINERS = "container:\n  enabled: true\n  endpoint: localhost\n"


def raw_config(mongo: MongoServer, db: Database, ghost_dirs: dict[str, Path], **overrides: Any) -> dict[str, Any]:
    ghost_config = ghost_dirs["root"].parent / "ghost-config.yml"  # a test may write its own there first
    if not ghost_config.exists():
        ghost_config.write_text(GHOST_CONFIG_WITH_CONTAINERS)
    raw: dict[str, Any] = {
        "mongodb": {"uri": mongo.uri, "database": db.name, "timeout": "5s"},
        "lxd": {"timeout": "60s"},
        "ghost": {**{key: str(path) for key, path in ghost_dirs.items()}, "config": str(ghost_config)},
        "events": {"poll_interval": "200ms"},
        # No warm pool unless a test asks (tests/test_warm_pool.py): idle containers would add load to every test.
        "container": {
            "idmap_user": "{}:{}".format(*WORKING_COPY_IDS),
            "exec_timeout": "60s",
            "warm_pool": {"per_app": 0},
        },
        "lease_ttl": "5s",
        "shutdown_grace": "20s",
        "log": {"format": "json", "level": "debug"},
    }
    for key, value in overrides.items():
        _merge(raw, key, value)
    return raw


def _merge(raw: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict) and isinstance(raw.get(key), dict):
        for inner_key, inner_value in value.items():
            _merge(raw[key], inner_key, inner_value)
    else:
        raw[key] = value


@pytest.fixture
def write_config(mongo: MongoServer, db: Database, ghost_dirs: dict[str, Path], tmp_path: Path) -> Callable[..., Path]:
    """Write a config file for a daemon process of this test and return its path."""

    def write(name: str = "config.yml", **overrides: Any) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw_config(mongo, db, ghost_dirs, **overrides)))
        return path

    return write


def job_ids(db: Database) -> set[str]:
    return {str(job["_id"]) for job in db.jobs.find({}, {"_id": 1})}


def leftover_containers(lxd: Lxd, db: Database) -> list[str]:
    """Containers tagged with a job of this test's database: none may remain after a step ends."""
    jobs = job_ids(db)
    return [c.name for c in lxd.list_containers() if c.tags.get(TAG_JOB) in jobs]


@pytest.fixture
def lxd_cleanup(lxd: Lxd, db: Database) -> Iterator[None]:
    """Remove, at the end, what this test's jobs left in LXD if it failed half-way (found by job id; nothing else)."""
    yield
    for name in leftover_containers(lxd, db) + idle_containers_of_apps(lxd, db):
        lxd.delete_container(name)
    remove_job_images(lxd, db)


def idle_containers_of_apps(lxd: Lxd, db: Database) -> list[str]:
    """The warm pool's containers for apps of this test's database (a daemon killed mid-test leaves them)."""
    apps = {str(app["_id"]) for app in db.apps.find({}, {"_id": 1})}
    return [c.name for c in idle_containers(lxd.list_containers()) if c.app_id in apps]


def remove_job_images(lxd: Lxd, db: Database) -> None:
    """Delete the images (and aliases) built for this database's jobs."""
    jobs = job_ids(db)
    for image in lxd.list_images():
        if image.properties.get(IMAGE_PROP_JOB) in jobs:
            for alias in image.aliases:
                lxd.delete_alias(alias)
            lxd.delete_image(image.fingerprint)
            remove_templates_of(lxd, image.fingerprint, structlog.get_logger("tests"))
    for job in jobs:
        lxd.delete_alias(job)


@pytest.fixture
def published_aliases(lxd: Lxd) -> Iterator[list[str]]:
    """Aliases the daemon publishes in a test; their images are deleted afterwards."""
    aliases: list[str] = []
    yield aliases
    for alias in aliases:
        image = lxd.image_by_alias(alias)
        lxd.delete_alias(alias)
        if image is not None and image.aliases == (alias,):
            lxd.delete_image(image.fingerprint)


@pytest.fixture
def daemons(write_config, tmp_path: Path, lxd_cleanup) -> Iterator[Callable[..., Daemons]]:
    """Groups of `ghost-buildpackd run` processes with these config overrides; stopped at the end."""
    made: list[Daemons] = []

    def make(**overrides: Any) -> Daemons:
        made.append(Daemons(write_config, tmp_path, overrides))
        return made[-1]

    yield make
    for group in made:
        group.stop_all()
