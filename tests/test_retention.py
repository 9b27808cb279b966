"""Retention: container images follow their AMIs, on the real LXD and the harness's MongoDB."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from botocore.session import get_session
from botocore.stub import Stubber
from bson import ObjectId
from pymongo.database import Database

from ghost_buildpackd.config import Config, ConfigError, config_from_mapping
from ghost_buildpackd.ghost.documents import parse_app
from ghost_buildpackd.lxd import ContainerSpec, Lxd
from ghost_buildpackd.model import RUNNING, SUCCEEDED, step_id
from ghost_buildpackd.operator_commands import reconcile_command
from ghost_buildpackd.store import ImageRecord, Store
from ghost_buildpackd.upkeep.inventory import Ec2Inventory, GhostInventory, Verdict, ami_retention
from ghost_buildpackd.upkeep.retention import KEEP, LEAVE, MARK_MISSING, PRUNE, Reconciler
from tests.support.ghost import finish_buildimage, make_app, make_job, set_status
from tests.support.steps import seed_step

pytestmark = [pytest.mark.lxd, pytest.mark.mongodb]


class Images:
    """Images this test publishes (each distinct), all deleted at the end whatever happens."""

    def __init__(self, lxd: Lxd, base_fingerprint: str):
        self.lxd = lxd
        self.base_fingerprint = base_fingerprint
        self.container = f"gbp-rettest-{uuid.uuid4().hex[:12]}"
        self.fingerprints: list[str] = []
        lxd.create_container(ContainerSpec(name=self.container, image=base_fingerprint, tags={}))

    def publish(self, *aliases: str) -> str:
        # A property unique to each publish gives each image its own fingerprint.
        image = self.lxd.publish(self.container, {"description": f"retention test {uuid.uuid4().hex}"}, "none")
        self.fingerprints.append(image.fingerprint)
        for alias in aliases:
            self.lxd.point_alias(alias, image.fingerprint)
        return image.fingerprint

    def exists(self, fingerprint: str) -> bool:
        return self.lxd.image_by_fingerprint(fingerprint) is not None

    def alias_exists(self, alias: str) -> bool:
        return self.lxd.image_by_alias(alias) is not None

    def cleanup(self) -> None:
        self.lxd.delete_container(self.container)
        for fingerprint in self.fingerprints:
            assert fingerprint != self.base_fingerprint
            self.lxd.delete_image(fingerprint)


@pytest.fixture
def images(lxd: Lxd, base_image: str) -> Iterator[Images]:
    base = lxd.image_by_alias(base_image)
    assert base is not None
    made = Images(lxd, base.fingerprint)
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def base_fingerprint(lxd: Lxd, base_image: str) -> str:
    image = lxd.image_by_alias(base_image)
    assert image is not None
    return image.fingerprint


@dataclasses.dataclass
class Build:
    alias: str
    fingerprint: str
    ami: str
    app_id: ObjectId


def build(
    db: Database, store: Store, images: Images, app_id: ObjectId, ami: str, fingerprint: str | None = None
) -> Build:
    """What a successful buildimage leaves: a done Ghost job with its AMI, an image aliased by job id, a record.

    With `fingerprint`, the alias goes on that existing image instead of a new one.
    """
    job_id = make_job(db, app_id, "buildimage")
    finish_buildimage(db, job_id, ami)
    alias = str(job_id)
    if fingerprint:
        images.lxd.point_alias(alias, fingerprint)
    else:
        fingerprint = images.publish(alias)
    app = parse_app(db.apps.find_one({"_id": app_id}))
    store.record_image(
        ImageRecord(
            alias=alias,
            fingerprint=fingerprint,
            job_id=job_id,
            app_id=app_id,
            app_identity=app.identity,
            app_label=app.label,
            region=app.region,
            ami_id=ami,
            ami_name=f"{app.identity}.{alias}",
            base_image="ghost-buildpackd/busybox",
            size=1,
            created_at=datetime.now(UTC),
        )
    )
    return Build(alias, fingerprint, ami, app_id)


def builds(db: Database, store: Store, images: Images, app_id: ObjectId, count: int, tag: str) -> list[Build]:
    made = [build(db, store, images, app_id, f"ami-{tag}{index:07x}") for index in range(count)]
    db.apps.update_one({"_id": app_id}, {"$set": {"build_infos.container_image": made[-1].alias}})
    return made


class CountingMetrics:
    def __init__(self) -> None:
        self.deleted = 0

    def image_deleted(self) -> None:
        self.deleted += 1


@pytest.fixture
def two_apps(db: Database, store: Store, images: Images) -> dict[str, list[Build]]:
    """Two apps, six builds each (oldest first); each app's current image is its newest build."""
    shop = make_app(db, name="shop")
    blog = make_app(db, name="blog")
    return {"shop": builds(db, store, images, shop, 6, "a"), "blog": builds(db, store, images, blog, 6, "b")}


