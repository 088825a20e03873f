"""What an operator watches on the pool, read from the job store at one moment.

The store is the source of truth (DESIGN, Jobs), so the operator metrics are read from it when
they are asked for rather than counted in some API process's memory: any API process answers
the same, and nothing is lost when one restarts.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from store.models import ApiKey, Job
from store.states import JobStatus
from store.workers import WorkerState, list_workers


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
    # From the pool registry: every state, 0 where none (offline: stopped or silent too long).
    workers_by_state: dict[str, int]
    workers_up: int  # reporting within the stale threshold
    workers_busy: int  # up and running a job


def pool_stats(session: Session, *, stale_after_seconds: float) -> PoolStats:
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

    running = []
    rows = session.execute(
        sa.select(
            Job.id, Job.owner, Job.lease_owner, Job.progress_step, Job.started_at, Job.heartbeat_at
        ).where(Job.status == JobStatus.RUNNING.value)
    )
    for job_id, owner, worker, step, start, heartbeat in rows:
        if heartbeat is None or start is None or worker is None:
            continue
        # Over the job's whole run so far (a resumed attempt's steps count from its first start).
        seconds = (heartbeat - start).total_seconds()
        running.append(RunningJob(job_id, owner, worker, step / seconds if seconds > 0 else 0.0))

    members = list_workers(session, stale_after_seconds=stale_after_seconds)
    workers_by_state = {state.value: 0 for state in WorkerState}
    for member in members:
        workers_by_state[member.state.value] += 1
    up = [member for member in members if member.state != WorkerState.OFFLINE]
    busy = sum(member.worker.current_job_id is not None for member in up)
    return PoolStats(
        jobs_by_state, queued_by_owner, waits, running, workers_by_state, len(up), busy
    )
