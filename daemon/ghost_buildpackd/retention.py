"""Image retention: a container image lives exactly as long as the AMI built with it.

The reconciler is level-triggered: each pass compares the `container_images`
records with what LXD holds and with which AMIs are still live, and converges.
Only images the daemon recorded are ever deleted; an image an app names as its
`build_infos.container_image`, or one a step in flight uses, is never touched.
When any fact cannot be gathered (MongoDB, LXD, the AMI inventory), the pass
deletes nothing.

Which AMIs are live comes from an inventory (`retention.inventory`):
- `ghost` applies Ghost's intended rule from its jobs: per app identity (the AMI
  name prefix `ami.{env}.{region}.{role}.{name}[.{color}]`), the AMIs of the
  `ami_retention` newest builds are live. A build is a buildimage job that
  recorded its AMI: `done`, or `failed` at the autoscaling group update after it;
- `ec2` asks EC2 which recorded AMI ids still exist, per region, through each
  app's assumed role when it has one (as Ghost's AWS calls do).
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

from bson import ObjectId

from .config import Config
from .ghost.documents import AssumedRole, parse_app, parse_job
from .ghost.fields import BadDocument, parse_object_id
from .images import is_job_alias, named_image
from .logs import get_logger
from .lxd import ImageInfo, Lxd
from .metrics import MetricsRecorder
from .status import table
from .store import ImageRecord, Store
from .templates import remove_templates_of

log = get_logger(__name__)

EC2_BATCH = 100  # AMI ids per DescribeImages call
STS_SESSION_NAME = "ghost-buildpackd-retention"

# Actions in the report
KEEP = "keep"
PRUNE = "prune"  # alias deleted, and the image with it when no alias remains on it
MARK_MISSING = "mark-missing"  # the record's image is gone: the record becomes pruned (reason `missing`)
RESTORE_ALIAS = "restore-alias"  # live AMI, image still there, alias lost: point the alias again
LEAVE = "leave"  # out of step but not the daemon's to repair (no live record): reported only
ERROR = "error"


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


# --- the reconciler ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReportRow:
    app: str
    alias: str
    ami: str
    live: bool | None
    action: str
    reason: str


@dataclasses.dataclass
class ReconcileReport:
    dry_run: bool
    rows: list[ReportRow] = dataclasses.field(default_factory=list)
    counts: Counter[str] = dataclasses.field(default_factory=Counter)
    error: str = ""  # set when the pass could not gather its facts (nothing was changed)

    @property
    def ok(self) -> bool:
        return not self.error

    def add(self, row: ReportRow) -> None:
        self.rows.append(row)
        self.counts[row.action] += 1


@dataclasses.dataclass(frozen=True)
class _Facts:
    """What one pass knows before it changes anything."""

    records: list[ImageRecord]
    images: list[ImageInfo]
    protected: dict[str, str]  # fingerprint -> why it is never touched
    verdicts: dict[str, Verdict]
    recorded_aliases: set[str]  # aliases of every record, pruned ones included


class Reconciler:
    """Deletes container images whose AMIs were pruned, and nothing else."""

    def __init__(
        self,
        config: Config,
        store: Store,
        lxd: Lxd,
        metrics: MetricsRecorder | None = None,
        inventory: Inventory | None = None,
    ):
        self.config = config
        self.store = store
        self.lxd = lxd
        self.metrics = metrics
        self.inventory = inventory or make_inventory(config, store)
        self._lock = threading.Lock()  # the periodic pass and the after-build pass never overlap

    def run(self, app_id: ObjectId | None = None, dry_run: bool = False) -> ReconcileReport:
        with self._lock:
            report = ReconcileReport(dry_run=dry_run)
            try:
                facts = self._gather(app_id)
            except Exception as error:  # any unanswered question: delete nothing this pass
                report.error = str(error) if isinstance(error, InventoryUnavailable) else _describe_error(error)
                log.error("reconcile_skipped", reason=report.error, app_id=str(app_id) if app_id else None)
                return report
            self._converge(facts, report, dry_run)
            if app_id is None:
                self._report_orphans(facts, report)
            log.info("reconcile_finished", dry_run=dry_run, app_id=str(app_id) if app_id else None, **report.counts)
            return report

    # --- facts ---

    def _gather(self, app_id: ObjectId | None) -> _Facts:
        records = self.store.image_records(app_id, state="live")
        images = self.lxd.list_images()
        protected = self._protected(images)
        verdicts = self.inventory.verdicts(records) if records else {}
        return _Facts(records, images, protected, verdicts, self.store.all_image_aliases() if app_id is None else set())

    def _protected(self, images: list[ImageInfo]) -> dict[str, str]:
        """Images never touched: an app's current image, and images of steps in flight."""
        protected: dict[str, str] = {}
        for name, steps in self.store.active_step_images().items():
            if image := named_image(name, images):
                protected[image.fingerprint] = f"used by step in flight {', '.join(sorted(steps))}"
        for name, apps in self.store.apps_container_images().items():
            if image := named_image(name, images):
                protected[image.fingerprint] = f"current container_image of app {', '.join(sorted(apps))}"
        return protected

    # --- changes ---

    def _converge(self, facts: _Facts, report: ReconcileReport, dry_run: bool) -> None:
        by_alias = {alias: image for image in facts.images for alias in image.aliases}
        by_fingerprint = {image.fingerprint: image for image in facts.images}
        # Aliases left on each image, as this pass removes some (a dry run predicts with it).
        remaining = {image.fingerprint: set(image.aliases) for image in facts.images}
        for record in facts.records:
            # Alias first; else the recorded fingerprint (an earlier pass may have stopped after the alias).
            image = by_alias.get(record.alias) or by_fingerprint.get(record.fingerprint)
            verdict = facts.verdicts.get(record.alias, Verdict(None, "no verdict"))
            action, reason = self._decide(record, image, verdict, facts.protected)
            try:
                if not dry_run:
                    action, reason = self._apply(action, record, image, reason, remaining)
                elif action == PRUNE and image is not None:
                    remaining[image.fingerprint].discard(record.alias)
            except Exception as error:  # one record failing leaves the others to converge
                log.error("reconcile_record_failed", alias=record.alias, action=action, error=_describe_error(error))
                action, reason = ERROR, f"{action} failed: {_describe_error(error)}"
            report.add(ReportRow(record.app_label, record.alias, record.ami_id, verdict.live, action, reason))
            if action == PRUNE and image is not None and not remaining.get(image.fingerprint):
                report.counts["images_deleted"] += 1

    @staticmethod
    def _decide(
        record: ImageRecord, image: ImageInfo | None, verdict: Verdict, protected: Mapping[str, str]
    ) -> tuple[str, str]:
        if image is None:
            return MARK_MISSING, "missing"
        if image.fingerprint in protected:
            return KEEP, protected[image.fingerprint]
        if verdict.live is None:
            return KEEP, f"inventory has no answer: {verdict.reason}"
        if verdict.live:
            if record.alias not in image.aliases:
                return RESTORE_ALIAS, f"{verdict.reason}; the alias was gone, the image is not"
            return KEEP, verdict.reason
        return PRUNE, verdict.reason

    def _apply(
        self, action: str, record: ImageRecord, image: ImageInfo | None, reason: str, remaining: dict[str, set[str]]
    ) -> tuple[str, str]:
        """Carry the decision out; returns the action taken and its reason."""
        if action == MARK_MISSING:
            self.store.mark_image_pruned(record.alias, "missing")
            log.warning("image_record_missing", alias=record.alias, app=record.app_label, ami=record.ami_id)
        elif action == RESTORE_ALIAS and image is not None:
            self.lxd.point_alias(record.alias, image.fingerprint, f"ghost-buildpackd {record.app_label}")
            log.warning("image_alias_restored", alias=record.alias, fingerprint=image.fingerprint)
        elif action == PRUNE and image is not None:
            # Asked again right before deleting: a deploy may have started on it since the pass began.
            protected_now = self._protected([image])
            if protected_now:
                return KEEP, protected_now[image.fingerprint]
            self._prune(record, image, reason, remaining)
        return action, reason

    def _prune(self, record: ImageRecord, image: ImageInfo, reason: str, remaining: dict[str, set[str]]) -> None:
        """Delete the alias; then the image, when no alias remains on it; then mark the record."""
        if record.alias in image.aliases:
            self.lxd.delete_alias(record.alias)
        current = self.lxd.image_by_fingerprint(image.fingerprint)  # LXD is the truth, not our snapshot
        remaining[image.fingerprint] = set(current.aliases) if current else set()
        image_deleted = current is not None and not current.aliases
        if image_deleted:
            self.lxd.delete_image(image.fingerprint)
            remove_templates_of(self.lxd, image.fingerprint, log)
        self.store.mark_image_pruned(record.alias, reason)
        log.info(
            "image_pruned",
            alias=record.alias,
            fingerprint=image.fingerprint,
            app=record.app_label,
            app_identity=record.app_identity,
            ami=record.ami_id,
            reason=reason,
            image_deleted=image_deleted,
        )
        if image_deleted and self.metrics is not None:
            self.metrics.image_deleted()

    def _report_orphans(self, facts: _Facts, report: ReconcileReport) -> None:
        """Job-id aliases with no live record: not the daemon's to delete, only reported."""
        live = {record.alias for record in facts.records}
        for image in facts.images:
            for alias in image.aliases:
                if not is_job_alias(alias) or alias in live:
                    continue
                reason = (
                    "its record is pruned but the alias exists: left alone"
                    if alias in facts.recorded_aliases
                    else "alias with no container_images record: left alone"
                )
                report.add(ReportRow("?", alias, "", None, LEAVE, reason))


