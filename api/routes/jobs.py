"""/v1/jobs: submit, list, read, cancel, and a job's events, metrics, checkpoints and student."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Path, Query, Response, status
from fastapi.responses import StreamingResponse
from pydantic import ValidatorFunctionWrapHandler, WrapValidator

from api import service
from api.deps import CallerDep, EnqueueDep, ReaderDep, SessionDep
from api.downloads import download
from api.schemas import (
    CheckpointList,
    ErrorOut,
    EventPage,
    JobOut,
    JobPage,
    JobSubmission,
    MetricSeries,
    StudentList,
)
from store.jobs import JobFilters
from store.states import JobStatus

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "No API key, or an unknown or revoked one."},
    404: {"model": ErrorOut, "description": "No such job visible to this key."},
    422: {"model": ErrorOut, "description": "A field is invalid; `field` names it."},
    503: {"model": ErrorOut, "description": "The job database is unavailable."},
}

SUBMIT_EXAMPLES = {
    "preset": {
        "summary": "A paper preset on hub models",
        "value": {
            "teacher": "gpt2-xl",
            "student": "gpt2",
            "dataset": "databricks/databricks-dolly-15k",
            "preset": "amid",
            "max_steps": 2000,
        },
    },
    "explicit": {
        "summary": "Every loss knob explicit, local data",
        "value": {
            "teacher": "models/teacher",
            "student": "models/student",
            "dataset": {"source": "data/dolly.jsonl", "format": "dolly"},
            "alpha": -3.0,
            "lambda": 0.1,
            "divergence": "ab",
            "anchor": "teacher",
            "max_steps": 500,
            "batch_size": 8,
        },
    },
}

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERRORS)


def _exact_json_types(value: Any, _: ValidatorFunctionWrapHandler) -> JobSubmission:
    # A JSON body is typed exactly as the OpenAPI schema says: "8" is not an integer, 0 is not
    # a boolean. Pydantic's lax mode would coerce them (and silently accept what the schema
    # refuses); the model stays lax for YAML settings files, where `5e-4` parses as a string.
    if isinstance(value, JobSubmission):
        return value
    return JobSubmission.model_validate(value, strict=True)


JobRequest = Annotated[JobSubmission, WrapValidator(_exact_json_types)]

JobId = Annotated[str, "a job id (32 hex characters)"]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobOut,
    responses={
        200: {"model": JobOut, "description": "Replay: this Idempotency-Key's existing job."},
        409: {"model": ErrorOut, "description": "Idempotency-Key reused with other settings."},
        413: {"model": ErrorOut, "description": "Body larger than the server allows."},
        429: {"model": ErrorOut, "description": "This key has too many jobs queued."},
    },
    summary="Submit a distillation job",
)
def submit_job(
    *,
    session: SessionDep,
    caller: CallerDep,
    enqueue: EnqueueDep,
    response: Response,
    settings: Annotated[JobRequest, Body(openapi_examples=SUBMIT_EXAMPLES)],
    idempotency_key: Annotated[
        str | None,
        Header(
            description="Same key from the same API key returns the same job (status 200).",
            max_length=255,
        ),
    ] = None,
) -> JobOut:
    job, created = service.submit_job(session, caller, settings, idempotency_key, enqueue)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
    return job


@router.get("", response_model=JobPage, summary="List jobs, newest first")
async def list_jobs(
    *,
    reader: ReaderDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the previous page.")
    ] = None,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this state.")] = None,
    name: Annotated[
        str | None,
        Query(max_length=255, pattern=r"^[^\x00-\x1f\x7f]*$", description="Part of the name."),
    ] = None,
    tag: Annotated[str | None, Query(max_length=64, description="Jobs with this tag.")] = None,
    owner: Annotated[
        str | None, Query(max_length=64, description="Jobs of this API key id (admins).")
    ] = None,
) -> JobPage:
    filters = JobFilters(name=name, tag=tag, owner=owner)
    state = status.value if status else None
    return await reader.read(
        lambda session, caller: service.list_jobs(
            session, caller, status=state, limit=limit, after=after, filters=filters
        )
    )


@router.get("/{job_id}", response_model=JobOut, summary="One job")
async def get_job(reader: ReaderDep, job_id: JobId) -> JobOut:
    return await reader.read(lambda session, caller: service.get_job(session, caller, job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    responses={409: {"model": ErrorOut, "description": "The job has already finished."}},
    summary="Cancel a job (queued: at once; running: at the next step)",
)
def cancel_job(session: SessionDep, caller: CallerDep, job_id: JobId) -> JobOut:
    return service.cancel_job(session, caller, job_id)


@router.get("/{job_id}/events", response_model=EventPage, summary="A job's events, in order")
async def list_events(
    reader: ReaderDep,
    job_id: JobId,
    after: Annotated[
        int | None, Query(ge=0, le=2**62, description="Only events after this id.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EventPage:
    return await reader.read(
        lambda session, caller: service.list_events(
            session, caller, job_id, after=after, limit=limit
        )
    )


@router.get("/{job_id}/metrics", response_model=MetricSeries, summary="A job's metric series")
async def list_metrics(
    *,
    reader: ReaderDep,
    job_id: JobId,
    name: Annotated[
        str | None,
        # No control characters: a metric name never has one, and Postgres refuses NUL outright.
        Query(
            max_length=128,
            pattern=r"^[^\x00-\x1f\x7f]*$",
            description="One series, e.g. train/loss.",
        ),
    ] = None,
    after_step: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
) -> MetricSeries:
    return await reader.read(
        lambda session, caller: service.list_metrics(
            session, caller, job_id, name=name, after_step=after_step, limit=limit
        )
    )


@router.get("/{job_id}/checkpoints", response_model=CheckpointList, summary="A job's checkpoints")
async def list_checkpoints(reader: ReaderDep, job_id: JobId) -> CheckpointList:
    return await reader.read(
        lambda session, caller: service.list_checkpoints(session, caller, job_id)
    )


@router.get(
    "/{job_id}/student",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/gzip": {}}, "description": "tar.gz of the student."},
        409: {"model": ErrorOut, "description": "No final student yet."},
    },
    summary="Download the final student as a tar.gz",
)
async def download_student(reader: ReaderDep, job_id: JobId) -> StreamingResponse:
    return await download(
        reader,
        lambda session, caller: service.student_uri(session, caller, job_id),
        f"student-{job_id}",
    )


@router.get(
    "/{job_id}/students",
    response_model=StudentList,
    responses={404: {"model": ErrorOut, "description": "No such job, or not a sweep."}},
    summary="A sweep's students, ranked best first once it has succeeded",
)
async def list_students(reader: ReaderDep, job_id: JobId) -> StudentList:
    return await reader.read(lambda session, caller: service.list_students(session, caller, job_id))


@router.get(
    "/{job_id}/students/{student}",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/gzip": {}}, "description": "tar.gz of the student."},
        404: {"model": ErrorOut, "description": "No such job, not a sweep, or no such student."},
        409: {"model": ErrorOut, "description": "The sweep has not succeeded (yet)."},
    },
    summary="Download one student of a sweep as a tar.gz",
)
async def download_sweep_student(
    reader: ReaderDep,
    job_id: JobId,
    student: Annotated[int, Path(ge=0, le=1000, description="Its place in the sweep, from 0.")],
) -> StreamingResponse:
    return await download(
        reader,
        lambda session, caller: service.sweep_student_uri(session, caller, job_id, student),
        f"student-{job_id}-{student}",
    )
