"""What every step body shares: its context, its outcome, and the container chores.

A step body (`buildimage.run`, `deploy.prepare`, `deploy.run`) receives a
`StepContext` while the runner holds the step's lease, and returns an
`Outcome`. It fails by raising `StepFailed` (or `BadDocument` for bad Ghost
data); the runner records the outcome, so bodies never write terminal states.
"""

from __future__ import annotations

import dataclasses
import grp
import math
import pwd
import re
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

from .. import templates
from ..config import Config
from ..joblog import JobLog, OutputCollector
from ..logs import Logger
from ..lxd import (
    TAG_APP,
    TAG_CLAIM,
    TAG_JOB,
    TAG_KIND,
    TAG_OWNER,
    TAG_STEP,
    ContainerSpec,
    ExecResult,
    Lxd,
    LxdError,
    LxdUnavailable,
    Mount,
    is_unavailable,
)
from ..lxd_outages import wait_until_back
from ..model import BUILD_PACK, Step
from ..policy import LIMITS
from ..store import Store

SCRIPT_DIR = "/var/lib/ghost-buildpackd"  # where scripts are put inside containers
COMMAND_NOT_FOUND = "Command not found"  # how LXD reports an exec whose command exits 127
KILL_TIMEOUT = 30.0  # for the kill that ends a container's processes; past it, the container is force-stopped


class StepFailed(Exception):
    """The step cannot succeed; `message` says why in words a Ghost user can act on."""

    def __init__(self, message: str, exit_code: int | None = None, output_tail: str = "", timed_out: bool = False):
        self.message = message
        self.exit_code = exit_code
        self.output_tail = output_tail  # the end of the failed command's output
        self.timed_out = timed_out  # killed at container.exec_timeout
        super().__init__(message)


class LeaseLost(Exception):
    """Another instance holds the step now: stop without writing anything."""


