"""The buildimage step's scripts in its container: the hooks pushed and run, salt bootstrapped, the features
installed by every provisioner of Ghost's `features_provisioners` with its command's placeholders filled
as Ghost fills them.
"""

from __future__ import annotations

from ..config import PLACEHOLDER_ANSIBLE_VERBOSITY, PLACEHOLDER_LOG_LEVEL, PLACEHOLDER_VENV, Config
from ..lxd import ContainerSpec
from .buildimage_plan import BuildPlan, check_abort, lxd_phase, make_base_template
from .commands import run_command
from .containers import SCRIPT_DIR, launch
from .context import StepContext

# Ghost's ANSIBLE_LOG_LEVEL_MAP: provisioner_log_level -> ansible-playbook's verbosity (none for error, warning).
ANSIBLE_VERBOSITY = {
    "info": "-v",
    "profile": "-vv",
    "debug": "-vvv",
    "trace": "-vvvv",
    "garbage": "-vvvv",
    "all": "-vvvv",
}


def build_in_container(ctx: StepContext, plan: BuildPlan, spec: ContainerSpec) -> None:
    """Create the build's container and run the scripts in it (the build after the AMI, or ahead of it)."""
    check_abort(ctx, "creating the container")
    # A new base image: its first build is made from the image, its template once the outcome is recorded
    # (Ghost no longer waits then; made during the build, it slowed the build's own publish on dir).
    lxd_phase("creating the container", lambda: launch(ctx, spec, template_later=True))
    ctx.after_outcome.append(lambda: make_base_template(ctx))
    run_scripts(ctx, plan, spec.name)


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
