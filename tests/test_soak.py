"""The soak's CI version: five minutes of mixed Ghost traffic against two daemon instances, through a MongoDB
primary step-down and an LXD restart (benchmarks/soak.py; `scripts/soak` runs the two hours).

Real `mongod` (a three-node replica set), the real LXD, two `ghost-buildpackd run` processes, Ghost's
`buildpack` and `buildimage` commands as subprocesses. LXD is stopped and started again halfway through
the second half: everything else using this LXD meets the restart too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from benchmarks.common import to_json
from benchmarks.soak import Site, SoakPlan, flatness, report, run_soak, working_copy_effects

# One step-down at 150 s, one LXD restart at 225 s; GHOST_BUILDPACKD_SOAK_NO_LXD_RESTART=1 leaves LXD alone.
CI_PLAN = SoakPlan(
    duration=300.0,
    restart_every=150.0,
    lxd_restarts=not os.environ.get("GHOST_BUILDPACKD_SOAK_NO_LXD_RESTART"),
    drain=240.0,
)


@pytest.mark.lxd
@pytest.mark.slow
@pytest.mark.parametrize("mongo", ["three_node"], indirect=True)
def test_five_minutes_of_ghost_traffic_through_a_step_down_and_an_lxd_restart(mongo, db, lxd, base_image, tmp_path):
    result = run_soak(Site(mongo, lxd, tmp_path, db, base_image), CI_PLAN)
    print(report(result))
    (tmp_path / "soak.json").write_text(to_json(result))  # the figures, as scripts/soak writes them

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


# --- the figures themselves: each can fail ----------------------------------------------------------


def test_a_second_done_is_a_duplicate_and_a_second_start_a_rerun(tmp_path: Path):
    for name, runs, after in (
        ("once", "start\ndone\n", "after\n"),
        ("cut-off-then-run", "start\nstart\ndone\n", "after\n"),
        ("twice", "start\ndone\nstart\ndone\n", "after\nafter\n"),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".soak-runs").write_text(runs)
        (tmp_path / name / ".soak-after").write_text(after)

    duplicated, reruns = working_copy_effects(tmp_path)

    assert duplicated == ["twice: build_pack done 2 times", "twice: after_all_deploy ran 2 times"]
    assert reruns == ["cut-off-then-run: build_pack started 2 times", "twice: build_pack started 2 times"]


def test_rss_or_descriptors_growing_past_the_tolerance_are_not_flat():
    def run(rss_end: float, fds_end: int) -> dict:
        # 100 s sampled every second: the second tenth at 60 MiB and 60 descriptors, the last tenth as given.
        samples = [(float(t), 60.0 if t < 90 else rss_end, 60 if t < 90 else fds_end) for t in range(101)]
        return flatness(samples, 100.0)

    assert run(65.0, 65)["flat"]
    assert not run(75.0, 65)["flat"]  # over 10 MiB (15% of 60 is 9)
    assert not run(65.0, 75)["flat"]  # over 10 descriptors
