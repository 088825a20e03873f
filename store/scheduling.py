"""Which queued job a free worker runs next: the pool's turn order, the claim that follows it,
and the bookkeeping of the wake-up messages.

The order lives in one query (`queue_order`), read both by the claim and by the queue positions
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

import sqlalchemy as sa
from sqlalchemy.orm import Session

from store.jobs import claim_job, has_outstanding_message
from store.models import ApiKey, Job, utcnow
from store.states import JobStatus

# Postgres serialises claims on this advisory lock (an arbitrary constant: "amid" in ASCII), so
# each claim reads the running counts and turns as the previous claim committed them.
CLAIM_LOCK_KEY = 0x616D6964


@dataclass(frozen=True)
class QueuePlace:
    position: int  # 1: the next job to start
    claimable: bool  # False: its key is at its running limit


def queue_order() -> sa.Subquery:
    """Every waiting job with its place in the pool's turn order.

    Columns: `id`, `owner`, `claimable` (its key is below its running limit) and `position`
    (1, 2, ...: the order in which free workers take the jobs).
    """
    waiting = (
        sa.select(
            Job.id,
            Job.owner,
            sa.func.row_number()
            .over(
                partition_by=Job.owner,
                order_by=(Job.priority.desc(), Job.created_at, Job.id),
            )
            .label("rank"),
            sa.func.min(Job.created_at).over(partition_by=Job.owner).label("first_waiting"),
        )
        .where(Job.status == JobStatus.QUEUED.value, Job.cancel_requested.is_(False))
        .subquery("waiting")
    )
    owners = (
        sa.select(
            Job.owner,
            sa.func.sum(sa.case((Job.status == JobStatus.RUNNING.value, 1), else_=0)).label(
                "running"
            ),
            sa.func.min(
                sa.case((Job.status == JobStatus.RUNNING.value, Job.started_at), else_=None)
            ).label("oldest_running_start"),
            sa.func.max(Job.started_at).label("last_start"),
        )
        .where(Job.owner.in_(sa.select(waiting.c.owner)))
        .group_by(Job.owner)
        .subquery("owners")
    )
    running = sa.func.coalesce(owners.c.running, 0)
    share = sa.func.coalesce(ApiKey.share, 1)
    turn = (running + waiting.c.rank - 1) // share
    return (
        sa.select(
            waiting.c.id,
            waiting.c.owner,
            sa.or_(ApiKey.max_running.is_(None), running < ApiKey.max_running).label("claimable"),
            sa.func.row_number()
            .over(
                order_by=(
                    turn,
                    owners.c.oldest_running_start.asc().nulls_last(),
                    owners.c.last_start.asc().nulls_first(),
                    waiting.c.first_waiting,
                    waiting.c.owner,
                    waiting.c.rank,
                )
            )
            .label("position"),
        )
        .select_from(waiting)
        .outerjoin(owners, owners.c.owner == waiting.c.owner)
        .outerjoin(ApiKey, ApiKey.id == waiting.c.owner)
        .subquery("queue_order")
    )


def queue_places(session: Session, job_ids: list[str] | None = None) -> dict[str, QueuePlace]:
    """The place of each waiting job (of `job_ids` only, if given) in the turn order."""
    order = queue_order()
    query = sa.select(order.c.id, order.c.position, order.c.claimable)
    if job_ids is not None:
        query = query.where(order.c.id.in_(job_ids))
    return {
        job_id: QueuePlace(int(position), bool(claimable))
        for job_id, position, claimable in session.execute(query)
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
    order = queue_order()
    picked = session.execute(
        sa.select(Job.id, has_outstanding_message().label("outstanding"))
        .join(order, order.c.id == Job.id)
        .where(
            order.c.claimable,
            Job.status == JobStatus.QUEUED.value,
            Job.cancel_requested.is_(False),
        )
        .order_by(order.c.position)
        .limit(1)
        .with_for_update(of=Job, skip_locked=True)
    ).one_or_none()
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
    without a job process."""
    order = queue_order()
    if session.execute(sa.select(order.c.id).where(order.c.claimable).limit(1)).first():
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