def keep_two(make_config: Callable[..., Config]) -> Config:
    return make_config(retention={"ami_retention": 2})


def surviving(images: Images, made: list[Build]) -> list[str]:
    return [item.alias for item in made if images.alias_exists(item.alias) and images.exists(item.fingerprint)]


def test_keeps_the_newest_images_per_app_and_nothing_else_goes(
    make_config, store, lxd, images, two_apps, base_fingerprint
):
    foreign_job_alias = str(ObjectId())  # looks like the daemon's, but has no record
    foreign = images.publish(foreign_job_alias, f"foreign-{uuid.uuid4().hex[:8]}")
    metrics = CountingMetrics()

    with structlog.testing.capture_logs() as logs:
        report = Reconciler(keep_two(make_config), store, lxd, metrics=metrics).run()

    assert report.ok, report.error
    for made in two_apps.values():
        assert surviving(images, made) == [made[-2].alias, made[-1].alias]
        for item in made[:-2]:
            assert not images.exists(item.fingerprint), item
            record = store.get_image_record(item.alias)
            assert record is not None and record.state == "pruned"
            assert "not among the 2 newest AMIs" in record.pruned_reason
        assert store.get_image_record(made[-1].alias).state == "live"
    assert images.exists(foreign) and images.alias_exists(foreign_job_alias)
    assert images.exists(base_fingerprint)
    assert metrics.deleted == 8
    assert report.counts[PRUNE] == 8 and report.counts[KEEP] == 4
    assert [row.reason for row in report.rows if row.alias == foreign_job_alias] == [
        "alias with no container_images record: left alone"
    ]
    pruned = [line for line in logs if line["event"] == "image_pruned"]
    assert len(pruned) == 8
    oldest = two_apps["shop"][0]
    line = next(line for line in pruned if line["alias"] == oldest.alias)
    assert line["fingerprint"] == oldest.fingerprint and line["ami"] == oldest.ami and line["app"] == "shop/prod/web"
    assert line["reason"] and line["image_deleted"] is True

    # Level-triggered: the second pass finds nothing to do.
    before = {image.fingerprint: image.aliases for image in lxd.list_images()}
    again = Reconciler(keep_two(make_config), store, lxd, metrics=metrics).run()
    assert again.ok and PRUNE not in again.counts and MARK_MISSING not in again.counts
    mine = set(images.fingerprints)
    assert {fp: a for fp, a in before.items() if fp in mine} == {
        image.fingerprint: image.aliases for image in lxd.list_images() if image.fingerprint in mine
    }
    assert metrics.deleted == 8


@pytest.mark.parametrize(
    ("message", "kept"),
    [
        ("Autoscaling group update failed: Throttling", [1, 2]),  # its AMI was built: it counts among the newest
        ("ERROR: ami_id not found. The packer process may have failed.", [0, 1, 2]),  # no answer for it: kept
    ],
)
def test_a_build_failed_only_at_the_autoscaling_update_counts_as_built(
    make_config, db, store, lxd, images, message, kept
):
    made = builds(db, store, images, make_app(db, name="shop"), 3, "c")
    set_status(db, ObjectId(made[1].alias), "failed", message)

    report = Reconciler(keep_two(make_config), store, lxd).run()

    assert report.ok, report.error
    assert surviving(images, made) == [made[index].alias for index in kept]


def test_current_image_and_step_in_flight_are_protected(make_config, db, store, lxd, images, two_apps):
    shop, blog = two_apps["shop"], two_apps["blog"]
    # shop rolled back to its oldest image; blog has a deploy running on its second oldest
    # and a finished one on its oldest (which protects nothing).
    db.apps.update_one({"_id": shop[0].app_id}, {"$set": {"build_infos.container_image": shop[0].alias}})
    running_job, done_job = make_job(db, blog[0].app_id, "deploy"), make_job(db, blog[0].app_id, "deploy")
    seed_step(store, running_job, "deploy", "app", app_id=blog[0].app_id, state=RUNNING)
    seed_step(store, done_job, "deploy", "app", app_id=blog[0].app_id, state=SUCCEEDED)
    for job_id, alias in ((running_job, blog[1].alias), (done_job, blog[0].alias)):
        updated = db.container_steps.update_one({"_id": step_id(job_id, "deploy", "app")}, {"$set": {"image": alias}})
        assert updated.modified_count == 1

    report = Reconciler(keep_two(make_config), store, lxd).run()

    assert report.ok, report.error
    assert surviving(images, shop) == [shop[0].alias, shop[4].alias, shop[5].alias]
    assert surviving(images, blog) == [blog[1].alias, blog[4].alias, blog[5].alias]
    reasons = {row.alias: row.reason for row in report.rows}
    assert reasons[shop[0].alias].startswith("current container_image of app")
    assert reasons[blog[1].alias].startswith("used by step in flight")


