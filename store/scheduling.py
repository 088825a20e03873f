"""Which queued job a free worker runs next: the pool's turn order, the claim that follows it,
and the bookkeeping of the wake-up messages.

The order lives in `queue_order`, read both by the claim and by the queue positions
the API shows, so a position is the order in which the claim will take the jobs:

- Each owner (API key) has slots: its running jobs fill the first ones, then its waiting jobs,
  ordered by priority (higher first), then by submission. Slot k (from 0) falls in turn
  k // share, where `share` is the key's weight (default 1). An owner who already holds
  workers therefore waits behind one who holds none, and a queue of twenty jobs gets one turn
  at a time, not twenty.
- Within a turn the owners keep one cycle, the same in every turn: first those with a job
  running, by when their oldest running job started; then the others, the one whose latest job
  started longest ago first (one who never ran, first of all), then the one waiting longest.
  So owners take turns in the order they were served: a round robin that a position shown
  now still describes after the next jobs start.
- Priority orders one owner's jobs only: it can never move a job past another owner's turn.
- A key at its `max_running` limit keeps its place, but the claim passes over its jobs until one
  of its running jobs ends.

A broker message only wakes a worker: it names the job whose submission sent it, but the claim
takes whichever job comes first. The reaper's "one outstanding message per queued job" rule
still holds, because a message is counted against one waiting job and is used up in only two
ways: the job it counts against starts (it leaves the queue), or it is used up without that, and
then the job it counts against is marked (`received_at`) so the reaper may send it a new one.
When a worker takes job X's message and claims Y, and Y had a message of its own waiting, that
message now stands for X: X keeps its outstanding message and nothing is marked. Had Y none,
X's message is used up. Which job a message counts against is only a tally: messages are
interchangeable, so the tally stays right whichever job is marked.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from store.jobs import claim_job, has_outstanding_message, waiting_to_start
from store.models import ApiKey, Job, utcnow
from store.states import JobStatus

# Postgres serialises claims on this advisory lock (an arbitrary constant: "amid" in ASCII), so
# each claim reads the running counts and turns as the previous claim committed them.
CLAIM_LOCK_KEY = 0x616D6964


@dataclass(frozen=True)
class QueuePlace:
    position: int  # 1: the next job to start
    claimable: bool  # False: its key is at its running limit


@dataclass(frozen=True)
class _Owner:
    """What the turn order needs of a key with waiting jobs."""

    running: int
    oldest_running_start: datetime | None
    last_start: datetime | None
    share: int
    max_running: int | None

    @property
    def below_limit(self) -> bool:
        """Its waiting jobs may start now (it runs fewer jobs than its limit, or has none)."""
        return self.max_running is None or self.running < self.max_running


def queue_order(session: Session) -> list[tuple[str, bool]]:
    """Every waiting job in the pool's turn order: (job id, claimable), the next to start first.

    Read with four plain queries (the waiting jobs, the running ones, each waiting key's latest
    start and its settings) and ordered here. As one SQL statement with window functions the
    order was at the planner's mercy: with the statistics of a queue that had just grown (as any
    queue does, faster than autovacuum re-analyses it) Postgres re-aggregated every key's jobs
    for each waiting job, 0.9 s at 3,000 jobs queued where the same statement with fresh
    statistics took 13 ms. Plain reads cost the same whatever the statistics say.
    """
    waiting = session.execute(
        sa.select(Job.id, Job.owner, Job.priority, Job.created_at).where(waiting_to_start())
    ).all()
    if not waiting:
        return []
    owners = _owners(session, {row.owner for row in waiting})
    by_owner: dict[str, list[Any]] = {}
    for row in waiting:
        by_owner.setdefault(row.owner, []).append(row)
    never = datetime.min.replace(tzinfo=UTC)
    slots = []
    for owner, rows in by_owner.items():
        rows.sort(key=lambda row: (-row.priority, row.created_at, row.id))
        stats = owners[owner]
        first_waiting = min(row.created_at for row in rows)
        for rank, row in enumerate(rows, start=1):
            turn = (stats.running + rank - 1) // stats.share
            key = (
                turn,
                # Keys with a job running first, by when their oldest running job started...
                stats.oldest_running_start is None,
                stats.oldest_running_start or never,
                # ...then the key whose latest job started longest ago (one never run first)...
                stats.last_start is not None,
                stats.last_start or never,
                # ...then the one waiting longest.
                first_waiting,
                owner,
                rank,
            )
            slots.append((key, row.id, stats.below_limit))
    slots.sort(key=lambda slot: slot[0])
    return [(job_id, claimable) for _, job_id, claimable in slots]


def _owners(session: Session, keys: set[str]) -> dict[str, _Owner]:
    running = {
        owner: (int(count), oldest)
        for owner, count, oldest in session.execute(
            sa.select(Job.owner, sa.func.count(), sa.func.min(Job.started_at))
            .where(Job.status == JobStatus.RUNNING.value, Job.owner.in_(keys))
            .group_by(Job.owner)
        )
    }
    last_start = {
        owner: started
        for owner, started in session.execute(
            sa.select(Job.owner, sa.func.max(Job.started_at))
            .where(Job.owner.in_(keys))
            .group_by(Job.owner)
        )
    }
    settings = {
        key_id: (share, max_running)
        for key_id, share, max_running in session.execute(
            sa.select(ApiKey.id, ApiKey.share, ApiKey.max_running).where(ApiKey.id.in_(keys))
        )
    }
    owners = {}
    for key in keys:
        count, oldest = running.get(key, (0, None))
        share, max_running = settings.get(key, (1, None))
        owners[key] = _Owner(count, oldest, last_start.get(key), share or 1, max_running)
    return owners


def queue_places(session: Session, job_ids: list[str] | None = None) -> dict[str, QueuePlace]:
    """The place of each waiting job (of `job_ids` only, if given) in the turn order."""
    wanted = None if job_ids is None else set(job_ids)
    return {
        job_id: QueuePlace(position, claimable)
        for position, (job_id, claimable) in enumerate(queue_order(session), start=1)
        if wanted is None or job_id in wanted
    }


def _serialise_claims(session: Session) -> None:
    # SQLite needs nothing: its transactions take the write lock up front (store.db).
    if session.get_bind().dialect.name == "postgresql":
        session.execute(sa.select(sa.func.pg_advisory_xact_lock(CLAIM_LOCK_KEY)))


def claim_next(session: Session, worker_id: str, message_job_id: str) -> Job | None:
    """Claim the first claimable job in the turn order for `worker_id`, woken by the message
    sent for `message_job_id`; None if no job can start now (the message is then used up).

    The pick locks its row (`FOR UPDATE SKIP LOCKED`: a job a cancel is holding is passed over)
    and the claim is the conditional UPDATE of `claim_job`, so two workers never take one job;
    claims queue on an advisory lock so running limits and turns see every earlier claim.
    """
    _serialise_claims(session)
    picked = None
    for job_id, claimable in queue_order(session):
        if not claimable:
            continue
        picked = session.execute(
            sa.select(Job.id, has_outstanding_message().label("outstanding"))
            .where(Job.id == job_id, waiting_to_start())
            .with_for_update(skip_locked=True)
        ).one_or_none()
        if picked is not None:
            break
    if picked is None:
        use_up_message(session, message_job_id)
        return None
    claimed = claim_job(session, picked.id, worker_id)
    if claimed is None or not picked.outstanding:
        use_up_message(session, message_job_id)
    return claimed


def take_message(session: Session, job_id: str) -> bool:
    """A worker took the message sent for `job_id` off the queue: whether some job can start
    now. If none can, the message is stale: it is used up here, and dropped by the caller
    without a job process.

    Checked in the worker's main process for every message, so it reads only the waiting keys,
    not the whole order."""
    waiting_keys = set(
        session.execute(sa.select(Job.owner).where(waiting_to_start()).distinct()).scalars()
    )
    if waiting_keys and any(owner.below_limit for owner in _owners(session, waiting_keys).values()):
        return True
    use_up_message(session, job_id)
    return False


def use_up_message(session: Session, job_id: str) -> None:
    """A message was used up without starting the job it counts against: mark that job (the
    one it was sent for if that one still counts a message, else another waiting job that
    does), so the reaper may send it a new one."""
    target = (
        sa.select(Job.id)
        .where(Job.status == JobStatus.QUEUED.value, has_outstanding_message())
        .order_by(sa.case((Job.id == job_id, 0), else_=1), Job.enqueued_at)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    session.execute(
        sa.update(Job).where(Job.id == target).values(received_at=utcnow()),
        execution_options={"synchronize_session": False},
    )
