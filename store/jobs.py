"""Job store operations: everything the API and the workers do to a job.

Every function takes the caller's `Session` first and never commits: the edges (a request, a
task body) own the transaction. Status changes the workers race on (claim, heartbeat, finish,
requeue) are single conditional UPDATEs or row-locked reads, so two processes can never both
win the same job.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.errors import AmidError
from store import webhooks
from store.models import Checkpoint, Job, JobEvent, JobMetric, new_id, utcnow
from store.states import FINISHED, IllegalTransition, JobStatus, check_transition

EventLevel = Literal["info", "warning", "error"]
EVENT_LEVELS: frozenset[str] = frozenset({"info", "warning", "error"})


class JobNotFound(AmidError):
    """No such job, or one the caller may not see (the two are not told apart)."""

    status_code = 404

    def __init__(self, job_id: str):
        super().__init__(f"job {job_id} not found", field="id")
        self.job_id = job_id


class JobNotCancellable(AmidError):
    """Cancel asked of a job that has already finished."""

    status_code = 409

    def __init__(self, job: Job):
        super().__init__(f"job {job.id} is already {job.status}; it cannot be cancelled")
        self.job_id = job.id


class IdempotencyKeyReused(AmidError):
    """The same Idempotency-Key was sent earlier with different settings."""

    status_code = 409

    def __init__(self, job_id: str):
        super().__init__(
            f"this Idempotency-Key already created job {job_id} with different settings",
            field="Idempotency-Key",
        )


class InvalidCursor(AmidError):
    status_code = 422

    def __init__(self) -> None:
        super().__init__("not a cursor this service returned", field="after")


class InvalidEvent(AmidError):
    status_code = 422


@dataclass(frozen=True)
class EventIn:
    """One event to record: level is info, warning or error; type a short machine name."""

    level: EventLevel
    type: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LeaseState:
    still_owned: bool  # False: the job was requeued or finished; the worker must stop
    cancel_requested: bool


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats replaced by None (JSON and Postgres JSONB have no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def _event(job_id: str, level: EventLevel, type_: str, message: str, **data: Any) -> JobEvent:
    return JobEvent(
        job_id=job_id,
        created_at=utcnow(),
        level=level,
        type=type_,
        message=message,
        data=json_safe(data),
    )


def _locked(session: Session, job_id: str) -> Job | None:
    # FOR UPDATE serialises this read-decide-write with the workers' conditional UPDATEs on
    # Postgres; SQLite needs nothing more, since its transactions take the write lock up front.
    return session.execute(
        sa.select(Job).where(Job.id == job_id).with_for_update(),
        execution_options={"populate_existing": True},
    ).scalar_one_or_none()


# -- creating and reading ------------------------------------------------------------------------


def create_job(
    session: Session,
    settings: dict[str, Any],
    owner: str,
    idempotency_key: str | None,
    max_attempts: int,
    *,
    name: str | None = None,
    tags: Sequence[str] = (),
    webhook_url: str | None = None,
    priority: int = 0,
) -> tuple[Job, bool]:
    """A new queued job, or the existing one for the same owner and idempotency key.

    Returns (job, created). Two requests racing with the same key both end with the same job:
    the loser's insert hits the (owner, idempotency_key) unique constraint inside a savepoint,
    which is rolled back, and it reads the winner's row instead.
    """
    if idempotency_key is not None:
        existing = find_by_idempotency_key(session, owner, idempotency_key)
        if existing is not None:
            return _replayed(existing, settings), False
    now = utcnow()
    job = Job(
        id=new_id(),
        owner=owner,
        status=JobStatus.QUEUED.value,
        settings=json_safe(settings),
        attempt=0,
        max_attempts=max_attempts,
        cancel_requested=False,
        progress_step=0,
        latest_metrics={},
        idempotency_key=idempotency_key,
        name=name,
        tags=list(tags),
        webhook_url=webhook_url,
        priority=priority,
        created_at=now,
        updated_at=now,
    )
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()
    except IntegrityError:
        if idempotency_key is None:
            raise
        existing = find_by_idempotency_key(session, owner, idempotency_key)
        if existing is None:
            raise
        return _replayed(existing, settings), False
    session.add(_event(job.id, "info", "queued", "job created and queued"))
    return job, True


def find_by_idempotency_key(session: Session, owner: str, key: str) -> Job | None:
    return session.execute(
        sa.select(Job).where(Job.owner == owner, Job.idempotency_key == key)
    ).scalar_one_or_none()


def _replayed(job: Job, settings: dict[str, Any]) -> Job:
    if job.settings != json_safe(settings):
        raise IdempotencyKeyReused(job.id)
    return job


def get_job(session: Session, job_id: str, owner: str | None = None) -> Job:
    """The job; `owner=None` is an admin who sees every job, another owner's job is not found."""
    job = session.get(Job, job_id)
    if job is None or (owner is not None and job.owner != owner):
        raise JobNotFound(job_id)
    return job


