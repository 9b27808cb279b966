"""Commands a step runs in its container: under `container.exec_timeout`, output streamed to Ghost's job log,
and a failure worded for a Ghost user (exit code, out of memory, an unprivileged container's refusal).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..joblog import OutputCollector
from ..lxd import ExecResult
from .context import StepContext, StepFailed

COMMAND_NOT_FOUND = "Command not found"  # how LXD reports an exec whose command exits 127


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
