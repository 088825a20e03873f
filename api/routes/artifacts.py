"""Downloads of a job's artifacts beyond the final student: any listed checkpoint, as a tar.gz."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import StreamingResponse

from api import service
from api.deps import ReaderDep
from api.downloads import download
from api.routes.jobs import ERRORS, JobId
from api.schemas import ErrorOut

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERRORS)


@router.get(
    "/{job_id}/checkpoints/{step}/archive",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/gzip": {}}, "description": "tar.gz of the checkpoint."},
        404: {"model": ErrorOut, "description": "No such job, or no checkpoint at that step."},
    },
    summary="Download one checkpoint (weights, tokenizer, card, training state) as a tar.gz",
)
async def download_checkpoint(
    reader: ReaderDep,
    job_id: JobId,
    step: Annotated[int, Path(ge=0, le=2**31 - 1)],
) -> StreamingResponse:
    return await download(
        reader,
        lambda session, caller: service.checkpoint_uri(session, caller, job_id, step),
        f"checkpoint-{job_id}-step-{step}",
    )
