"""A daemon process whose step bodies are trivial, for the event-intake guarantees.

Same `Daemon` as production (intake, leases, runner, shutdown); only the bodies
differ: each records its effect in the test database's `test_effects`
collection (one document per step, counting how many times the effect
happened and which instances did it) after `TEST_WORK_SECONDS` of simulated
work, so kills land in the middle of steps.

With `TEST_HOLD_CLAIM_UNTIL_REQUESTED=1`, the first deploy step it claims
while still `pending` is held, right after the claim, until Ghost's request
for it lands (at most HOLD_LIMIT seconds): the interleaving where another
host's request arrives between a claim and the holder's next move, which no
timing can make reliable otherwise.

Usage: python -m tests.support.trivial_daemon CONFIG
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from ghost_buildpackd.config import load_config
from ghost_buildpackd.daemon import Daemon, connect_store, install_signal_handlers
from ghost_buildpackd.logs import configure_logging, get_logger
from ghost_buildpackd.lxd import Lxd
from ghost_buildpackd.model import DEPLOY, PENDING, READY, REQUESTED, SUCCEEDED
from ghost_buildpackd.runner import Bodies
from ghost_buildpackd.steps import Outcome, StepContext, StepFailed
from ghost_buildpackd.store import Store, retry_transient
from tests.support.waiting import Timeout, wait_until

WORK_SECONDS = float(os.environ.get("TEST_WORK_SECONDS", "0.05"))
HOLD_CLAIM_UNTIL_REQUESTED = os.environ.get("TEST_HOLD_CLAIM_UNTIL_REQUESTED") == "1"
HOLD_LIMIT = 60.0

log = get_logger(__name__)


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


def hold_first_pending_claim(store: Store) -> None:
    """Make the store's first claim of a pending deploy step return only once the step is requested."""
    claim = store.claim_step
    held: list[str] = []

    def claim_then_hold(*args, **kwargs):
        step = claim(*args, **kwargs)
        if step is not None and not held and step.kind == DEPLOY and step.state == PENDING:
            held.append(step.id)
            log.warning("test_claim_held", step=step.id)
            with contextlib.suppress(Timeout):  # the test did not request it: go on as usual
                wait_until(lambda: store.get_step(step.id).state == REQUESTED, HOLD_LIMIT, "Ghost's request")
        return step

    store.claim_step = claim_then_hold  # type: ignore[method-assign]


def main(config_path: str) -> int:
    config = load_config(Path(config_path)).with_instance_id()
    configure_logging(config.log.format, config.log.level)
    store = connect_store(config)
    if HOLD_CLAIM_UNTIL_REQUESTED:
        hold_first_pending_claim(store)
    daemon = Daemon(config, store, Lxd(config.lxd), bodies=TRIVIAL, owns_process=True)
    install_signal_handlers(daemon)
    return daemon.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
