"""The deploy step: a module's script (`build_pack`, or `after_all_deploy` in deploy and redeploy)
in a container made from the app's last built image.

Two phases, driven by the runner:
- `prepare` (job `started`): check the image, launch the container early so its
  start overlaps Ghost's git clone. No working copy yet.
- `run` (Ghost's client set `requested`): mount the working copy at the
  module's `path`, push the buildpack outside the module directory, run it with
  `bash` (`sh` when the image has no bash) in the module directory, and remove
  the container whatever happens. As Ghost does, a `build_pack` file at the root
  of the working copy wins over the stored script. It stays in the working copy
  until the outcome is recorded (a run repeated after a crash must find it):
  Ghost's client removes it then (`client.remove_committed_script`).

Everything that can be refused (module, paths, scripts, image, a working
copy of root's) is checked before anything runs. Files the buildpack writes
belong to the working copy's owner: in unprivileged containers, container
root is a host id of that container alone (`container_spec`) and the owner is
mapped in as itself, so container root may write in the working copy; after
every script the module is handed back to the owner (`give_back_files`),
whichever container user wrote its files: `deploy_ownership.py`.
"""

from __future__ import annotations

from pathlib import Path

from ..ghost.documents import App, Module, containers_off, parse_app, parse_job
from ..ghost.fields import BadDocument
from ..ghost.scripts import ModuleScript
from ..images import ImageNotFound, deploy_image
from ..joblog import OutputCollector
from ..logs import Secrets
from ..lxd import Mount
from ..model import BUILD_PACK, DEPLOY, FAILED, READY, REDEPLOY, SKIPPED, SUCCEEDED
from .commands import run_command, script_shell
from .containers import SCRIPT_DIR, container_name, container_spec, describe_ids, launch, refuse_root_ids
from .context import Outcome, StepContext, StepFailed
from .deploy_ownership import give_back_files, let_git_trust_the_module, path_owner, prepared_owner
from .release import clean_up_container, remove_leftovers

MOUNT_DEVICE = "ghost-module"  # the LXD disk device holding the working copy


def prepare(ctx: StepContext) -> Outcome:
    """Check the app's image and launch the container from it, before Ghost has cloned the module."""
    app, module = load_app_module(ctx)
    if not module.has_script(ctx.step.script):
        return Outcome(SKIPPED, message=f"module {module.name} has no {ctx.step.script}")
    module.check_stored_script(ctx.step.script)  # refused now rather than after a container was launched
    if not module.raw.get(ctx.step.script):  # only a file committed in the clone can give it something to run
        return Outcome(READY, message=f"no container prepared: the stored {ctx.step.script} is empty")
    if ctx.store.app_build_in_flight(app.id) is not None:  # the run waits for its image: a container now is stale
        return Outcome(READY, message="no container prepared: a container build of the app is in flight")
    image = image_fingerprint(ctx, app)
    announce_image(ctx, app)
    ctx.save(image=app.container_image)  # retention keeps an image a step uses
    if prepared_enough(ctx):
        return Outcome(READY, message="not launched ahead (container.max_prepared): launched when asked for")
    check_abort(ctx, "launching the container")
    owner = prepared_owner(ctx.config, app, module)
    spec = container_spec(ctx, image, idmap=owner)
    try:
        name = launch(ctx, spec)
        check_abort(ctx, "marking the container ready")
    except BaseException:
        clean_up_container(ctx, prepared_container(ctx))
        raise
    ctx.say(
        "deploy_container_prepared",
        f"module {module.name}: container {name} started from image {app.container_image}, "
        "waiting for Ghost to ask for the buildpack",
        container=name,
        image=app.container_image,
    )
    return Outcome(READY, message=f"container {name} ready")


def run(ctx: StepContext) -> Outcome:
    """Run the module's script on its working copy; the container is removed in every outcome."""
    name = prepared_container(ctx)
    try:
        app, module = load_app_module(ctx)
        if not module.has_script(ctx.step.script):
            return Outcome(SKIPPED, message=f"module {module.name} has no {ctx.step.script}")
        working_copy = app.working_copy(ctx.config.ghost.root, module)
        script = module.script(working_copy, ctx.step.script)
        if not script.content and script.path is None:  # Ghost runs it with bash: nothing happens, it succeeds
            return Outcome(SKIPPED, message=f"{script.source} is empty and the working copy has no such file")
        owner = refuse_root_ids(path_owner(working_copy), f"the working copy {working_copy}")
        with Secrets.registered(app.secret_values):
            name = usable_container(ctx, app, owner)
            collector = run_build_pack(ctx, name, app, module, script, working_copy, owner)
    finally:
        clean_up_container(ctx, name, after_outcome=True)  # also a prepared one, when the input was refused
    message = f"{script_label(ctx, module)} succeeded"
    ctx.say("deploy_buildpack_succeeded", message, module=module.name, script=ctx.step.script)
    return Outcome(SUCCEEDED, message=message, exit_code=0, output_tail=collector.tail_text())


