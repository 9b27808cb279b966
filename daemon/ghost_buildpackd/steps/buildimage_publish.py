"""The buildimage step's image and its records: publish and alias the image, write `container_images` and
point the app at it (fenced on the step's attempt), and recover what an earlier attempt published.

LXD and `container_images` are the truth after a crash or on replay: an
image of the job that the record does not name was half-published.
"""

from __future__ import annotations

from typing import Any

from bson import ObjectId

from ..ghost.documents import Job
from ..images import BuildOrder, build_order, is_job_alias, keeps_newer_build
from ..lxd import IMAGE_PROP_CLAIM, IMAGE_PROP_JOB, ImageInfo
from ..model import SUCCEEDED
from ..store import ImageRecord, utcnow
from .buildimage_plan import BuildPlan, lxd_phase
from .context import LeaseLost, Outcome, StepContext, StepFailed
from .release import remove_leftovers


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
    if resumed:  # the container built ahead of the AMI stays for `buildimage_ahead.adoptable` to judge
        remove_leftovers(ctx, keep=ctx.step.container if ctx.step.inputs else None)
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
