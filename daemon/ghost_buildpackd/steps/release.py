"""How a step's container ends: its processes killed and its disks detached once the script ended, its
deletion (after the outcome is recorded, or at once), and the removal of what earlier attempts left.

A failure here never hides the step's own outcome; whatever is left is a
tagged container of a finished step, which the orphan sweep removes.
"""

from __future__ import annotations

from ..logs import get_logger
from ..lxd import Lxd, LxdUnavailable, is_unavailable
from ..lxd_outages import wait_until_back
from ..policy import LIMITS
from .context import StepContext

log = get_logger(__name__)

KILL_TIMEOUT = 30.0  # for the kill that ends a container's processes; past it, the container is force-stopped


def remove_container(ctx: StepContext, name: str | None) -> None:
    """Delete the step's container, or in debug mode keep it and say how to get in."""
    if not name:
        return
    if ctx.config.container.debug:
        ctx.say(
            "container_kept_for_debug",
            f"debug: container {name} kept; get in with: lxc exec {name} -- sh",
            container=name,
            command=f"lxc exec {name} -- sh",
        )
        return
    if ctx.lxd.delete_container(name):
        ctx.log.info("container_deleted", container=name)


def clean_up_container(ctx: StepContext, name: str, after_outcome: bool = False) -> None:
    """Remove the step's container (kept in debug mode); a failure here never hides the step's own outcome.

    With `after_outcome`, every process in the container but its init is
    killed and its disks are detached now, so nothing in it can touch a host
    directory once the outcome is known, and the container is deleted (a stop
    of over half a second, then the root filesystem) after the outcome is
    recorded: whoever waits for the step need not wait for that. Whatever is
    left (LXD down, a crash in between) is a tagged container of a finished
    step, which the orphan sweep removes.
    """
    try:
        status = ctx.lxd.container_status(name)
        if status is None:
            return
        if after_outcome and not ctx.config.container.debug:
            release_container(ctx, name, status)
        else:
            remove_container(ctx, name)
    except Exception as error:
        ctx.log.error("container_cleanup_failed", container=name, error=str(error), consequence="the sweep retries")


def release_container(ctx: StepContext, name: str, status: str) -> None:
    """End its processes and detach its disks now, delete it after the outcome; if that fails, delete it now."""
    try:
        if status == "Running":
            end_processes(ctx.lxd, name)
        ctx.lxd.remove_devices(name)
    except Exception as error:
        ctx.log.warning("container_release_failed_deleting_now", container=name, error=str(error))
        if is_unavailable(error):  # an LXD restart: the outcome waits until the container is gone
            ctx.job_log.write(f"LXD went away ({error}); removing the container once it is back")
            if not wait_until_back(ctx.lxd, error, ctx.abort, LIMITS.lxd_outage_wait):
                raise
        remove_container(ctx, name)  # nothing in it may carry on once the outcome is known
        return
    ctx.after_outcome.append(lambda: remove_container(ctx, name))


def end_processes(lxd: Lxd, name: str) -> None:
    """SIGKILL every process of a running container but its init; a stop when no command can start.

    One kill(-1): the kernel signals every process of the container's PID
    namespace in one pass that no fork escapes. It takes a few tens of
    milliseconds where a stop takes over half a second. A container at its
    process limit (a fork bomb) cannot start the kill: it is stopped.
    """
    try:
        result = lxd.execute(name, ["sh", "-c", "kill -9 -1; true"], {}, lambda _chunk: None, KILL_TIMEOUT)
        if result.ok or result.timed_out:  # past its deadline, `execute` force-stopped the container
            return
        reason = result.error or f"the kill command exited {result.exit_code}"
    except LxdUnavailable:
        raise
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
    log.info("container_stopped_to_end_processes", container=name, reason=reason)
    lxd.stop(name)


def remove_leftovers(ctx: StepContext, keep: str | None = None) -> list[str]:
    """Delete the containers of this step made by this attempt or earlier ones (LXD is the truth, not the record),
    but `keep` (a prepared container this attempt adopts).

    Never one of a later attempt: a holder that paused and lost the step must
    not undo its successor's work.
    """
    removed = []
    for container in ctx.lxd.list_containers():
        if container.step_id != ctx.step.id or container.claim > ctx.step.claim or container.name == keep:
            continue
        if ctx.lxd.delete_container(container.name):
            ctx.log.warning("leftover_container_removed", container=container.name)
            removed.append(container.name)
    return removed
