"""The pool's turn order on the real Postgres: who starts next, the positions the API shows,
priorities, running limits and shares, and the tally of wake-up messages."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from store import jobs
from store.keys import create_api_key
from store.models import Job
from store.scheduling import claim_next, queue_places, take_message

pytestmark = pytest.mark.integration

SETTINGS = {"teacher": "t", "student": "s", "dataset": {"source": "d.jsonl"}}


@pytest.fixture
def pool(session: Session) -> Iterator[Session]:
    """The store session with an empty queue: jobs other tests committed are failed here, inside
    this test's rolled-back transaction."""
    session.execute(
        sa.update(Job)
        .where(Job.status.in_(["queued", "running"]))
        .values(status="failed", finished_at=sa.func.now())
    )
    yield session


def _submit(session: Session, owner: str, count: int = 1, priority: int = 0) -> list[str]:
    return [
        jobs.create_job(session, SETTINGS, owner, None, 3, priority=priority)[0].id
        for _ in range(count)
    ]


def _claim(session: Session, worker: str = "w") -> str | None:
    claimed = claim_next(session, worker, "0" * 32)
    return claimed.id if claimed is not None else None


def _finish(session: Session, job_id: str, worker: str = "w") -> None:
    assert jobs.finish_job(session, job_id, worker, "succeeded") is not None


def _by_position(session: Session) -> list[str]:
    places = queue_places(session)
    return sorted(places, key=lambda job_id: places[job_id].position)


def test_a_second_owner_starts_before_the_first_owners_backlog(pool: Session) -> None:
    backlog = _submit(pool, "owner-a", 10)
    assert _claim(pool) == backlog[0]  # A holds the only worker
    (late,) = _submit(pool, "owner-b")
    assert queue_places(pool, [late])[late].position == 1
    _finish(pool, backlog[0])
    assert _claim(pool) == late
    # Then A again, one job at a time, in the order it submitted them.
    _finish(pool, late)
    assert _claim(pool) == backlog[1]


@pytest.mark.parametrize("workers", [1, 3])
def test_positions_are_the_order_in_which_jobs_start(pool: Session, workers: int) -> None:
    a = _submit(pool, "owner-a", 4)
    assert _claim(pool, "w0") == a[0]
    b = _submit(pool, "owner-b", 3)
    c = _submit(pool, "owner-c", 2) + _submit(pool, "owner-c", 1, priority=5)
    predicted = _by_position(pool)
    assert set(predicted) == {*a[1:], *b, *c}

    # `workers` workers: each takes the next job, and the oldest running job ends first.
    running = [a[0]]
    started: list[str] = []
    while len(started) < len(predicted):
        while len(running) < workers:
            job_id = _claim(pool, "w0")
            assert job_id is not None
            running.append(job_id)
            started.append(job_id)
        _finish(pool, running.pop(0), "w0")
    assert started == predicted


def test_priority_orders_an_owners_own_jobs_only(pool: Session) -> None:
    low, middle = _submit(pool, "owner-a", 1, priority=-3) + _submit(pool, "owner-a", 1)
    (high,) = _submit(pool, "owner-a", 1, priority=10)
    (other,) = _submit(pool, "owner-b")
    order = _by_position(pool)
    assert [job for job in order if job != other] == [high, middle, low]
    # B's one job takes B's turn: second, ahead of A's lower-priority jobs, whatever A asks.
    assert order.index(other) == 1


def test_a_key_at_its_running_limit_is_passed_over(pool: Session) -> None:
    key, _ = create_api_key(pool, "limited", max_running=1)
    first, second = _submit(pool, key.id, 2)
    assert _claim(pool, "w1") == first
    assert queue_places(pool, [second])[second].claimable is False
    assert _claim(pool, "w2") is None  # a free worker, but nothing it may take
    assert take_message(pool, second) is False
    (other,) = _submit(pool, "owner-b")
    assert take_message(pool, other) is True
    assert _claim(pool, "w2") == other
    _finish(pool, first, "w1")
    assert _claim(pool, "w1") == second


def test_a_larger_share_starts_more_jobs_per_turn(pool: Session) -> None:
    heavy, _ = create_api_key(pool, "heavy", share=2)
    light = _submit(pool, "owner-light", 3)
    weighted = _submit(pool, heavy.id, 4)
    order = _by_position(pool)
    turns = [order[:3], order[3:6]]
    assert all(
        sorted(turn) == sorted([light[i], weighted[2 * i], weighted[2 * i + 1]])
        for i, turn in enumerate(turns)
    )


def test_a_message_claiming_another_job_stays_counted(pool: Session) -> None:
    """X's message starts Y. If Y had its own message waiting, that one now stands for X, and
    the reaper sends X nothing; if Y had none, X's message is used up and X is sent a new one."""
    y, x = _submit(pool, "owner-y") + _submit(pool, "owner-x")
    jobs.mark_enqueued(pool, x)
    jobs.mark_enqueued(pool, y)
    claimed = claim_next(pool, "w", x)
    assert claimed is not None and claimed.id == y
    assert x not in jobs.jobs_to_redispatch(pool, older_than_seconds=0)

    (z,) = _submit(pool, "owner-z")  # never sent a message
    (w,) = _submit(pool, "owner-w")
    jobs.mark_enqueued(pool, w)
    claimed = claim_next(pool, "w2", w)
    assert claimed is not None and claimed.id == x  # X's turn: it waited longest
    # X's own message is still in the broker, standing for W: nothing to send.
    assert jobs.jobs_to_redispatch(pool, older_than_seconds=0) == [z]
    claimed = claim_next(pool, "w3", w)
    assert claimed is not None and claimed.id == z
    # Z had no message: W's message was used up by Z, so W needs a new one.
    assert jobs.jobs_to_redispatch(pool, older_than_seconds=0) == [w]


def test_a_message_that_finds_no_job_is_used_up(pool: Session) -> None:
    (job,) = _submit(pool, "owner-a")
    jobs.mark_enqueued(pool, job)
    assert take_message(pool, job) is True
    assert jobs.request_cancel(pool, job, None).status == "cancelled"
    assert take_message(pool, job) is False
    assert claim_next(pool, "w", job) is None