def test_a_deploy_starting_during_the_pass_still_protects_its_image(make_config, db, store, lxd, images):
    made = builds(db, store, images, make_app(db), 3, "7")
    config = make_config(retention={"ami_retention": 1})

    class DeployStartsMeanwhile(GhostInventory):
        """Ghost's inventory, while a deploy step starts on the oldest image (after protection was first read)."""

        def verdicts(self, records: list[ImageRecord]) -> dict[str, Verdict]:
            job_id = make_job(db, made[0].app_id, "deploy")
            seed_step(store, job_id, "deploy", "app", app_id=made[0].app_id, state=RUNNING)
            db.container_steps.update_one({"_id": step_id(job_id, "deploy", "app")}, {"$set": {"image": made[0].alias}})
            return super().verdicts(records)

    report = Reconciler(config, store, lxd, inventory=DeployStartsMeanwhile(config, store)).run()

    assert surviving(images, made) == [made[0].alias, made[2].alias]
    rows = {row.alias: row for row in report.rows}
    assert rows[made[0].alias].action == KEEP and rows[made[0].alias].reason.startswith("used by step in flight")
    assert rows[made[1].alias].action == PRUNE


def test_inventory_that_cannot_answer_deletes_nothing(make_config, store, lxd, images, two_apps, tmp_path):
    failing_ec2 = Ec2Inventory(
        stubbed_ec2(lambda stub: stub.add_client_error("describe_images", "RequestLimitExceeded"))
    )
    report = Reconciler(keep_two(make_config), store, lxd, inventory=failing_ec2).run()
    assert not report.ok and "RequestLimitExceeded" in report.error

    for made in two_apps.values():
        assert surviving(images, made) == [item.alias for item in made]
        assert all(store.get_image_record(item.alias).state == "live" for item in made)


def test_dry_run_prints_the_plan_and_changes_nothing(make_config, store, lxd, images, two_apps, capsys):
    config = keep_two(make_config)
    report = Reconciler(config, store, lxd).run(dry_run=True)
    assert report.counts[PRUNE] == 8 and report.counts["images_deleted"] == 8

    shop_app = str(two_apps["shop"][0].app_id)
    out = io.StringIO()
    assert reconcile_command(config, out, dry_run=True, app_id=shop_app) == 0
    table = out.getvalue()
    assert table.startswith("dry run: nothing was changed")
    assert table.splitlines()[1].split() == ["APP", "ALIAS", "AMI", "LIVE", "ACTION", "REASON"]
    oldest, newest = two_apps["shop"][0], two_apps["shop"][-1]
    assert any(
        oldest.alias in line and oldest.ami in line and " no " in line and PRUNE in line for line in table.splitlines()
    )
    assert any(newest.alias in line and " yes " in line and KEEP in line for line in table.splitlines())
    assert two_apps["blog"][0].alias not in table  # --app limits the pass to one app

    for made in two_apps.values():
        assert surviving(images, made) == [item.alias for item in made]
        assert all(store.get_image_record(item.alias).state == "live" for item in made)


def test_blue_and_green_are_separate_identities(make_config, db, store, lxd, images):
    blue = builds(db, store, images, make_app(db, name="shop", color="blue"), 3, "c")
    green = builds(db, store, images, make_app(db, name="shop", color="green"), 3, "d")

    report = Reconciler(keep_two(make_config), store, lxd).run()

    assert report.ok, report.error
    assert surviving(images, blue) == [blue[1].alias, blue[2].alias]
    assert surviving(images, green) == [green[1].alias, green[2].alias]
    assert store.get_image_record(blue[0].alias).pruned_reason.endswith(
        "not among the 2 newest AMIs of ami.prod.eu-west-1.web.shop.blue (ami_retention)"
    )


