"""Who owns a deploy's files: the ids mapped into its container (the working copy's owner), git's trust in
the module there, and the hand-back of the module's files to that owner after every script.

Files the buildpack writes belong to the working copy's owner: in
unprivileged containers, container root is a host id of that container alone
(`container_spec`) and the owner is mapped in as itself, so container root may
write in the working copy; after every script the module is handed back to the
owner (`give_back_files`), whichever container user wrote its files.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import Config
from ..ghost.documents import App, Module
from ..lxd import LxdError
from .commands import run_command
from .containers import describe_ids, idmap_user_ids, refuse_root_ids
from .context import StepContext, StepFailed


def path_owner(path: Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_uid, info.st_gid


def prepared_owner(config: Config, app: App, module: Module) -> tuple[int, int]:
    """Who is mapped into a container made before Ghost's clone (a preparation, the warm pool): the working copy's
    owner if it exists, else `container.idmap_user`; StepFailed when that is root's."""
    candidate = app.app_dir(config.ghost.root) / module.name
    if candidate.is_dir() and not candidate.is_symlink():
        return refuse_root_ids(path_owner(candidate), f"the working copy {candidate}")
    user = config.container.idmap_user
    try:
        return refuse_root_ids(idmap_user_ids(user), f"container.idmap_user {user!r}")
    except KeyError:
        raise StepFailed(f"container.idmap_user: no user {user!r} on this host") from None


# Appends to the container's system git configuration (in the container only: it is removed after the script).
GIT_SAFE_DIRECTORY = 'printf "[safe]\\n\\tdirectory = %s\\n" "$1" >> /etc/gitconfig'


def let_git_trust_the_module(ctx: StepContext, name: str, module: Module) -> None:
    """Let git run as container root in the module (`safe.directory` in the container's /etc/gitconfig).

    The working copy belongs to its owner inside the container too (mapped as
    itself), not to container root: git (2.35.2 and later) refuses a repository
    another user owns ("detected dubious ownership"), where Ghost's buildpack,
    run by the clone's owner, has it work. Measured with git 2.39.5: the
    system file's `safe.directory` lifts it. Best effort: a failure is logged.
    """
    result = ctx.lxd.execute(
        name,
        ["sh", "-c", GIT_SAFE_DIRECTORY, "sh", module.path],
        {},
        lambda _: None,
        ctx.config.container.exec_timeout,
        abort=ctx.abort,
    )
    if not result.ok:
        ctx.log.warning("git_safe_directory_not_set", container=name, exit_code=result.exit_code, error=result.error)


def started_for_hand_back(ctx: StepContext, name: str) -> bool:
    """A script that ran out of `container.exec_timeout` was stopped with its container: it is started again, so
    its files are handed back all the same (Ghost's next deploy removes the clone as its user). Not after a
    cancellation or a takeover: the step is then no longer this attempt's to act on."""
    if ctx.abort.is_set():
        ctx.log.warning("ownership_not_restored", container=name, reason="the step was cancelled or taken over")
        return False
    try:
        ctx.lxd.start(name)
        ctx.lxd.wait_ready(name, ctx.config.container.ready_timeout, abort=ctx.abort)
    except LxdError as error:
        ctx.log.warning("ownership_not_restored", container=name, reason=f"could not start it again: {error}")
        return False
    return True


def give_back_files(ctx: StepContext, name: str, module: Module, owner: tuple[int, int], succeeded: bool) -> None:
    """Hand every file of the module to the working copy's owner, before the outcome is recorded.

    Whatever ran in the container (root, whose host id is the container's
    own, a package manager dropping privileges, a `chown www-data`) left files
    that Ghost's user could not remove at its next deploy (`chmod -R u+rwx`,
    `rm -rf` on the clone). The owner's ids are given as they are (derived
    from the working copy, never fixed): an unprivileged container has them
    mapped as themselves. `-h`: a symlink is handed back itself, its target is
    never touched.

    A failure fails a privileged step that succeeded (its root may chown
    anything). In an unprivileged container, only files whose host owner has
    no id inside it resist, and the container cannot have made those (someone
    put them in the working copy on the host): said in the job log, never a
    failure. After a failed script this is best effort.
    """
    if ctx.lxd.container_status(name) != "Running" and not started_for_hand_back(ctx, name):
        return
    privileged = ctx.config.container.privileged
    uid, gid = owner
    label = f"ownership of the module's files to the working copy's owner {describe_ids(*owner)}"
    try:
        run_command(ctx, name, ["chown", "-R", "-h", f"{uid}:{gid}", module.path], {}, label)
    except StepFailed as error:
        if privileged and succeeded:
            raise
        ctx.say(
            "ownership_partly_restored",
            f"some files of the module keep their owner: {error.output_tail or error.message}"
            + ("" if privileged else " (files whose host owner has no id in the container, not made by the script)"),
            module=module.name,
        )