def encode_cursor(job: Job) -> str:
    """An opaque cursor pointing just after `job` in the newest-first listing."""
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, job_id = raw.split("|", 1)
        created_at = datetime.fromisoformat(stamp)
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidCursor() from exc
    if created_at.tzinfo is None or not job_id:
        raise InvalidCursor()
    return created_at, job_id


def list_jobs(
    session: Session,
    *,
    owner: str | None = None,
    status: str | None = None,
    limit: int = 50,
    after: str | None = None,
    filters: JobFilters | None = None,
) -> list[Job]:
    """Jobs newest first; `after` is a cursor from `encode_cursor` of the previous page's last job."""
    query = list_jobs_query(owner=owner, status=status, limit=limit, after=after)
    if filters is not None:
        query = filters.apply(query)
    return list(session.execute(query).scalars())


@dataclass(frozen=True)
class JobFilters:
    """What people filter the listing by: part of the name, one tag, the submitting key."""

    name: str | None = None
    tag: str | None = None
    owner: str | None = None

    def apply(self, query: sa.Select[Job]) -> sa.Select[Job]:
        if self.name:
            query = query.where(Job.name.ilike(f"%{_like_escaped(self.name)}%", escape="\\"))
        if self.tag:
            # The tags column is a JSON list of strings: `"tag"` appears in its text exactly when
            # the tag is in the list (tags cannot hold quotes). One form for JSONB and SQLite.
            pattern = f'%"{_like_escaped(self.tag)}"%'
            query = query.where(sa.cast(Job.tags, sa.Text).like(pattern, escape="\\"))
        if self.owner:
            query = query.where(Job.owner == self.owner)
        return query


def _like_escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def list_jobs_query(
    *, owner: str | None, status: str | None, limit: int, after: str | None
) -> sa.Select[Job]:
    """The listing's SQL: keyset pagination on (created_at, id).

    Every page is one range scan of an index ((owner|status), created_at, id), as cheap at job
    10,000 as at job 1, where an OFFSET would read and discard every earlier row.
    """
    query = sa.select(Job)
    if owner is not None:
        query = query.where(Job.owner == owner)
    if status is not None:
        query = query.where(Job.status == status)
    if after is not None:
        created_at, job_id = decode_cursor(after)
        query = query.where(sa.tuple_(Job.created_at, Job.id) < sa.tuple_(created_at, job_id))
    return query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)


def count_queued(session: Session, owner: str) -> int:
    """Jobs of `owner` waiting in the queue (the per-key limit counts these)."""
    return session.execute(
        sa.select(sa.func.count())
        .select_from(Job)
        .where(Job.owner == owner, Job.status == JobStatus.QUEUED.value)
    ).scalar_one()


# -- cancelling ----------------------------------------------------------------------------------


def request_cancel(session: Session, job_id: str, owner: str | None) -> Job:
    """Cancel: a queued job is cancelled at once; a running one is asked to stop at its next step.

    Cancelling a job that is already being cancelled is a no-op; a finished job is refused.
    """
    job = _locked(session, job_id)
    if job is None or (owner is not None and job.owner != owner):
        raise JobNotFound(job_id)
    if job.status in FINISHED:
        raise JobNotCancellable(job)
    if job.cancel_requested:
        return job
    now = utcnow()
    job.cancel_requested = True
    if job.status == JobStatus.QUEUED:
        check_transition(job.status, JobStatus.CANCELLED)
        job.status = JobStatus.CANCELLED.value
        job.finished_at = now
        _ended(
            session, job, _event(job.id, "warning", "cancelled", "job cancelled before it started")
        )
    else:
        session.add(
            _event(
                job.id, "info", "cancel_requested", "cancel requested; stopping at the next step"
            )
        )
    session.flush()
    return job


# -- the worker's side ---------------------------------------------------------------------------


def waiting_to_start() -> sa.ColumnElement[bool]:
    """A job that waits in the queue to be claimed: queued, and not being cancelled."""
    return sa.and_(Job.status == JobStatus.QUEUED.value, Job.cancel_requested.is_(False))


