"""Parity with Ghost 19.08's own runs, against a running daemon on the real LXD where LXD is involved.

Each test names the Ghost behaviour it holds the daemon to; docs/ghost.md's parity table lists the same.
Fake provisioners record their command lines: `salt-call` and `wget` (which fetches salt's
bootstrap script) in an image made for the test module, `ansible-playbook` in a fake Ghost
virtualenv on the host, mounted as Ghost mounts its own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.session import get_session
from botocore.stub import Stubber
from bson import ObjectId

from ghost_buildpackd.check import unprivileged_failures_check, venv_check
from ghost_buildpackd.config import ConfigError, config_from_mapping
from ghost_buildpackd.ghost.documents import parse_app, parse_job
from ghost_buildpackd.ghost.fields import BadDocument
from ghost_buildpackd.ghost.scripts import choose_module_script, ghost_b64decode
from ghost_buildpackd.lxd import ContainerSpec, Lxd
from ghost_buildpackd.model import BUILDIMAGE, FAILED, SUCCEEDED, step_id
from ghost_buildpackd.steps import StepFailed, buildimage, looks_unprivileged
from ghost_buildpackd.store import ImageRecord
from ghost_buildpackd.upkeep.inventory import Ec2Inventory, GhostInventory
from tests.conftest import GHOST_CONFIG_WITH_CONTAINERS, WORKING_COPY_IDS, leftover_containers
from tests.support.daemon import DaemonProcess
from tests.support.ghost import b64, finish_buildimage, make_app, make_job, module_doc, set_status
from tests.support.steps import step_context, terminal_step
from tests.support.waiting import wait_until

BASH_IMAGE = "ghost-buildpackd/busybox-bash"  # scripts/setup builds it (scripts/build-base-image --with-bash)
GHOST_LINE = re.compile(r"^\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2} GMT: \[container [^\]]+\] ")

FAKE_SALT_CALL = '#!/bin/sh\necho "salt-call ARGS: $*"\n'
# Ghost fetches bootstrap-salt.sh with wget; the fake writes one that says it ran.
FAKE_WGET = '#!/bin/sh\n[ "$1" = -O ] && printf "echo bootstrap ran with \\$0\\n" > "$2"\necho "wget ARGS: $*"\n'
FAKE_ANSIBLE = '#!/bin/sh\necho "ansible-playbook ARGS: $0 $*"\n'

CLIENT = """
import json, sys
from pymongo import MongoClient
from pathlib import Path
from ghost_buildpackd.ghost.client import run_buildpack
db = MongoClient(sys.argv[1], tz_aware=True)[sys.argv[2]]
result = run_buildpack(db, sys.argv[3], sys.argv[4], timeout=90, poll_interval=0.2, ghost_root=Path(sys.argv[5]))
print(json.dumps({"state": result.state, "message": result.message, "tail": result.output_tail}))
"""


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_tools_image(lxd: Lxd, base_image: str) -> Iterator[str]:
    """The busybox image with fake `salt-call` and `wget` in /usr/local/bin (ahead of busybox's on PATH)."""
    alias = f"gbp-test-fake-tools-{uuid.uuid4().hex[:8]}"
    name = f"gbp-test-tools-{uuid.uuid4().hex[:8]}"
    base = lxd.image_by_alias(base_image)
    assert base is not None
    lxd.create_container(ContainerSpec(name=name, image=base.fingerprint, tags={}))
    try:
        lxd.start(name)
        lxd.wait_ready(name, 60, probe=("mkdir", "-p", "/usr/local/bin"))
        lxd.push_file(name, "/usr/local/bin/salt-call", FAKE_SALT_CALL.encode())
        lxd.push_file(name, "/usr/local/bin/wget", FAKE_WGET.encode())
        lxd.stop(name)
        image = lxd.publish(name, {"description": "ghost-buildpackd test: fake salt tools"}, "none")
        lxd.point_alias(alias, image.fingerprint)
    finally:
        lxd.delete_container(name)
    yield alias
    lxd.delete_alias(alias)
    lxd.delete_image(image.fingerprint)


@pytest.fixture
def bash_image(lxd: Lxd) -> str:
    if lxd.image_by_alias(BASH_IMAGE) is None:
        pytest.fail(f"image {BASH_IMAGE!r} is missing: run scripts/setup (scripts/build-base-image --with-bash)")
    return BASH_IMAGE


@pytest.fixture
def fake_venv(tmp_path: Path) -> Path:
    """Ghost's virtualenv as the container sees it: bin/ansible-playbook, readable by anyone."""
    venv = tmp_path / "ghost-venv"
    (venv / "bin").mkdir(parents=True)
    playbook = venv / "bin" / "ansible-playbook"
    playbook.write_text(FAKE_ANSIBLE)
    for path in (venv, venv / "bin", playbook):
        path.chmod(0o755)
    return venv


def ghost_config_file(tmp_path: Path, text: str) -> str:
    """Ghost's config.yml with containers enabled, plus `text`."""
    path = tmp_path / "ghost-config.yml"
    path.write_text(GHOST_CONFIG_WITH_CONTAINERS + text)
    return str(path)


def provisioner_trees(ghost_dirs: dict[str, Path], job_id: ObjectId, *names: str) -> None:
    """What Ghost's buildimage leaves for the container build: one tree per configured provisioner."""
    for name in names:
        tree = ghost_dirs["provisioner_tree"] / f"{name}-{job_id}"
        tree.mkdir()
        tree.chmod(0o755)


def job_log(ghost_dirs: dict[str, Path], job_id: ObjectId) -> str:
    path = ghost_dirs["log_dir"] / f"{job_id}.txt"
    return path.read_text() if path.exists() else ""


def built(store, job_id: ObjectId, timeout: float = 120):
    return wait_until(lambda: terminal_step(store, step_id(job_id, "buildimage")), timeout, f"build of {job_id}")


# --- features, hooks, log lines: one daemon, two builds -----------------------------------------


@pytest.mark.lxd
def test_builds_install_features_as_ghost_does(
    db, store, lxd, write_config, ghost_dirs, tmp_path, fake_tools_image, fake_venv, lxd_cleanup
):
    ghost_config = ghost_config_file(
        tmp_path,
        "features_provisioners:\n  salt: {git_repo: git@example.invalid:salt}\n"
        "  ansible: {git_repo: git@example.invalid:ansible}\nprovisioner_log_level: debug\n",
    )
    config = write_config(ghost={"config": ghost_config, "venv": str(fake_venv)})
    hook = 'env | grep "^GHOST_" | sort; echo "hook ran with $0"'
    app = make_app(db, source_container_image=fake_tools_image, pre_buildimage=hook, features=[])
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready()
        bootstrapped = make_job(db, app, options=["false"])  # options[0] false: Ghost bootstraps salt
        provisioner_trees(ghost_dirs, bootstrapped, "salt", "ansible")
        finish_buildimage(db, bootstrapped, "ami-0a000001")
        assert built(store, bootstrapped).state == SUCCEEDED, store.get_step(step_id(bootstrapped, "buildimage"))
        skipped = make_job(db, app)  # no options: Ghost skips the bootstrap
        provisioner_trees(ghost_dirs, skipped, "salt", "ansible")
        finish_buildimage(db, skipped, "ami-0a000002")
        assert built(store, skipped).state == SUCCEEDED
        assert daemon.terminate() == 0

    text = job_log(ghost_dirs, bootstrapped)
    # every configured provisioner ran although the app has no features, with Ghost's command lines
    assert "wget ARGS: -O bootstrap-salt.sh https://bootstrap.saltstack.com" in text
    assert "bootstrap ran with bootstrap-salt.sh" in text
    assert (
        "salt-call ARGS: state.highstate --file-root=/srv/salt/salt --pillar-root=/srv/salt/pillar --local -l debug"
        in text
    )
    ansible = f"{fake_venv}/bin/ansible-playbook -i localhost, --connection=local /srv/ansible/main.yml -vvv"
    assert f"ansible-playbook ARGS: {ansible}" in text
    # order: bootstrap, pre hook, salt, ansible
    order = [text.index(mark) for mark in ("bootstrap ran", "hook ran", "salt-call ARGS", "ansible-playbook ARGS")]
    assert order == sorted(order)
    # the hook's environment is Ghost's image builder's: GHOST_ENV_COLOR always, no GHOST_ACTIVE_COLOR
    assert "GHOST_APP=shop\nGHOST_ENV=prod\nGHOST_ENV_COLOR=\nGHOST_ROLE=web\n" in re.sub(
        r"\[container buildimage\] ", "", text
    )
    # Ghost's log-line format: the daemon's messages carry Ghost's timestamp prefix, output lines do not
    headings = [line for line in text.splitlines() if GHOST_LINE.match(line)]
    assert any("$ salt-call" in line for line in headings) and any("published" in line for line in headings)
    assert all(not GHOST_LINE.match(line) for line in text.splitlines() if "ARGS:" in line)

    text = job_log(ghost_dirs, skipped)
    assert "salt bootstrap skipped" in text and "bootstrap ran" not in text and "wget ARGS" not in text
    assert "salt-call ARGS:" in text and "ansible-playbook ARGS:" in text
    assert leftover_containers(lxd, db) == []


@pytest.mark.lxd
def test_a_failure_of_an_unprivileged_container_names_container_privileged(
    db, store, lxd, write_config, make_config, base_image, tmp_path, ghost_dirs, lxd_cleanup
):
    app = make_app(db, source_container_image=base_image, pre_buildimage="mknod /tmp/null c 1 3")
    with DaemonProcess(write_config(), tmp_path / "daemon.log") as daemon:
        daemon.wait_ready()
        job = make_job(db, app)
        finish_buildimage(db, job)
        step = built(store, job)
        assert daemon.terminate() == 0

    assert step.state == FAILED and "container.privileged: true" in step.message, step.message
    assert "Operation not permitted" in job_log(ghost_dirs, job)
    assert "container.privileged: true" in job_log(ghost_dirs, job)
    result = unprivileged_failures_check(make_config(), store)
    assert not result.ok and step.id in result.detail and "container.privileged" in result.fix


@pytest.mark.lxd
def test_ghosts_default_salt_runs_without_features_and_a_missing_salt_call_is_named(
    make_config, store, lxd, db, ghost_dirs, lxd_cleanup
):
    app = make_app(db, features=[])  # Ghost's default features_provisioners: salt alone
    job = make_job(db, app)
    finish_buildimage(db, job)
    provisioner_trees(ghost_dirs, job, "salt")
    ctx = step_context(make_config(), store, lxd, job, BUILDIMAGE)
    with pytest.raises(StepFailed) as failure:
        buildimage.run(ctx)
    assert failure.value.message == (
        "features install (salt): `salt-call` is not in the container's image (exit 127: command not found)"
    )
    assert "salt bootstrap skipped" in job_log(ghost_dirs, job)
    assert leftover_containers(lxd, db) == []


def test_the_unprivileged_heuristic_needs_a_refused_privileged_operation():
    assert looks_unprivileged("mknod: /tmp/x: Operation not permitted")
    assert looks_unprivileged("mount: /mnt: permission denied.")
    assert looks_unprivileged("sysctl: cannot stat /proc/sys/net/ipv4/ip_forward: Read-only file system")
    assert not looks_unprivileged("cp: cannot create 'out': Permission denied")  # no privileged operation
    assert not looks_unprivileged("mount point prepared")  # no refusal


# --- buildpacks: the script, its shell, its environment ------------------------------------------

BASH_ONLY = """if [[ "$GHOST_MODULE_NAME" == api ]]; then echo "bash ran the committed script"; fi
echo "repo=$GHOST_MODULE_REPO note=$NOTE active=$GHOST_ACTIVE_COLOR color=$GHOST_ENV_COLOR"
"""


def clone(ghost_dirs: dict[str, Path], module: str, files: dict[str, str]) -> Path:
    path = ghost_dirs["root"] / "shop" / "prod" / "web" / "blue" / module
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
        os.chown(path / name, *WORKING_COPY_IDS)
    os.chown(path, *WORKING_COPY_IDS)
    return path


def run_client(mongo, db, job: ObjectId, module: str, ghost_root: Path) -> dict[str, Any]:
    """Ghost's `buildpack` command's request, in a process of its own (it removes a committed script it ran)."""
    done = subprocess.run(
        [sys.executable, "-c", CLIENT, mongo.uri, db.name, str(job), module, str(ghost_root)],
        capture_output=True,
        text=True,
        timeout=150,
        check=True,
    )
    return json.loads(done.stdout)


@pytest.fixture
def image_aliases(lxd: Lxd) -> Iterator[list[str]]:
    """Aliases standing for "the app's last built image", pointed at a base image; removed afterwards."""
    made: list[str] = []
    yield made
    for alias in made:
        lxd.delete_alias(alias)


def alias_of(lxd: Lxd, image_aliases: list[str], base: str) -> str:
    alias = f"gbp-test-parity-{uuid.uuid4().hex[:10]}"
    image = lxd.image_by_alias(base)
    assert image is not None
    image_aliases.append(alias)
    lxd.point_alias(alias, image.fingerprint, "ghost-buildpackd test_parity")
    return alias


@pytest.mark.lxd
def test_buildpacks_run_as_ghost_runs_them(
    mongo, db, store, lxd, write_config, ghost_dirs, tmp_path, base_image, bash_image, image_aliases
):
    stored = b64("echo stored script; echo wrapped=ok\n" * 8)
    wrapped = "\n".join(stored[i : i + 76] for i in range(0, len(stored), 76)) + "\n"  # as `base64` writes it
    modules = [
        # git_repo empty, source.url set: Ghost's normalisation gives GHOST_MODULE_REPO the url
        module_doc(
            "api",
            "/srv/api",
            "echo the stored script must not run",
            git_repo="",
            source={"url": " git@example.invalid:api.git "},
        ),
        {**module_doc("web", "/srv/web", None), "build_pack": wrapped},
    ]
    env_vars = [{"var_key": "NOTE", "var_value": "café-crème"}]
    with_bash = make_app(
        db,
        name="shop",
        color="blue",
        container_image=alias_of(lxd, image_aliases, bash_image),
        modules=modules,
        env_vars=env_vars,
    )
    with DaemonProcess(write_config(), tmp_path / "daemon.log") as daemon:
        daemon.wait_ready()
        deploy = make_job(db, with_bash, command="deploy", modules=["api"])
        set_status(db, deploy, "started")
        api = clone(ghost_dirs, "api", {"build_pack": BASH_ONLY, "app.py": "print(1)\n"})
        result = run_client(mongo, db, deploy, "api", ghost_dirs["root"])
        assert result["state"] == SUCCEEDED, result
        set_status(db, deploy, "done")

        db.apps.update_one(
            {"_id": with_bash}, {"$set": {"build_infos.container_image": alias_of(lxd, image_aliases, base_image)}}
        )
        plain = make_job(db, with_bash, command="deploy", modules=["web"])
        set_status(db, plain, "started")
        clone(ghost_dirs, "web", {"app.py": "print(2)\n"})
        result_sh = run_client(mongo, db, plain, "web", ghost_dirs["root"])
        set_status(db, plain, "done")
        assert daemon.terminate() == 0

    # the committed file won over the stored script, ran with bash, and was removed by Ghost's client once its
    # outcome was recorded, like Ghost's `rm -vf`
    assert "bash ran the committed script" in result["tail"]
    assert "the stored script must not run" not in job_log(ghost_dirs, deploy)
    assert sorted(p.name for p in api.iterdir()) == ["app.py"]
    # Ghost's environment: the url as repo (stripped), the colours, non-ASCII dropped from values
    assert "repo=git@example.invalid:api.git note=caf-crme active=green color=blue" in result["tail"]
    text = job_log(ghost_dirs, deploy)
    assert "the file build_pack at the root of the working copy" in text and "with bash" in text
    assert "env_vars NOTE: non-ASCII characters dropped" in text
    # the stored script, wrapped at 76 columns, decoded as Ghost decodes it, run with sh on an image without bash
    assert result_sh["state"] == SUCCEEDED, result_sh
    assert "wrapped=ok" in result_sh["tail"]
    text = job_log(ghost_dirs, plain)
    assert "the image has no bash: the script runs with sh" in text
    assert leftover_containers(lxd, db) == []


def test_a_committed_script_is_preferred_and_the_stored_one_then_not_decoded(tmp_path):
    (tmp_path / "build_pack").write_text("echo committed\n")
    chosen = choose_module_script(tmp_path, "build_pack", "not base64 at all: ###")
    assert chosen.content == b"echo committed\n" and chosen.path == tmp_path / "build_pack"
    (tmp_path / "build_pack").unlink()
    with pytest.raises(BadDocument, match=r"app.modules\[0\].build_pack: not valid base64 \(incorrect padding\)"):
        choose_module_script(tmp_path, "build_pack", "YWJjZA", "app.modules[0].build_pack")
    assert choose_module_script(tmp_path, "after_all_deploy", b64("echo after")).content == b"echo after"
    (tmp_path / "after_all_deploy").write_text("echo committed after\n")  # the same rule for after_all_deploy
    assert choose_module_script(tmp_path, "after_all_deploy", b64("echo after")).content == b"echo committed after\n"


def test_a_committed_script_outside_the_working_copy_is_refused(tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    (tmp_path / "secret").write_text("host file")
    (copy / "build_pack").symlink_to(tmp_path / "secret")
    with pytest.raises(BadDocument, match=r"working copy file build_pack: resolves to .* outside the working copy"):
        choose_module_script(copy, "build_pack", b64("echo stored"))


@pytest.mark.parametrize(
    ("encoded", "decoded"),
    [
        ("YWJj\nZGVm\n", b"abcdef"),  # wrapped, as `base64` writes it
        ("  YW Jj\r\n", b"abc"),  # spaces, CR
        ("!!YWJj!!", b"abc"),  # characters outside the alphabet are skipped
        ("YQ==YQ==", b"a"),  # padding ends the input
        ("YWI=YQ", b"ab"),
        ("Y Q = =", b"a"),  # a pad may be followed, past skipped characters, by the second pad
        ("YQ=x=", b"a\x0c"),  # a lone pad after two characters is skipped; the one after three ends it
        ("YWJj=", b"abc"),  # a pad where no quantum is open is skipped
        ("", b""),
    ],
)
def test_base64_is_decoded_as_python_2_decodes_it(encoded, decoded):
    assert ghost_b64decode(encoded) == decoded


@pytest.mark.parametrize(
    ("encoded", "reason"),
    [
        ("YQ", "incorrect padding"),
        ("YQ=", "incorrect padding"),
        ("YWJjZ", "incorrect padding"),
        ("YWJj\u00e9", "non-ASCII"),
    ],
)
def test_base64_that_python_2_refuses_is_refused(encoded, reason):
    with pytest.raises(ValueError, match=reason):
        ghost_b64decode(encoded)


def test_environments_are_ghosts_variable_for_variable():
    doc = {
        "_id": ObjectId(),
        "name": "shop",
        "env": "prod",
        "role": "web",
        "env_vars": [{"var_key": "NOTE", "var_value": "naïve"}, {"var_key": "EMPTY"}],
        "modules": [{"name": "api", "path": "/srv/api", "source": {"url": "s3://bucket/api"}}],
    }
    app = parse_app(doc)
    assert app.hook_env() == {
        "GHOST_APP": "shop",
        "GHOST_ENV": "prod",
        "GHOST_ENV_COLOR": "",
        "GHOST_ROLE": "web",
        "NOTE": "naïve",  # Ghost's image builder passes values as they are
        "EMPTY": "",
    }
    assert app.module_env(app.module("api")) == {
        "GHOST_APP": "shop",
        "GHOST_ENV": "prod",
        "GHOST_ROLE": "web",
        "GHOST_MODULE_NAME": "api",
        "GHOST_MODULE_PATH": "/srv/api",
        "GHOST_MODULE_REPO": "s3://bucket/api",
        "NOTE": "nave",  # get_ghost_env_variables encodes to ASCII, ignoring what does not fit
        "EMPTY": "",
    }
    blue = parse_app({**doc, "blue_green": {"color": "blue", "is_online": True}})
    assert blue.hook_env()["GHOST_ENV_COLOR"] == "blue" and "GHOST_ACTIVE_COLOR" not in blue.hook_env()
    assert blue.module_env(blue.module("api"))["GHOST_ACTIVE_COLOR"] == "blue"


# --- poll mode: Ghost's cancel writes local time ----------------------------------------------


def high_water_at_least(store, when: datetime) -> bool:
    mark = store.load_checkpoint().poll_high_water
    return mark is not None and (mark if mark.tzinfo else mark.replace(tzinfo=UTC)) >= when


def job_doc(app: ObjectId, status: str, message: str, updated: datetime) -> dict[str, Any]:
    return {
        "command": "buildimage",
        "app_id": app,
        "status": status,
        "message": message,
        "options": [],
        "_updated": updated,
    }


@pytest.mark.lxd
@pytest.mark.parametrize("mongo", ["standalone"], indirect=True)
def test_poll_high_water_mark_never_passes_this_hosts_clock(db, store, write_config, tmp_path):
    config = write_config(events={"mode": "poll", "poll_interval": "200ms"})
    app = make_app(db)
    with DaemonProcess(config, tmp_path / "daemon.log", trivial_bodies=True) as daemon:
        daemon.wait_ready()
        # Ghost's run.py cancels with a local-time _updated: on a host at UTC+3 that is 3 hours ahead.
        now = datetime.now(UTC)
        db.jobs.insert_one(job_doc(app, "cancelled", "", now + timedelta(hours=3)))
        wait_until(lambda: high_water_at_least(store, now), 30, "a poll that read the cancelled job")
        later = db.jobs.insert_one(
            job_doc(app, "done", "Build image OK: [ami-0b000001]", datetime.now(UTC))
        ).inserted_id
        wait_until(lambda: store.get_step(step_id(later, "buildimage")), 30, "the next job to be seen")
        assert daemon.saw("job_updated_in_the_future")
        assert daemon.terminate() == 0
    assert not high_water_at_least(store, datetime.now(UTC) + timedelta(seconds=1))  # never past the clock


# --- retention: Ghost counts builds; the ec2 inventory asks in each app's account -----------------


def image_record(
    job_id: ObjectId, app_id: ObjectId, ami: str, identity: str = "ami.prod.eu-west-1.web.shop"
) -> ImageRecord:
    return ImageRecord(
        alias=str(job_id),
        fingerprint="0" * 64,
        job_id=job_id,
        app_id=app_id,
        app_identity=identity,
        app_label="shop/prod/web",
        region="eu-west-1",
        ami_id=ami,
        ami_name="",
        base_image="",
        size=0,
        created_at=datetime.now(UTC),
    )


def test_ghost_inventory_counts_builds_whose_autoscaling_update_failed(db, store, make_config):
    config = make_config(retention={"ami_retention": 2})
    app = make_app(db)
    records = []
    for index, (status, message) in enumerate(
        [
            ("done", "Build image OK: [ami-00000001]"),
            ("done", "Build image OK: [ami-00000002]"),
            ("failed", "Autoscaling group update failed: throttled"),  # AMI recorded, then the ASG update failed
            ("failed", "An error occured during container process (boom)"),  # no AMI: not a build
        ]
    ):
        job = make_job(db, app)
        set_status(db, job, status, message)
        if index == 2:
            store.record_image(image_record(job, app, "ami-00000003"))
            records.append(image_record(job, app, "ami-00000003"))
        elif index < 2:
            records.append(image_record(job, app, f"ami-0000000{index + 1}"))
    verdicts = GhostInventory(config, store).verdicts(records)
    assert [verdicts[record.alias].live for record in records] == [False, True, True]

    unrecorded = make_job(db, app)  # a newer failed-at-ASG build the daemon has no record of still counts
    set_status(db, unrecorded, "failed", "Autoscaling group update failed")
    verdicts = GhostInventory(config, store).verdicts(records)
    assert [verdicts[record.alias].live for record in records] == [False, False, True]


def test_ec2_inventory_uses_each_apps_assumed_role(db, store):
    own = make_app(db, name="own")
    assumed = make_app(
        db,
        name="other",
        assumed_account_id="210987654321",
        assumed_role_name="ghost-role",
        assumed_region_name="us-east-1",
    )
    records = [
        image_record(ObjectId(), own, "ami-0000000a"),
        image_record(ObjectId(), assumed, "ami-0000000b", "ami.prod.eu-west-1.web.other"),
    ]

    session = get_session()
    sts = session.create_client("sts", region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t")
    ec2 = {
        key: session.create_client("ec2", region_name="eu-west-1", aws_access_key_id="t", aws_secret_access_key="t")
        for key in ("own", "assumed")
    }
    asked: list[tuple[str, Any]] = []

    def ec2_for(region: str, credentials: Any) -> Any:
        asked.append((region, credentials))
        return ec2["assumed" if credentials else "own"]

    with Stubber(sts) as sts_stub, Stubber(ec2["own"]) as own_stub, Stubber(ec2["assumed"]) as other_stub:
        expires = datetime.now(UTC) + timedelta(hours=1)
        sts_stub.add_response(
            "assume_role",
            {
                "Credentials": {
                    "AccessKeyId": "ASIAEXAMPLE0000001",
                    "SecretAccessKey": "secret-of-the-role",
                    "SessionToken": "session-token-of-the-role",
                    "Expiration": expires,
                }
            },
            {"RoleArn": "arn:aws:iam::210987654321:role/ghost-role", "RoleSessionName": "ghost-buildpackd-retention"},
        )
        own_stub.add_response(
            "describe_images",
            {"Images": [{"ImageId": "ami-0000000a", "State": "available"}]},
            {"ImageIds": ["ami-0000000a"]},
        )
        other_stub.add_response(
            "describe_images",
            {"Images": [{"ImageId": "ami-0000000b", "State": "available"}]},
            {"ImageIds": ["ami-0000000b"]},
        )
        verdicts = Ec2Inventory(
            ec2_for, store=store, sts_factory=lambda region: sts if region == "us-east-1" else pytest.fail(region)
        ).verdicts(records)
        for stub in (sts_stub, own_stub, other_stub):
            stub.assert_no_pending_responses()

    assert all(verdict.live for verdict in verdicts.values())
    assert verdicts[records[1].alias].reason == "AMI available in EC2 (eu-west-1, account 210987654321)"
    role_credentials = {
        "aws_access_key_id": "ASIAEXAMPLE0000001",
        "aws_secret_access_key": "secret-of-the-role",
        "aws_session_token": "session-token-of-the-role",
    }
    assert sorted(asked, key=lambda item: bool(item[1])) == [("eu-west-1", None), ("eu-west-1", role_credentials)]


def test_ghost_venv_must_not_be_a_system_directory():
    with pytest.raises(ConfigError, match=r"ghost\.venv: /usr is a system directory"):
        config_from_mapping({"ghost": {"venv": "/usr"}}, env={})


def test_check_says_when_ghosts_virtualenv_lacks_ansible(tmp_path, fake_venv):
    ghost_config = ghost_config_file(tmp_path, "features_provisioners:\n  ansible: {}\n")
    missing = config_from_mapping({"ghost": {"config": ghost_config, "venv": str(tmp_path / "nowhere")}}, env={})
    result = venv_check(missing)
    assert not result.ok and "ansible-playbook does not exist" in result.detail and "sys.exec_prefix" in result.fix
    assert venv_check(config_from_mapping({"ghost": {"config": ghost_config, "venv": str(fake_venv)}}, env={})).ok
    assert venv_check(config_from_mapping({"ghost": {"venv": str(tmp_path / "nowhere")}}, env={})).ok  # salt only


@pytest.mark.parametrize(
    ("level", "salt_level", "ansible_flag"),
    [("warning", "warning", []), ("error", "error", []), ("info", "info", ["-v"]), ("trace", "trace", ["-vvvv"])],
)
def test_provisioner_commands_take_ghosts_log_level(tmp_path, level, salt_level, ansible_flag):
    ghost_config = ghost_config_file(tmp_path, f"provisioner_log_level: {level}\n")
    config = config_from_mapping({"ghost": {"config": ghost_config, "venv": "/opt/ghost/venv"}}, env={})
    commands = config.container.provisioner_commands
    assert buildimage.provisioner_argv(config, commands.salt)[-2:] == ["-l", salt_level]
    assert buildimage.provisioner_argv(config, commands.ansible) == [
        "/opt/ghost/venv/bin/ansible-playbook",
        "-i",
        "localhost,",
        "--connection=local",
        "/srv/ansible/main.yml",
        *ansible_flag,  # Ghost's map has no flag for error and warning: none is passed
    ]


def test_the_plan_follows_ghosts_provisioners_not_the_apps_features(make_config, store, lxd, db, ghost_dirs):
    app = make_app(db, features=[{"name": "web", "provisioner": "ansible"}])  # Ghost's config: salt alone
    with_tree, without_tree = make_job(db, app), make_job(db, app)
    provisioner_trees(ghost_dirs, with_tree, "salt")
    config = make_config()

    def plan(job: ObjectId) -> buildimage.BuildPlan:
        ctx = step_context(config, store, lxd, job, BUILDIMAGE)
        return buildimage.make_plan(ctx, parse_job(store.get_job(job)), parse_app(store.get_app(app)))

    planned = plan(with_tree)
    assert planned.provisioners == ["salt"] and not planned.bootstrap_salt  # no options: no bootstrap
    assert planned.notes == [
        "the app's features use ansible, which Ghost's features_provisioners does not list: not installed "
        "(Ghost runs only the provisioners its config.yml lists)"
    ]
    planned = plan(without_tree)
    assert planned.provisioners == [] and "salt (Ghost's features_provisioners) skipped" in planned.notes[0]