# --- validation ------------------------------------------------------------------


def load_app_module(ctx: StepContext) -> tuple[App, Module]:
    """The job's app and the step's module, validated (BadDocument/StepFailed name the field)."""
    step = ctx.step
    if step.kind != DEPLOY or not step.module:
        raise StepFailed(f"step {step.id} is not a deploy step of a module")
    job_doc = ctx.store.get_job(step.job_id)
    if job_doc is None:
        raise StepFailed(f"job {step.job_id} does not exist")
    job = parse_job(job_doc)
    commands = (DEPLOY,) if step.script == BUILD_PACK else (DEPLOY, REDEPLOY)
    if job.command not in commands:
        raise BadDocument("job.command", f"expected {' or '.join(commands)} for {step.script}, got {job.command!r}")
    app = parse_app(ctx.store.get_app(job.app_id), job.app_id)
    off = containers_off(app, ctx.config.ghost_settings.container_enabled, DEPLOY)
    if off:
        raise StepFailed(
            f"refused: {off}; the patched Ghost runs its {step.script} on its own host then (an unpatched Ghost, "
            "or a setting changed after the job started)"
        )
    return app, app.module(step.module)


def script_word(ctx: StepContext) -> str:
    """What the step runs, in messages and file names: `buildpack` or `after_all_deploy`."""
    return "buildpack" if ctx.step.script == BUILD_PACK else ctx.step.script


def script_label(ctx: StepContext, module: Module) -> str:
    """`buildpack of module api` or `after_all_deploy of module api`, for messages."""
    return f"{script_word(ctx)} of module {module.name}"


# --- which image -------------------------------------------------------------------


def announce_image(ctx: StepContext, app: App) -> None:
    """When the app's newest container build failed, say in Ghost's job log which older image runs and why."""
    failed = ctx.store.newest_app_build(app.id)
    if failed is None or failed.state != FAILED or str(failed.job_id) == app.container_image:
        return
    ctx.say(
        "deploy_uses_older_image",
        f"the app's last container build (buildimage job {failed.job_id}) failed: {failed.message}; "
        f"this deploy uses the older image {app.container_image} (the app's build_infos.container_image)",
        failed_build=str(failed.job_id),
        image=app.container_image,
    )


def image_fingerprint(ctx: StepContext, app: App) -> str:
    """The fingerprint of the image the deploy runs (`images.deploy_image`); StepFailed when there is none."""
    try:
        return deploy_image(ctx.lxd, app.container_image).fingerprint
    except ImageNotFound as error:
        raise StepFailed(str(error)) from None


def check_abort(ctx: StepContext, before: str) -> None:
    """Between phases: stop when the runner asked (cancelled, lease lost, shutdown)."""
    if ctx.abort.is_set():
        raise StepFailed(f"deploy step interrupted (cancelled or taken over) before {before}")


# --- the container -----------------------------------------------------------------


def prepared_container(ctx: StepContext) -> str:
    """The container the preparation recorded (made by its own, earlier claim), else this attempt's name."""
    return ctx.step.container or container_name(ctx.step)


