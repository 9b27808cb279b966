"""Template containers: one stopped container per image and id mapping, copied for each new container.

Why: an unprivileged container's root filesystem is shifted to its id mapping
before its first start (at creation on `dir`, at the first start on btrfs),
which rewrites the owner of every file of the image: seconds for a Debian
image, on every container. A copy of a template needs no unpacking: on a
copy-on-write pool it is a snapshot, on `dir` a file copy. Unprivileged
containers have a host id range of their own (`security.idmap.isolated`), so
LXD shifts the copy from the template's range to its own at its first start
(measured on `dir` with the Debian image: 1.3 s for a copy and start without
the shift, 1.8 s with it); a privileged copy needs none.

A template is reusable by containers that share what the copy depends on:
the image, the id mapping (privileged, isolated, the host ids mapped as
themselves), the profiles (so the pool) and the root disk's size; its name
says so (`template_name`). It is made under a temporary name, started once,
stopped and renamed, so a template under its own name is always complete.
A build's container, once its image is published, holds exactly that image's
files, shifted already: it becomes the template of the app's deploys as it is
(`adopt`), so a new image costs no template-making at all.
Whatever goes wrong with one, the container is created from the image, as
without templates.

At most `container.templates` are kept (0: none), the least recently used go
first. The sweep removes templates whose image is gone and temporary ones a
crash left; retention removes an image's templates with the image.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
import zlib
from datetime import UTC, datetime, timedelta

from .logs import Logger
from .lxd import TAG_PREFIX, ContainerInfo, ContainerSpec, Lxd, is_unavailable

TAG_TEMPLATE = TAG_PREFIX + "template"  # on a template: the fingerprint of its image
TEMPLATE_NAME = re.compile(r"gbp-tpl-[0-9a-f]{12}-[0-9a-f]{8}")
# A temporary template older than this was left by a crash (making one takes seconds).
ABANDONED_AFTER = timedelta(minutes=10)

_guard = threading.Lock()
_making: dict[str, threading.Lock] = {}  # per template name: one maker per process, the others wait for it
_last_used: dict[str, float] = {}  # template name -> monotonic time of its last copy, for eviction


def template_name(spec: ContainerSpec) -> str:
    """`gbp-tpl-<image>-<crc>`: the crc covers everything a copy must share with its template."""
    key = f"{spec.image}|{spec.privileged}|{spec.idmap}|{spec.isolated}|{','.join(spec.profiles)}|{spec.disk}"
    return f"gbp-tpl-{spec.image[:12]}-{zlib.crc32(key.encode()):08x}"


def template_spec(spec: ContainerSpec, name: str) -> ContainerSpec:
    """The template for containers like `spec`: the same image, mapping, profiles and disk; no mounts, no limits."""
    return ContainerSpec(
        name=name,
        image=spec.image,
        tags={TAG_TEMPLATE: spec.image},
        privileged=spec.privileged,
        idmap=spec.idmap,
        isolated=spec.isolated,
        disk=spec.disk,
        profiles=spec.profiles,
    )


def is_template(container: ContainerInfo) -> bool:
    """A complete template (temporary ones are not)."""
    return TAG_TEMPLATE in container.tags and TEMPLATE_NAME.fullmatch(container.name) is not None


def create_container(lxd: Lxd, spec: ContainerSpec, keep: int, log: Logger) -> None:
    """Create `spec`'s container as a copy of its template when `keep` allows templates, else from its image."""
    if keep > 0:
        try:
            template = ready_template(lxd, spec, keep, log)
            lxd.create_container(spec, copy_of=template)
            _last_used[template] = time.monotonic()
            log.info("container_copied_from_template", container=spec.name, template=template)
            return
        except Exception as error:
            if is_unavailable(error):
                raise
            log.warning(
                "container_template_unusable", container=spec.name, error=str(error), consequence="made from the image"
            )
            lxd.delete_container(spec.name)  # a copy that failed half-way
    lxd.create_container(spec)


