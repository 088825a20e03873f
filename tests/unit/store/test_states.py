"""The job lifecycle table: what is allowed moves, everything else raises a 409."""

from __future__ import annotations

import itertools

import pytest

from store.states import (
    FINISHED,
    TRANSITIONS,
    IllegalTransition,
    JobStatus,
    check_transition,
    is_finished,
)

ALLOWED = {
    ("queued", "running"),
    ("queued", "cancelled"),
    ("queued", "failed"),
    ("running", "succeeded"),
    ("running", "failed"),
    ("running", "cancelled"),
    ("running", "queued"),
}


@pytest.mark.parametrize(("old", "new"), sorted(ALLOWED))
def test_allowed_transitions_pass(old: str, new: str) -> None:
    check_transition(old, new)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pair
        for pair in itertools.product([s.value for s in JobStatus], repeat=2)
        if pair not in ALLOWED
    ],
)
def test_every_other_transition_is_refused_with_409(old: str, new: str) -> None:
    with pytest.raises(IllegalTransition) as info:
        check_transition(old, new)
    assert info.value.status_code == 409
    assert old in info.value.message and new in info.value.message


def test_unknown_status_is_an_illegal_transition_not_a_crash() -> None:
    with pytest.raises(IllegalTransition):
        check_transition("queued", "exploded")


def test_finished_states_are_exactly_those_without_exits() -> None:
    assert {s.value for s in FINISHED} == {"succeeded", "failed", "cancelled"}
    for status in JobStatus:
        assert is_finished(status) == (not TRANSITIONS[status])
