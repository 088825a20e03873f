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
from store.scheduling import claim_next

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


def _fresh_queue(engine: sa.Engine, count: int) -> list[str]:
    """`count` committed jobs, alone in the queue (jobs other tests left queued are failed)."""
    with Session(engine) as session:
        session.execute(sa.update(Job).where(Job.status == "queued").values(status="failed"))
        key, _ = create_api_key(session, "pool")
        made = [jobs.create_job(session, SETTINGS, key.id, None, 3)[0].id for _ in range(count)]
        session.commit()
        return made


def _claim_next_and_commit(engine: sa.Engine, worker: str) -> str | None:
    with Session(engine) as session:
        claimed = claim_next(session, worker, "0" * 32)
        session.commit()
        return claimed.id if claimed else None


def test_two_workers_picking_the_next_job_take_different_ones(engine: sa.Engine) -> None:
    first_job, second_job = _fresh_queue(engine, 2)
    # A has picked and claimed the first job (not committed) when B asks for the next one.
    with Session(engine) as first:
        claimed = claim_next(first, "A", "0" * 32)
        assert claimed is not None and claimed.id == first_job
        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(_claim_next_and_commit, engine, "B")
            with pytest.raises(TimeoutError):
                second.result(timeout=0.5)  # B waits for A's claim to commit or roll back
            first.commit()
            assert second.result(timeout=10) == second_job


def test_many_workers_picking_at_once_never_share_a_job(engine: sa.Engine) -> None:
    queued = _fresh_queue(engine, RACERS // 2)
    barrier = threading.Barrier(RACERS)

    def claim(worker: int) -> str | None:
        barrier.wait()
        return _claim_next_and_commit(engine, f"worker-{worker}")

    with ThreadPoolExecutor(RACERS) as pool:
        results = list(pool.map(claim, range(RACERS)))
    taken = [job_id for job_id in results if job_id is not None]
    assert sorted(taken) == sorted(queued)  # each job once; the other workers got nothing
    with Session(engine) as session:
        assert {jobs.get_job(session, job_id).attempt for job_id in queued} == {1}


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
