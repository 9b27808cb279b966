"""The build run ahead of the AMI: while Packer runs, the container of a buildimage job is built, stopped and
kept, so that once the AMI exists only its publication is left (`buildimage.run` adopts it).

Ghost 19.08 writes the job's Packer definition (`/tmp/packer/<job id>/aws_builder.json`, `ghost.packer_dir`)
right after it made the job's provisioner trees and just before Packer starts (`AWSImageBuilder.start_builder`),
so that file is the sign every input of the build exists. The container then runs the same hooks and features
install as the build after the AMI, and the step waits `ready` with the container and the digest of its inputs
(`inputs_digest`). Ghost's request publishes it when the inputs are unchanged, else builds again.

Building ahead only saves time: whatever goes wrong here (the definition never comes, a hook fails, a bad
document) leaves the step `ready` without a container, and the build after the AMI runs and reports as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

from ..config import Config
from ..ghost.documents import Job
from ..ghost.fields import BadDocument
from ..logs import Secrets
from ..lxd import TAG_STEP, ContainerSpec, ImageInfo
from ..model import PREPARING, READY, RUNNING
from ..policy import LIMITS
from .buildimage_plan import (
    BuildPlan,
    build_spec,
    check_abort,
    load_job_app,
    lxd_phase,
    make_plan,
    resolve_base_image,
)
from .buildimage_scripts import build_in_container, provisioner_argv
from .context import LeaseLost, Outcome, StepContext, StepFailed
from .release import clean_up_container

PACKER_DEFINITION = "aws_builder.json"  # Ghost's AWSImageBuilder._packer_file_path_aws, in its job's directory


def prepare(ctx: StepContext) -> Outcome:
    """Build the container ahead of the AMI; `ready` with it (or without it when it could not be built)."""
    try:
        job, app = load_job_app(ctx)
    except (BadDocument, StepFailed) as error:
        return not_built_ahead(f"{error}")
    if job.built_image:  # its request was missed (a record of an earlier version): build and publish now
        ctx.save(RUNNING, message="building the container image (its AMI is built)")
        return build_now(ctx)
    if job.status != "started":
        return not_built_ahead(f"the job is {job.status}")
    others = ctx.store.builds_ahead_held(ctx.step)
    if others >= ctx.config.workers - 1:
        return not_built_ahead(f"{others} builds ahead hold workers already (at most workers - 1: a deploy finds one)")
    waited = wait_for_inputs(ctx, job)
    if waited:
        return not_built_ahead(waited)
    try:
        plan = make_plan(ctx, job, app)
        with Secrets.registered(app.secret_values):
            return build_ahead(ctx, plan)
    except LeaseLost:
        raise
    except Exception as error:  # building ahead only saves time: whatever failed, the build after the AMI runs
        check_abort(ctx, "marking the build ready")  # a cancellation or a stop is the outcome, not a build later
        ctx.log.warning("buildimage_ahead_failed", error=str(error), consequence="built once the AMI is built")
        ctx.job_log.write(f"the build ahead of the AMI failed ({error}); it runs again once the AMI is built")
        return not_built_ahead(f"the build ahead failed: {error}")


def build_now(ctx: StepContext) -> Outcome:
    from . import buildimage  # the sequence after the AMI; imported here, it imports this module

    return buildimage.run(ctx)


def not_built_ahead(reason: str) -> Outcome:
    return Outcome(
        READY,
        f"not built ahead of the AMI: {reason}; built once the AMI is built",
        fields={"container": None, "inputs": ""},
    )


def packer_definition(ctx: StepContext, job: Job) -> Path:
    return ctx.config.ghost.packer_dir / str(job.id) / PACKER_DEFINITION


def wait_for_inputs(ctx: StepContext, job: Job) -> str:
    """Wait for Ghost's Packer definition of the job: "" once it exists, else why the build is not made ahead
    (the AMI came first, the job was cancelled, or the definition did not come in time: another host's job)."""
    definition = packer_definition(ctx, job)
    deadline = time.monotonic() + LIMITS.build_inputs_wait
    while not definition.exists():
        check_abort(ctx, "building ahead of the AMI")
        fresh = ctx.store.get_step(ctx.step.id)
        if fresh is None or fresh.state != PREPARING or fresh.cancel_requested:
            return "asked for before its inputs existed"  # the release that follows says what came
        if time.monotonic() >= deadline:
            return f"Ghost's Packer definition {definition} did not appear within {LIMITS.build_inputs_wait:g}s"
        ctx.abort.wait(LIMITS.build_inputs_poll)
    return ""


def build_ahead(ctx: StepContext, plan: BuildPlan) -> Outcome:
    started = time.monotonic()
    base = resolve_base_image(ctx, plan.app)
    spec = build_spec(ctx, plan, base)
    digest = inputs_digest(ctx.config, plan, base, spec)
    ctx.say(
        "buildimage_ahead_started",
        f"building the container image of {plan.app.label} in container {spec.name} while Packer builds the AMI",
        container=spec.name,
    )
    try:
        build_in_container(ctx, plan, spec)
        lxd_phase("detaching the provisioner trees", lambda: ctx.lxd.remove_devices(spec.name))
        lxd_phase("stopping the container", lambda: ctx.lxd.stop(spec.name))
        check_abort(ctx, "marking the build ready")
    except BaseException:
        clean_up_container(ctx, spec.name)
        raise
    seconds = time.monotonic() - started
    ctx.say(
        "buildimage_built_ahead",
        f"container {spec.name} built ahead of the AMI in {seconds:.1f}s; published once Ghost's job has its AMI",
        container=spec.name,
        duration_s=round(seconds, 3),
    )
    return Outcome(READY, f"container {spec.name} built ahead of the AMI", fields={"inputs": digest})


def adoptable(ctx: StepContext, plan: BuildPlan, base: ImageInfo) -> str | None:
    """The container built ahead, when its inputs are those of the build now asked for and it is there,
    stopped and this step's; else None, said in the job log when one was built ahead (the build then
    forgets it before launching its own: `buildimage.build`)."""
    name, recorded = ctx.step.container, ctx.step.inputs
    if not name or not recorded:
        return None
    spec = dataclasses.replace(build_spec(ctx, plan, base), name=name)
    if inputs_digest(ctx.config, plan, base, spec) != recorded:
        ctx.say("buildimage_inputs_changed", "the build's inputs changed since it was built ahead: building again")
    elif not left_as_built(ctx, name):
        ctx.say("buildimage_ahead_gone", f"container {name} built ahead is not there as it was left: building again")
    else:
        ctx.say("buildimage_ahead_adopted", f"container {name} was built ahead of the AMI: publishing it")
        return name
    return None


def left_as_built(ctx: StepContext, name: str) -> bool:
    """Whether `name` is this step's container, stopped as the build ahead left it."""
    details = ctx.lxd.describe_container(name)
    return details is not None and details.status == "Stopped" and details.config.get(TAG_STEP) == ctx.step.id


def inputs_digest(config: Config, plan: BuildPlan, base: ImageInfo, spec: ContainerSpec) -> str:
    """What the build's result depends on: the base image, the container's shape, the hooks and their
    environment, the provisioners' commands as run and every file of their trees (path, type, size, time,
    mode). Not the contents of Ghost's virtualenv (ansible's), which only an upgrade of Ghost changes."""
    digest = hashlib.sha256()
    shape = dataclasses.asdict(dataclasses.replace(spec, name="", tags={}))  # its name and tags name the attempt
    head = {
        "base": base.fingerprint,
        "spec": shape,
        "hooks": plan.hooks,
        "env": plan.app.hook_env(),
        "provisioners": plan.provisioners,
        "commands": commands_run(config, plan),
    }
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    for device, mount in sorted(plan.mounts.items()):
        digest.update(f"\0{device}\0{mount.path}\0".encode())
        if device.startswith("provisioner-"):
            digest.update(tree_listing(mount.source))
    return digest.hexdigest()


def commands_run(config: Config, plan: BuildPlan) -> list[list[str]]:
    """The salt bootstrap and features install commands the build runs, as `buildimage_scripts` runs them."""
    commands = config.container.provisioner_commands
    bootstrap = commands.salt_bootstrap if plan.bootstrap_salt else ()
    templates = [*bootstrap, *(getattr(commands, provisioner) for provisioner in plan.provisioners)]
    return [provisioner_argv(config, template) for template in templates]


def tree_listing(top: Path) -> bytes:
    """Every entry below `top` with its type, size, modification time and mode, in a stable order."""
    lines = []
    for parent, dirs, files in os.walk(top):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(parent) / name
            info = path.lstat()
            link = os.readlink(path) if path.is_symlink() else ""
            lines.append(f"{path.relative_to(top)}\0{info.st_mode}\0{info.st_size}\0{info.st_mtime_ns}\0{link}")
    return "\n".join(lines).encode()
