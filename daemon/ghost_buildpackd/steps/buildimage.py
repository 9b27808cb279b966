"""The buildimage step: after a successful AMI build, build the app's container image.

From the app's base image (`build_infos.source_container_image`), a container
runs Ghost's pre hook, the features install (salt or ansible, on the job's
provisioner trees mounted read-only) and the post hook, then is published as
the image aliased with the job id. Features are installed as Ghost's image
builder installs them: every provisioner of Ghost's `features_provisioners`
runs for every build (salt, then ansible), salt bootstrapped first unless the
job's `options[0]` says to skip it, ansible from Ghost's virtualenv mounted at
its own path, log levels from `provisioner_log_level`. The `container_images`
record and `apps.build_infos.container_image` are written only once the image
and its alias exist, so the app keeps its previous image when anything fails.

Everything that can be refused (job, app, hooks, features, provisioner trees)
is checked before a container is created. The container is removed in every
outcome unless `container.debug` is set, or, once the image is published, kept
as the template of the app's deploys (`templates.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bson import ObjectId

from ..config import PLACEHOLDER_ANSIBLE_VERBOSITY, PLACEHOLDER_LOG_LEVEL, PLACEHOLDER_VENV, Config
from ..ghost.documents import PROVISIONERS, App, Job, containers_off, parse_app, parse_job
from ..ghost.fields import BadDocument
from ..images import BuildOrder, ImageNotFound, base_image, build_order, is_job_alias, keeps_newer_build
from ..logs import Secrets
from ..lxd import IMAGE_PROP_CLAIM, IMAGE_PROP_JOB, ContainerSpec, ImageInfo, Mount
from ..model import BUILDIMAGE, SUCCEEDED
from ..store import ImageRecord, utcnow
from ..upkeep import templates
from . import (
    SCRIPT_DIR,
    LeaseLost,
    Outcome,
    StepContext,
    StepFailed,
    clean_up_container,
    container_spec,
    idmap_user_ids,
    launch,
    refuse_root_ids,
    remove_leftovers,
    run_command,
)

HOOKS = ("pre_buildimage", "post_buildimage")
PROVISIONER_MOUNT = "/srv/{provisioner}"  # where Ghost's commands expect each provisioner tree
VENV_DEVICE = "ghost-venv"
# Ghost's ANSIBLE_LOG_LEVEL_MAP: provisioner_log_level -> ansible-playbook's verbosity (none for error, warning).
ANSIBLE_VERBOSITY = {
    "info": "-v",
    "profile": "-vv",
    "debug": "-vvv",
    "trace": "-vvvv",
    "garbage": "-vvvv",
    "all": "-vvvv",
}

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


def run(ctx: StepContext) -> Outcome:
    """Build, publish and record the app's container image for the buildimage job of `ctx.step`."""
    try:
        job, app = load_job_app(ctx)
        plan = make_plan(ctx, job, app)
    except (BadDocument, StepFailed):
        remove_dead_attempt_containers(ctx)
        raise
    with Secrets.registered(app.secret_values):
        finished = lxd_phase("cleaning up after an earlier attempt", recover_earlier_attempt, ctx, plan)
        if finished is not None:
            return finished
        base = resolve_base_image(ctx, app)
        return build(ctx, plan, base)


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


# --- the build ---------------------------------------------------------------------------


def build(ctx: StepContext, plan: BuildPlan, base: ImageInfo) -> Outcome:
    spec = container_spec(ctx, base.fingerprint, plan.mounts, idmap=build_owner(ctx))  # mounts are read-only
    ctx.say(
        "buildimage_started",
        f"building the container image of {plan.app.label} (job {plan.alias}, AMI {plan.ami_id or 'unknown'}) "
        f"in container {spec.name}",
        container=spec.name,
        ami_id=plan.ami_id,
    )
    published: ImageInfo | None = None
    try:
        check_abort(ctx, "creating the container")
        lxd_phase("creating the container", lambda: launch(ctx, spec))
        run_scripts(ctx, plan, spec.name)
        check_abort(ctx, "publishing the image")
        image = published = publish(ctx, plan, base, spec.name)
    finally:  # before the records, so a container never outlives a build that cannot record (MongoDB down)
        if published is None:
            clean_up_container(ctx, spec.name)
        else:
            keep_as_template(ctx, spec, published)
    kept = record(ctx, plan, base, image)
    message = f"container image {plan.alias} published ({image.fingerprint[:12]}, {image.size} bytes)" + (
        kept_newer(kept)
    )
    ctx.say("buildimage_succeeded", message, image=plan.alias, fingerprint=image.fingerprint, size=image.size)
    return Outcome(SUCCEEDED, message=message, fields={"image": plan.alias, "fingerprint": image.fingerprint})


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


