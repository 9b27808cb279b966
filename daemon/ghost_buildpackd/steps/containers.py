"""A step's container, from its name to its launch: tags, the ids mapped into it, its spec from `container.*`.

Names and tags tie a container to one attempt of one step, so whatever an
attempt does by name touches only its own; `launch` removes what earlier
attempts left first (`release.remove_leftovers`).
"""

from __future__ import annotations

import grp
import pwd
import re
import threading
import zlib
from collections.abc import Mapping

from ..config import Config, ContainerConfig
from ..logs import Logger
from ..lxd import (
    TAG_APP,
    TAG_CLAIM,
    TAG_JOB,
    TAG_KIND,
    TAG_OWNER,
    TAG_STEP,
    ContainerSpec,
    Lxd,
    LxdError,
    LxdUnavailable,
    Mount,
)
from ..model import BUILD_PACK, DEPLOY, Step
from ..upkeep import templates, warm_pool
from .context import StepContext, StepFailed
from .release import remove_leftovers

SCRIPT_DIR = "/var/lib/ghost-buildpackd"  # where scripts are put inside containers


def container_name(step: Step) -> str:
    """An LXD-valid name, unique to the step's attempt: `gbp-<job>-b-<claim>`, or
    `gbp-<job>-d-<module>-<crc>-<claim>` for a build_pack and `gbp-<job>-a-<module>-<crc>-<claim>`
    for an after_all_deploy.

    From the job id (never the AMI name) and the claim number, so two attempts
    of a step never share a container: whatever one attempt does by name
    touches only its own.
    """
    if step.kind == "buildimage":
        return f"gbp-{step.job_id}-b-{step.claim}"
    module = step.module or ""
    slug = re.sub(r"[^a-z0-9]+", "-", module.lower()).strip("-")[:16] or "m"
    script = "d" if step.script == BUILD_PACK else "a"
    return f"gbp-{step.job_id}-{script}-{slug}-{zlib.crc32(module.encode()):08x}-{step.claim}"[:63]


def step_tags(ctx: StepContext) -> dict[str, str]:
    step = ctx.step
    return {
        TAG_STEP: step.id,
        TAG_JOB: str(step.job_id),
        TAG_APP: str(step.app_id or ""),
        TAG_KIND: step.kind,
        TAG_OWNER: ctx.instance_id,
        TAG_CLAIM: str(step.claim),
    }


def idmap_user_ids(spec: str) -> tuple[int, int]:
    """`container.idmap_user`: a user name (its uid and primary gid), `uid` or `uid:gid`."""
    if re.fullmatch(r"\d+(:\d+)?", spec):
        uid, _, gid = spec.partition(":")
        return int(uid), int(gid or uid)
    entry = pwd.getpwnam(spec)  # KeyError when the user does not exist
    return entry.pw_uid, entry.pw_gid


def describe_ids(uid: int, gid: int) -> str:
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return f"{user}:{group} ({uid}:{gid})"


def refuse_root_ids(ids: tuple[int, int], source: str) -> tuple[int, int]:
    """`ids` (uid, gid) when they may be mapped into a container; StepFailed naming `source` for root's.

    A mapped id is the same id on this host: container processes would run
    as root (uid 0), or in root's group (gid 0), on the host, and files they
    write would be root's.
    """
    uid, gid = ids
    if uid == 0 or gid == 0:
        whose = "uid 0 (root)" if uid == 0 else "gid 0 (root's group)"
        raise StepFailed(
            f"refused: {source} belongs to {whose}, {describe_ids(uid, gid)}: mapped into the container, it would "
            "make container processes root on this host, and root would own what they write; "
            "give it to Ghost's user (chown -R) and run the job again"
        )
    return ids