def claim_job(session: Session, job_id: str, worker_id: str) -> Job | None:
    """Take this queued job for `worker_id`; None if it is not claimable (cancelled, already
    running or finished). One conditional UPDATE, so exactly one claimant wins. Workers call it
    through `store.scheduling.claim_next`, which picks the job."""
    now = utcnow()
    claimed = session.execute(
        sa.update(Job)
        .where(
            Job.id == job_id,
            waiting_to_start(),
        )
        .values(
            status=JobStatus.RUNNING.value,
            attempt=Job.attempt + 1,
            lease_owner=worker_id,
            heartbeat_at=now,
            started_at=sa.func.coalesce(Job.started_at, now),
            updated_at=now,
        )
        .returning(Job),
        execution_options={"synchronize_session": False, "populate_existing": True},
    ).scalar_one_or_none()
    if claimed is None:
        return None
    session.add(
        _event(
            claimed.id,
            "info",
            "started",
            f"attempt {claimed.attempt} of {claimed.max_attempts} started on {worker_id}",
            attempt=claimed.attempt,
            worker=worker_id,
        )
    )
    return claimed


def _lease(job_id: str, worker_id: str) -> sa.ColumnElement[bool]:
    return sa.and_(
        Job.id == job_id, Job.lease_owner == worker_id, Job.status == JobStatus.RUNNING.value
    )


def heartbeat(session: Session, job_id: str, worker_id: str) -> LeaseState:
    """Refresh the lease; tells the worker whether it still owns the job and whether to stop."""
    now = utcnow()
    cancel = session.execute(
        sa.update(Job)
        .where(_lease(job_id, worker_id))
        .values(heartbeat_at=now, updated_at=now)
        .returning(Job.cancel_requested),
        execution_options={"synchronize_session": False},
    ).scalar_one_or_none()
    if cancel is not None:
        return LeaseState(still_owned=True, cancel_requested=bool(cancel))
    current = session.execute(
        sa.select(Job.cancel_requested).where(Job.id == job_id)
    ).scalar_one_or_none()
    return LeaseState(still_owned=False, cancel_requested=bool(current))


def update_progress(
    session: Session,
    job_id: str,
    worker_id: str,
    *,
    step: int,
    total_steps: int | None,
    eta_seconds: float | None,
    latest_metrics: dict[str, Any] | None = None,
) -> bool:
    """Record the step reached (and refresh the lease); False if the worker lost the lease.

    `latest_metrics` is merged into the stored dict, so train and eval metrics both stay
    visible. Only the lease holder writes these fields, so the read-merge-write cannot race.
    """
    values: dict[str, Any] = {
        "progress_step": step,
        "total_steps": total_steps,
        "eta_seconds": json_safe(eta_seconds),
        "heartbeat_at": utcnow(),
        "updated_at": utcnow(),
    }
    if latest_metrics:
        current = session.execute(
            sa.select(Job.latest_metrics).where(_lease(job_id, worker_id))
        ).scalar_one_or_none()
        if current is None:
            return False
        values["latest_metrics"] = {**current, **json_safe(latest_metrics)}
    updated = session.execute(
        sa.update(Job).where(_lease(job_id, worker_id)).values(**values).returning(Job.id),
        execution_options={"synchronize_session": False},
    ).scalar_one_or_none()
    return updated is not None


def add_events(session: Session, job_id: str, events: Sequence[EventIn]) -> None:
    for item in events:
        if item.level not in EVENT_LEVELS:
            raise InvalidEvent(
                f"event level must be one of {sorted(EVENT_LEVELS)}, not {item.level!r}",
                field="level",
            )
    session.add_all(
        _event(job_id, item.level, item.type, item.message, **item.data) for item in events
    )
    session.flush()


def add_metrics(session: Session, job_id: str, points: Sequence[tuple[int, str, float]]) -> None:
    """Append (step, name, value) points; a non-finite value is stored as null."""
    if not points:
        return
    now = utcnow()
    session.execute(
        sa.insert(JobMetric),
        [
            {
                "job_id": job_id,
                "step": step,
                "name": name,
                "value": json_safe(float(value)),
                "created_at": now,
            }
            for step, name, value in points
        ],
    )


