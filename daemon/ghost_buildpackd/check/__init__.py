"""`ghost-buildpackd check`: can this host do the daemon's work? One line per check, OK or FAIL with the fix.

WARN lines name a risk that does not stop the daemon (the exit code stays 0).

Every wait is bounded by the configured timeouts. The probe container is
named `gbp-check-<random>` and is always deleted.

Each check is in the module of what it looks at (mongodb.py, lxd_server.py, host.py, settings.py) and
returns a `CheckResult` (result.py), whose line `run_checks` prints.
"""

from __future__ import annotations

from typing import TextIO

from ..config import Config
from .host import SUBGID, SUBUID, compressor_check, idmap_check, subid_allows, writable_dir_check
from .lxd_server import (
    COPY_ON_WRITE,
    METADATA_ADDRESS,
    PROJECT_IMAGE_PREFIX,
    SIZED_STORAGE,
    limits_check,
    lxd_checks,
    metadata_check,
    pick_probe_image,
    probe_container_check,
    read_loop_size,
    read_root_pool,
    storage_cost_check,
)
from .mongodb import (
    GHOST_COLLECTIONS,
    GHOST_DATABASE_HINT,
    collections_check,
    events_check,
    mongo_checks,
    mongodb_version_check,
    version_tuple,
)
from .result import CheckResult, fail, ok, warn
from .settings import (
    RECENT_STEPS,
    buildpack_waits_check,
    containers_enabled_check,
    unprivileged_failures_check,
    venv_check,
)

__all__ = [
    "COPY_ON_WRITE",
    "GHOST_COLLECTIONS",
    "GHOST_DATABASE_HINT",
    "METADATA_ADDRESS",
    "PROJECT_IMAGE_PREFIX",
    "RECENT_STEPS",
    "SIZED_STORAGE",
    "SUBGID",
    "SUBUID",
    "CheckResult",
    "buildpack_waits_check",
    "collections_check",
    "compressor_check",
    "containers_enabled_check",
    "events_check",
    "fail",
    "idmap_check",
    "limits_check",
    "lxd_checks",
    "metadata_check",
    "mongo_checks",
    "mongodb_version_check",
    "ok",
    "pick_probe_image",
    "probe_container_check",
    "read_loop_size",
    "read_root_pool",
    "run_checks",
    "storage_cost_check",
    "subid_allows",
    "unprivileged_failures_check",
    "venv_check",
    "version_tuple",
    "warn",
    "writable_dir_check",
]


def run_checks(config: Config, out: TextIO) -> int:
    """Run every check, print one line each; 0 only when all pass."""
    results: list[CheckResult] = []

    def report(result: CheckResult) -> None:
        results.append(result)
        out.write(result.render())
        out.flush()

    store = mongo_checks(config, report)
    lxd_checks(config, store, report)
    if store is not None:
        report(unprivileged_failures_check(config, store))
        store.db.client.close()
    report(idmap_check(config))
    for name, path in (("ghost.root", config.ghost.root), ("ghost.log_dir", config.ghost.log_dir)):
        report(writable_dir_check(name, path))
    report(compressor_check(config))
    report(venv_check(config))
    report(containers_enabled_check(config))
    report(buildpack_waits_check(config))
    failed = sum(not result.ok for result in results)
    warned = sum(result.warning for result in results)
    out.write(f"\n{len(results) - failed - warned} OK, {warned} WARN, {failed} FAIL\n")
    return 0 if failed == 0 else 1
