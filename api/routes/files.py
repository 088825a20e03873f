"""/v1/files: upload a dataset or a model, list, read and delete uploads; jobs name them
`file:<id>`."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response, status
from starlette.concurrency import run_in_threadpool

from api import files
from api.deps import CallerDep, ReaderDep, SessionDep
from api.schemas import ErrorOut
from store import files as file_store
from store.artifacts import get_artifact_store
from store.config import get_config

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "No API key, or an unknown or revoked one."},
    404: {"model": ErrorOut, "description": "No such file visible to this key."},
    422: {"model": ErrorOut, "description": "A field is invalid; `field` names it."},
    503: {"model": ErrorOut, "description": "The job database is unavailable."},
}

router = APIRouter(prefix="/v1/files", tags=["files"], responses=ERRORS)

FileId = Annotated[str, "a file id (32 hex characters)"]
Purpose = Literal["dataset", "model"]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=files.FileOut,
    responses={413: {"model": ErrorOut, "description": "Larger than AMID_MAX_UPLOAD_BYTES."}},
    summary="Upload a dataset (.jsonl, .json, .parquet) or a model (tar of save_pretrained)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "The file's bytes, as they are (streamed; not multipart).",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def upload_file(
    request: Request,
    session: SessionDep,
    caller: CallerDep,
    purpose: Annotated[Purpose, Query(description="dataset or model.")],
    filename: Annotated[
        str, Query(max_length=255, description="The file's name; its suffix says its type.")
    ],
) -> files.FileOut:
    files.check_name(purpose, filename)
    config = get_config()
    spool_root = config.home / "uploads"
    spool_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="upload-", dir=spool_root) as scratch:
        spooled = Path(scratch) / filename
        size, sha256 = await files.spool(request.stream(), spooled, config.max_upload_bytes)
        # Checking, unpacking and storing are blocking work: off the event loop.
        return await run_in_threadpool(
            files.store_upload,
            session,
            caller,
            get_artifact_store(),
            purpose=purpose,
            filename=filename,
            spooled=spooled,
            size=size,
            sha256=sha256,
        )


@router.get("", response_model=files.FileList, summary="Your uploads, newest first")
async def list_files(
    reader: ReaderDep,
    purpose: Annotated[Purpose | None, Query(description="Only datasets or only models.")] = None,
) -> files.FileList:
    return await reader.read(lambda session, caller: files.list_files(session, caller, purpose))


@router.get("/{file_id}", response_model=files.FileOut, summary="One upload")
async def get_file(reader: ReaderDep, file_id: FileId) -> files.FileOut:
    return await reader.read(
        lambda session, caller: files.file_out(file_store.get_file(session, file_id, caller.scope))
    )


@router.delete("/{file_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete an upload")
def delete_file(session: SessionDep, caller: CallerDep, file_id: FileId) -> Response:
    files.delete_file(session, caller, file_id, get_artifact_store())
    return Response(status_code=status.HTTP_204_NO_CONTENT)
