"""The Ghost benchmark's counting (benchmarks/ghost.py): which deploy steps were prepared before Ghost's request."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from benchmarks.ghost import (
    LATE,
    NOT_PREPARED,
    PREPARED,
    RUN_CLAIMED,
    StepStamps,
    classify,
    first_times,
    log_objects,
    shares,
    spans,
    stamps_of,
)


def stamps(
    preparing: float | None = None, ready: float | None = None, requested: float | None = 10.0, module: str = "api"
) -> StepStamps:
    """A step of a job started at 0, created at 0.1, claimed at 0.2 (only the stamps classify reads vary)."""
    return StepStamps(
        module=module,
        position=1,
        started=0.0,
        created=0.1,
        claimed=0.2,
        preparing=preparing,
        launched=None if ready is None else ready - 0.01,
        ready=ready,
        requested=requested,
        run_claimed=None,
        finished=None if requested is None else requested + 0.5,
    )


@pytest.mark.parametrize(
    ("preparing", "ready", "expected"),
    [
        (1.0, 2.0, PREPARED),  # ready, then Ghost asked
        (1.0, 10.0, PREPARED),  # ready in the same instant as the request
        (1.0, 10.5, LATE),  # preparing when Ghost asked: the preparation ended after the request
        (1.0, None, LATE),  # preparing when Ghost asked, and never ready (the request was found instead)
        (10.5, 11.0, NOT_PREPARED),  # Ghost asked before the launch began
        (None, None, NOT_PREPARED),  # never prepared: the run launched the container
    ],
)
def test_each_step_is_prepared_late_or_not_prepared_by_its_stamps(
    preparing: float | None, ready: float | None, expected: str
) -> None:
    assert classify(stamps(preparing, ready)) == expected


def test_a_step_ghost_never_requested_is_an_error_naming_its_module() -> None:
    with pytest.raises(ValueError, match="module worker: the step was never requested"):
        classify(stamps(1.0, 2.0, requested=None, module="worker"))


def test_shares_are_percent_of_the_steps_in_each_class() -> None:
    found = shares([stamps(1.0, 2.0), stamps(1.0, 2.0), stamps(1.0, 11.0), stamps(None, None)])
    assert found == {PREPARED: 50.0, LATE: 25.0, NOT_PREPARED: 25.0}


def test_spans_measure_from_ghosts_start_and_leave_out_moves_that_never_happened() -> None:
    measured = spans(stamps(None, None))
    assert measured["started_to_created"] == pytest.approx(0.1)
    assert measured["started_to_requested"] == pytest.approx(10.0)
    assert measured["request_to_outcome"] == pytest.approx(0.5)
    assert measured["launch"] is None and measured["ready_ahead_of_request"] is None


def test_the_daemons_log_gives_the_first_time_of_each_event_and_when_the_request_was_claimed() -> None:
    lines = [
        {"event": "step_claimed", "step": "s1", "state": "pending", "timestamp": "2026-12-05T03:00:00.100000Z"},
        {"event": "step_prepared", "step": "s1", "timestamp": "2026-12-05T03:00:01.000000Z"},
        {"event": "step_claimed", "step": "s1", "state": "requested", "timestamp": "2026-12-05T03:00:02.000000Z"},
        {"event": "step_claimed", "step": "s1", "state": "running", "timestamp": "2026-12-05T03:00:03.000000Z"},
        {"event": "step_created", "step": "s1", "timestamp": "2026-12-05T03:00:00.000000Z"},  # not a stamp kept
    ]
    found = first_times(lines)
    claimed, prepared, run = found["step_claimed"]["s1"], found["step_prepared"]["s1"], found[RUN_CLAIMED]["s1"]
    assert (prepared - claimed, run - claimed) == (pytest.approx(0.9), pytest.approx(1.9))
    assert "step_created" not in found


def test_two_log_objects_glued_on_one_line_are_both_read() -> None:
    glued_line = '{"event": "container_creating", "step": "s1"}{"event": "Connection pool is full"}'
    text = f'{glued_line}\n\n{{"event": "x"}}\nnot json\n'
    found, glued = log_objects(text)
    assert [item["event"] for item in found] == ["container_creating", "Connection pool is full", "x"]
    assert glued == 1


def test_a_container_taken_from_the_warm_pool_starts_the_preparation() -> None:
    """No `container_creating` then: the take is when the step was preparing from (late here: ready after)."""
    at = "2026-12-05T03:00:0{}.000000Z".format
    lines = [
        {"event": "step_claimed", "step": "s1", "state": "pending", "timestamp": at(1)},
        {"event": "warm_container_taken", "step": "s1", "timestamp": at(2)},
        {"event": "step_prepared", "step": "s1", "timestamp": at(4)},
    ]
    requested = datetime(2026, 12, 5, 3, 0, 3, tzinfo=UTC)
    record = {"_id": "s1", "module": "api", "created_at": requested, "times": {"requested": requested}}
    step = stamps_of(record, 1, requested.timestamp() - 3, first_times(lines), [], None)
    assert step.warm and step.preparing == pytest.approx(requested.timestamp() - 1)
    assert classify(step) == LATE
