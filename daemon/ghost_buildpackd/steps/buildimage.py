"""The buildimage step: once the job built its AMI, publish the app's container image (built ahead while
Packer ran, `buildimage_ahead.py`), or build it now.

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
as the template of the app's deploys (`upkeep/templates.py`).

This module is the build's sequence; the build ahead of the AMI is `buildimage_ahead.py`'s; its checks are
`buildimage_plan.py`'s,
the scripts run in the container `buildimage_scripts.py`'s, the image and
its records (and their recovery after a crash) `buildimage_publish.py`'s.
"""

from __future__ import annotations

import dataclasses

from ..ghost.fields import BadDocument
from ..logs import Secrets
from ..lxd import ContainerSpec, ImageInfo, LxdUnavailable
from ..model import SUCCEEDED
from ..upkeep import templates
from .buildimage_ahead import adoptable
from .buildimage_plan import (
    BuildPlan,
    build_spec,
    check_abort,
    load_job_app,
    lxd_phase,
    make_plan,
    resolve_base_image,
)
from .buildimage_publish import (
    kept_newer,
    publish,
    record,
    recover_earlier_attempt,
    remove_dead_attempt_containers,
)
from .buildimage_scripts import build_in_container, provisioner_argv
from .context import LeaseLost, Outcome, StepContext, StepFailed
from .release import clean_up_container

# Names tests and tools reach through this module (`buildimage.make_plan`), wherever they live.
__all__ = [
    "BuildPlan",
    "build",
    "load_job_app",
    "make_plan",
    "provisioner_argv",
    "recover_earlier_attempt",
    "resolve_base_image",
    "run",
]


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
        return build(ctx, plan, base, container_built_ahead(ctx, plan, base))


def container_built_ahead(ctx: StepContext, plan: BuildPlan, base: ImageInfo) -> str | None:
    """`buildimage_ahead.adoptable`; None, building as before, when it cannot tell (it only saves time)."""
    try:
        return adoptable(ctx, plan, base)
    except (LeaseLost, LxdUnavailable):
        raise
    except Exception as error:
        ctx.log.warning("buildimage_ahead_not_judged", error=str(error), consequence="built now")
        return None


# --- the build ---------------------------------------------------------------------------


def build(ctx: StepContext, plan: BuildPlan, base: ImageInfo, built_ahead: str | None = None) -> Outcome:
    """Build (unless `built_ahead` names the container built ahead of the AMI), publish and record."""
    spec = build_spec(ctx, plan, base)
    if built_ahead:
        spec = dataclasses.replace(spec, name=built_ahead)
    ctx.say(
        "buildimage_started",
        f"building the container image of {plan.app.label} (job {plan.alias}, AMI {plan.ami_id or 'unknown'}) "
        f"in container {spec.name}",
        container=spec.name,
        ami_id=plan.ami_id,
    )
    published: ImageInfo | None = None
    if not built_ahead and ctx.step.inputs:  # a container left by a run is never taken for one built ahead
        ctx.save(inputs="")
    try:
        if not built_ahead:
            build_in_container(ctx, plan, spec)
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
