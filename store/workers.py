"""The pool registry: one row per worker, written by the worker's main process, read by the API.

A worker registers once it consumes, then heartbeats every `AMID_HEARTBEAT_SECONDS` with the job
it runs (if any). What the pool shows is read from these rows at each request: a worker silent
for longer than `AMID_STALE_AFTER_SECONDS` (the threshold after which the reaper takes its jobs
back) is offline whatever its row last said.

Draining: an admin sets `drain_requested`; the worker reads it on its next heartbeat, runs no
further job (a message it still receives goes back to the queue for another worker), and reports
`draining` until its current job is over, then `drained`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

import sqlalchemy as sa
from sqlalchemy.orm import Session

from core.errors import AmidError
from store.models import ApiKey, Job, Worker, utcnow
from store.states import JobStatus

# Rows of workers silent this long are deleted (when a worker registers) and no longer listed:
# every restart of a worker outside a container is a new process, so a new row.
FORGET_AFTER = timedelta(days=1)


class WorkerState(StrEnum):
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"  # asked to drain, its current job still running
    DRAINED = "drained"  # asked to drain, no job, and it takes no other
    OFFLINE = "offline"  # stopped, or silent past the stale threshold


class WorkerNotFound(AmidError):
    status_code = 404

    def __init__(self, worker_id: str):
        super().__init__(f"worker {worker_id} not found", field="id")


class WorkerOffline(AmidError):
    """Drain asked of a worker that is not running (there is nothing to drain)."""

    status_code = 409

    def __init__(self, worker_id: str):
        super().__init__(f"worker {worker_id} is offline; there is nothing to drain", field="id")


@dataclass(frozen=True)
class WorkerIdentity:
    """What a worker says of itself when it registers."""

    id: str
    host: str
    gpu_name: str
    gpu_memory_bytes: int | None
    version: str


@dataclass(frozen=True)
class PoolMember:
    """A worker as the pool shows it: its row, its state now, and who owns its current job."""

    worker: Worker
    state: WorkerState
    job_owner: str | None
    job_owner_name: str | None


# -- the worker's side ---------------------------------------------------------------------------


def register(session: Session, me: WorkerIdentity) -> None:
    """Join the pool as idle (a worker restarted under the same id starts afresh, undrained), and
    forget workers long gone."""
    now = utcnow()
    session.execute(
        sa.delete(Worker).where(Worker.last_seen_at < now - FORGET_AFTER),
        execution_options={"synchronize_session": False},
    )
    worker = session.get(Worker, me.id) or Worker(id=me.id)
    worker.host = me.host
    worker.gpu_name = me.gpu_name
    worker.gpu_memory_bytes = me.gpu_memory_bytes
    worker.version = me.version
    worker.state = WorkerState.IDLE.value
    worker.drain_requested = False
    worker.current_job_id = None
    worker.started_at = now
    worker.last_seen_at = now
    session.add(worker)
    session.flush()


def heartbeat(
    session: Session, worker_id: str, *, job_leases: Sequence[str], settled: bool
) -> bool | None:
    """Report in: the current job is the running job leased to one of `job_leases` (the ids its
    job processes claim under); `settled` means the worker runs nothing and accepts nothing.

    Returns whether a drain is requested, or None when the row is gone (register again). The
    state follows from the row's own `drain_requested` in the same UPDATE, so a drain asked
    between two heartbeats is never overwritten.
    """
    job_id = session.execute(
        sa.select(Job.id)
        .where(Job.status == JobStatus.RUNNING.value, Job.lease_owner.in_(job_leases))
        .limit(1)
    ).scalar_one_or_none()
    running = WorkerState.BUSY if job_id is not None else WorkerState.IDLE
    draining = WorkerState.DRAINED if settled else WorkerState.DRAINING
    drain_requested: bool | None = session.execute(
        sa.update(Worker)
        .where(Worker.id == worker_id)
        .values(
            last_seen_at=utcnow(),
            current_job_id=job_id,
            state=sa.case((Worker.drain_requested, draining.value), else_=running.value),
        )
        .returning(Worker.drain_requested),
        execution_options={"synchronize_session": False},
    ).scalar_one_or_none()
    return drain_requested


def leave(session: Session, worker_id: str) -> None:
    """A worker that stops says so, rather than fading out after the stale threshold."""
    session.execute(
        sa.update(Worker)
        .where(Worker.id == worker_id)
        .values(state=WorkerState.OFFLINE.value, current_job_id=None, last_seen_at=utcnow()),
        execution_options={"synchronize_session": False},
    )


# -- what the pool shows -------------------------------------------------------------------------


def shown_state(worker: Worker, fresh_since: datetime) -> WorkerState:
    if worker.last_seen_at < fresh_since:
        return WorkerState.OFFLINE
    return WorkerState(worker.state)


def list_workers(
    session: Session, *, stale_after_seconds: float, worker_id: str | None = None
) -> list[PoolMember]:
    """Every worker seen within `FORGET_AFTER` (or only `worker_id`), by host then id."""
    now = utcnow()
    fresh_since = now - timedelta(seconds=stale_after_seconds)
    query = (
        sa.select(Worker, Job.owner, ApiKey.name)
        .join(Job, Job.id == Worker.current_job_id, isouter=True)
        .join(ApiKey, ApiKey.id == Job.owner, isouter=True)
        .where(Worker.last_seen_at >= now - FORGET_AFTER)
        .order_by(Worker.host, Worker.id)
    )
    if worker_id is not None:
        query = query.where(Worker.id == worker_id)
    rows = session.execute(query)
    return [
        PoolMember(worker, shown_state(worker, fresh_since), owner, name)
        for worker, owner, name in rows
    ]


def request_drain(session: Session, worker_id: str, *, stale_after_seconds: float) -> None:
    """Ask a live worker to finish its current job and take no other (asking again changes
    nothing); an unknown worker is not found, an offline one refused."""
    worker = session.execute(
        sa.select(Worker).where(Worker.id == worker_id).with_for_update(),
        execution_options={"populate_existing": True},
    ).scalar_one_or_none()
    if worker is None:
        raise WorkerNotFound(worker_id)
    fresh_since = utcnow() - timedelta(seconds=stale_after_seconds)
    if shown_state(worker, fresh_since) == WorkerState.OFFLINE:
        raise WorkerOffline(worker_id)
    if not worker.drain_requested:
        worker.drain_requested = True
        worker.state = WorkerState.DRAINING.value
    session.flush()
