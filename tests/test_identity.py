"""Who a container's processes are on this host (real LXD): never root through the working copy's owner, never
Ghost's user as container root, and no app's processes reading another's environment."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pymongo.database import Database

from ghost_buildpackd.config import Config
from ghost_buildpackd.lxd import Lxd
from ghost_buildpackd.steps import StepFailed, container_name, deploy
from ghost_buildpackd.store import Store
from tests.conftest import WORKING_COPY_IDS, leftover_containers
from tests.support.ghost import module_doc
from tests.support.steps import deploy_context
from tests.support.waiting import wait_until
from tests.test_deploy import deploy_job, job_log, owner, prepare_ready, run_deploy, working_copy

pytestmark = pytest.mark.lxd

IdMap = list[tuple[int, int, int]]  # (first id inside, first id on the host, count), as /proc/<pid>/uid_map says


def id_map(pid: int, kind: str) -> IdMap:
    lines = Path(f"/proc/{pid}/{kind}_map").read_text().split("\n")
    return [(int(a), int(b), int(c)) for a, b, c in (line.split() for line in lines if line.strip())]


def host_id(mapping: IdMap, inside: int) -> int:
    return next(host + inside - first for first, host, count in mapping if first <= inside < first + count)


def host_ids(mapping: IdMap) -> set[int]:
    return {i for _, host, count in mapping for i in range(host, host + count)}


def init_pid(lxd: Lxd, name: str) -> int:
    return lxd.client.instances.get(name).state().pid


# --- the working copy's owner is never root -------------------------------------------------


@pytest.mark.parametrize("ids", [(0, 0), (WORKING_COPY_IDS[0], 0)], ids=["root", "root's group"])
def test_a_working_copy_of_roots_is_refused_before_anything_runs(
    ids: tuple[int, int],
    make_config: Callable[..., Config],
    store: Store,
    lxd: Lxd,
    db: Database,
    image_alias: str,
    ghost_dirs,
    lxd_cleanup,
) -> None:
    config = make_config()
    job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", "touch made")])
    prepared = prepare_ready(config, store, lxd, job_id, "app")  # no working copy yet: container.idmap_user
    assert lxd.container_status(container_name(prepared.step)) == "Running"
    module_dir = working_copy(ghost_dirs["root"], "app")
    os.chown(module_dir, *ids)

    with pytest.raises(StepFailed) as failure:
        run_deploy(deploy_context(config, store, lxd, job_id, "app", "run"))

    message = failure.value.message
    assert f"refused: the working copy {module_dir} belongs to " in message
    assert ("uid 0 (root)" if ids[0] == 0 else "gid 0 (root's group)") in message
    assert "container processes root on this host" in message
    assert sorted(p.name for p in module_dir.iterdir()) == ["requirements.txt"]  # nothing ran
    assert "$ bash" not in job_log(config, job_id) and "$ sh" not in job_log(config, job_id)
    assert leftover_containers(lxd, db) == []  # the prepared container went too


def test_a_working_copy_of_roots_found_at_preparation_launches_nothing(
    make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, image_alias: str, ghost_dirs, lxd_cleanup
) -> None:
    config = make_config()
    job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", "touch made")])
    module_dir = working_copy(ghost_dirs["root"], "app")  # left by an earlier deploy
    os.chown(module_dir, 0, 0)

    with pytest.raises(StepFailed, match=f"refused: the working copy {module_dir} belongs to uid 0"):
        deploy.prepare(deploy_context(config, store, lxd, job_id, "app", "prepare"))

    assert leftover_containers(lxd, db) == []


@pytest.mark.parametrize("user", ["root", "0:0"])
def test_an_idmap_user_of_roots_is_refused_at_preparation(
    user: str, make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, image_alias: str, lxd_cleanup
) -> None:
    config = make_config(container={"idmap_user": user})
    job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", "touch made")])

    with pytest.raises(StepFailed, match=f"refused: container.idmap_user '{user}' belongs to uid 0 \\(root\\)"):
        deploy.prepare(deploy_context(config, store, lxd, job_id, "app", "prepare"))

    assert leftover_containers(lxd, db) == []


# --- host ids of container processes ---------------------------------------------------------

RECORD_IDS = """set -e
id -u > whoami
cat /proc/self/uid_map > uid_map
cat /proc/self/gid_map > gid_map
mkdir -p out && echo built > out/file && chown 33:33 out/file
cp /etc/gitconfig gitconfig
"""


def test_the_buildpack_runs_as_neither_host_root_nor_ghosts_user_its_files_are_the_owners_and_git_trusts_it(
    make_config: Callable[..., Config], store: Store, lxd: Lxd, db: Database, image_alias: str, ghost_dirs, lxd_cleanup
) -> None:
    config = make_config()
    job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", RECORD_IDS)])
    module_dir = working_copy(ghost_dirs["root"], "app")

    outcome = run_deploy(deploy_context(config, store, lxd, job_id, "app", "run"))

    assert outcome.state == "succeeded", outcome
    uid, gid = WORKING_COPY_IDS
    uid_map = [tuple(map(int, line.split())) for line in (module_dir / "uid_map").read_text().splitlines()]
    gid_map = [tuple(map(int, line.split())) for line in (module_dir / "gid_map").read_text().splitlines()]
    assert (module_dir / "whoami").read_text().strip() == "0"
    root_on_host = host_id(uid_map, 0)
    assert root_on_host not in (0, uid), uid_map  # container root is neither host root nor Ghost's user
    assert host_id(gid_map, 0) not in (0, gid), gid_map
    assert (uid, uid, 1) in uid_map and (gid, gid, 1) in gid_map  # the owner is mapped as itself, alone
    assert host_ids(uid_map) & {0} == set() and host_ids(gid_map) & {0} == set()
    # git, run as container root, trusts the module, which belongs to another user inside the container
    assert "[safe]\n\tdirectory = /srv/app\n" in (module_dir / "gitconfig").read_text()
    for name in ("whoami", "uid_map", "out", "out/file"):  # written by container root, and by www-data
        assert owner(module_dir / name) == WORKING_COPY_IDS, name
    assert leftover_containers(lxd, db) == []


@pytest.fixture
def secret_process() -> Iterator[Callable[[str, str], int]]:
    """Start `sleep` in a container with SECRET in its environment (`lxc exec`); its host pid. Ended afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start(container: str, secret: str) -> int:
        marker = f"{abs(hash(secret)) % 100000 + 100000}"  # a duration nothing else on this host sleeps
        started.append(subprocess.Popen(["lxc", "exec", container, "--env", f"SECRET={secret}", "--", "sleep", marker]))
        wanted = f"sleep\0{marker}\0".encode()
        return wait_until(
            lambda: next((p for p in _pids_in(container) if _cmdline(p) == wanted), None), 60, f"sleep in {container}"
        )

    yield start
    for process in started:
        process.kill()
        process.wait(timeout=60)


