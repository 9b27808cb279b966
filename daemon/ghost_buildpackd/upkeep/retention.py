"""Image retention: a container image lives exactly as long as the AMI built with it.

The reconciler is level-triggered: each pass compares the `container_images`
records with what LXD holds and with which AMIs are still live, and converges.
Only images the daemon recorded are ever deleted; an image an app names as its
`build_infos.container_image`, or one a step in flight uses, is never touched.
When any fact cannot be gathered (MongoDB, LXD, the AMI inventory), the pass
deletes nothing.

Which AMIs are live comes from an inventory (`retention.inventory`, inventory.py):
`ghost` applies Ghost's intended rule from its jobs (the `ami_retention` newest
builds per app identity), `ec2` asks EC2 which recorded AMI ids still exist.
The operator's `reconcile` command (operator_commands.py) runs one pass and
prints its report.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from collections.abc import Mapping

from bson import ObjectId

from ..config import Config
from ..images import is_job_alias, named_image
from ..logs import get_logger
from ..lxd import ImageInfo, Lxd
from ..metrics import MetricsRecorder
from ..store import ImageRecord, Store
from .inventory import Inventory, InventoryUnavailable, Verdict, make_inventory
from .templates import remove_templates_of

log = get_logger(__name__)

# Actions in the report
KEEP = "keep"
PRUNE = "prune"  # alias deleted, and the image with it when no alias remains on it
MARK_MISSING = "mark-missing"  # the record's image is gone: the record becomes pruned (reason `missing`)
RESTORE_ALIAS = "restore-alias"  # live AMI, image still there, alias lost: point the alias again
LEAVE = "leave"  # out of step but not the daemon's to repair (no live record): reported only
ERROR = "error"


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
                report.error = str(error) if isinstance(error, InventoryUnavailable) else describe_error(error)
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
                log.error("reconcile_record_failed", alias=record.alias, action=action, error=describe_error(error))
                action, reason = ERROR, f"{action} failed: {describe_error(error)}"
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


def describe_error(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"
