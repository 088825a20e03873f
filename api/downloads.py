"""Directory artifacts (a student, a checkpoint) served as tar.gz downloads."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import Caller, Reader
from store.artifacts import ArtifactNotFound, get_artifact_store


async def download(
    reader: Reader, locate: Callable[[Session, Caller], str], name: str
) -> StreamingResponse:
    """The artifact that `locate` finds for the caller, as a tar.gz whose entries sit under
    `name/`. The read that locates it ends before the first byte is sent: a stream may last
    minutes, and no transaction (on SQLite, no lock) is held through it."""
    uri = await reader.read(locate)
    return await run_in_threadpool(_stream, uri, name)


def _stream(uri: str, name: str) -> StreamingResponse:
    store = get_artifact_store()
    # Checked before streaming: once bytes are on the wire, an error can no longer be a 4xx.
    if not store.exists(uri):
        raise ArtifactNotFound(f"{name} is missing from artifact storage")
    return StreamingResponse(
        store.iter_archive(uri, prefix=name),
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{name}.tar.gz"'},
    )
