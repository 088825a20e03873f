"""Response bodies of the API and how store rows map onto them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field, StringConstraints, field_validator

from core.settings import DistillSettings
from store.models import WEBHOOK_URL_MAX_LENGTH, Checkpoint, Job, JobEvent, JobMetric, utcnow
from store.webhooks import check_webhook_url
from store.workers import PoolMember

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
    webhook_url: str | None = Field(
        None,
        max_length=WEBHOOK_URL_MAX_LENGTH,
        description=(
            "An http(s) URL the job's end (succeeded, failed, cancelled) is POSTed to, signed "
            "with the key's webhook secret; unset: the key's default, if any."
        ),
        examples=["https://example.com/hooks/amid"],
    )

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        return None if value is None else check_webhook_url(value)

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
            self.model_dump(by_alias=True, exclude={"name", "tags", "webhook_url", "priority"})
        )


class Progress(BaseModel):
    step: int = Field(description="Optimizer steps done.")
    total_steps: int | None = Field(description="Steps the run will take, once known.")
    fraction: float | None = Field(description="step / total_steps, in [0, 1].")
    eta_seconds: float | None = Field(description="Estimated seconds until the run ends.")


class JobError(BaseModel):
    code: str = Field(description="The error's class name, e.g. TokenizerMismatch, WorkerLost.")
    message: str


class SweepStudentOut(BaseModel):
    student: int = Field(description="Its place in the job's `sweep` list, from 0.")
    knobs: dict[str, Any] = Field(description="Its sweep entry, as submitted.")
    rank: int | None = Field(description="1 is the best; null until the sweep has succeeded.")
    metric: str | None = Field(description="The metric the students are ranked by.")
    score: float | None = Field(description="Its value of that metric (null: never measured).")
    download_url: str | None = Field(
        description="Where this API serves its final student as a tar.gz, once succeeded."
    )


class StudentList(BaseModel):
    items: list[SweepStudentOut] = Field(description="Best first once ranked, else in order.")


def sweep_students(job: Job) -> list[SweepStudentOut]:
    """A sweep job's students: ranked, best first, once it succeeded; in sweep order before."""
    if job.sweep_summary:
        return [
            SweepStudentOut(
                student=entry["student"],
                knobs=entry["knobs"],
                rank=entry["rank"],
                metric=entry["metric"],
                score=entry["score"],
                download_url=f"/v1/jobs/{job.id}/students/{entry['student']}",
            )
            for entry in job.sweep_summary
        ]
    return [
        SweepStudentOut(
            student=index, knobs=knobs, rank=None, metric=None, score=None, download_url=None
        )
        for index, knobs in enumerate(_sweep_entries(job))
    ]


def _sweep_entries(job: Job) -> list[dict[str, Any]]:
    # Stored settings have every default filled in: an entry's unset knobs are nulls.
    entries = job.settings.get("sweep") or []
    return [{key: value for key, value in entry.items() if value is not None} for entry in entries]


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
    webhook_url: str | None = Field(
        description="Where this job's end is POSTed (null: the key's default, if any)."
    )
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
    sweep_summary: list[SweepStudentOut] | None = Field(
        description=(
            "A sweep: its students, best first once it has succeeded (the final student is the "
            "first one's); null for a job of one student."
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


class WebhookSecretOut(BaseModel):
    secret: str = Field(description="Signs this key's webhook deliveries (HMAC-SHA256).")
    signature_header: str = Field(
        description="The header holding `t=<unix time>,v1=<hex HMAC of '<t>.<body>'>`.",
        examples=["amid-signature"],
    )
    default_webhook_url: str | None = Field(
        description="Where this key's jobs report their end unless a job names its own URL."
    )


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
        webhook_url=job.webhook_url,
        priority=job.priority,
        queue_position=queue.position if queue else None,
        start_eta_seconds=queue.start_eta_seconds if queue else None,
        sweep_summary=sweep_students(job) if job.settings.get("sweep") else None,
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


class WorkerOut(BaseModel):
    id: str = Field(
        description="`host:pid:gpuN` of the worker's main process.",
        examples=["gpu-box-1:7:gpu0"],
    )
    host: str
    gpu: str = Field(description="The GPU's name as torch reports it, or `cpu`.")
    gpu_memory_bytes: int | None = Field(description="The GPU's memory; null for `cpu`.")
    state: str = Field(description="idle, busy, draining, drained or offline.")
    job: str | None = Field(description="The id of the job it runs (every key sees it).")
    job_owner: str | None = Field(
        description="The API key id that submitted that job: admin keys only, null for others."
    )
    job_owner_name: str | None = Field(description="That key's name: admin keys only.")
    version: str = Field(description="The amid version the worker runs.")
    started_at: datetime
    last_seen_at: datetime
    last_seen_seconds: float = Field(description="Seconds since it last reported (server clock).")


class WorkerList(BaseModel):
    items: list[WorkerOut]


def worker_out(member: PoolMember, *, show_owner: bool) -> WorkerOut:
    worker = member.worker
    return WorkerOut(
        id=worker.id,
        host=worker.host,
        gpu=worker.gpu_name,
        gpu_memory_bytes=worker.gpu_memory_bytes,
        state=member.state.value,
        job=worker.current_job_id,
        job_owner=member.job_owner if show_owner else None,
        job_owner_name=member.job_owner_name if show_owner else None,
        version=worker.version,
        started_at=worker.started_at,
        last_seen_at=worker.last_seen_at,
        last_seen_seconds=max(0.0, (utcnow() - worker.last_seen_at).total_seconds()),
    )
