"""Response bodies of the API and how store rows map onto them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field, StringConstraints

from core.settings import DistillSettings
from store.models import Checkpoint, Job, JobEvent, JobMetric

MIN_PRIORITY, MAX_PRIORITY = -10, 10

# A tag is a label for filtering, not prose: short, no spaces or quotes.
Tag = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:/-]+$")]


class JobSubmission(DistillSettings):
    """A job's body: the run settings of `amid distill`, plus what people call the job."""

    name: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        pattern=r"^[^\x00-\x1f\x7f]*$",
        description="A name for people; the jobs list filters on it.",
    )
    tags: list[Tag] = Field(
        default_factory=list, max_length=20, description="Labels; the jobs list filters on one."
    )
    priority: int = Field(
        0,
        ge=MIN_PRIORITY,
        le=MAX_PRIORITY,
        description=(
            "Orders this key's own queued jobs (higher first); it never moves a job ahead of "
            "another key's turn."
        ),
    )

    def run_settings(self) -> DistillSettings:
        """The run settings alone: what is stored, validated and run."""
        return DistillSettings.model_validate(
            self.model_dump(by_alias=True, exclude={"name", "tags", "priority"})
        )


class Progress(BaseModel):
    step: int = Field(description="Optimizer steps done.")
    total_steps: int | None = Field(description="Steps the run will take, once known.")
    fraction: float | None = Field(description="step / total_steps, in [0, 1].")
    eta_seconds: float | None = Field(description="Estimated seconds until the run ends.")


class JobError(BaseModel):
    code: str = Field(description="The error's class name, e.g. TokenizerMismatch, WorkerLost.")
    message: str


class JobOut(BaseModel):
    id: str = Field(examples=["4f1c2e9a0b7d4c3e8f6a5b4c3d2e1f00"])
    name: str | None
    tags: list[str]
    owner: str = Field(description="The id of the API key that submitted the job.")
    status: str = Field(description="queued, running, succeeded, failed or cancelled.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempt: int = Field(description="Runs started so far (a lost worker's run counts).")
    max_attempts: int
    progress: Progress
    error: JobError | None
    settings: dict[str, Any] = Field(description="The run settings, every default filled in.")
    latest_metrics: dict[str, Any]
    student_uri: str | None = Field(description="Where the final student is, once succeeded.")
    cancel_requested: bool
    priority: int = Field(description="Orders this key's own queued jobs, higher first.")
    queue_position: int | None = Field(
        description="While queued: the job's place in the pool's turn order (1: next to start)."
    )
    start_eta_seconds: float | None = Field(
        description=(
            "While queued: estimated seconds until it starts, from the pool's recent pace; "
            "null when that cannot be estimated."
        )
    )


@dataclass(frozen=True)
class QueueView:
    """Where a queued job stands: its place in the turn order and when it may start."""

    position: int
    start_eta_seconds: float | None


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(
        description="Pass as `after` for the next page; null on the last page."
    )


class EventOut(BaseModel):
    id: int = Field(description="Increasing; pass the last one seen as `after`.")
    created_at: datetime
    level: str = Field(description="info, warning or error.")
    type: str
    message: str
    data: dict[str, Any]


class EventPage(BaseModel):
    items: list[EventOut]
    next_after: int | None = Field(description="The `after` that continues from here.")


class MetricPoint(BaseModel):
    step: int
    name: str
    value: float | None = Field(description="Null where the value was not finite.")
    created_at: datetime


class MetricSeries(BaseModel):
    items: list[MetricPoint]


class CheckpointOut(BaseModel):
    step: int
    uri: str
    download_url: str = Field(description="Where this API serves the checkpoint as a tar.gz.")
    sha256: str
    metrics: dict[str, Any]
    best: bool
    created_at: datetime


class CheckpointList(BaseModel):
    items: list[CheckpointOut]


class ErrorOut(BaseModel):
    error: str = Field(description="The error's class name.", examples=["SettingRefused"])
    detail: str = Field(examples=["path is outside the directories this server allows"])
    field: str | None = Field(description="The request field at fault.", examples=["teacher"])


def job_out(job: Job, queue: QueueView | None = None) -> JobOut:
    fraction = None
    if job.total_steps:
        fraction = min(1.0, job.progress_step / job.total_steps)
    error = None
    if job.error_code is not None:
        error = JobError(code=job.error_code, message=job.error_message or "")
    return JobOut(
        id=job.id,
        name=job.name,
        tags=job.tags or [],
        owner=job.owner,
        status=job.status,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        progress=Progress(
            step=job.progress_step,
            total_steps=job.total_steps,
            fraction=fraction,
            eta_seconds=job.eta_seconds,
        ),
        error=error,
        settings=job.settings,
        latest_metrics=job.latest_metrics,
        student_uri=job.final_uri,
        cancel_requested=job.cancel_requested,
        priority=job.priority,
        queue_position=queue.position if queue else None,
        start_eta_seconds=queue.start_eta_seconds if queue else None,
    )


def event_out(event: JobEvent) -> EventOut:
    return EventOut.model_validate(event, from_attributes=True)


def metric_out(point: JobMetric) -> MetricPoint:
    return MetricPoint.model_validate(point, from_attributes=True)


def checkpoint_out(checkpoint: Checkpoint) -> CheckpointOut:
    return CheckpointOut(
        step=checkpoint.step,
        uri=checkpoint.uri,
        download_url=f"/v1/jobs/{checkpoint.job_id}/checkpoints/{checkpoint.step}/archive",
        sha256=checkpoint.sha256,
        metrics=checkpoint.metrics,
        best=checkpoint.is_best,
        created_at=checkpoint.created_at,
    )
