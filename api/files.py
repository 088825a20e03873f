"""What the files routes do: take an upload as it streams in, check it, store it, list and delete.

An upload is spooled to a temporary file while its size and sha256 are counted, checked the way
the worker will read it (a dataset's type and first row; a model archive's `config.json`), put in
artifact storage, and only then recorded. A file is complete or absent: a rejected or cut-off
upload leaves neither a row nor stored content behind.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
import tempfile
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from api.deps import Caller
from api.errors import BodyTooLarge
from api.validation import check_dataset_upload
from core.data import FILE_SUFFIXES
from core.errors import AmidError
from store import files
from store.artifacts import ArtifactStore
from store.models import UploadedFile, new_id

# A plain file name: no directories, no leading dot, nothing a shell or a URL would mangle.
_FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
MODEL_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
MODEL_DIR = "model"


class UploadRefused(AmidError):
    status_code = 422


class FileOut(BaseModel):
    id: str = Field(examples=["0c4d9a3e5f6b4a1c9d8e7f6a5b4c3d2e"])
    ref: str = Field(description="How a job names this file: `file:<id>`.")
    purpose: str = Field(description="dataset or model.")
    filename: str
    size: int = Field(description="Bytes received.")
    sha256: str = Field(description="sha256 of the bytes received.")
    created_at: datetime


class FileList(BaseModel):
    items: list[FileOut]


def file_out(row: UploadedFile) -> FileOut:
    return FileOut(
        id=row.id,
        ref=f"{files.FILE_PREFIX}{row.id}",
        purpose=row.purpose,
        filename=row.filename,
        size=row.size,
        sha256=row.sha256,
        created_at=row.created_at,
    )


def check_name(purpose: str, filename: str) -> None:
    """Refuse a name the stored file could not keep or the worker could not read."""
    if not _FILENAME.fullmatch(filename):
        raise UploadRefused(
            "must be a plain file name (letters, digits, '.', '_', '-'; no directories)",
            field="filename",
        )
    if purpose == "dataset" and Path(filename).suffix not in FILE_SUFFIXES:
        raise UploadRefused(
            f"a dataset must be one of {', '.join(FILE_SUFFIXES)}", field="filename"
        )
    if purpose == "model" and not filename.endswith(MODEL_ARCHIVE_SUFFIXES):
        raise UploadRefused(
            "a model is uploaded as a tar archive of its save_pretrained directory "
            f"({', '.join(MODEL_ARCHIVE_SUFFIXES)})",
            field="filename",
        )


async def spool(body: AsyncIterator[bytes], target: Path, limit: int) -> tuple[int, str]:
    """Write the streamed body to `target`; returns (size, sha256). Over `limit`: a 413."""
    digest = hashlib.sha256()
    size = 0
    with target.open("wb") as handle:
        async for chunk in body:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(limit)
            digest.update(chunk)
            handle.write(chunk)
    if size == 0:
        raise UploadRefused("the upload is empty", field="body")
    return size, digest.hexdigest()


def store_upload(
    session: Session,
    caller: Caller,
    artifacts: ArtifactStore,
    *,
    purpose: str,
    filename: str,
    spooled: Path,
    size: int,
    sha256: str,
) -> FileOut:
    """Check the spooled upload, put it in artifact storage, then record it."""
    file_id = new_id()
    if purpose == "dataset":
        check_dataset_upload(spooled, filename)
        uri = artifacts.upload_file(spooled, files.file_key(file_id, filename)).uri
    else:
        with tempfile.TemporaryDirectory(dir=spooled.parent) as scratch:
            model_dir = _unpack_model(spooled, Path(scratch))
            uri = artifacts.upload_dir(model_dir, files.file_key(file_id, MODEL_DIR)).uri
    row = files.add_file(
        session,
        file_id=file_id,
        owner=caller.key_id,
        purpose=purpose,
        filename=filename,
        size=size,
        sha256=sha256,
        uri=uri,
    )
    session.commit()
    return file_out(row)


def _unpack_model(archive: Path, scratch: Path) -> Path:
    """The save_pretrained directory inside the archive (at its top or one folder down)."""
    try:
        with tarfile.open(archive) as tar:
            # filter="data": no absolute paths, no `..`, no links out, no device files.
            tar.extractall(scratch, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise UploadRefused(f"not a readable tar archive: {exc}", field="body") from exc
    candidates = [scratch, *sorted(p for p in scratch.iterdir() if p.is_dir())]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise UploadRefused(
        "the archive holds no config.json (at its top or in one folder): not a "
        "save_pretrained directory",
        field="body",
    )


def list_files(session: Session, caller: Caller, purpose: str | None) -> FileList:
    rows = files.list_files(session, caller.scope, purpose=purpose)
    return FileList(items=[file_out(row) for row in rows])


def delete_file(session: Session, caller: Caller, file_id: str, artifacts: ArtifactStore) -> None:
    # The row goes first (a job can no longer name the file), then the content.
    row = files.delete_file(session, file_id, caller.scope)
    session.commit()
    artifacts.delete(row.uri)
