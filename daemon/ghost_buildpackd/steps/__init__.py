"""Step bodies and what they share.

- `context.py`: the `StepContext` the runner hands a body, its `Outcome`, `StepFailed` and `LeaseLost`.
- `containers.py`: a step's container, from its name, tags and spec to its launch.
- `commands.py`: commands run in it, under a deadline, their failures worded for a Ghost user.
- `release.py`: how it ends: its processes killed, disks detached, deleted; earlier attempts' leftovers.
- `buildimage.py` (with `buildimage_plan.py`, `buildimage_scripts.py`, `buildimage_publish.py`) and
  `deploy.py` (with `deploy_ownership.py`): the bodies of the two kinds of step.

Importers use this package's names (`from .steps import StepContext`) and its two body modules.
"""

from __future__ import annotations

from .commands import (
    COMMAND_NOT_FOUND,
    SHELLS,
    UNPRIVILEGED_HINT,
    looks_unprivileged,
    one_stream,
    run_command,
    script_shell,
)
from .containers import (
    SCRIPT_DIR,
    container_name,
    container_spec,
    describe_ids,
    idmap_user_ids,
    launch,
    refuse_root_ids,
    step_tags,
)
from .context import LeaseLost, Outcome, StepContext, StepFailed, run_after_outcome
from .release import (
    KILL_TIMEOUT,
    clean_up_container,
    end_processes,
    release_container,
    remove_container,
    remove_leftovers,
)

__all__ = [
    "COMMAND_NOT_FOUND",
    "KILL_TIMEOUT",
    "SCRIPT_DIR",
    "SHELLS",
    "UNPRIVILEGED_HINT",
    "LeaseLost",
    "Outcome",
    "StepContext",
    "StepFailed",
    "clean_up_container",
    "container_name",
    "container_spec",
    "describe_ids",
    "end_processes",
    "idmap_user_ids",
    "launch",
    "looks_unprivileged",
    "one_stream",
    "refuse_root_ids",
    "release_container",
    "remove_container",
    "remove_leftovers",
    "run_after_outcome",
    "run_command",
    "script_shell",
    "step_tags",
]
