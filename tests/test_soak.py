"""The soak's CI version: five minutes of mixed Ghost traffic against two daemon instances, through a MongoDB
primary step-down and an LXD restart (benchmarks/soak.py; `scripts/soak` runs the two hours).

Real `mongod` (a three-node replica set), the real LXD, two `ghost-buildpackd run` processes, Ghost's
`buildpack` and `buildimage` commands as subprocesses. LXD is stopped and started again halfway through
the second half: everything else using this LXD meets the restart too.
"""

from __future__ import annotations

import os

import pytest
from benchmarks.soak import Site, SoakPlan, report, run_soak

pytestmark = [
    pytest.mark.lxd,
    pytest.mark.slow,
    pytest.mark.parametrize("mongo", ["three_node"], indirect=True),
]

# One step-down at 150 s, one LXD restart at 225 s; GHOST_BUILDPACKD_SOAK_NO_LXD_RESTART=1 leaves LXD alone.
CI_PLAN = SoakPlan(
    duration=300.0,
    restart_every=150.0,
    lxd_restarts=not os.environ.get("GHOST_BUILDPACKD_SOAK_NO_LXD_RESTART"),
    drain=240.0,
)


def test_five_minutes_of_ghost_traffic_through_a_step_down_and_an_lxd_restart(mongo, db, lxd, base_image, tmp_path):
    result = run_soak(Site(mongo, lxd, tmp_path, db, base_image), CI_PLAN)
    print(report(result))

    wanted_faults = ["step_down", "lxd_restart"] if CI_PLAN.lxd_restarts else ["step_down"]
    assert [fault["kind"] for fault in result["faults"]] == wanted_faults, result["fault_errors"]
    assert result["steps_by_kind_and_state"].get("deploy:succeeded", 0) >= 20, "too little traffic to say anything"
    assert result["steps_by_kind_and_state"].get("buildimage:succeeded", 0) >= 1
    assert result["lost"] == []
    assert result["duplicated"] == []
    assert result["unexpected_outcomes"] == []
    assert result["containers_left"] == []
    assert result["ghost_errors"] == []
    assert result["drained"] and result["settled"]
    assert all(result["daemons_alive_at_end"].values()), result["daemons_alive_at_end"]
    assert result["daemon_exit_codes"] == {"a": 0, "b": 0}
    for name, memory in result["memory"].items():
        assert memory["flat"], f"daemon {name}: {memory}"
    assert result["passed"]