def _describe_error(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


# --- `ghost-buildpackd reconcile` --------------------------------------------------------------


def format_report(report: ReconcileReport) -> str:
    """The table: app, alias, AMI, live or not, action, reason."""
    header = ("APP", "ALIAS", "AMI", "LIVE", "ACTION", "REASON")
    live = {True: "yes", False: "no", None: "?"}
    rows = [(row.app, row.alias, row.ami, live[row.live], row.action, row.reason) for row in report.rows]
    lines = ["dry run: nothing was changed"] if report.dry_run else []
    lines.append(table(header, rows).rstrip("\n"))
    summary = ", ".join(f"{action}: {count}" for action, count in sorted(report.counts.items())) or "no records"
    lines.append(f"{'would be' if report.dry_run else 'done'}: {summary}")
    return "\n".join(lines)


def reconcile_command(config: Config, out: TextIO, dry_run: bool, app_id: str | None) -> int:
    """`ghost-buildpackd reconcile [--dry-run] [--app APP_ID]`: 0 done, 1 facts unavailable, 2 bad --app."""
    try:
        app = parse_object_id(app_id, "--app") if app_id is not None else None
    except BadDocument as error:
        print(f"ghost-buildpackd reconcile: {error}", file=sys.stderr)
        return 2
    try:
        store = Store.from_uri(config.mongodb.uri, config.mongodb.database, config.mongodb.timeout)
        lxd = Lxd(config.lxd)
    except Exception as error:
        print(f"ghost-buildpackd reconcile: cannot connect: {_describe_error(error)}", file=sys.stderr)
        return 1
    report = Reconciler(config, store, lxd).run(app, dry_run=dry_run)
    if report.error:
        print(f"ghost-buildpackd reconcile: nothing changed: {report.error}", file=sys.stderr)
        return 1
    print(format_report(report), file=out)
    return 0
