"""What the job routes do, kept out of the route handlers: submit, list, read, cancel."""

from __future__ import annotations

import logging
import re

from sqlalchemy.orm import Session

from api.deps import Caller, Enqueue
from api.queue_snapshot import queue_views
from api.schemas import (
    CheckpointList,
    EventPage,
    JobOut,
    JobPage,
    JobSubmission,
    MetricSeries,
    StudentList,
    checkpoint_out,
    event_out,
    job_out,
    metric_out,
    sweep_students,
)
from api.validation import validate_job_settings
from core.errors import AmidError
from store import jobs
from store.config import get_config
from store.keys import lock_key
from store.models import Job

logger = logging.getLogger(__name__)

_JOB_ID = re.compile(r"[0-9a-f]{32}")
# Printable ASCII without spaces: what clients put in headers, and safe to store and echo.
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


class QueueLimitReached(AmidError):
    status_code = 429


class StudentNotReady(AmidError):
    status_code = 409


class InvalidIdempotencyKey(AmidError):
    # Its own class, so the error reads as what it is rather than as the bare base class.
    status_code = 422


def load_job(session: Session, caller: Caller, job_id: str) -> Job:
    # A malformed id cannot exist: answer 404 without asking the database.
    if not _JOB_ID.fullmatch(job_id):
        raise jobs.JobNotFound(job_id[:64])
    return jobs.get_job(session, job_id, caller.scope)


def submit_job(
    session: Session,
    caller: Caller,
    submission: JobSubmission,
    idempotency_key: str | None,
    enqueue: Enqueue,
) -> tuple[JobOut, bool]:
    """Validate, persist, commit, then enqueue. Returns (job, created).

    The message is sent only after the commit, so a worker never looks for a row that is not
    there yet. If the broker is down the job stays queued (no error to the client) and the
    dispatcher sends it later.
    """
    config = get_config()
    if idempotency_key is not None and not _IDEMPOTENCY_KEY.fullmatch(idempotency_key):
        raise InvalidIdempotencyKey(
            "must be 1 to 255 printable ASCII characters without spaces",
            field="Idempotency-Key",
        )
    stored = validate_job_settings(session, submission.run_settings(), config, owner=caller.scope)

    def create() -> tuple[Job, bool]:
        return jobs.create_job(
            session,
            stored,
            caller.key_id,
            idempotency_key,
            config.max_attempts,
            name=submission.name,
            tags=submission.tags,
            webhook_url=submission.webhook_url,
            priority=submission.priority,
        )

    if idempotency_key is not None:
        existing = jobs.find_by_idempotency_key(session, caller.key_id, idempotency_key)
        if existing is not None:
            # A replay answers with the first job even when the queue is now full.
            job, created = create()
            return _shown(session, [job])[0], created
    lock_key(session, caller.key_id)
    queued = jobs.count_queued(session, caller.key_id)
    if queued >= config.max_queued_per_key:
        raise QueueLimitReached(
            f"{queued} jobs of this key are already queued (limit {config.max_queued_per_key}); "
            "wait for some to start or cancel them"
        )
    job, created = create()
    session.commit()
    if created:
        _dispatch(session, job.id, enqueue)
    return _shown(session, [job])[0], created


def _dispatch(session: Session, job_id: str, enqueue: Enqueue) -> None:
    # Counted before it is sent: a worker may take the message at once (store.scheduling).
    jobs.mark_enqueued(session, job_id)
    session.commit()
    try:
        enqueue(job_id)
    except Exception:  # noqa: BLE001 - any broker failure: the row is queued, the dispatcher resends
        logger.warning("enqueue of job %s failed; it stays queued for the dispatcher", job_id)
        jobs.unmark_enqueued(session, job_id)
        session.commit()


def list_jobs(
    session: Session,
    caller: Caller,
    *,
    status: str | None,
    limit: int,
    after: str | None,
    filters: jobs.JobFilters | None = None,
) -> JobPage:
    # One row more than asked tells whether another page exists, without a count.
    rows = jobs.list_jobs(
        session,
        owner=caller.scope,
        status=status,
        limit=limit + 1,
        after=after,
        filters=filters,
    )
    page = rows[:limit]
    next_cursor = jobs.encode_cursor(page[-1]) if len(rows) > limit else None
    return JobPage(items=_shown(session, page), next_cursor=next_cursor)


def get_job(session: Session, caller: Caller, job_id: str) -> JobOut:
    return _shown(session, [load_job(session, caller, job_id)])[0]


def _shown(session: Session, rows: list[Job]) -> list[JobOut]:
    """The jobs as the API shows them: a queued one with its place in the queue and its
    estimated start."""
    views = queue_views(session, rows)
    return [job_out(job, views.get(job.id)) for job in rows]


def cancel_job(session: Session, caller: Caller, job_id: str) -> JobOut:
    load_job(session, caller, job_id)
    job = jobs.request_cancel(session, job_id, caller.scope)
    session.commit()
    return job_out(job)


def list_events(
    session: Session, caller: Caller, job_id: str, *, after: int | None, limit: int
) -> EventPage:
    load_job(session, caller, job_id)
    events = jobs.list_events(session, job_id, after=after, limit=limit)
    next_after = events[-1].id if events else after
    return EventPage(items=[event_out(event) for event in events], next_after=next_after)


def list_metrics(
    session: Session,
    caller: Caller,
    job_id: str,
    *,
    name: str | None,
    after_step: int | None,
    limit: int,
) -> MetricSeries:
    load_job(session, caller, job_id)
    points = jobs.list_metrics(session, job_id, name, after_step=after_step, limit=limit)
    return MetricSeries(items=[metric_out(point) for point in points])


def list_checkpoints(session: Session, caller: Caller, job_id: str) -> CheckpointList:
    load_job(session, caller, job_id)
    return CheckpointList(
        items=[checkpoint_out(item) for item in jobs.list_checkpoints(session, job_id)]
    )


def student_uri(session: Session, caller: Caller, job_id: str) -> str:
    job = load_job(session, caller, job_id)
    if job.final_uri is None:
        raise StudentNotReady(f"job {job.id} has no final student yet (status {job.status})")
    return job.final_uri


class NotASweep(AmidError):
    status_code = 404


class StudentNotFound(AmidError):
    status_code = 404


def list_students(session: Session, caller: Caller, job_id: str) -> StudentList:
    job = load_job(session, caller, job_id)
    if not job.settings.get("sweep"):
        raise NotASweep(f"job {job.id} is not a sweep; its student is at /v1/jobs/{job.id}/student")
    return StudentList(items=sweep_students(job))


def sweep_student_uri(session: Session, caller: Caller, job_id: str, index: int) -> str:
    """Where student `index` of a sweep is, once the sweep has succeeded."""
    students = list_students(session, caller, job_id).items
    if not 0 <= index < len(students):
        raise StudentNotFound(
            f"job {job_id} has students 0 to {len(students) - 1}, not {index}", field="student"
        )
    job = load_job(session, caller, job_id)
    for entry in job.sweep_summary or []:
        if entry["student"] == index:
            return str(entry["uri"])
    raise StudentNotReady(f"job {job.id} has no final students yet (status {job.status})")


class CheckpointNotFound(AmidError):
    status_code = 404


def checkpoint_uri(session: Session, caller: Caller, job_id: str, step: int) -> str:
    load_job(session, caller, job_id)
    for checkpoint in jobs.list_checkpoints(session, job_id):
        if checkpoint.step == step:
            return checkpoint.uri
    raise CheckpointNotFound(f"job {job_id} has no checkpoint at step {step}", field="step")
