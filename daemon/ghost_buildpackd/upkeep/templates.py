"""Template containers: one stopped container per image and id mapping, copied for each new container.

Why: an unprivileged container's root filesystem is shifted to its id mapping
before its first start (at creation on `dir`, at the first start on btrfs),
which rewrites the owner of every file of the image: seconds for a Debian
image, on every container. A copy of a template needs no unpacking: on a
copy-on-write pool it is a snapshot, on `dir` a file copy, with nothing left
to shift.

A template is reusable by containers that share what the copy depends on:
the image, the id mapping (privileged, or the host ids mapped as themselves),
the profiles (so the pool) and the root disk's size; its name
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

Several daemons may share one LXD, and on a `dir` pool LXD deletes a
container whose files are being copied without a word (its rsync takes
"files vanished" as success): the copy would miss files. So what protects a
template lives on the template, in LXD, for every instance to see: each copy
holds it (a `template-copy.<copy>` tag, a lease until a time past the longest
copy), and a deletion first marks it (`template-deleting`), only when no live
hold is there; no copy starts on a marked template. Both are compare-and-set
writes (`Lxd.change_tags`). A copy is used only when, after it, the template
is still there, still held by it and unmarked; otherwise it is discarded and
the container is made from the image. The time of a template's last copy is
a tag too (`template-used`), so eviction ranks templates the same way in
every instance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
import time
import uuid
import zlib
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from ..logs import Logger
from ..lxd import TAG_PREFIX, ContainerInfo, ContainerSpec, Lxd, is_unavailable

TAG_TEMPLATE = TAG_PREFIX + "template"  # on a template: the fingerprint of its image
TAG_USED = TAG_TEMPLATE + "-used"  # wall-clock time (epoch seconds) of the last copy's start, or of its making
TAG_COPY = TAG_TEMPLATE + "-copy."  # + a copy's name: epoch seconds until which that copy holds the template
TAG_DELETING = TAG_TEMPLATE + "-deleting"  # epoch seconds its deletion began: no copy starts any more
TEMPLATE_NAME = re.compile(r"gbp-tpl-[0-9a-f]{12}-[0-9a-f]{8}")
# A temporary template older than this was left by a crash (making one takes seconds).
ABANDONED_AFTER = timedelta(minutes=10)
# Added to lxd.operation_timeout (the longest wait on a copy) for a hold's lease: the hosts of the daemons
# sharing an LXD write and read these times with their own clocks.
CLOCK_MARGIN = 300.0

_guard = threading.Lock()
_making: dict[str, threading.Lock] = {}  # per template name: one maker per process, the others wait for it
_wanted: dict[str, ContainerSpec] = {}  # per template name: to be made off the hot path (`want_template`)


class TemplateUnusable(Exception):
    """A template cannot be copied now, or its copy cannot be trusted."""


def template_name(spec: ContainerSpec) -> str:
    """`gbp-tpl-<image>-<crc>`: the crc covers everything a copy must share with its template."""
    # `owner-as-itself`: templates of the earlier mapping (container root was the owner) are not reused.
    key = f"{spec.image}|{spec.privileged}|{spec.idmap}|owner-as-itself|{','.join(spec.profiles)}|{spec.disk}"
    return f"gbp-tpl-{spec.image[:12]}-{zlib.crc32(key.encode()):08x}"


def template_spec(spec: ContainerSpec, name: str) -> ContainerSpec:
    """The template for containers like `spec`: the same image, mapping, profiles and disk; no mounts, no limits."""
    return ContainerSpec(
        name=name,
        image=spec.image,
        tags=template_tags(spec.image),
        privileged=spec.privileged,
        idmap=spec.idmap,
        disk=spec.disk,
        profiles=spec.profiles,
        protected=True,  # deleted only through `remove_template`, which honours copies in flight
    )


def template_tags(image: str) -> dict[str, str]:
    """The tags of a template of `image`, fresh: used now, so eviction does not take it first."""
    return {TAG_TEMPLATE: image, TAG_USED: _stamp(time.time())}


def is_template(container: ContainerInfo) -> bool:
    """A complete template (temporary ones are not)."""
    return TAG_TEMPLATE in container.tags and TEMPLATE_NAME.fullmatch(container.name) is not None


def live_holds(tags: Mapping[str, str], now: float) -> list[str]:
    """The copies holding a template with these tags whose lease has not run out at `now`."""
    return [key[len(TAG_COPY) :] for key, until in tags.items() if key.startswith(TAG_COPY) and _time(until) > now]


def last_use(container: ContainerInfo) -> float:
    """When the template was last copied (or made), for eviction: its tag, else its creation, else never."""
    if TAG_USED in container.tags:
        return _time(container.tags[TAG_USED])
    return container.created_at.timestamp() if container.created_at else 0.0


def create_container(lxd: Lxd, spec: ContainerSpec, keep: int, log: Logger, template_later: bool = False) -> None:
    """Create `spec`'s container as a copy of its template when `keep` allows templates, else from its image.

    With `template_later`, when there is no template yet, the container is made
    from its image, as fast as without templates, and its template is made
    off the hot path (`want_template`; a build makes it once its outcome is
    recorded): the first build of a new base image waits for one unpacking, not two.
    """
    if keep > 0 and template_later and lxd.container_status(template_name(spec)) != "Stopped":
        want_template(spec)
        log.info("container_made_from_image", container=spec.name, template_later=template_name(spec))
        lxd.create_container(spec)
        return
    if keep > 0:
        try:
            template, made = ready_template(lxd, spec, log)
            copy_template(lxd, template, spec)
            log.info("container_copied_from_template", container=spec.name, template=template)
            if made:
                evict_templates(lxd, keep, log, spare=template)
            return
        except Exception as error:
            if is_unavailable(error):
                raise
            log.warning(
                "container_template_unusable", container=spec.name, error=str(error), consequence="made from the image"
            )
            lxd.delete_container(spec.name)  # a copy that failed half-way, or one that cannot be trusted
    lxd.create_container(spec)


def want_template(spec: ContainerSpec) -> None:
    """Ask for the template of containers like `spec` to be made off the hot path (`make_wanted_templates`)."""
    with _guard:
        _wanted[template_name(spec)] = spec


def make_wanted_templates(lxd: Lxd, keep: int, log: Logger) -> list[str]:
    """Make the templates first uses asked for (`want_template`); the names of those made now."""
    with _guard:
        wanted = dict(_wanted)
        _wanted.clear()
    made = []
    for spec in wanted.values():
        if keep <= 0:
            break
        template, fresh = ready_template(lxd, spec, log)
        if fresh:
            evict_templates(lxd, keep, log, spare=template)
            made.append(template)
    return made


def ready_template(lxd: Lxd, spec: ContainerSpec, log: Logger) -> tuple[str, bool]:
    """The name of the complete template for containers like `spec`, and whether it was made now."""
    name = template_name(spec)
    with _maker_lock(name):
        if lxd.container_status(name) == "Stopped":
            return name, False
        make_template(lxd, spec, name, log)
    return name, True


def copy_template(lxd: Lxd, template: str, spec: ContainerSpec) -> None:
    """Create `spec`'s container as a copy of `template`, held for the copy's length; TemplateUnusable when the
    hold cannot be taken or the template did not stay whole until the copy ended (the copy is then left to the
    caller to discard)."""
    if not hold_template(lxd, template, spec.name, time.time() + lxd.config.operation_timeout + CLOCK_MARGIN):
        raise TemplateUnusable(f"template {template} is not a complete template, or is being deleted")
    try:
        lxd.create_container(spec, copy_of=template)
    except Exception:
        with contextlib.suppress(Exception):  # the copy's own error is the one to report; the lease runs out
            release_template(lxd, template, spec.name)
        raise
    if not release_template(lxd, template, spec.name):
        raise TemplateUnusable(f"template {template} was deleted or marked for deletion during the copy")


def hold_template(lxd: Lxd, template: str, copy: str, until: float) -> bool:
    """Hold `template` for the copy `copy` until `until` (and note its use now); False when it is no complete
    template or its deletion began. The hold is read back: a deletion's mark written in the same moment
    can overwrite it (`Lxd.change_tags`)."""
    key = TAG_COPY + copy

    def add_hold(tags: dict[str, str]) -> dict[str, str] | None:
        if TAG_TEMPLATE not in tags or TAG_DELETING in tags:
            return None
        return tags | {key: _stamp(until), TAG_USED: _stamp(time.time())}

    if lxd.change_tags(template, add_hold) is None:
        return False
    return _held(lxd, template, key)


def release_template(lxd: Lxd, template: str, copy: str) -> bool:
    """Drop the hold of the copy `copy`; whether the template stayed whole: still there, still held by `copy`
    and not marked for deletion."""
    key = TAG_COPY + copy
    whole = _held(lxd, template, key)

    def drop_hold(tags: dict[str, str]) -> dict[str, str] | None:
        return {name: value for name, value in tags.items() if name != key} if key in tags else None

    lxd.change_tags(template, drop_hold)
    return whole


def _held(lxd: Lxd, template: str, key: str) -> bool:
    """Whether `template` is there, held under `key`, not marked, and not being deleted or renamed by anyone."""
    details = lxd.describe_container(template)
    if details is None or key not in details.config or TAG_DELETING in details.config:
        return False
    return not lxd.being_removed(template)


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
        lxd.delete_container(temporary, unprotect=True)
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
        # Renamed first, still tagged as its step's container, then retagged: in between it is its build's
        # container (the step's takeover or the orphan sweep removes it if the build dies there), never a
        # template under a name that is not one, which the sweep takes for half-made once the container is
        # older than ABANDONED_AFTER, as a build's container often is. No copy starts until the retag.
        lxd.rename_container(container, name)
        try:
            lxd.retag_container(name, template_tags(spec.image), protect=True)
        except Exception:
            with contextlib.suppress(Exception):
                remove_template(lxd, name, "its adoption failed", log)
            raise
    log.info("container_template_adopted", template=name, container=container, image=spec.image[:12])
    evict_templates(lxd, keep, log, spare=name)
    return True


def evict_templates(lxd: Lxd, keep: int, log: Logger, spare: str = "") -> list[str]:
    """Delete the least recently used templates beyond `keep` (never `spare`, nor one a copy holds); their names.

    The bound counts the templates of every daemon sharing this LXD, and their
    holds and last uses are on the templates: every instance ranks alike.
    """
    now = time.time()
    templates = [c for c in lxd.list_containers() if is_template(c) and TAG_DELETING not in c.tags]
    excess = len(templates) - keep
    candidates = [c for c in templates if c.name != spare and not live_holds(c.tags, now)]
    removed: list[str] = []
    for container in sorted(candidates, key=last_use):
        if len(removed) >= excess:
            break
        if remove_template(lxd, container.name, "over container.templates", log):
            removed.append(container.name)
        elif lxd.container_status(container.name) is None:
            excess -= 1  # deleted by someone else meanwhile: one fewer to go
    return removed


def remove_stale_templates(lxd: Lxd, log: Logger, now: datetime | None = None) -> list[str]:
    """Delete templates whose image is gone and temporary ones a crash left; their names."""
    now = now or datetime.now(UTC)
    found = [container for container in lxd.list_containers() if TAG_TEMPLATE in container.tags]
    # Images read after the containers: a template adopted in between has its image published already.
    images = {image.fingerprint for image in lxd.list_images()}
    removed = []
    for container in found:
        if TAG_DELETING in container.tags:
            reason = "its deletion was interrupted"
        elif container.tags[TAG_TEMPLATE] not in images:
            reason = "its image is gone"
        elif not is_template(container) and container.created_at and now - container.created_at > ABANDONED_AFTER:
            reason = "left half-made"
        else:
            continue
        if remove_template(lxd, container.name, reason, log):
            removed.append(container.name)
    return removed


@dataclasses.dataclass(frozen=True)
class KeptTemplate:
    """A template kept on purpose (`container.templates`), not a leftover: what `status`, `check` and the demo list."""

    name: str
    image: str  # its image's fingerprint
    image_size: int | None  # bytes of the image file in LXD; None once the image is gone (the sweep removes it)
    last_used: float  # epoch seconds of its last copy (or its making)
    copies: int  # copies holding it now


def kept_templates(lxd: Lxd) -> list[KeptTemplate]:
    """The complete templates on this LXD (every daemon sharing it counts them alike), most recently used first."""
    sizes = {image.fingerprint: image.size for image in lxd.list_images()}
    now = time.time()
    kept = [
        KeptTemplate(
            c.name, c.tags[TAG_TEMPLATE], sizes.get(c.tags[TAG_TEMPLATE]), last_use(c), len(live_holds(c.tags, now))
        )
        for c in lxd.list_containers()
        if is_template(c)
    ]
    return sorted(kept, key=lambda template: template.last_used, reverse=True)


def remove_templates_of(lxd: Lxd, fingerprint: str, log: Logger) -> list[str]:
    """Delete every template of the image `fingerprint` (when the image itself is deleted)."""
    names = [c.name for c in lxd.list_containers() if c.tags.get(TAG_TEMPLATE) == fingerprint]
    return [name for name in names if remove_template(lxd, name, "its image was deleted", log)]


def remove_template(lxd: Lxd, name: str, reason: str, log: Logger) -> bool:
    """Mark, then delete, a template no copy holds; False when a copy holds it (the next pass retries)."""
    try:
        holders = mark_for_deletion(lxd, name)
        if holders is None:
            return False  # gone already
        if holders:
            log.info("container_template_kept_in_use", template=name, copies=holders, reason=reason)
            return False
        deleted = lxd.delete_container(name, unprotect=True)
    except Exception as error:  # LXD busy or away: the next pass retries
        log.warning("container_template_remove_failed", template=name, error=str(error))
        return False
    if deleted:
        log.info("container_template_removed", template=name, reason=reason)
    return deleted


def mark_for_deletion(lxd: Lxd, name: str) -> list[str] | None:
    """Mark the template `name` for deletion unless a copy holds it: [] once marked (no copy starts after), the
    copies holding it when refused, None when there is no such container. The mark is read back: a hold
    written in the same moment can overwrite it (`Lxd.change_tags`)."""
    now = time.time()
    holders: list[str] = []

    def add_mark(tags: dict[str, str]) -> dict[str, str] | None:
        holders[:] = live_holds(tags, now)
        if holders:
            return None
        return tags if TAG_DELETING in tags else tags | {TAG_DELETING: _stamp(now)}

    if lxd.change_tags(name, add_mark) is None:
        return holders if holders else None
    details = lxd.describe_container(name)
    if details is None:
        return None
    now_holding = live_holds(details.config, time.time())
    if TAG_DELETING not in details.config:
        return now_holding or ["unknown: the mark was overwritten"]
    return now_holding


def _stamp(moment: float) -> str:
    return f"{moment:.3f}"


def _time(value: str) -> float:
    """A stamp as `_stamp` wrote it; 0 (long past) when unreadable."""
    try:
        return float(value)
    except ValueError:
        return 0.0
