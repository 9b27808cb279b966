"""The checks of the daemon's settings against Ghost's: its virtualenv, container.enabled, the buildpack
command's waits within Ghost's RQ job timeout, and whether containers need to be privileged."""

from __future__ import annotations

from ..config import Config, buildpack_waits, waits_fit
from ..ghost.config_yml import DEFAULT_GHOST_CONFIG
from ..model import FAILED
from ..steps import UNPRIVILEGED_HINT
from ..store import Store, short_error
from .result import CheckResult, fail, ok, warn


def venv_check(config: Config) -> CheckResult:
    """Ghost's virtualenv, where ansible runs from, when Ghost's features_provisioners lists ansible."""
    venv = config.ghost.venv
    if "ansible" not in config.ghost_settings.features_provisioners:
        return ok("ghost.venv", "not needed: Ghost's features_provisioners does not list ansible")
    playbook = venv / "bin" / "ansible-playbook"
    if not playbook.is_file():
        return fail(
            "ghost.venv",
            f"{playbook} does not exist: every build would fail at the ansible features install",
            "set ghost.venv to Ghost's virtualenv (python -c 'import sys; print(sys.exec_prefix)' "
            "with the python of Ghost's worker)",
        )
    return ok("ghost.venv", f"{playbook} exists")


def containers_enabled_check(config: Config) -> CheckResult:
    """Ghost's container.enabled: off, the daemon makes no step (as 19.08's lxd_is_available gate)."""
    ghost = config.ghost_settings
    if ghost.container_enabled:
        return ok("ghost container.enabled", f"true in {ghost.path}")
    where = f"in {ghost.path}" if ghost.path else f"no Ghost config.yml read (ghost.config; no {DEFAULT_GHOST_CONFIG})"
    return warn(
        "ghost container.enabled",
        f"not true ({where}): no container step is made; Ghost runs module scripts on its host",
        "set container.enabled: true in Ghost's config.yml (ghost.config names it), then restart the daemon",
    )


def buildpack_waits_check(config: Config) -> CheckResult:
    """The buildpack command's longest life must fit in Ghost's RQ job timeout, which kills the whole job."""
    timeout, build_wait = config.buildpack.timeout, config.buildpack.build_wait
    limit = config.ghost_settings.rq_worker_job_timeout
    waits = f"buildpack.build_wait {build_wait:g}s + buildpack.timeout {timeout:g}s = {build_wait + timeout:g}s"
    if waits_fit(timeout, build_wait, limit):
        return ok("buildpack waits", f"{waits} per module script, within Ghost's rq_worker_job_timeout {limit}s")
    derived_timeout, derived_wait = buildpack_waits(limit)
    return warn(
        "buildpack waits",
        f"{waits} per module script: more than five sixths of Ghost's rq_worker_job_timeout {limit}s, which "
        "leaves too little to the rest of the deploy: rq may kill the whole job first, the script still running",
        f"leave buildpack.timeout and buildpack.build_wait out (then {derived_timeout:g}s and {derived_wait:g}s), "
        "lower them, or raise rq_worker_job_timeout in Ghost's config.yml",
    )


RECENT_STEPS = 50  # finished steps read for failures an unprivileged container caused


def unprivileged_failures_check(config: Config, store: Store) -> CheckResult:
    """Recent steps that failed on an operation an unprivileged container refuses (see steps.looks_unprivileged)."""
    name = "container.privileged"
    if config.container.privileged:
        return ok(name, "true: containers are privileged")
    try:
        steps = store.recent_finished_steps(RECENT_STEPS)
    except Exception as error:
        return fail(name, f"cannot read recent steps: {short_error(error)}", "fix the mongodb check first")
    failed = [step for step in steps if step.state == FAILED and UNPRIVILEGED_HINT in step.message]
    if not failed:
        return ok(name, f"false; none of the last {len(steps)} finished steps failed for being unprivileged")
    return fail(
        name,
        f"{len(failed)} of the last {len(steps)} finished steps failed on an operation unprivileged containers "
        f"refuse: {', '.join(step.id for step in failed[:3])}",
        "make the hook, feature or buildpack work without it, or set container.privileged: true "
        "(Ghost's own default; containers then run as root on this host)",
    )
