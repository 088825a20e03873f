"""Directory artifacts (a student, a checkpoint) served as tar.gz downloads."""

from __future__ import annotations

from fastapi.responses import StreamingResponse

from store.artifacts import ArtifactNotFound, get_artifact_store


def stream_artifact(uri: str, name: str) -> StreamingResponse:
    """The artifact at `uri` as a tar.gz whose entries sit under `name/`."""
    store = get_artifact_store()
    # Checked before streaming: once bytes are on the wire, an error can no longer be a 4xx.
    if not store.exists(uri):
        raise ArtifactNotFound(f"{name} is missing from artifact storage")
    return StreamingResponse(
        store.iter_archive(uri, prefix=name),
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{name}.tar.gz"'},
    )
