"""What the warm pool keeps ready, shaped as a deploy step would shape it: the apps deployed most recently that
run their buildpacks in containers, each with the spec of its next deploy container (upkeep/warm_pool.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from bson import ObjectId

from ..config import Config
from ..ghost.documents import containers_off, parse_app
from ..ghost.fields import BadDocument
from ..images import ImageNotFound, deploy_image
from ..logs import get_logger
from ..lxd import COPY_ON_WRITE, ContainerSpec, Lxd
from ..model import DEPLOY
from ..store import Store
from ..upkeep.warm_pool import WarmTarget
from .containers import shaped_spec, start_container
from .context import StepFailed
from .deploy_ownership import prepared_owner

log = get_logger(__name__)


def warm_candidates(config: Config, store: Store, lxd: Lxd) -> list[WarmTarget]:
    """The apps deployed most recently, newest first, whose next deploy would run in a container of its image."""
    settings = config.container.warm_pool
    root = lxd.root_pool(["default", *config.container.profiles])
    copies_files = root is None or root[1] not in COPY_ON_WRITE
    targets = []
    for app_id in store.recently_deployed_apps(limit=settings.max):
        target = warm_target(config, store, lxd, app_id, copies_files)
        if target is not None:
            targets.append(target)
    return targets


def warm_target(config: Config, store: Store, lxd: Lxd, app_id: ObjectId, copies_files: bool) -> WarmTarget | None:
    """The spec of the app's next deploy container, or None when it would have none (said at debug level)."""
    try:
        app = parse_app(store.get_app(app_id), app_id)
        off = containers_off(app, config.ghost_settings.container_enabled, DEPLOY)
        with_build_pack = sorted(app.module_names_with_build_pack())
        if off or not with_build_pack:
            log.debug("warm_pool_skips_app", app=app.label, reason=off or "no module has a build_pack")
            return None
        image = deploy_image(lxd, app.container_image)
        owner = prepared_owner(config, app, app.module(with_build_pack[0]))
    except (BadDocument, ImageNotFound, StepFailed) as error:
        log.debug("warm_pool_skips_app", app_id=str(app_id), reason=str(error))
        return None
    spec = shaped_spec(config.container, "", image.fingerprint, {}, owner)
    return WarmTarget(app_id=app.id, app=app.label, spec=spec, disk=image.size if copies_files else 0)


def idle_launcher(config: Config, lxd: Lxd, stop: threading.Event) -> Callable[[ContainerSpec], None]:
    """How the pool launches an idle container: as a step launches its own (`start_container`)."""
    return lambda spec: start_container(lxd, config, spec, log, stop)
