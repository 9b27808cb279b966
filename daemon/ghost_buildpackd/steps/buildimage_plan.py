"""The buildimage step's checks, before any container exists: the job and app, the hooks, which provisioners
run and the trees and virtualenv mounted for them (refused when LXD must not mount them), as a `BuildPlan`;
the base image and the owner mapped into the build's container.

Also the two helpers every phase of the build uses (`check_abort`, `lxd_phase`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..config import PLACEHOLDER_VENV
from ..ghost.documents import PROVISIONERS, App, Job, containers_off, parse_app, parse_job
from ..ghost.fields import BadDocument
from ..images import ImageNotFound, base_image
from ..lxd import ContainerSpec, ImageInfo, Mount
from ..model import BUILDIMAGE
from ..upkeep import templates
from .containers import container_spec, idmap_user_ids, refuse_root_ids
from .context import LeaseLost, StepContext, StepFailed

HOOKS = ("pre_buildimage", "post_buildimage")
PROVISIONER_MOUNT = "/srv/{provisioner}"  # where Ghost's commands expect each provisioner tree
VENV_DEVICE = "ghost-venv"

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """What the step will do, all checked before any container exists."""

    job: Job
    app: App
    alias: str
    ami_id: str
    hooks: dict[str, str]  # hook name -> decoded script ("" runs nothing)
    provisioners: list[str]  # provisioners to run, in Ghost's order
    mounts: dict[str, Mount]  # LXD device name -> provisioner tree or Ghost's virtualenv
    bootstrap_salt: bool
    notes: list[str]  # what differs from the app's features, said in the job log


# --- checks before anything runs ---------------------------------------------------------


def load_job_app(ctx: StepContext) -> tuple[Job, App]:
    doc = ctx.store.get_job(ctx.step.job_id)
    if doc is None:
        raise BadDocument("job", f"no job with _id {ctx.step.job_id}")
    job = parse_job(doc)
    app = parse_app(ctx.store.get_app(job.app_id), job.app_id)
    off = containers_off(app, ctx.config.ghost_settings.container_enabled, BUILDIMAGE)
    if off:
        raise StepFailed(f"refused: {off}")
    return job, app


def make_plan(ctx: StepContext, job: Job, app: App) -> BuildPlan:
    """Decode hooks, choose provisioners and find their trees; BadDocument/StepFailed when unusable."""
    hooks = {name: app.hook(name) for name in HOOKS}
    configured = ctx.config.ghost_settings.features_provisioners
    used = set(app.provisioners())
    provisioners, mounts, notes = [], {}, []
    for provisioner in PROVISIONERS:  # Ghost's image builder runs salt, then ansible
        if provisioner not in configured:
            if provisioner in used:
                notes.append(
                    f"the app's features use {provisioner}, which Ghost's features_provisioners does not list: "
                    "not installed (Ghost runs only the provisioners its config.yml lists)"
                )
            continue
        tree = provisioner_tree(ctx, job, provisioner)
        if not tree.is_dir():
            if provisioner in used:
                raise StepFailed(
                    f"the app's features use {provisioner}, but its provisioner tree {tree} does not exist "
                    "(Ghost prepares it during the buildimage job; is ghost.provisioner_tree right?)"
                )
            notes.append(
                f"{provisioner} (Ghost's features_provisioners) skipped: its tree {tree} does not exist and the "
                "app's features do not use it (Ghost's own builder would fail the build here)"
            )
            continue
        problem = unsafe_tree_problem(tree, ctx.config.ghost.provisioner_tree, trusted_owners(ctx))
        if problem:
            raise StepFailed(f"provisioner tree {tree} is not mounted: {problem}")
        provisioners.append(provisioner)
        mounts[f"provisioner-{provisioner}"] = Mount(tree, PROVISIONER_MOUNT.format(provisioner=provisioner), True)
    if "ansible" in provisioners:
        mounts.update(venv_mount(ctx))
    return BuildPlan(
        job=job,
        app=app,
        alias=str(job.id),
        ami_id=job.ami_id or app.ami,
        hooks=hooks,
        provisioners=provisioners,
        mounts=mounts,
        bootstrap_salt="salt" in provisioners and not job.skips_salt_bootstrap,
        notes=notes,
    )


def provisioner_tree(ctx: StepContext, job: Job, provisioner: str) -> Path:
    """Where Ghost prepares this job's `provisioner` tree."""
    return ctx.config.ghost.provisioner_tree / f"{provisioner}-{job.id}"


