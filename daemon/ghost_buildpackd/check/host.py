"""The checks of this host: the id mapping LXD needs, the directories Ghost's files go to, the publish compressor."""

from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path

from ..config import PUBLISH_COMPRESSORS, Config
from ..steps import idmap_user_ids
from .result import CheckResult, fail, ok

SUBUID, SUBGID = Path("/etc/subuid"), Path("/etc/subgid")


def subid_allows(path: Path, host_id: int) -> bool:
    """Whether `path` (subuid/subgid) lets root map `host_id` (`root:<id>:1` or a range holding it)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in ("root", "0") and parts[1].isdigit() and parts[2].isdigit():
            start, count = int(parts[1]), int(parts[2])
            if start <= host_id < start + count:
                return True
    return False


def idmap_check(config: Config) -> CheckResult:
    user = config.container.idmap_user
    if config.container.privileged:
        return ok("idmap", "container.privileged is true: no raw.idmap needed")
    try:
        uid, gid = idmap_user_ids(user)
    except KeyError:
        return fail(
            "idmap",
            f"container.idmap_user {user!r} is no user on this host",
            "create the user (systemd/sysusers.d/ghost-buildpackd.conf), or give `uid:gid`",
        )
    if uid == 0 or gid == 0:
        return fail(
            "idmap",
            f"container.idmap_user {user!r} ({uid}:{gid}) is root's: mapped into containers, it would make their "
            "processes root on this host (steps refuse it)",
            "set container.idmap_user to Ghost's user",
        )
    missing = [
        f"root:{value}:1 in {path}" for path, value in ((SUBUID, uid), (SUBGID, gid)) if not subid_allows(path, value)
    ]
    if missing:
        return fail(
            "idmap",
            f"container.idmap_user {user!r} ({uid}:{gid}) cannot be mapped: missing {' and '.join(missing)}",
            f"echo root:{uid}:1 >> {SUBUID}; echo root:{gid}:1 >> {SUBGID}; then restart LXD",
        )
    return ok("idmap", f"root may map {uid}:{gid} ({user}) into containers ({SUBUID}, {SUBGID})")


def _current_user() -> str:
    # By uid, not $USER: `setpriv`/`runuser` may keep the caller's environment.
    try:
        return f"{pwd.getpwuid(os.getuid()).pw_name} (uid {os.getuid()})"
    except KeyError:
        return f"uid {os.getuid()}"


def writable_dir_check(name: str, path: Path) -> CheckResult:
    """The directory exists and the user running this check can write in it."""
    who = _current_user()
    hint = (
        "run the check as the daemon's user to test what the service sees "
        "(`setpriv --reuid=ghost --regid=ghost --groups=lxd ghost-buildpackd check`)"
    )
    if not path.is_dir():
        return fail(
            name, f"{path} does not exist", f"create it (systemd/tmpfiles.d/ghost-buildpackd.conf) or fix {name}"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        return fail(name, f"{path} is not writable by {who}", f"give the daemon's user write access to {path}; {hint}")
    return ok(name, f"{path} exists and is writable by {who}, the user this check runs as")


def compressor_check(config: Config) -> CheckResult:
    compression = config.container.publish_compression
    if compression == "none":
        return ok("publish compression", "none: images are published uncompressed")
    binary = PUBLISH_COMPRESSORS[compression]
    if not config.lxd.on_this_host:
        return ok("publish compression", f"{compression}: LXD at {config.lxd.endpoint} runs {binary} (not checked)")
    found = shutil.which(binary)
    if not found:
        return fail(
            "publish compression",
            f"container.publish_compression is {compression} but {binary} is not on PATH",
            f"install {binary} (LXD runs it when publishing) or set container.publish_compression: none",
        )
    return ok("publish compression", f"{compression}: {found}")