def keep_as_template(ctx: StepContext, spec: ContainerSpec, image: ImageInfo) -> None:
    """The build's stopped container becomes the template of deploys of its published image, else goes.

    Never raises, like `clean_up_container`: the image is published, and
    whatever is left (LXD gone meanwhile) is a tagged container of a finished
    step, which the orphan sweep removes.
    """
    keep = ctx.config.container.templates
    if keep > 0 and not ctx.config.container.debug:
        try:
            if templates.adopt(ctx.lxd, spec.name, dataclasses.replace(spec, image=image.fingerprint), keep, ctx.log):
                return
        except Exception as error:
            ctx.log.warning("container_template_not_adopted", container=spec.name, error=str(error))
    clean_up_container(ctx, spec.name)


def run_scripts(ctx: StepContext, plan: BuildPlan, container: str) -> None:
    """Salt bootstrap, pre hook, features install, post hook, in that order, each under container.exec_timeout."""
    env = plan.app.hook_env()
    for note in plan.notes:
        ctx.say("features_note", note)
    push_hooks(ctx, plan, container)
    bootstrap_salt(ctx, plan, container)
    run_hook(ctx, plan, container, "pre_buildimage", env)
    check_abort(ctx, "installing the features")
    install_features(ctx, plan, container, env)
    check_abort(ctx, "running the post_buildimage hook")
    run_hook(ctx, plan, container, "post_buildimage", env)
    # The image must not carry the daemon's scripts, nor their directory (`launch`'s probe makes it).
    run_command(ctx, container, ["rm", "-rf", SCRIPT_DIR], {}, "removing the hook scripts")


def hook_path(name: str) -> str:
    return f"{SCRIPT_DIR}/hook-{name}"


def push_hooks(ctx: StepContext, plan: BuildPlan, container: str) -> None:
    for name, script in plan.hooks.items():
        if script.strip():
            lxd_phase(f"copying the {name} hook", ctx.lxd.push_file, container, hook_path(name), script.encode())


def run_hook(ctx: StepContext, plan: BuildPlan, container: str, name: str, env: dict[str, str]) -> None:
    if not plan.hooks[name].strip():
        ctx.say("hook_skipped", f"no {name} hook: nothing to run", hook=name)
        return
    run_command(ctx, container, ["sh", hook_path(name)], env, f"{name} hook")


def bootstrap_salt(ctx: StepContext, plan: BuildPlan, container: str) -> None:
    if plan.bootstrap_salt:
        for command in ctx.config.container.provisioner_commands.salt_bootstrap:
            run_command(ctx, container, provisioner_argv(ctx.config, command), {}, "salt bootstrap")
    elif "salt" in plan.provisioners:
        ctx.say("salt_bootstrap_skipped", "salt bootstrap skipped (the job's options[0] says so, or it has no options)")


def install_features(ctx: StepContext, plan: BuildPlan, container: str, env: dict[str, str]) -> None:
    """Every provisioner of Ghost's features_provisioners, whatever the app's features (as Ghost)."""
    if not plan.provisioners:
        ctx.say("features_skipped", "no provisioner to run: features install skipped")
        return
    commands = ctx.config.container.provisioner_commands
    for provisioner in plan.provisioners:
        argv = provisioner_argv(ctx.config, getattr(commands, provisioner))
        run_command(ctx, container, argv, env, f"features install ({provisioner})")


def provisioner_argv(config: Config, template: tuple[str, ...]) -> list[str]:
    """The command with its placeholders filled as Ghost fills them; an argument left empty is dropped."""
    level = config.ghost_settings.provisioner_log_level
    values = {
        PLACEHOLDER_LOG_LEVEL: level,
        PLACEHOLDER_ANSIBLE_VERBOSITY: ANSIBLE_VERBOSITY.get(level, ""),
        PLACEHOLDER_VENV: str(config.ghost.venv),
    }
    argv = []
    for arg in template:
        for placeholder, value in values.items():
            arg = arg.replace(placeholder, value)
        if arg:
            argv.append(arg)
    return argv