def venv_mount(ctx: StepContext) -> dict[str, Mount]:
    """Ghost's virtualenv at its own path, read-only, when the ansible command names it."""
    venv = ctx.config.ghost.venv
    if not any(PLACEHOLDER_VENV in arg for arg in ctx.config.container.provisioner_commands.ansible):
        return {}
    if not venv.is_dir():
        raise StepFailed(
            f"ansible runs from Ghost's virtualenv, but ghost.venv {venv} is not a directory "
            "(set ghost.venv to the sys.exec_prefix of Ghost's worker)"
        )
    return {VENV_DEVICE: Mount(venv, str(venv), True)}


def trusted_owners(ctx: StepContext) -> set[int]:
    """Who may own a provisioner tree: root, the daemon's user and Ghost's user (`container.idmap_user`)."""
    owners = {0, os.geteuid()}
    with contextlib.suppress(KeyError):
        owners.add(idmap_user_ids(ctx.config.container.idmap_user)[0])
    return owners


def unsafe_tree_problem(tree: Path, top: Path, owners: set[int]) -> str:
    """Why LXD must not mount `tree` (it mounts as root, following symlinks), or "" when it may.

    No component of the path may be a symlink. From `top` (ghost.provisioner_tree,
    under the world-writable /tmp) down, each directory must belong to a trusted
    owner and be writable by nobody else. Above `top`, a directory others may
    write must have the sticky bit (as /tmp has), so nobody can swap what is below.
    """
    path = Path("/")
    for part in tree.parts[1:]:
        path = path / part
        info = path.lstat()
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISLNK(info.st_mode):
            return f"{path} is a symlink (LXD would follow it as root)"
        if path == top or top in path.parents:
            if info.st_uid not in owners:
                return f"{path} is owned by uid {info.st_uid}, not by root, the daemon's user or Ghost's user"
            if mode & 0o022:
                return f"{path} is writable by its group or by others (mode {mode:04o})"
        elif mode & 0o022 and not mode & stat.S_ISVTX:
            return f"{path} is writable by its group or by others without the sticky bit (mode {mode:04o})"
    return ""


# --- what the build starts from ---------------------------------------------------------------


def resolve_base_image(ctx: StepContext, app: App) -> ImageInfo:
    """The image the build starts from (`images.base_image`), said in Ghost's job log."""
    reference, server = app.source_container_image, ctx.config.lxd.image_server
    try:
        base = lxd_phase("resolving the base image", lambda: base_image(ctx.lxd, reference, server))
    except StepFailed as error:
        if isinstance(error.__cause__, ImageNotFound):
            raise StepFailed(f"base image (app.build_infos.source_container_image): {error.__cause__}") from None
        raise
    ctx.say(
        "base_image_resolved",
        f"base image {app.source_container_image!r} is {base.describe()}",
        reference=app.source_container_image,
        fingerprint=base.fingerprint,
    )
    return base


def make_base_template(ctx: StepContext) -> None:
    """The template a first build of its base image asked for (`templates.want_template`), made now."""
    templates.make_wanted_templates(ctx.lxd, ctx.config.container.templates, ctx.log)


def build_spec(ctx: StepContext, plan: BuildPlan, base: ImageInfo) -> ContainerSpec:
    """The build's container (its mounts read-only), after the AMI as ahead of it."""
    return container_spec(ctx, base.fingerprint, plan.mounts, idmap=build_owner(ctx))


def build_owner(ctx: StepContext) -> tuple[int, int] | None:
    """With templates, `container.idmap_user` is mapped into the build's container as in deploys, so it can
    become the template of the app's deploys (`keep_as_template`); else, or when that user is unknown, none."""
    if ctx.config.container.templates <= 0:
        return None
    user = ctx.config.container.idmap_user
    try:
        return refuse_root_ids(idmap_user_ids(user), f"container.idmap_user {user!r}")
    except KeyError:
        return None


# --- helpers of every phase of the build --------------------------------------------------


def check_abort(ctx: StepContext, next_phase: str) -> None:
    if ctx.abort.is_set():
        raise StepFailed(f"cancelled before {next_phase} (step cancelled, taken over or daemon stopping)")


def lxd_phase(phase: str, action: Callable[..., T], *args: Any) -> T:
    """Run one LXD operation; an error becomes StepFailed naming the phase (transient ones were retried)."""
    try:
        return action(*args)
    except (StepFailed, LeaseLost, BadDocument):
        raise
    except Exception as error:
        raise StepFailed(f"{phase} failed: {type(error).__name__}: {error}") from error
