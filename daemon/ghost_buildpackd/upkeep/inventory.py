"""AMI inventories: which AMIs are live, as retention's reconciler asks (`retention.inventory`).

- `ghost` applies Ghost's intended rule from its jobs: per app identity (the AMI
  name prefix `ami.{env}.{region}.{role}.{name}[.{color}]`), the AMIs of the
  `ami_retention` newest builds are live. A build is a buildimage job that
  recorded its AMI: `done`, or `failed` at the autoscaling group update after it;
- `ec2` asks EC2 which recorded AMI ids still exist, per region, through each
  app's assumed role when it has one (as Ghost's AWS calls do).

When an inventory cannot answer, it raises `InventoryUnavailable` and the
reconciler's pass deletes nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from bson import ObjectId

from ..config import Config
from ..ghost.documents import AssumedRole, parse_app, parse_job
from ..ghost.fields import BadDocument
from ..logs import get_logger
from ..store import ImageRecord, Store

log = get_logger(__name__)

EC2_BATCH = 100  # AMI ids per DescribeImages call
STS_SESSION_NAME = "ghost-buildpackd-retention"


class InventoryUnavailable(Exception):
    """The inventory cannot say which AMIs are live: this pass deletes nothing."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether a record's AMI is live: True, False, or None when the inventory does not know."""

    live: bool | None
    reason: str


class Inventory(Protocol):
    def verdicts(self, records: list[ImageRecord]) -> dict[str, Verdict]:
        """A verdict per record alias; raises InventoryUnavailable when it cannot answer."""


# --- ami_retention -----------------------------------------------------------------


def ami_retention(config: Config) -> int:
    """Newest AMIs kept per app identity: resolved at load (the daemon's key, else Ghost's config.yml, else 5)."""
    assert config.retention.ami_retention is not None, "resolved by config_from_mapping"
    return config.retention.ami_retention


# --- inventories ---------------------------------------------------------------------


class GhostInventory:
    """Ghost's rule, from MongoDB: per identity, the AMIs of the N newest successful buildimages are live."""

    def __init__(self, config: Config, store: Store):
        self.config = config
        self.store = store

    def verdicts(self, records: list[ImageRecord]) -> dict[str, Verdict]:
        keep = ami_retention(self.config)
        wanted = {record.app_identity for record in records}
        try:
            newest = self._amis_by_identity(wanted)
        except Exception as error:  # MongoDB errors and the like: no answer this pass
            raise InventoryUnavailable(f"cannot read Ghost's jobs: {type(error).__name__}: {error}") from error
        return {record.alias: self._verdict(record, newest.get(record.app_identity, []), keep) for record in records}

    def _amis_by_identity(self, identities: set[str]) -> dict[str, list[str]]:
        """Identity -> the AMI of each of its builds, newest first.

        A failed build's message names no AMI: the image record of that job does;
        without one, the build still takes its place among the newest.
        """
        app_identity: dict[ObjectId, str] = {}
        for doc in self.store.all_apps():
            try:
                app = parse_app(doc)
            except BadDocument as error:
                # Its jobs go uncounted: fewer known AMIs only ever keeps more images.
                log.warning("retention_app_skipped", app_id=str(doc.get("_id")), reason=str(error))
                continue
            if app.identity in identities:
                app_identity[app.id] = app.identity
        recorded = {record.job_id: record.ami_id for record in self.store.image_records(state=None)}
        builds: dict[str, list[tuple[datetime, ObjectId, str]]] = {}
        for doc in self.store.ended_buildimage_jobs(list(app_identity)):
            try:
                job = parse_job(doc)
            except BadDocument:
                continue
            if not job.built_image or job.app_id not in app_identity:
                continue
            ami = job.ami_id or recorded.get(job.id) or f"(AMI of build {job.id})"
            builds.setdefault(app_identity[job.app_id], []).append((_job_time(job.updated, job.id), job.id, ami))
        return {identity: _unique(ami for *_, ami in sorted(found, reverse=True)) for identity, found in builds.items()}

    @staticmethod
    def _verdict(record: ImageRecord, amis: list[str], keep: int) -> Verdict:
        if not record.ami_id:
            return Verdict(None, "the record has no AMI id")
        if record.ami_id in amis[:keep]:
            return Verdict(True, f"among the {keep} newest AMIs of {record.app_identity}")
        if record.ami_id in amis:
            return Verdict(False, f"not among the {keep} newest AMIs of {record.app_identity} (ami_retention)")
        return Verdict(None, f"no buildimage job of {record.app_identity} produced {record.ami_id}")


def _job_time(updated: datetime | None, job_id: ObjectId) -> datetime:
    """When the build ended: the job's `_updated`, else its id's creation time."""
    when = updated or job_id.generation_time
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


_GONE = ("InvalidAMIID.NotFound", "InvalidAMIID.Unavailable")
_MALFORMED = "InvalidAMIID.Malformed"