def test_records_out_of_step_are_repaired_and_an_image_goes_with_its_last_alias(make_config, db, store, lxd, images):
    app_id = make_app(db)
    gone, old = build(db, store, images, app_id, "ami-e0000001"), build(db, store, images, app_id, "ami-e0000002")
    lxd.delete_image(gone.fingerprint)  # deleted by hand: the record is out of step
    shared = images.publish()
    first = build(db, store, images, app_id, "ami-e0000003", fingerprint=shared)
    second = build(db, store, images, app_id, "ami-e0000004", fingerprint=shared)
    config = keep_two(make_config)

    dry = Reconciler(config, store, lxd).run(dry_run=True)
    assert {row.alias: row.action for row in dry.rows if row.action != LEAVE} == {
        gone.alias: MARK_MISSING,
        old.alias: PRUNE,
        first.alias: KEEP,
        second.alias: KEEP,
    }
    assert store.get_image_record(gone.alias).state == "live"

    Reconciler(config, store, lxd).run()
    record = store.get_image_record(gone.alias)
    assert record.state == "pruned" and record.pruned_reason == "missing"
    assert not images.exists(old.fingerprint)
    assert images.alias_exists(first.alias) and images.alias_exists(second.alias)

    # A newer build pushes `first` out: its alias goes, the image stays for `second`.
    build(db, store, images, app_id, "ami-e0000005")
    Reconciler(config, store, lxd).run()
    assert not images.alias_exists(first.alias) and images.exists(shared) and images.alias_exists(second.alias)
    # And another pushes `second` out: no alias remains, so the image goes.
    build(db, store, images, app_id, "ami-e0000006")
    report = Reconciler(config, store, lxd).run()
    assert not images.exists(shared)
    assert report.counts[PRUNE] == 1 and report.counts["images_deleted"] == 1