def add_checkpoint(
    session: Session,
    job_id: str,
    *,
    step: int,
    uri: str,
    sha256: str,
    metrics: dict[str, Any],
    is_best: bool,
) -> Checkpoint:
    """Record a complete checkpoint (written again at the same step after a resume: replaced)."""
    checkpoint = session.execute(
        sa.select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step)
    ).scalar_one_or_none()
    if checkpoint is None:
        checkpoint = Checkpoint(job_id=job_id, step=step, created_at=utcnow())
        session.add(checkpoint)
    checkpoint.uri = uri
    checkpoint.sha256 = sha256
    checkpoint.metrics = json_safe(metrics)
    checkpoint.is_best = is_best
    session.flush()
    if is_best:
        session.execute(
            sa.update(Checkpoint)
            .where(Checkpoint.job_id == job_id, Checkpoint.id != checkpoint.id)
            .values(is_best=False),
            execution_options={"synchronize_session": "fetch"},
        )
    return checkpoint


def forget_checkpoint(session: Session, job_id: str, step: int) -> None:
    """Drop the row of a checkpoint whose artifact is gone: the list shows only what exists."""
    session.execute(
        sa.delete(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step),
        execution_options={"synchronize_session": False},
    )


def latest_checkpoint(session: Session, job_id: str) -> Checkpoint | None:
    return session.execute(
        sa.select(Checkpoint)
        .where(Checkpoint.job_id == job_id)
        .order_by(Checkpoint.step.desc())
        .limit(1)
    ).scalar_one_or_none()


def finish_job(
    session: Session,
    job_id: str,
    worker_id: str,
    status: str | JobStatus,
    *,
    error_code: str | None = None,
    error_message: str | None = None,
    final_uri: str | None = None,
    sweep_summary: list[dict[str, Any]] | None = None,
) -> Job | None:
    """End a running job as succeeded, failed or cancelled; None if the worker lost the lease."""
    target = JobStatus(status)
    if target not in FINISHED:
        # running -> queued is a legal move, but only the reaper makes it; a worker finishes.
        raise IllegalTransition(JobStatus.RUNNING.value, target.value)
    now = utcnow()
    job = session.execute(
        sa.update(Job)
        .where(_lease(job_id, worker_id))
        .values(
            status=target.value,
            error_code=error_code,
            error_message=error_message,
            final_uri=final_uri,
            sweep_summary=json_safe(sweep_summary),
            finished_at=now,
            updated_at=now,
        )
        .returning(Job),
        execution_options={"synchronize_session": False, "populate_existing": True},
    ).scalar_one_or_none()
    if job is None:
        return None
    _ended(session, job, _finish_event(job))
    return job


def _ended(session: Session, job: Job, event: JobEvent) -> None:
    """Record that `job` has just finished: its event, and the webhook delivery it owes (in the
    same transaction, so a process that dies after the commit cannot lose the delivery)."""
    session.add(event)
    webhooks.schedule_delivery(session, job)


def _finish_event(job: Job) -> JobEvent:
    if job.status == JobStatus.SUCCEEDED:
        return _event(job.id, "info", "succeeded", "job succeeded", final_uri=job.final_uri)
    if job.status == JobStatus.CANCELLED:
        return _event(job.id, "warning", "cancelled", "job cancelled", step=job.progress_step)
    return _event(
        job.id,
        "error",
        "failed",
        f"job failed: {job.error_code}: {job.error_message}",
        error_code=job.error_code,
    )


def fail_job(session: Session, job_id: str, error_code: str, error_message: str) -> Job | None:
    """Fail a queued or running job regardless of who holds it (a failure found before or
    without a lease). Returns None, changing nothing, if the job had already finished."""
    job = _locked(session, job_id)
    if job is None:
        raise JobNotFound(job_id)
    if job.status in FINISHED:
        return None
    check_transition(job.status, JobStatus.FAILED)
    now = utcnow()
    job.status = JobStatus.FAILED.value
    job.error_code = error_code
    job.error_message = error_message
    job.finished_at = now
    session.flush()
    _ended(session, job, _finish_event(job))
    return job


# -- the reaper and the dispatcher ---------------------------------------------------------------


