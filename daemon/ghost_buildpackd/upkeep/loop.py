"""The upkeep loop: periodic and on-demand chores off the hot paths, in one supervised thread.

What it runs, and when:
- the list of base images Ghost's UI offers: at start, then every `base_images_interval`;
- the expiry of prepared containers never asked for, the orphan sweep and the stale-template
  sweep (sweep.py, templates.py): at start, every `sweep_interval`, and soon after a job ends;
- image retention (retention.py): for an app soon after its image is built, and for every
  app every `retention.interval` (the first pass at most a minute after start).
A chore that fails is logged (`upkeep_failed`) and tried again at its next turn.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from bson import ObjectId

from ..config import Config
from ..images import selectable_base_images
from ..logs import get_logger
from ..lxd import Lxd
from ..store import Store
from ..supervise import Supervised
from .retention import Reconciler
from .sweep import expire_prepared, sweep_orphans
from .templates import remove_stale_templates

log = get_logger(__name__)


class Upkeep:
    """Periodic and on-demand chores off the hot paths: orphan sweep, stale templates, image retention, and the
    list of base images Ghost's UI offers."""

    def __init__(self, config: Config, store: Store, lxd: Lxd, reconciler: Reconciler, stop: threading.Event):
        self.config = config
        self.store = store
        self.lxd = lxd
        self.reconciler = reconciler
        self.stop = stop
        self._apps: set[ObjectId] = set()
        self._sweep_due = threading.Event()
        self._kick = threading.Event()
        self._lock = threading.Lock()
        self.loop = Supervised("upkeep", self._loop, stop)

    def image_built(self, app_id: ObjectId) -> None:
        with self._lock:
            self._apps.add(app_id)
        self._kick.set()

    def job_ended(self, _job_id: ObjectId) -> None:
        self._sweep_due.set()
        self._kick.set()

    def _loop(self) -> None:
        next_sweep = next_base_images = 0.0  # at start
        next_retention = time.monotonic() + min(60.0, self.config.retention.interval)
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_base_images:
                self._guarded("base_images", self.refresh_base_images)
                next_base_images = now + self.config.base_images_interval
            if now >= next_sweep or self._sweep_due.is_set():
                self._sweep_due.clear()
                self._guarded("sweep", self._sweep)
                next_sweep = now + self.config.sweep_interval
            with self._lock:
                apps, self._apps = self._apps, set()
            for app_id in apps:
                self._guarded("retention_after_build", lambda app_id=app_id: self.reconciler.run(app_id=app_id))
            if now >= next_retention:
                self._guarded("retention", self.reconciler.run)
                next_retention = now + self.config.retention.interval
            self._kick.wait(max(0.5, min(next_sweep, next_retention, next_base_images) - time.monotonic()))
            self._kick.clear()

    def refresh_base_images(self) -> None:
        """List the base images this LXD server offers into MongoDB, where Ghost's UI reads them (no LXD access
        for Ghost). The last list stays while no daemon refreshes it: a hidden selector would make Ghost's UI save
        `'None'` (containers off) for every app edited meanwhile."""
        images = selectable_base_images(self.lxd.list_images())
        self.store.save_base_images(images, self.config.instance_id or "")
        log.debug("base_images_refreshed", count=len(images))

    def _sweep(self) -> None:
        expire_prepared(self.store, self.lxd, self.config.container.prepared_max_age, log)
        sweep_orphans(self.store, self.lxd, self.config.container.debug, log)
        remove_stale_templates(self.lxd, log)

    @staticmethod
    def _guarded(what: str, action: Callable[..., object]) -> None:
        try:
            action()
        except Exception:
            log.exception("upkeep_failed", task=what)
