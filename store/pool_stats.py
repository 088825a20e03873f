"""What an operator watches on the pool, read from the job store at one moment.

The store is the source of truth (DESIGN, Jobs), so the operator metrics are read from it when
they are asked for rather than counted in some API process's memory: any API process answers
the same, and nothing is lost when one restarts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from store.models import ApiKey, Job, utcnow
from store.states import JobStatus


@dataclass(frozen=True)
class RunningJob:
    job_id: str
    owner: str
    worker: str
    steps_per_second: float


@dataclass(frozen=True)
class PoolStats:
    jobs_by_state: dict[str, int]  # every state, 0 where none
    queued_by_owner: dict[tuple[str, str], int]  # (key id, key name) -> queued jobs
    # Submission to first start (a retried attempt keeps its first start), every job that started.
    queue_waits_seconds: list[float]
    running: list[RunningJob]
    busy_workers: int  # workers holding a running job whose heartbeat is fresh


def pool_stats(session: Session, *, stale_after_seconds: float) -> PoolStats:
    now = utcnow()
    counts = dict(
        session.execute(sa.select(Job.status, sa.func.count()).group_by(Job.status)).all()
    )
    jobs_by_state = {state.value: int(counts.get(state.value, 0)) for state in JobStatus}

    queued = session.execute(
        sa.select(Job.owner, ApiKey.name, sa.func.count())
        .join(ApiKey, ApiKey.id == Job.owner, isouter=True)
        .where(Job.status == JobStatus.QUEUED.value)
        .group_by(Job.owner, ApiKey.name)
    )
    queued_by_owner = {(owner, name or owner): int(n) for owner, name, n in queued}

    started = session.execute(
        sa.select(Job.created_at, Job.started_at).where(Job.started_at.is_not(None))
    )
    waits = [
        max(0.0, (start - created).total_seconds())
        for created, start in started
        if start is not None
    ]

    fresh_since = now - timedelta(seconds=stale_after_seconds)
    running = []
    busy = set()
    rows = session.execute(
        sa.select(
            Job.id, Job.owner, Job.lease_owner, Job.progress_step, Job.started_at, Job.heartbeat_at
        ).where(Job.status == JobStatus.RUNNING.value)
    )
    for job_id, owner, worker, step, start, heartbeat in rows:
        if heartbeat is None or start is None or worker is None:
            continue
        if heartbeat >= fresh_since:
            busy.add(worker)
        # Over the job's whole run so far (a resumed attempt's steps count from its first start).
        seconds = (heartbeat - start).total_seconds()
        running.append(RunningJob(job_id, owner, worker, step / seconds if seconds > 0 else 0.0))
    return PoolStats(jobs_by_state, queued_by_owner, waits, running, len(busy))