def requeue_stale(
    session: Session, *, stale_after_seconds: float, max_attempts_default: int
) -> list[tuple[str, str]]:
    """Running jobs whose worker stopped heartbeating: back to the queue while attempts remain,
    else failed with `WorkerLost`. A lost job that had been asked to cancel is cancelled.

    Returns (job_id, new status) for each job changed.
    """
    threshold = utcnow() - timedelta(seconds=stale_after_seconds)
    stale = (
        session.execute(
            sa.select(Job)
            .where(
                Job.status == JobStatus.RUNNING.value,
                sa.or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < threshold),
            )
            .order_by(Job.heartbeat_at)
            # Two reapers never handle the same job; a worker's heartbeat in flight wins.
            .with_for_update(skip_locked=True),
            execution_options={"populate_existing": True},
        )
        .scalars()
        .all()
    )
    changed: list[tuple[str, str]] = []
    now = utcnow()
    for job in stale:
        limit = job.max_attempts or max_attempts_default
        lost_worker = job.lease_owner
        if job.cancel_requested:
            job.status = JobStatus.CANCELLED.value
            job.finished_at = now
            _ended(
                session, job, _event(job.id, "warning", "cancelled", "worker lost while cancelling")
            )
        elif job.attempt < limit:
            job.status = JobStatus.QUEUED.value
            job.lease_owner = None
            job.heartbeat_at = None
            # Null enqueued_at: the dispatcher sends it to the broker again on its next pass.
            job.enqueued_at = None
            session.add(
                _event(
                    job.id,
                    "warning",
                    "requeued",
                    f"worker {lost_worker} stopped heartbeating; requeued after attempt "
                    f"{job.attempt} of {limit}",
                    attempt=job.attempt,
                    worker=lost_worker,
                )
            )
        else:
            job.status = JobStatus.FAILED.value
            job.finished_at = now
            job.error_code = "WorkerLost"
            job.error_message = (
                f"the worker running this job was lost on each of its {job.attempt} attempts "
                f"(max_attempts={limit})"
            )
            _ended(session, job, _finish_event(job))
        changed.append((job.id, job.status))
    session.flush()
    return changed


def has_outstanding_message() -> sa.ColumnElement[bool]:
    """A message counted against the job is still waiting in the broker (or in a worker's
    hands): sent, and not used up since (see `store.scheduling`)."""
    return sa.and_(
        Job.enqueued_at.is_not(None),
        sa.or_(Job.received_at.is_(None), Job.received_at < Job.enqueued_at),
    )


def jobs_to_redispatch(
    session: Session, *, older_than_seconds: float, broker_empty: bool = False
) -> list[str]:
    """Queued jobs that need a message: never sent, or sent long ago and not waiting any more.

    One message per job at a time: a message counted against a job and not used up since is
    outstanding, and waits in the broker behind the others however long the queue is; it is
    sent again only when the broker's queue is empty (`broker_empty`), so the message must have
    been lost (a broker restarted without its data). A message used up without starting its
    job (`store.scheduling.use_up_message`) is sent again.
    """
    threshold = utcnow() - timedelta(seconds=older_than_seconds)
    due = sa.or_(
        Job.enqueued_at.is_(None),
        sa.and_(
            Job.enqueued_at < threshold,
            sa.true() if broker_empty else ~has_outstanding_message(),
        ),
    )
    return list(
        session.execute(
            sa.select(Job.id).where(waiting_to_start(), due).order_by(Job.created_at)
        ).scalars()
    )


def mark_enqueued(session: Session, job_id: str) -> None:
    """Count a message against the job: called before the message is sent, so a worker that
    takes it at once already finds it counted."""
    session.execute(
        sa.update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()),
        execution_options={"synchronize_session": False},
    )


def unmark_enqueued(session: Session, job_id: str) -> None:
    """The send failed (the broker is down): the job has no message, and the reaper's next
    pass sends one."""
    session.execute(
        sa.update(Job).where(Job.id == job_id).values(enqueued_at=None),
        execution_options={"synchronize_session": False},
    )


# -- reading a job's history ---------------------------------------------------------------------


def list_events(
    session: Session, job_id: str, after: int | None = None, limit: int = 100
) -> list[JobEvent]:
    """Events in the order they happened; `after` is the last event id already seen."""
    query = sa.select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(JobEvent.id > after)
    return list(session.execute(query.order_by(JobEvent.id).limit(limit)).scalars())


def list_metrics(
    session: Session,
    job_id: str,
    name: str | None = None,
    *,
    after_step: int | None = None,
    limit: int = 10_000,
) -> list[JobMetric]:
    """Metric points by step (then by name); `name` picks one series."""
    query = sa.select(JobMetric).where(JobMetric.job_id == job_id)
    if name is not None:
        query = query.where(JobMetric.name == name)
    if after_step is not None:
        query = query.where(JobMetric.step > after_step)
    query = query.order_by(JobMetric.step, JobMetric.name, JobMetric.id).limit(limit)
    return list(session.execute(query).scalars())


def list_checkpoints(session: Session, job_id: str) -> list[Checkpoint]:
    return list(
        session.execute(
            sa.select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)
        ).scalars()
    )
