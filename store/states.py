"""Job states and the transitions between them, held as data.

Every status change in the store goes through `check_transition`, so an illegal move (say, a
finished job back to running) is refused in one place with a 409 rather than written silently.
"""

from __future__ import annotations

from enum import StrEnum

from core.errors import AmidError


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# old status -> the statuses it may move to. running -> queued is the requeue after a lost worker.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}

FINISHED: frozenset[JobStatus] = frozenset(
    status for status, targets in TRANSITIONS.items() if not targets
)


class IllegalTransition(AmidError):
    """A status change the job lifecycle does not allow."""

    status_code = 409

    def __init__(self, old: str, new: str):
        super().__init__(f"a job cannot go from {old} to {new}", field="status")
        self.old = old
        self.new = new


def check_transition(old: str | JobStatus, new: str | JobStatus) -> None:
    """Raise `IllegalTransition` unless `old -> new` is an allowed move."""
    try:
        old_status, new_status = JobStatus(old), JobStatus(new)
    except ValueError as exc:
        raise IllegalTransition(str(old), str(new)) from exc
    if new_status not in TRANSITIONS[old_status]:
        raise IllegalTransition(old_status.value, new_status.value)


def is_finished(status: str | JobStatus) -> bool:
    return JobStatus(status) in FINISHED