def ready_template(lxd: Lxd, spec: ContainerSpec, keep: int, log: Logger) -> str:
    """The name of the complete template for containers like `spec`, made now when there is none."""
    name = template_name(spec)
    with _maker_lock(name):
        if lxd.container_status(name) == "Stopped":
            return name
        make_template(lxd, spec, name, log)
    evict_templates(lxd, keep, log, spare=name)
    return name


def _maker_lock(name: str) -> threading.Lock:
    with _guard:
        return _making.setdefault(name, threading.Lock())


def make_template(lxd: Lxd, spec: ContainerSpec, name: str, log: Logger) -> None:
    """Create, start once (the shift), stop, then rename: under `name`, a template is complete."""
    temporary = f"{name}-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    try:
        lxd.create_container(template_spec(spec, temporary))
        lxd.start(temporary)
        lxd.stop(temporary)
        lxd.rename_container(temporary, name)
    except Exception:
        lxd.delete_container(temporary)
        if lxd.container_status(name) == "Stopped":  # another daemon on this LXD made it meanwhile
            return
        raise
    log.info(
        "container_template_made", template=name, image=spec.image[:12], seconds=round(time.monotonic() - started, 2)
    )


def adopt(lxd: Lxd, container: str, spec: ContainerSpec, keep: int, log: Logger) -> bool:
    """Make the stopped `container` the template for containers like `spec`; False when they have one already.

    For a container that holds exactly the files of `spec.image`, shifted for
    `spec`'s mapping: a build's container once its image is published.
    """
    name = template_name(spec)
    with _maker_lock(name):
        if lxd.container_status(name) is not None:
            return False
        lxd.retag_container(container, {TAG_TEMPLATE: spec.image})
        lxd.rename_container(container, name)
    log.info("container_template_adopted", template=name, container=container, image=spec.image[:12])
    evict_templates(lxd, keep, log, spare=name)
    return True


def evict_templates(lxd: Lxd, keep: int, log: Logger, spare: str = "") -> list[str]:
    """Delete the least recently used templates beyond `keep` (never `spare`); their names."""
    templates = [container for container in lxd.list_containers() if is_template(container)]
    never = datetime.min.replace(tzinfo=UTC)
    templates.sort(key=lambda c: (_last_used.get(c.name, 0.0), c.created_at or never))
    excess = [c.name for c in templates if c.name != spare][: max(0, len(templates) - keep)]
    return [name for name in excess if _remove_template(lxd, name, "over container.templates", log)]


def remove_stale_templates(lxd: Lxd, log: Logger, now: datetime | None = None) -> list[str]:
    """Delete templates whose image is gone and temporary ones a crash left; their names."""
    now = now or datetime.now(UTC)
    found = [container for container in lxd.list_containers() if TAG_TEMPLATE in container.tags]
    # Images read after the containers: a template adopted in between has its image published already.
    images = {image.fingerprint for image in lxd.list_images()}
    removed = []
    for container in found:
        if container.tags[TAG_TEMPLATE] not in images:
            reason = "its image is gone"
        elif not is_template(container) and container.created_at and now - container.created_at > ABANDONED_AFTER:
            reason = "left half-made"
        else:
            continue
        if _remove_template(lxd, container.name, reason, log):
            removed.append(container.name)
    return removed


def remove_templates_of(lxd: Lxd, fingerprint: str, log: Logger) -> list[str]:
    """Delete every template of the image `fingerprint` (when the image itself is deleted)."""
    names = [c.name for c in lxd.list_containers() if c.tags.get(TAG_TEMPLATE) == fingerprint]
    return [name for name in names if _remove_template(lxd, name, "its image was deleted", log)]


def _remove_template(lxd: Lxd, name: str, reason: str, log: Logger) -> bool:
    try:
        deleted = lxd.delete_container(name)
    except Exception as error:  # a template in use by a copy right now, LXD busy: the next pass retries
        log.warning("container_template_remove_failed", template=name, error=str(error))
        return False
    _last_used.pop(name, None)
    if deleted:
        log.info("container_template_removed", template=name, reason=reason)
    return deleted