class Ec2Inventory:
    """Asks EC2 which recorded AMI ids still exist (DescribeImages, per region and account).

    An app with an assumed role (`assumed_account_id`, `assumed_role_name`,
    `assumed_region_name`) has its AMIs in that account: they are asked for with
    the role's credentials from STS AssumeRole, as Ghost makes its AWS calls.
    """

    def __init__(
        self,
        client_factory: Callable[[str, Mapping[str, str] | None], Any] | None = None,
        store: Store | None = None,
        sts_factory: Callable[[str], Any] | None = None,
    ):
        self.client_factory = client_factory or _boto3_client
        self.store = store
        self.sts_factory = sts_factory or _boto3_sts_client

    def verdicts(self, records: list[ImageRecord]) -> dict[str, Verdict]:
        roles = self._roles()
        groups: dict[tuple[str, AssumedRole | None], set[str]] = {}
        result: dict[str, Verdict] = {}
        for record in records:
            region = _record_region(record)
            if not record.ami_id or not region:
                result[record.alias] = Verdict(None, "the record has no AMI id or region")
            else:
                groups.setdefault((region, roles.get(record.app_id)), set()).add(record.ami_id)
        states = {group: self._states(*group, sorted(amis)) for group, amis in groups.items()}
        for record in records:
            if record.alias not in result:
                group = (_record_region(record), roles.get(record.app_id))
                result[record.alias] = _ec2_verdict(_where(*group), states[group].get(record.ami_id, "absent"))
        return result

    def _roles(self) -> dict[ObjectId, AssumedRole]:
        """App id -> its assumed role; apps without one use the daemon's own credentials."""
        if self.store is None:
            return {}
        roles = {}
        try:
            for doc in self.store.all_apps():
                try:
                    app = parse_app(doc)
                    role = app.assumed_role
                except BadDocument as error:  # its AMIs are asked for with the daemon's credentials
                    log.warning("retention_app_skipped", app_id=str(doc.get("_id")), reason=str(error))
                    continue
                if role is not None:
                    roles[app.id] = role
        except Exception as error:
            raise InventoryUnavailable(f"cannot read Ghost's apps: {type(error).__name__}: {error}") from error
        return roles

    def _states(self, region: str, role: AssumedRole | None, ami_ids: list[str]) -> dict[str, str]:
        """AMI id -> EC2 state (`available`, `deregistered`, ..., `absent`, `malformed`)."""
        where = _where(region, role)
        try:
            client = self.client_factory(region, self._credentials(region, role))
        except InventoryUnavailable:
            raise
        except Exception as error:
            raise InventoryUnavailable(f"EC2 client for {where}: {type(error).__name__}: {error}") from error
        states: dict[str, str] = {}
        for start in range(0, len(ami_ids), EC2_BATCH):
            states.update(self._describe(client, where, ami_ids[start : start + EC2_BATCH]))
        return states

    def _credentials(self, region: str, role: AssumedRole | None) -> Mapping[str, str] | None:
        """Temporary credentials of the app's role (STS AssumeRole), None for the daemon's own."""
        if role is None:
            return None
        try:
            answer = self.sts_factory(role.region or region).assume_role(
                RoleArn=role.arn, RoleSessionName=STS_SESSION_NAME
            )
        except Exception as error:
            raise InventoryUnavailable(f"STS AssumeRole {role.arn}: {type(error).__name__}: {error}") from error
        credentials = answer["Credentials"]
        return {
            "aws_access_key_id": credentials["AccessKeyId"],
            "aws_secret_access_key": credentials["SecretAccessKey"],
            "aws_session_token": credentials["SessionToken"],
        }

    def _describe(self, client: Any, where: str, batch: list[str]) -> dict[str, str]:
        """One batch; when EC2 refuses an id it names none of, ask in halves down to single ids."""
        try:
            response = client.describe_images(ImageIds=batch)
        except Exception as error:
            code = _error_code(error)
            if code not in (*_GONE, _MALFORMED):
                raise InventoryUnavailable(f"EC2 DescribeImages in {where}: {error}") from error
            if len(batch) == 1:
                return {batch[0]: "malformed" if code == _MALFORMED else "absent"}
            middle = len(batch) // 2
            return {
                **self._describe(client, where, batch[:middle]),
                **self._describe(client, where, batch[middle:]),
            }
        states = {ami: "absent" for ami in batch}
        for image in response.get("Images", []):
            states[image["ImageId"]] = str(image.get("State", "available"))
        return states


def _boto3() -> tuple[Any, Any]:
    try:
        import boto3
        from botocore.config import Config as BotoConfig
    except ImportError as error:
        raise InventoryUnavailable(
            "retention.inventory is ec2 but boto3 is not installed (pip install 'ghost-buildpackd[ec2]')"
        ) from error
    settings = BotoConfig(connect_timeout=10, read_timeout=30, retries={"max_attempts": 4, "mode": "standard"})
    return boto3, settings


def _boto3_client(region: str, credentials: Mapping[str, str] | None) -> Any:
    """EC2 in `region`: with `credentials` (an assumed role's), else boto3's default chain (the environment)."""
    boto3, settings = _boto3()
    return boto3.client("ec2", region_name=region, config=settings, **(credentials or {}))


def _boto3_sts_client(region: str) -> Any:
    boto3, settings = _boto3()
    return boto3.client("sts", region_name=region, config=settings)


def _where(region: str, role: AssumedRole | None) -> str:
    return f"{region}, account {role.account_id}" if role else region


def _error_code(error: Exception) -> str:
    response = getattr(error, "response", None)
    return str(((response or {}).get("Error") or {}).get("Code", "")) if isinstance(response, Mapping) else ""


def _record_region(record: ImageRecord) -> str:
    """The record's region, else the one in its identity `ami.{env}.{region}.{role}.{name}`."""
    if record.region:
        return record.region
    parts = record.app_identity.split(".")
    return parts[2] if len(parts) >= 5 else ""


def _ec2_verdict(where: str, state: str) -> Verdict:
    if state == "malformed":
        return Verdict(None, f"EC2 ({where}) calls the AMI id malformed")
    if state in ("absent", "deregistered"):
        return Verdict(False, f"AMI {state} in EC2 ({where})")
    return Verdict(True, f"AMI {state} in EC2 ({where})")


def make_inventory(config: Config, store: Store) -> Inventory:
    if config.retention.inventory == "ec2":
        return Ec2Inventory(store=store)
    return GhostInventory(config, store)
