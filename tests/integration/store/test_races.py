"""Races between real connections: the claim and the idempotent create each have one winner.

These use committed rows (the racers are separate connections), each under a fresh owner, so
they do not need the rolled-back session of the other tests.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from store import jobs
from store.keys import create_api_key
from store.models import Job

pytestmark = pytest.mark.integration

SETTINGS = {"teacher": "t", "student": "s", "dataset": {"source": "d.jsonl"}}
RACERS = 6


def _committed_job(engine: sa.Engine) -> tuple[str, str]:
    with Session(engine) as session:
        key, _ = create_api_key(session, "race")
        job, _ = jobs.create_job(session, SETTINGS, key.id, None, 3)
        session.commit()
        return job.id, key.id


def test_claim_race_between_connections_has_exactly_one_winner(engine: sa.Engine) -> None:
    job_id, _ = _committed_job(engine)
    barrier = threading.Barrier(RACERS)

    def claim(worker: int) -> str | None:
        with Session(engine) as session:
            barrier.wait()
            claimed = jobs.claim_job(session, job_id, f"worker-{worker}")
            session.commit()
            return claimed.lease_owner if claimed else None

    with ThreadPoolExecutor(RACERS) as pool:
        results = list(pool.map(claim, range(RACERS)))
    winners = [owner for owner in results if owner is not None]
    assert len(winners) == 1
    with Session(engine) as session:
        job = jobs.get_job(session, job_id)
        assert (job.status, job.attempt, job.lease_owner) == ("running", 1, winners[0])


def test_claim_blocked_behind_an_uncommitted_claim_gets_nothing(engine: sa.Engine) -> None:
    # Deterministic interleaving: A has claimed (row locked, not committed) when B tries.
    job_id, _ = _committed_job(engine)
    with Session(engine) as first:
        assert jobs.claim_job(first, job_id, "A") is not None
        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(_claim_and_commit, engine, job_id, "B")
            with pytest.raises(TimeoutError):
                second.result(timeout=0.5)  # B waits on A's row lock
            first.commit()
            assert second.result(timeout=10) is None


def _claim_and_commit(engine: sa.Engine, job_id: str, worker: str) -> str | None:
    with Session(engine) as session:
        claimed = jobs.claim_job(session, job_id, worker)
        session.commit()
        return claimed.id if claimed else None


def test_idempotent_create_race_makes_one_job(engine: sa.Engine) -> None:
    with Session(engine) as session:
        key, _ = create_api_key(session, "race")
        session.commit()
        owner = key.id
    # A has inserted (uncommitted) when B arrives: B passes the pre-check, its insert waits on
    # the unique index, then fails once A commits, and B must answer with A's job.
    with Session(engine) as first:
        job_a, created_a = jobs.create_job(first, SETTINGS, owner, "same-key", 3)
        job_a_id = job_a.id
        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(_create_and_commit, engine, owner)
            with pytest.raises(TimeoutError):
                second.result(timeout=0.5)
            first.commit()
            job_b, created_b = second.result(timeout=10)
    assert created_a and not created_b
    assert job_b == job_a_id

    barrier = threading.Barrier(RACERS)

    def create(_: int) -> tuple[str, bool]:
        barrier.wait()
        return _create_and_commit(engine, owner, "free-for-all")

    with ThreadPoolExecutor(RACERS) as pool:
        results = list(pool.map(create, range(RACERS)))
    assert len({job_id for job_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    with Session(engine) as session:
        rows = session.execute(
            sa.select(sa.func.count()).select_from(Job).where(Job.owner == owner)
        ).scalar_one()
    assert rows == 2


def _create_and_commit(engine: sa.Engine, owner: str, key: str = "same-key") -> tuple[str, bool]:
    with Session(engine) as session:
        job, created = jobs.create_job(session, SETTINGS, owner, key, 3)
        session.commit()
        return job.id, created