def publish(ctx: StepContext, plan: BuildPlan, base: ImageInfo, container: str) -> ImageInfo:
    """Stop the container, publish it and point the job's alias at the new image."""
    compression = ctx.config.container.publish_compression
    ctx.say(
        "image_publishing",
        f"publishing container {container} as image {plan.alias} (compression {compression})",
        container=container,
        image=plan.alias,
        compression=compression,
    )
    lxd_phase("detaching the provisioner trees", lambda: ctx.lxd.remove_devices(container))
    lxd_phase("stopping the container", lambda: ctx.lxd.stop(container))
    properties = {**image_properties(plan, base), IMAGE_PROP_CLAIM: str(ctx.step.claim)}
    image = lxd_phase("publishing the image", lambda: ctx.lxd.publish(container, properties, compression))
    try:
        previous = ctx.lxd.image_by_alias(plan.alias)  # set when the job is replayed
        if previous is not None and previous.claim > ctx.step.claim:
            raise LeaseLost(ctx.step.id)  # a later attempt of this step published already
        ctx.confirm_lease()
        ctx.lxd.point_alias(plan.alias, image.fingerprint, properties["description"])
    except LeaseLost:
        ctx.lxd.delete_image(image.fingerprint)
        raise
    except Exception as error:  # no image without its alias may survive
        ctx.lxd.delete_image(image.fingerprint)
        raise StepFailed(f"pointing alias {plan.alias} at the new image failed: {error}") from error
    if previous is not None and previous.fingerprint != image.fingerprint:
        delete_replaced_image(ctx, plan.alias, previous)
    return image


def image_properties(plan: BuildPlan, base: ImageInfo) -> dict[str, str]:
    app = plan.app
    properties = {
        "description": f"ghost-buildpackd: {app.label} ({app.region or 'no region'}), job {plan.alias}, "
        f"AMI {plan.ami_id or 'unknown'}",
        "ghost.app": app.name,
        "ghost.env": app.env,
        "ghost.role": app.role,
        "ghost.region": app.region,
        "ghost.color": app.color,
        "ghost.app_id": str(app.id),
        IMAGE_PROP_JOB: plan.alias,
        "ghost.ami_id": plan.ami_id,
        "ghost.ami_name": app.ami_name,
        "ghost-buildpackd.base_image": base.fingerprint,
    }
    for key in ("os", "release", "architecture", "variant"):
        if base.properties.get(key):
            properties[key] = base.properties[key]
    return {key: value for key, value in properties.items() if value}


def delete_replaced_image(ctx: StepContext, alias: str, previous: ImageInfo) -> None:
    """The alias moved on replay: delete the image it left unless something else still names it."""
    current = ctx.lxd.image_by_fingerprint(previous.fingerprint)
    if current is None or current.aliases:
        return
    others = [r for r in ctx.store.image_records() if r.fingerprint == previous.fingerprint and r.alias != alias]
    if others:
        return
    ctx.lxd.delete_image(previous.fingerprint)
    ctx.log.info("replaced_image_deleted", fingerprint=previous.fingerprint, alias=alias)


def record(ctx: StepContext, plan: BuildPlan, base: ImageInfo, image: ImageInfo) -> str | None:
    """The two MongoDB writes, only once the image and its alias exist, both fenced on the step's attempt.

    Returns the image the app keeps when a newer buildimage job's build named it first, else None."""
    app = plan.app
    ctx.confirm_lease()
    recorded = ctx.store.record_image(
        ImageRecord(
            alias=plan.alias,
            fingerprint=image.fingerprint,
            job_id=plan.job.id,
            app_id=app.id,
            app_identity=app.identity,
            app_label=app.label,
            region=app.region,
            ami_id=plan.ami_id,
            ami_name=app.ami_name,
            base_image=base.fingerprint,
            size=image.size,
            created_at=utcnow(),
        ),
        claim=ctx.step.claim,
    )
    if not recorded:  # a later attempt of this step recorded its own image
        ctx.abort.set()
        raise LeaseLost(ctx.step.id)
    kept = point_app_at_image(ctx, app.id, plan.job)
    ctx.log.info("image_recorded", image=plan.alias, fingerprint=image.fingerprint, app_id=str(app.id), app_kept=kept)
    return kept


def kept_newer(kept: str | None) -> str:
    """What the outcome adds when the app kept the image of a newer build."""
    if kept is None:
        return ""
    return (
        f"; the app keeps container image {kept}, built for a newer buildimage job (Ghost's job order), so "
        "deploys do not go back to this older build"
    )


APP_WRITE_TRIES = 3  # compare-and-set rounds against other builds of the same app finishing at the same moment


