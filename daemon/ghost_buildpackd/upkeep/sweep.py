"""The orphan sweep: containers the daemon left behind (crashes, hard kills).

Run at start and every `sweep_interval`. LXD is the truth: a container
carrying the daemon's step tag is removed when its step record is gone or
finished. A container of an active step is left alone even when the step's
lease expired: whoever takes the step over removes it (`remove_leftovers`),
and deleting it here would race with that takeover.

Before that, the containers of steps prepared longer than
`container.prepared_max_age` ago and not asked for yet are removed (a deploy's
launched ahead, a build's built ahead of its AMI). The steps stay requestable:
a long multi-module deploy may reach the module hours later, and its run then
launches a new container; the job's end cancels the steps of a job that ended,
and a job whose worker was killed without a word leaves only the record.
"""

from __future__ import annotations

from bson import ObjectId
from bson.errors import InvalidId

from ..logs import Logger
from ..lxd import TAG_JOB, ContainerInfo, Lxd
from ..store import Store


def expire_prepared(store: Store, lxd: Lxd, max_age: float, log: Logger) -> list[str]:
    """Remove the containers that waited for Ghost's request longer than `max_age`; the ids of their steps."""
    reason = (
        f"the container prepared over {max_age:g}s ago (container.prepared_max_age) was removed while waiting for "
        "Ghost's request; the run launches (a build builds) a new one when asked"
    )
    expired = store.expire_stale_ready(max_age, reason)
    for step in expired:
        log.warning("prepared_container_expired", step=step.id, job_id=str(step.job_id), container=step.container,
                    reason=reason)  # fmt: skip
        if step.container:
            _remove_container(lxd, step.container, step.id, "prepared_max_age", log)
    return [step.id for step in expired]


def sweep_orphans(store: Store, lxd: Lxd, keep_debug: bool, log: Logger) -> list[str]:
    """Remove orphaned tagged containers; returns the containers removed.

    The daemon creates no LXD profiles (devices live on the container), so it
    deletes none either: profiles are the operator's.

    With `keep_debug` (container.debug), containers of finished steps are kept on
    purpose so people can look inside; only those without a step record go.
    """
    removed = []
    for container in lxd.list_containers():
        reason = orphan_reason(store, container, keep_debug)
        if reason and _remove_container(lxd, container.name, container.step_id, reason, log):
            removed.append(container.name)
    return removed


def orphan_reason(store: Store, container: ContainerInfo, keep_debug: bool) -> str | None:
    """Why `container` belongs to no live step, or None when it must stay."""
    sid = container.step_id
    if not sid:
        return None  # tagged by hand or by another tool: not ours to judge
    step = store.get_step(sid)
    if step is None:
        # Only a container of a job in *this* Ghost database is ours: another Ghost
        # (another database) may share this LXD server, and its steps are not here.
        if not _job_known(store, container.tags.get(TAG_JOB)):
            return None
        return "no step record"
    if not step.terminal:
        return None  # live, or left to the takeover when its lease expired
    if keep_debug:
        return None
    return f"step {step.state}"


def _job_known(store: Store, job_id: str | None) -> bool:
    try:
        return bool(job_id) and store.get_job(ObjectId(job_id)) is not None
    except InvalidId:
        return False


def _remove_container(lxd: Lxd, name: str, step_id: str | None, reason: str, log: Logger) -> bool:
    try:
        deleted = lxd.delete_container(name)
    except Exception as error:  # one stuck container must not stop the sweep
        log.warning("orphan_container_remove_failed", container=name, step=step_id, error=str(error))
        return False
    if deleted:
        log.info("orphan_container_removed", container=name, step=step_id, reason=reason)
    return deleted
