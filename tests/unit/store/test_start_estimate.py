"""The start estimate of a queued job, from the pool's pace (a pure function of it)."""

from __future__ import annotations

import pytest

from store.start_estimate import PoolPace, start_eta


def test_each_job_ahead_takes_the_mean_on_the_first_worker_to_free_up() -> None:
    pace = PoolPace(mean_run_seconds=100.0, busy_for=[30.0, 80.0])
    # Workers free at 30 and 80; then the job at 1 runs 30-130, the job at 2 runs 80-180, ...
    assert [start_eta(pace, position) for position in (1, 2, 3, 4)] == [30.0, 80.0, 130.0, 180.0]


@pytest.mark.parametrize(
    ("pace", "position"),
    [
        (PoolPace(mean_run_seconds=100.0, busy_for=[]), 1),  # no live worker
        (PoolPace(mean_run_seconds=None, busy_for=[None]), 1),  # an end nobody can tell
        (PoolPace(mean_run_seconds=None, busy_for=[20.0]), 2),  # no mean for the job ahead
    ],
)
def test_nothing_to_estimate_from_is_none(pace: PoolPace, position: int) -> None:
    assert start_eta(pace, position) is None


def test_the_next_job_needs_no_mean_when_the_running_job_reports_its_end() -> None:
    assert start_eta(PoolPace(mean_run_seconds=None, busy_for=[20.0]), 1) == 20.0