def _pids_in(container: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"lxc.payload.{container}/" in (entry / "cgroup").read_text() + "/":
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile
                continue
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def read_environ(pid: int, uid: int, gid: int) -> subprocess.CompletedProcess[str]:
    """`cat /proc/<pid>/environ` as a host process of (uid, gid) without supplementary groups."""
    return subprocess.run(
        ["cat", f"/proc/{pid}/environ"], user=uid, group=gid, extra_groups=[], capture_output=True, text=True
    )


def test_containers_of_two_apps_cannot_read_each_others_environment(
    make_config: Callable[..., Config],
    store: Store,
    lxd: Lxd,
    db: Database,
    image_alias: str,
    lxd_cleanup,
    secret_process: Callable[[str, str], int],
) -> None:
    config = make_config()
    containers = {}
    for app in ("shop", "blog"):  # prepared as the daemon prepares them: the containers the buildpacks run in
        job_id = deploy_job(db, image_alias, [module_doc("app", "/srv/app", "true")], name=app)
        containers[app] = container_name(prepare_ready(config, store, lxd, job_id, "app").step)
    shop, blog = (init_pid(lxd, containers[app]) for app in ("shop", "blog"))
    uid, gid = WORKING_COPY_IDS

    # One map for every unprivileged container (see steps.container_spec for why not a range per container):
    # container root is neither host root nor Ghost's user, and the owner is mapped as itself.
    assert id_map(shop, "uid") == id_map(blog, "uid") and id_map(shop, "gid") == id_map(blog, "gid")
    for kind, owner_id in (("uid", uid), ("gid", gid)):
        assert (owner_id, owner_id, 1) in id_map(blog, kind), kind
        assert 0 not in host_ids(id_map(blog, kind)), kind
    shop_root = host_id(id_map(shop, "uid"), 0), host_id(id_map(shop, "gid"), 0)
    blog_root = host_id(id_map(blog, "uid"), 0), host_id(id_map(blog, "gid"), 0)
    assert uid not in (shop_root[0], blog_root[0]) and 0 not in (shop_root[0], blog_root[0])

    secret = f"blog-secret-{blog}"
    pid = secret_process(containers["blog"], secret)
    assert os.stat(f"/proc/{pid}").st_uid == blog_root[0]  # the same host uid as shop's root: the kernel keeps
    # each container's processes to its own user namespace all the same
    assert secret in Path(f"/proc/{pid}/environ").read_text()  # it is there: host root reads it
    for who in (shop_root, WORKING_COPY_IDS, (host_id(id_map(shop, "uid"), 33), host_id(id_map(shop, "gid"), 33))):
        attempt = read_environ(pid, *who)
        assert attempt.returncode != 0 and "Permission denied" in attempt.stderr, (who, attempt)
        assert secret not in attempt.stdout
    inside_shop = subprocess.run(
        ["lxc", "exec", containers["shop"], "--", "sh", "-c", "cat /proc/*/environ"], capture_output=True, text=True
    )
    assert secret not in inside_shop.stdout  # blog's processes are not even in shop's /proc