def point_app_at_image(ctx: StepContext, app_id: Any, job: Job) -> str | None:
    """Set `apps.build_infos.container_image` to the job's alias unless it names a newer job's build.

    Returns the image the app keeps (None when it now names this build).
    Builds of one app may finish in any order; the app takes the image of the
    newest job in Ghost's order (`images.keeps_newer_build`), the store only
    carries out the write. Fenced: read, judge, confirm the lease, then
    compare-and-set against what was read, so neither a holder that paused
    after its check nor a newer build recorded in between is overwritten: the
    next round reads and judges that one.
    """
    alias = str(job.id)
    mine = build_order(job.id, job.raw)
    for _ in range(APP_WRITE_TRIES):
        current = ctx.store.app_container_image(app_id)
        if current == alias:
            return None
        if keeps_newer_build(mine, current_build_order(ctx, current)):
            ctx.log.info("app_image_kept_newer_build", image=alias, app_image=current, app_id=str(app_id))
            return current
        ctx.confirm_lease()
        if ctx.store.set_app_container_image(app_id, alias, expected=current):
            return None
    raise StepFailed(f"apps.build_infos.container_image of app {app_id} kept changing; it was not set to {alias}")


def current_build_order(ctx: StepContext, current: str | None) -> BuildOrder | None:
    """Where the build the app names stands in Ghost's job order; None when the value names no job's build
    (nothing, or an image set by hand: a build replaces it)."""
    if current is None or not is_job_alias(current):
        return None
    job_id = ObjectId(current)
    return build_order(job_id, ctx.store.get_job(job_id))


# --- after a crash or on replay -------------------------------------------------------------


def recover_earlier_attempt(ctx: StepContext, plan: BuildPlan) -> Outcome | None:
    """Clean what an earlier attempt left; an Outcome when that attempt had in fact built the image.

    LXD and `container_images` are the truth: an image of this job that the
    record does not name is half-published and is deleted, and the alias is put
    back on the recorded image (or removed). The earlier image is reused only
    when this attempt resumes one that never finished (a crash of the step's
    first run after the record was written); a replay always builds again.
    """
    resumed = ctx.step.attempts > 1
    if resumed:
        remove_leftovers(ctx)
    ctx.confirm_lease()
    images = ctx.lxd.list_images()  # one snapshot serves every question below
    ours = [image for image in images if image.properties.get(IMAGE_PROP_JOB) == plan.alias]
    if any(image.claim > ctx.step.claim for image in ours):
        raise LeaseLost(ctx.step.id)  # a later attempt of this step is under way: its images are not ours to judge
    kept = recorded_image(ctx, plan.alias, images)
    aliased = next((image for image in images if plan.alias in image.aliases), None)
    if aliased is not None and (kept is None or aliased.fingerprint != kept.fingerprint):
        # The snapshot may be old by now (this process may have paused past its lease, and a successor published
        # meanwhile): the lease is confirmed again, and the alias changed only while it points where the snapshot
        # saw it.
        ctx.confirm_lease()
        if kept is not None:
            ctx.lxd.move_alias_if(plan.alias, kept.fingerprint, expected=aliased.fingerprint)
        else:
            ctx.lxd.delete_alias_if(plan.alias, aliased.fingerprint)
    for image in images:
        if image.properties.get(IMAGE_PROP_JOB) == plan.alias and (
            kept is None or image.fingerprint != kept.fingerprint
        ):
            ctx.confirm_lease()
            ctx.lxd.delete_image(image.fingerprint)
            ctx.log.warning("half_published_image_deleted", fingerprint=image.fingerprint, alias=plan.alias)
    if not resumed or kept is None or ctx.step.finished_at is not None:
        return None
    message = f"container image {plan.alias} was published by an earlier attempt ({kept.fingerprint[:12]})" + (
        kept_newer(point_app_at_image(ctx, plan.app.id, plan.job))
    )
    ctx.say("buildimage_recovered", message, image=plan.alias, fingerprint=kept.fingerprint)
    return Outcome(SUCCEEDED, message=message, fields={"image": plan.alias, "fingerprint": kept.fingerprint})


def remove_dead_attempt_containers(ctx: StepContext) -> None:
    """A takeover refused before its recovery ran: the dead attempt's container must not wait for the sweep."""
    if ctx.step.attempts <= 1:
        return
    try:
        remove_leftovers(ctx)
    except Exception as error:  # the refusal is the outcome to report; the sweep removes it later
        ctx.log.error("leftover_container_remove_failed", error=str(error))


def recorded_image(ctx: StepContext, alias: str, images: list[ImageInfo]) -> ImageInfo | None:
    """The image the live `container_images` record names, if it is among `images` (it still exists)."""
    recorded = ctx.store.get_image_record(alias)
    if recorded is None or recorded.state != "live":
        return None
    return next((image for image in images if image.fingerprint == recorded.fingerprint), None)


# --- helpers ---------------------------------------------------------------------------------


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