def test_reconcile_command_line(write_config, db, store, images):
    made = builds(db, store, images, make_app(db), 3, "9")
    config = write_config(retention={"ami_retention": 2})

    def reconcile(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "ghost_buildpackd", "--config", str(config), "reconcile", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    bad = reconcile("--app", "not-an-id")
    assert bad.returncode == 2 and "--app: expected an ObjectId" in bad.stderr

    dry = reconcile("--dry-run", "--app", str(made[0].app_id))
    assert dry.returncode == 0, dry.stderr
    oldest_row = next(line for line in dry.stdout.splitlines() if made[0].alias in line)
    assert oldest_row.split()[2:5] == [made[0].ami, "no", PRUNE]
    assert surviving(images, made) == [item.alias for item in made]

    real = reconcile()
    assert real.returncode == 0, real.stderr
    assert surviving(images, made) == [made[1].alias, made[2].alias]
    pruned = [json.loads(line) for line in real.stderr.splitlines() if '"image_pruned"' in line]
    assert [(line["alias"], line["fingerprint"]) for line in pruned] == [(made[0].alias, made[0].fingerprint)]


# --- ami_retention ---------------------------------------------------------------------


def test_ami_retention_comes_from_the_config_then_ghost_then_five(tmp_path: Path):
    ghost_config = tmp_path / "ghost.yml"
    ghost_config.write_text("ami_retention: 3\ncontainer: {enabled: true}\n")
    assert ami_retention(config_from_mapping({"retention": {"ami_retention": 7}}, env={})) == 7
    assert ami_retention(config_from_mapping({"ghost": {"config": str(ghost_config)}}, env={})) == 3
    assert ami_retention(config_from_mapping({}, env={})) == 5
    ghost_config.write_text("container: {enabled: true}\n")
    assert ami_retention(config_from_mapping({"ghost": {"config": str(ghost_config)}}, env={})) == 5
    ghost_config.write_text("ami_retention: none\n")
    with pytest.raises(ConfigError, match="ami_retention: expected a whole number"):
        config_from_mapping({"ghost": {"config": str(ghost_config)}}, env={})


# --- EC2 inventory, against recorded responses ---------------------------------------------


def ec2_client(region: str = "eu-west-1") -> Any:
    return get_session().create_client(
        "ec2", region_name=region, aws_access_key_id="testing", aws_secret_access_key="testing"
    )


def stubbed_ec2(setup: Callable[[Stubber], None], region: str = "eu-west-1") -> Callable[[str, Any], Any]:
    client = ec2_client(region)
    stub = Stubber(client)
    setup(stub)
    stub.activate()
    return lambda asked, credentials: client if asked == region else pytest.fail(f"unexpected region {asked}")


def record(alias: str, ami: str, region: str = "eu-west-1") -> ImageRecord:
    return ImageRecord(
        alias=alias,
        fingerprint="0" * 64,
        job_id=ObjectId(),
        app_id=ObjectId(),
        app_identity=f"ami.prod.{region}.web.shop",
        app_label="shop/prod/web",
        region=region,
        ami_id=ami,
        ami_name="",
        base_image="",
        size=0,
        created_at=datetime.now(UTC),
    )


def described(*images: tuple[str, str]) -> dict[str, Any]:
    """A recorded DescribeImages response (the fields the inventory reads, plus a few real ones)."""
    return {
        "Images": [
            {"ImageId": ami, "State": state, "Name": f"ami.prod.eu-west-1.web.shop.{ami}", "OwnerId": "123456789012"}
            for ami, state in images
        ]
    }


def test_ec2_inventory_asks_again_in_halves_when_ec2_refuses_an_id():
    amis = ["ami-0000000a", "ami-0000000b", "ami-0000000c", "ami-0000000d", "ami-zz"]

    def responses(stub: Stubber) -> None:
        # EC2 refuses a whole call when one id is unknown or malformed, without naming it.
        def refuse(code: str, ids: list[str]) -> None:
            stub.add_client_error("describe_images", code, expected_params={"ImageIds": ids})

        refuse("InvalidAMIID.NotFound", amis)
        refuse("InvalidAMIID.NotFound", amis[:2])
        stub.add_response("describe_images", described((amis[0], "available")), {"ImageIds": amis[:1]})
        refuse("InvalidAMIID.NotFound", amis[1:2])
        refuse("InvalidAMIID.Malformed", amis[2:])
        stub.add_response("describe_images", described((amis[2], "deregistered")), {"ImageIds": amis[2:3]})
        refuse("InvalidAMIID.Malformed", amis[3:])
        stub.add_response("describe_images", described(), {"ImageIds": amis[3:4]})
        refuse("InvalidAMIID.Malformed", amis[4:])

    inventory = Ec2Inventory(stubbed_ec2(responses))
    verdicts = inventory.verdicts([record(f"r{index}", ami) for index, ami in enumerate(amis)])

    assert {alias: verdict.live for alias, verdict in verdicts.items()} == {
        "r0": True,
        "r1": False,
        "r2": False,
        "r3": False,
        "r4": None,  # a malformed id is not evidence that an AMI is gone: kept
    }
    assert verdicts["r1"].reason == "AMI absent in EC2 (eu-west-1)"
    assert verdicts["r2"].reason == "AMI deregistered in EC2 (eu-west-1)"
    assert "malformed" in verdicts["r4"].reason


def test_ec2_inventory_asks_each_region_in_batches_of_100():
    west = [f"ami-{index:08x}" for index in range(150)]
    east = ["ami-0e000001"]
    west_client, east_client = ec2_client("eu-west-1"), ec2_client("us-east-1")
    with Stubber(west_client) as west_stub, Stubber(east_client) as east_stub:
        west_stub.add_response(
            "describe_images", described(*((a, "available") for a in west[:100])), {"ImageIds": west[:100]}
        )
        west_stub.add_response(
            "describe_images", described(*((a, "available") for a in west[100:])), {"ImageIds": west[100:]}
        )
        east_stub.add_response("describe_images", described(), {"ImageIds": east})
        clients = {"eu-west-1": west_client, "us-east-1": east_client}
        inventory = Ec2Inventory(lambda region, credentials: clients[region])
        verdicts = inventory.verdicts([record(a, a) for a in west] + [record(a, a, "us-east-1") for a in east])
        west_stub.assert_no_pending_responses()
        east_stub.assert_no_pending_responses()
    assert all(verdicts[ami].live for ami in west)
    assert verdicts[east[0]] == Verdict(False, "AMI absent in EC2 (us-east-1)")


def test_ec2_inventory_deletes_images_whose_amis_are_gone(make_config, db, store, lxd, images):
    made = builds(db, store, images, make_app(db), 3, "f")
    amis = sorted(item.ami for item in made)

    def responses(stub: Stubber) -> None:
        stub.add_response("describe_images", described((made[2].ami, "available")), {"ImageIds": amis})

    config = make_config(retention={"inventory": "ec2", "ami_retention": 1})
    report = Reconciler(config, store, lxd, inventory=Ec2Inventory(stubbed_ec2(responses))).run()

    assert report.ok, report.error
    assert surviving(images, made) == [made[2].alias]
    assert store.get_image_record(made[0].alias).pruned_reason == "AMI absent in EC2 (eu-west-1)"
