"""The pool's turn order on SQLite (the embedded default): the same query picks the same jobs,
and a key's running limit holds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from store import jobs
from store.db import make_engine, upgrade
from store.keys import create_api_key
from store.scheduling import claim_next, queue_places

SETTINGS = {"teacher": "t", "student": "s", "dataset": {"source": "d.jsonl"}}


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    url = f"sqlite:///{tmp_path / 'amid.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def _claim(engine: sa.Engine, worker: str) -> str | None:
    with Session(engine) as session:
        claimed = claim_next(session, worker, "0" * 32)
        session.commit()
        return claimed.id if claimed else None


def test_turns_priority_and_limits_on_sqlite(engine: sa.Engine) -> None:
    with Session(engine) as session:
        limited, _ = create_api_key(session, "limited", max_running=1)
        a = [jobs.create_job(session, SETTINGS, limited.id, None, 3)[0].id for _ in range(3)]
        b_low = jobs.create_job(session, SETTINGS, "owner-b", None, 3)[0].id
        b_high = jobs.create_job(session, SETTINGS, "owner-b", None, 3, priority=3)[0].id
        session.commit()
        places = queue_places(session)
    assert sorted(places, key=lambda job_id: places[job_id].position) == [
        a[0],
        b_high,
        a[1],
        b_low,
        a[2],
    ]

    assert [_claim(engine, f"w{n}") for n in range(4)] == [a[0], b_high, b_low, None]
    with Session(engine) as session:
        assert jobs.finish_job(session, a[0], "w0", "succeeded") is not None
        session.commit()
    assert _claim(engine, "w0") == a[1]