def container_spec(
    ctx: StepContext,
    image: str,
    mounts: Mapping[str, Mount] | None = None,
    idmap: tuple[int, int] | None = None,
) -> ContainerSpec:
    """The container for this step: `shaped_spec` under the step's name and tags."""
    if idmap is not None and not ctx.config.container.privileged:
        refuse_root_ids(idmap, "the id mapping")  # callers refuse first, naming the path: this is the backstop
    return shaped_spec(ctx.config.container, container_name(ctx.step), image, step_tags(ctx), idmap, mounts)


def shaped_spec(
    settings: ContainerConfig,
    name: str,
    image: str,
    tags: Mapping[str, str],
    idmap: tuple[int, int] | None,
    mounts: Mapping[str, Mount] | None = None,
) -> ContainerSpec:
    """A container shaped by `container.*` in the config (a step's, or an idle one of the warm pool).

    Who its processes are on this host: unprivileged, container root and
    every other id are in LXD's map of root's subordinate ids (container root
    is host uid 100000 with Debian's package: neither host root nor Ghost's
    user); only `idmap` (the working copy's owner) is mapped as itself, never
    root's. Privileged, container root is host root.

    Not `security.idmap.isolated` (a range per container): LXD 5.0.2 gives a
    container started while another isolated one is being created a range
    outside root's subordinate ids (base 65536: "newuidmap ... not allowed"),
    seen on 4 starts of one parallel test run; and every copy of a template
    would be shifted anew.
    """
    return ContainerSpec(
        name=name,
        image=image,
        tags=dict(tags),
        privileged=settings.privileged,
        idmap=None if settings.privileged else idmap,
        cpu=settings.limits.cpu,
        memory=settings.limits.memory,
        disk=settings.limits.disk,
        processes=settings.limits.processes,
        profiles=settings.profiles,
        mounts=dict(mounts or {}),
    )


def launch(ctx: StepContext, spec: ContainerSpec, template_later: bool = False) -> str:
    """Take an idle container of the warm pool shaped as `spec`, else create and start one; once it runs commands,
    its name. `template_later`: see `templates.create_container`."""
    if ctx.step.kind == DEPLOY and warm_pool.enabled(ctx.config):
        taken = warm_pool.take_idle(ctx.lxd, spec, ctx.instance_id, ctx.log)
        if taken is not None:
            return adopt_idle(ctx, taken)
    ctx.save(container=spec.name)  # recorded first, so whoever takes over knows what to remove
    ctx.confirm_lease()
    remove_leftovers(ctx)  # what earlier attempts of this step left (never a later attempt's)
    ctx.log.info("container_creating", container=spec.name, image=spec.image[:12])
    try:
        start_container(ctx.lxd, ctx.config, spec, ctx.log, ctx.abort, template_later)
    except LxdUnavailable:
        raise
    except LxdError as error:  # the image's fault (a command that hangs or fails), or a cancellation
        raise StepFailed(f"{error} (container.ready_timeout {ctx.config.container.ready_timeout:g}s)") from error
    ctx.log.info("container_ready", container=spec.name)
    return spec.name


def adopt_idle(ctx: StepContext, name: str) -> str:
    """The warm pool's container, tagged as this attempt's already: recorded, and what earlier attempts left goes."""
    try:
        ctx.save(container=name)
        ctx.confirm_lease()
        remove_leftovers(ctx, keep=name)
    except BaseException:
        ctx.lxd.delete_container(name)  # tagged as this attempt's: nobody else would use it
        raise
    ctx.log.info("container_ready", container=name, warm=True)
    return name


def start_container(
    lxd: Lxd, config: Config, spec: ContainerSpec, log: Logger, abort: threading.Event, template_later: bool = False
) -> None:
    """Create `spec`'s container (from a template where one serves), start it and wait until it runs commands."""
    templates.create_container(lxd, spec, config.container.templates, log, template_later)
    lxd.start(spec.name)
    # The probe also makes the directory scripts are pushed to (push_file expects it to exist).
    lxd.wait_ready(spec.name, config.container.ready_timeout, ("mkdir", "-p", SCRIPT_DIR), abort)
