"""When a queued job may start: an estimate from the pool's recent pace.

Each live worker (one holding a running job with a fresh heartbeat) frees up when its job ends:
after the job's own reported ETA, or, before it reports one, after the mean run time of the
recently finished jobs less the time it has run. Every job ahead in the queue then takes the
mean run time on the first worker to free up. A queued job waits only while every worker is
busy (an idle one claims at once), so the live workers are the whole pool. Running limits are
not simulated: a job of a key at its limit may start later than estimated.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from store.models import Job, utcnow
from store.states import JobStatus

# Finished runs the mean is taken over: recent enough to follow the kind of jobs queued now.
RECENT_RUNS = 20


@dataclass(frozen=True)
class PoolPace:
    mean_run_seconds: float | None  # None: no job has finished yet
    # Seconds until each live worker is free; None where that cannot be told.
    busy_for: list[float | None]


def pool_pace(session: Session, *, stale_after_seconds: float) -> PoolPace:
    now = utcnow()
    durations = [
        (finished - started).total_seconds()
        for started, finished in session.execute(
            sa.select(Job.started_at, Job.finished_at)
            .where(
                Job.status == JobStatus.SUCCEEDED.value,
                Job.started_at.is_not(None),
                Job.finished_at.is_not(None),
            )
            .order_by(Job.finished_at.desc())
            .limit(RECENT_RUNS)
        )
        if started is not None and finished is not None
    ]
    mean = sum(durations) / len(durations) if durations else None
    fresh_since = now - timedelta(seconds=stale_after_seconds)
    busy_for: list[float | None] = []
    for started, eta in session.execute(
        sa.select(Job.started_at, Job.eta_seconds).where(
            Job.status == JobStatus.RUNNING.value,
            Job.lease_owner.is_not(None),
            Job.heartbeat_at >= fresh_since,
        )
    ):
        if eta is not None:
            busy_for.append(max(0.0, eta))
        elif mean is not None and started is not None:
            busy_for.append(max(0.0, mean - (now - started).total_seconds()))
        else:
            busy_for.append(None)
    return PoolPace(mean, busy_for)


def start_eta(pace: PoolPace, position: int) -> float | None:
    """Seconds until the job at `position` (1: next) may start; None when it cannot be told
    (no live worker, a worker whose end is unknown, or no finished run to take a mean from)."""
    if not pace.busy_for or any(seconds is None for seconds in pace.busy_for):
        return None
    free_at = [seconds for seconds in pace.busy_for if seconds is not None]
    heapq.heapify(free_at)
    for _ in range(position - 1):
        if pace.mean_run_seconds is None:
            return None
        heapq.heapreplace(free_at, free_at[0] + pace.mean_run_seconds)
    return free_at[0]
