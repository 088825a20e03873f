"""Listing cursors and the JSON sanitising of what workers report."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from store.jobs import InvalidCursor, decode_cursor, encode_cursor, json_safe
from store.models import Job


@given(
    created_at=st.datetimes(timezones=st.just(UTC)),
    job_id=st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
)
def test_cursor_round_trips(created_at: datetime, job_id: str) -> None:
    job = Job(id=job_id, created_at=created_at)
    assert decode_cursor(encode_cursor(job)) == (created_at, job_id)


@pytest.mark.parametrize("cursor", ["", "not base64 !", "bm90aGluZw", "MjAyNi0wMS0wMXxhYmM"])
def test_foreign_cursors_are_refused_naming_after(cursor: str) -> None:
    # The last two decode fine but hold no "|" separator / no timezone.
    with pytest.raises(InvalidCursor) as info:
        decode_cursor(cursor)
    assert info.value.field == "after"


def test_json_safe_replaces_non_finite_floats_at_any_depth() -> None:
    value = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": "text", "e": 2}
    assert json_safe(value) == {"a": None, "b": [1.0, None, {"c": None}], "d": "text", "e": 2}
