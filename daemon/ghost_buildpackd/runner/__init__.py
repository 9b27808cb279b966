"""The step runner: claims steps under leases and runs their bodies in a bounded pool.

- A dispatcher thread claims work while a worker slot is free (so other
  instances get the rest) and wakes up at once when told new work exists.
- A renewer thread extends the lease of every step held here; a lost lease or
  a cancellation request sets the step's `abort` event, which stops its
  command (Lxd.execute force-stops the container).
- Self-fencing: each holder keeps a local deadline, `lease_ttl` minus a margin
  after it last sent a renewal that succeeded. A guard thread aborts the step
  when the deadline passes (MongoDB unreachable, or this process paused), so
  the holder stops acting before the lease expires on the server and a
  successor may take it. The renewer makes one bounded attempt per round.
- Every write about a step is fenced on its lease token (StepContext.save); what
  an attempt makes in LXD carries its claim number and is never touched by an
  earlier attempt. Every state it writes is a `Store.move` along the
  runner's or shutdown's rows of the transition table (model.py).
- Host binding: a deploy script runs only on the host Ghost's worker asked
  on (`requested_host`, where its working copy is). A step still pending or
  preparing may be claimed by any host; when Ghost's request for another host
  lands meanwhile, the holder finds it at its next move and hands the step
  back (lease released, state kept) before anything of the script runs.
- Shutdown: stop claiming, let running steps finish within the grace period,
  then abort them; an aborted step goes back along the table's shutdown rows,
  where another start resumes it.

The runner is one `Runner` composed of its concerns: `pool.py` (the claim
loop, the worker pool, lease renewal and the guard), `execute.py` (one held
step: its body, LXD outages, the hand-over, its outcome), `shutdown.py`
(stopping), `outcomes.py` (the bodies, the held-step record, outcomes).
"""

from __future__ import annotations

from .execute import Execution
from .outcomes import MAX_ATTEMPTS, Bodies, Held, RequestedElsewhere, StepBody
from .shutdown import Shutdown

__all__ = ["MAX_ATTEMPTS", "Bodies", "Held", "RequestedElsewhere", "Runner", "StepBody"]


class Runner(Shutdown, Execution):
    """Claims steps under leases and runs their bodies in a bounded pool, until stopped."""
