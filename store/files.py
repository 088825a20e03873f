"""Uploaded files: datasets and models a key sent to the service, named in jobs as `file:<id>`.

Store functions take a session and never commit, like the job store. A file row is written only
after its content is complete in artifact storage, so a row always points at a whole upload.
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from sqlalchemy.orm import Session

from core.errors import AmidError
from store.models import UploadedFile, utcnow

FILE_PREFIX = "file:"
FILE_REF = re.compile(r"file:([0-9a-f]{32})")
PURPOSES = ("dataset", "model")
_FILE_ID = re.compile(r"[0-9a-f]{32}")


class FileNotFound(AmidError):
    """No such file, or one the caller may not see (the two are not told apart)."""

    status_code = 404

    def __init__(self, file_id: str, field: str = "id"):
        super().__init__(f"file {file_id} not found", field=field)


def file_key(file_id: str, filename: str) -> str:
    """Where an upload's content lives in artifact storage."""
    return f"files/{file_id}/{filename}"


def add_file(
    session: Session,
    *,
    file_id: str,
    owner: str,
    purpose: str,
    filename: str,
    size: int,
    sha256: str,
    uri: str,
) -> UploadedFile:
    row = UploadedFile(
        id=file_id,
        owner=owner,
        purpose=purpose,
        filename=filename,
        size=size,
        sha256=sha256,
        uri=uri,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row


def get_file(session: Session, file_id: str, owner: str | None = None) -> UploadedFile:
    """The file; `owner=None` is an admin; another owner's file is not found."""
    # A malformed id cannot exist: not found without asking the database.
    row = session.get(UploadedFile, file_id) if _FILE_ID.fullmatch(file_id) else None
    if row is None or (owner is not None and row.owner != owner):
        raise FileNotFound(file_id[:64])
    return row


def list_files(
    session: Session, owner: str | None, *, purpose: str | None = None, limit: int = 100
) -> list[UploadedFile]:
    """Files newest first."""
    query = sa.select(UploadedFile)
    if owner is not None:
        query = query.where(UploadedFile.owner == owner)
    if purpose is not None:
        query = query.where(UploadedFile.purpose == purpose)
    query = query.order_by(UploadedFile.created_at.desc(), UploadedFile.id.desc()).limit(limit)
    return list(session.execute(query).scalars())


def delete_file(session: Session, file_id: str, owner: str | None) -> UploadedFile:
    row = get_file(session, file_id, owner)
    session.delete(row)
    session.flush()
    return row