def usable_container(ctx: StepContext, app: App, owner: tuple[int, int]) -> str:
    """The prepared container when it runs, untouched, with the right ownership mapping; else a new one.

    Untouched: LXD says no working copy was ever mounted in it (`ever_mounted`,
    a mark set with the first mount and never cleared), so no earlier run (cut
    off by a shutdown, its container released but not deleted) ran anything
    there. Having no mount now proves nothing: releasing a container detaches
    them. The preparation released its lease when it was done, so this attempt
    may adopt it, and removes whatever else earlier attempts left; a new
    container's launch removes them all (`remove_leftovers`).
    """
    name = prepared_container(ctx)
    wanted = container_spec(ctx, "", idmap=owner)
    current = ctx.lxd.describe_container(name)
    if current is None:
        ctx.log.info("deploy_container_not_prepared", container=name)
    elif current.status != "Running" or current.mounts or current.ever_mounted:
        ctx.log.warning(
            "deploy_container_recreated",
            container=name,
            status=current.status,
            devices=current.mounts,
            ever_mounted=current.ever_mounted,
        )
    elif ctx.step.image != app.container_image:
        ctx.say(
            "deploy_container_recreated_for_new_image",
            f"the app's container image is now {app.container_image} (the container was prepared from "
            f"{ctx.step.image or 'an older one'}): starting a new container",
            container=name,
            image=app.container_image,
        )
    elif current.maps_ownership_as(wanted):
        ctx.log.info("deploy_container_reused", container=name)
        remove_leftovers(ctx, keep=name)
        return name
    else:
        ctx.log.warning(
            "deploy_container_recreated_for_owner",
            container=name,
            reason="the working copy's owner differs from the prepared id mapping",
            owner=describe_ids(*owner),
        )
    spec = container_spec(ctx, image_fingerprint(ctx, app), idmap=owner)
    ctx.save(image=app.container_image)  # retention keeps an image a step uses
    if current is None:  # nothing prepared (a build was in flight at job start, or no preparation for this script)
        announce_image(ctx, app)
    check_abort(ctx, "launching the container")
    return launch(ctx, spec)  # launch deletes the containers of earlier attempts first


def run_build_pack(
    ctx: StepContext,
    name: str,
    app: App,
    module: Module,
    script: ModuleScript,
    working_copy: Path,
    owner: tuple[int, int],
) -> OutputCollector:
    """Mount, then run the script once per claim (`run_script`), then hand the module's files back.

    A start-over after LXD went away once the script had ended (during the
    hand-back or the release) must not run it again: its verdict is kept on
    the context, and only the hand-back is done again, in a new container.
    """
    check_abort(ctx, "mounting the working copy")
    ctx.lxd.add_mount(name, MOUNT_DEVICE, Mount(working_copy, module.path))
    if ctx.script_verdict is None:
        try:
            ctx.script_verdict = run_script(ctx, name, app, module, script, working_copy)
        except StepFailed as failure:  # the script's own verdict: non-zero exit, exec_timeout
            ctx.script_verdict = failure
    else:
        ctx.say(
            "deploy_script_not_run_again",
            f"module {module.name}: its {ctx.step.script} ended before LXD went away; its files are handed back "
            f"in container {name}, it does not run again",
            module=module.name,
        )
    verdict = ctx.script_verdict
    give_back_files(ctx, name, module, owner, succeeded=not isinstance(verdict, StepFailed))
    if isinstance(verdict, StepFailed):
        raise verdict
    return verdict


def run_script(
    ctx: StepContext, name: str, app: App, module: Module, script: ModuleScript, working_copy: Path
) -> OutputCollector:
    """Push the script and run it with bash (or sh) in the module directory: its output, or StepFailed."""
    # Outside the module: the working copy stays as cloned.
    path = f"{SCRIPT_DIR}/{script_word(ctx)}-{module.name}.sh"
    ctx.lxd.push_file(name, path, script.content, mode=0o644)
    let_git_trust_the_module(ctx, name, module)
    check_abort(ctx, f"running the {ctx.step.script}")
    shell = script_shell(ctx, name)
    ctx.say(
        "deploy_buildpack_starting",
        f"module {module.name}: running its {ctx.step.script} ({script.source}) with {shell} in {module.path} "
        f"(container {name})",
        module=module.name,
        path=module.path,
        working_copy=str(working_copy),
        script=ctx.step.script,
        source=script.source,
        shell=shell,
    )
    dropped = app.non_ascii_env_keys
    if dropped:  # names only: values may be secrets
        ctx.say(
            "env_non_ascii_dropped",
            f"env_vars {', '.join(dropped)}: non-ASCII characters dropped from their values, as Ghost does for "
            "module scripts",
            keys=dropped,
        )
    return run_command(ctx, name, [shell, path], app.module_env(module), script_label(ctx, module), cwd=module.path)


def prepared_enough(ctx: StepContext) -> bool:
    """Whether `container.max_prepared` containers already wait for their request (then `run` launches one)."""
    bound = ctx.config.container.max_prepared
    if bound is None or ctx.store.prepared_deploy_count(ctx.step.id) < bound:
        return False
    ctx.say(
        "deploy_container_deferred",
        f"module {ctx.step.module}: {bound} prepared container(s) already wait (container.max_prepared); "
        "this one is launched when Ghost asks for the buildpack",
        max_prepared=bound,
    )
    return True
