"""The fault-record contract that the fault tests write and the reliability script reads."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.faults.records import record_problem

GOOD: dict[str, Any] = {
    "fault": "f",
    "action": "a",
    "held": "h",
    "jobs_submitted": 1,
    "jobs_lost": 0,
    "measured": {"seconds": 0.5},
}


def test_a_record_that_keeps_the_contract() -> None:
    assert record_problem(GOOD) is None


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"extra": 1}, "keys"),
        ({"jobs_lost": True}, "jobs_lost is bool"),
        ({"jobs_submitted": "1"}, "jobs_submitted is str"),
        ({"measured": {"seconds": "fast"}}, "not numbers"),
    ],
)
def test_records_that_break_it_say_why(change: dict[str, Any], words: str) -> None:
    problem = record_problem({**GOOD, **change})
    assert problem is not None and words in problem