@dataclasses.dataclass(frozen=True)
class Outcome:
    state: str
    message: str = ""
    exit_code: int | None = None
    output_tail: str = ""
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StepContext:
    step: Step
    config: Config
    store: Store
    lxd: Lxd
    log: Logger  # bound with the step's context
    abort: threading.Event  # set when the lease is lost, the step is cancelled, or shutdown ran out of time
    instance_id: str
    # Monotonic time past which this holder no longer counts on its lease: set by the runner at each
    # claim and renewal, ahead of the lease's expiry by a margin, so it stops before a successor may start.
    lease_valid_until: float = math.inf
    _job_log: JobLog | None = None
    # Chores the runner does after recording the outcome (so nobody waits for them).
    after_outcome: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    # A module script's verdict (its output, or its failure) once it ended: kept for this claim, so a start-over
    # after LXD went away during the chores that follow (hand-back, release) redoes those, not the script.
    script_verdict: OutputCollector | StepFailed | None = None

    @property
    def job_log(self) -> JobLog:
        if self._job_log is None:
            marker = f"container {self.step.kind}" + (f" {self.step.module}" if self.step.module else "")
            self._job_log = JobLog(self.config.ghost.log_dir, str(self.step.job_id), marker)
        return self._job_log

    def save(self, state: str | None = None, **fields: Any) -> Step:
        """Fenced write to the step record; raises LeaseLost when another instance holds it."""
        updated = self.store.update_step(self.step, state=state, **fields)
        if updated is None:
            self.abort.set()
            raise LeaseLost(self.step.id)
        self.step = updated
        return updated

    def confirm_lease(self) -> None:
        """Before an act a successor's work could conflict with: LeaseLost unless the lease is still ours.

        Ours while the local deadline has not passed: the runner sets it ahead
        of the lease's expiry on the server, and no one may take the step
        before that expiry. A local check, so it needs no MongoDB round trip
        (a step carries on through a short outage); it cannot change before
        the act unless this process pauses past the margin in between.
        """
        if time.monotonic() >= self.lease_valid_until:
            self.abort.set()
            raise LeaseLost(self.step.id)

    def say(self, event: str, text: str, **fields: Any) -> None:
        """Tell both audiences: a line in Ghost's job log and a structured log event."""
        self.job_log.write(text)
        self.log.info(event, **fields)


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
    """The container for this step, shaped by `container.*` in the config.

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
    settings = ctx.config.container
    if idmap is not None and not settings.privileged:
        refuse_root_ids(idmap, "the id mapping")  # callers refuse first, naming the path: this is the backstop
    return ContainerSpec(
        name=container_name(ctx.step),
        image=image,
        tags=step_tags(ctx),
        privileged=settings.privileged,
        idmap=None if settings.privileged else idmap,
        cpu=settings.limits.cpu,
        memory=settings.limits.memory,
        disk=settings.limits.disk,
        processes=settings.limits.processes,
        profiles=settings.profiles,
        mounts=dict(mounts or {}),
    )


def launch(ctx: StepContext, spec: ContainerSpec) -> str:
    """Create and start the container, and wait until it runs commands."""
    ctx.save(container=spec.name)  # recorded first, so whoever takes over knows what to remove
    ctx.confirm_lease()
    remove_leftovers(ctx)  # what earlier attempts of this step left (never a later attempt's)
    ctx.log.info("container_creating", container=spec.name, image=spec.image[:12])
    templates.create_container(ctx.lxd, spec, ctx.config.container.templates, ctx.log)
    ctx.lxd.start(spec.name)
    # The probe also makes the directory scripts are pushed to (push_file expects it to exist).
    try:
        ctx.lxd.wait_ready(spec.name, ctx.config.container.ready_timeout, ("mkdir", "-p", SCRIPT_DIR), ctx.abort)
    except LxdUnavailable:
        raise
    except LxdError as error:  # the image's fault (a command that hangs or fails), or a cancellation
        raise StepFailed(f"{error} (container.ready_timeout {ctx.config.container.ready_timeout:g}s)") from error
    ctx.log.info("container_ready", container=spec.name)
    return spec.name


def run_command(
    ctx: StepContext,
    container: str,
    argv: list[str],
    env: Mapping[str, str],
    label: str,
    cwd: str | None = None,
) -> OutputCollector:
    """Run one command under `container.exec_timeout`, streaming its output; StepFailed unless it exits 0."""
    command = " ".join(argv)
    ctx.say("command_started", f"$ {command}  ({label})", command=command, label=label)
    collector = OutputCollector(
        ctx.job_log, ctx.log, ctx.config.container.output_head, ctx.config.container.output_tail
    )
    result: ExecResult = ctx.lxd.execute(
        container, one_stream(argv), env, collector, ctx.config.container.exec_timeout, cwd=cwd, abort=ctx.abort
    )
    collector.finish()
    fields = {
        "command": command,
        "label": label,
        "exit_code": result.exit_code,
        "duration_s": round(result.duration, 3),
        "output_bytes": collector.total,
    }
    if result.ok:
        ctx.log.info("command_succeeded", **fields)
        return collector
    if result.timed_out:
        reason = f"{label}: `{command}` did not finish within {ctx.config.container.exec_timeout:g}s (killed)"
    elif result.aborted:
        reason = f"{label}: `{command}` was interrupted (step cancelled or taken over)"
    elif result.exit_code is None and COMMAND_NOT_FOUND in result.error:
        reason = f"{label}: `{argv[0]}` is not in the container's image (exit 127: command not found)"
    elif result.exit_code is None:
        reason = f"{label}: `{command}` was lost ({result.error or 'the container went away'})"
    else:
        reason = f"{label}: `{command}` exited with code {result.exit_code}"
        if result.exit_code == 137:  # 128 + SIGKILL: in a container, nearly always the out-of-memory killer
            reason += " (killed by SIGKILL: out of memory under container.limits.memory?)"
        elif not ctx.config.container.privileged and looks_unprivileged(collector.tail_text()):
            reason += UNPRIVILEGED_HINT
    ctx.log.error("command_failed", reason=reason, **fields)
    raise StepFailed(reason, result.exit_code, collector.tail_text(), timed_out=result.timed_out)


SHELLS = ("sh", "bash")


def one_stream(argv: list[str]) -> list[str]:
    """A script run (`sh script`, `bash script`: hooks, buildpacks) with its stderr joined to its stdout inside
    the container, as Ghost's gcall gives a command one file for both: LXD carries the two over separate
    websockets, whose chunks would interleave out of order.

    Other commands (salt-call, ansible-playbook) keep LXD's own lookup of their name: a shell would look it up
    differently (busybox's sh may run its own applet of that name instead of the image's program).
    """
    if not argv or argv[0] not in SHELLS:
        return argv
    return [argv[0], "-c", 'exec "$0" "$@" 2>&1', *argv]


def script_shell(ctx: StepContext, container: str) -> str:
    """`bash` when the image has it, as Ghost runs module scripts (`bash script`); else `sh`, said in the job log."""
    # Exit 1, not 127, when absent: LXD reports an exit code of 127 as an error ("Command not found").
    argv = ["sh", "-c", "command -v bash >/dev/null 2>&1 || exit 1"]
    probe = ctx.lxd.execute(container, argv, {}, lambda _chunk: None, ctx.config.lxd.timeout)
    if probe.ok:
        return "bash"
    if probe.exit_code is None:  # the container went away: the script's own run reports it
        raise StepFailed(f"looking for bash in container {container} failed ({probe.error or 'interrupted'})")
    ctx.say(
        "script_shell_fallback",
        "the image has no bash: the script runs with sh (Ghost runs module scripts with bash; "
        "bash-only syntax will fail here)",
        shell="sh",
    )
    return "sh"


# Unprivileged containers refuse what needs real root on the host: mounts, kernel settings, device nodes.
UNPRIVILEGED_HINT = (
    " (the container is unprivileged, and the output shows an operation only a privileged container may do: "
    "make it unneeded, or set container.privileged: true, Ghost's own default)"
)
_REFUSALS = ("operation not permitted", "permission denied", "read-only file system")
_PRIVILEGED_OPERATIONS = re.compile(
    r"\b(mount|umount|sysctl|mknod|modprobe|insmod|swapon|iptables|setcap|unshare|apparmor_parser)\b|/proc/sys|/sys/",
    re.IGNORECASE,
)


def looks_unprivileged(output_tail: str) -> bool:
    """A failure typical of an unprivileged container: a line refusing a privileged operation."""
    return any(
        any(refusal in line.lower() for refusal in _REFUSALS) and _PRIVILEGED_OPERATIONS.search(line)
        for line in output_tail.splitlines()
    )


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
            end_processes(ctx.lxd, ctx.log, name)
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


def end_processes(lxd: Lxd, log: Logger, name: str) -> None:
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


def run_after_outcome(ctx: StepContext) -> None:
    """The chores a body left for after its outcome was recorded; failures are logged, never raised."""
    for chore in ctx.after_outcome:
        try:
            chore()
        except Exception:  # the orphan sweep catches what this misses
            ctx.log.exception("after_outcome_chore_failed")
    ctx.after_outcome.clear()


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
