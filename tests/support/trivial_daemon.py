"""A daemon process whose step bodies are trivial, for the event-intake guarantees.

Same `Daemon` as production (intake, leases, runner, shutdown); only the bodies
differ: each records its effect in the test database's `test_effects`
collection (one document per step, counting how many times the effect
happened and which instances did it) after `TEST_WORK_SECONDS` of simulated
work, so kills land in the middle of steps.

Usage: python -m tests.support.trivial_daemon CONFIG
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ghost_buildpackd.config import load_config
from ghost_buildpackd.daemon import Daemon, connect_store, install_signal_handlers
from ghost_buildpackd.logs import configure_logging
from ghost_buildpackd.lxd import Lxd
from ghost_buildpackd.model import READY, SUCCEEDED
from ghost_buildpackd.runner import Bodies
from ghost_buildpackd.steps import Outcome, StepContext, StepFailed
from ghost_buildpackd.store import retry_transient

WORK_SECONDS = float(os.environ.get("TEST_WORK_SECONDS", "0.05"))


def record_effect(ctx: StepContext) -> Outcome:
    if ctx.abort.wait(WORK_SECONDS):  # simulated work, interrupted like a real command
        raise StepFailed("interrupted")
    write_effect(ctx)
    return Outcome(SUCCEEDED, "trivial body ran")


@retry_transient  # through MongoDB outages, as every write of the daemon's own
def write_effect(ctx: StepContext) -> None:
    ctx.store.db["test_effects"].update_one(
        {"_id": ctx.step.id}, {"$inc": {"count": 1}, "$push": {"instances": ctx.instance_id}}, upsert=True
    )


def prepare(ctx: StepContext) -> Outcome:
    return Outcome(READY)


TRIVIAL = Bodies(buildimage=record_effect, prepare_deploy=prepare, run_deploy=record_effect)


def main(config_path: str) -> int:
    config = load_config(Path(config_path)).with_instance_id()
    configure_logging(config.log.format, config.log.level)
    daemon = Daemon(config, connect_store(config), Lxd(config.lxd), bodies=TRIVIAL)
    install_signal_handlers(daemon)
    return daemon.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
