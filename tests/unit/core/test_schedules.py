"""α/λ schedules: endpoints, monotone paths, and refused arguments."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.schedules import SCHEDULE_KINDS, schedule_value

values = st.floats(-10.0, 10.0, allow_nan=False)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@settings(max_examples=30, deadline=None)
@given(start=values, end=values, total=st.integers(2, 500))
def test_moving_schedules_run_from_start_to_end_monotonically(
    kind: str, start: float, end: float, total: int
) -> None:
    path = [schedule_value(kind, start, end, step, total) for step in range(total)]
    assert path[0] == pytest.approx(start, abs=1e-9)
    assert path[-1] == pytest.approx(end, abs=1e-9)
    low, high = min(start, end), max(start, end)
    assert all(low - 1e-9 <= v <= high + 1e-9 for v in path)
    sign = 1.0 if end >= start else -1.0
    assert all(sign * (b - a) >= -1e-9 for a, b in itertools.pairwise(path))


@settings(max_examples=20, deadline=None)
@given(start=values, end=values, step=st.integers(-5, 600), total=st.integers(1, 500))
def test_constant_stays_at_start(start: float, end: float, step: int, total: int) -> None:
    assert schedule_value("constant", start, end, step, total) == start


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_steps_outside_the_run_are_clamped(kind: str) -> None:
    total = 10
    assert schedule_value(kind, 1.0, 3.0, -4, total) == schedule_value(kind, 1.0, 3.0, 0, total)
    assert schedule_value(kind, 1.0, 3.0, 99, total) == schedule_value(
        kind, 1.0, 3.0, total - 1, total
    )


def test_linear_midpoint_and_cosine_shape() -> None:
    # Linear is halfway at the middle step; cosine is too, by symmetry, but moves slower at the
    # ends than linear does.
    assert schedule_value("linear", 0.0, 1.0, 50, 101) == pytest.approx(0.5)
    assert schedule_value("cosine", 0.0, 1.0, 50, 101) == pytest.approx(0.5)
    assert schedule_value("cosine", 0.0, 1.0, 10, 101) < schedule_value("linear", 0.0, 1.0, 10, 101)


def test_bad_arguments_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="schedule kind"):
        schedule_value("exponential", 0.0, 1.0, 0, 10)
    with pytest.raises(ValueError, match="total_steps"):
        schedule_value("linear", 0.0, 1.0, 0, 0)
