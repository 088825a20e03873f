"""Artifacts (checkpoints, the final student, metrics) behind one fsspec interface.

`file://` by default (under AMID_HOME), `s3://` for MinIO/S3 (the optional `s3` extra). Layout:

    jobs/<id>/checkpoints/step-<n>/   a checkpoint directory
    jobs/<id>/final/                  the final student
    jobs/<id>/students/<k>/           student k of a sweep (the job's final student: the best one)
    jobs/<id>/metrics.jsonl           every metric point of the run
    jobs/<id>/tensorboard/            the same points as TensorBoard event files

A directory artifact is complete or absent: its files are uploaded first, then a manifest with
every file's sha256 and size is written last. A directory without its manifest is not an
artifact (`exists` is false, `download_dir` refuses it), so a worker that dies mid-upload leaves
nothing that could be mistaken for a checkpoint. Downloads verify every file against the
manifest. Torch-free: the API streams downloads from here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from core.errors import AmidError
from store.config import get_config

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_VERSION = 1
CHUNK_BYTES = 1 << 20
_TAR_BLOCK = 512


class ArtifactNotFound(AmidError):
    """No complete artifact at this URI (missing, or an upload that never finished)."""

    status_code = 404


class ArtifactCorrupt(AmidError):
    """An artifact whose files do not match its manifest."""

    status_code = 500


@dataclass(frozen=True)
class UploadedArtifact:
    uri: str
    sha256: str  # of a directory: the digest of its manifest's file list; of a file: its content


def checkpoint_key(job_id: str, step: int) -> str:
    return f"jobs/{job_id}/checkpoints/step-{step}"


def final_key(job_id: str) -> str:
    return f"jobs/{job_id}/final"


def sweep_student_key(job_id: str, index: int) -> str:
    return f"jobs/{job_id}/students/{index}"


def metrics_key(job_id: str) -> str:
    return f"jobs/{job_id}/metrics.jsonl"


def tensorboard_key(job_id: str) -> str:
    return f"jobs/{job_id}/tensorboard"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _files_digest(files: dict[str, dict[str, Any]]) -> str:
    # The artifact's identity: the sorted (path, sha256, size) list, independent of upload order.
    canonical = json.dumps(files, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


class ArtifactStore:
    """Uploads, downloads and streams artifacts under one base URI."""

    def __init__(self, base_uri: str, s3_endpoint_url: str | None = None) -> None:
        self.base_uri = base_uri.rstrip("/")
        self.storage_options: dict[str, Any] = {}
        if self.base_uri.startswith("s3://") and s3_endpoint_url:
            self.storage_options["client_kwargs"] = {"endpoint_url": s3_endpoint_url}

    # -- addressing ------------------------------------------------------------------------------
    def uri_for(self, key: str) -> str:
        return f"{self.base_uri}/{key.strip('/')}"

    def _fs(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, path = url_to_fs(uri, **self.storage_options)
        return fs, path.rstrip("/")

    # -- writing ---------------------------------------------------------------------------------
    def upload_dir(self, local_dir: Path, key: str) -> UploadedArtifact:
        """Upload every file under `local_dir`, then the manifest; return its URI and digest."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise ArtifactNotFound(f"not a directory: {local_dir}")
        uri = self.uri_for(key)
        fs, root = self._fs(uri)
        # A retried upload to the same key first un-publishes whatever was there.
        if fs.exists(f"{root}/{MANIFEST_NAME}"):
            fs.rm(f"{root}/{MANIFEST_NAME}")
        files: dict[str, dict[str, Any]] = {}
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            if rel == MANIFEST_NAME:
                continue
            files[rel] = {"sha256": _sha256_file(path), "size": path.stat().st_size}
            target = f"{root}/{rel}"
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(path), target)
        # Verify what landed before publishing it: a short write must not become an artifact.
        for rel, entry in files.items():
            landed = fs.size(f"{root}/{rel}")
            if landed != entry["size"]:
                raise ArtifactCorrupt(
                    f"upload of {rel} to {uri} wrote {landed} bytes, expected {entry['size']}"
                )
        digest = _files_digest(files)
        manifest = {"version": MANIFEST_VERSION, "sha256": digest, "files": files}
        fs.makedirs(root, exist_ok=True)
        with fs.open(f"{root}/{MANIFEST_NAME}", "wb") as handle:
            handle.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
        return UploadedArtifact(uri=uri, sha256=digest)

    def upload_file(self, local_path: Path, key: str) -> UploadedArtifact:
        """Upload one file under a temporary name, then move it into place."""
        local_path = Path(local_path)
        uri = self.uri_for(key)
        fs, path = self._fs(uri)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        partial = f"{path}.partial"
        fs.put_file(str(local_path), partial)
        if fs.size(partial) != local_path.stat().st_size:
            fs.rm(partial)
            raise ArtifactCorrupt(f"upload of {local_path.name} to {uri} was cut short")
        fs.mv(partial, path)
        return UploadedArtifact(uri=uri, sha256=_sha256_file(local_path))

    # -- reading ---------------------------------------------------------------------------------
    def read_manifest(self, uri: str) -> dict[str, Any]:
        fs, root = self._fs(uri)
        try:
            with fs.open(f"{root}/{MANIFEST_NAME}", "rb") as handle:
                manifest: dict[str, Any] = json.loads(handle.read())
        except FileNotFoundError as exc:
            raise ArtifactNotFound(f"no complete artifact at {uri}") from exc
        return manifest

    def exists(self, uri: str) -> bool:
        """A directory artifact exists once its manifest does; a file artifact once it is in place."""
        fs, path = self._fs(uri)
        if fs.exists(f"{path}/{MANIFEST_NAME}"):
            return True
        return bool(fs.isfile(path))

    def read_head(self, uri: str, size: int) -> bytes:
        """The first `size` bytes of a file artifact (a cheap look, never the whole file)."""
        fs, path = self._fs(uri)
        try:
            with fs.open(path, "rb") as handle:
                head: bytes = handle.read(size)
        except FileNotFoundError as exc:
            raise ArtifactNotFound(f"no file at {uri}") from exc
        return head

    def download_file(self, uri: str, target: Path, sha256: str) -> Path:
        """Download a file artifact to `target`, checked against its sha256 (atomic: a
        half-downloaded file is never seen under the target's name)."""
        fs, path = self._fs(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        try:
            fs.get_file(path, str(partial))
        except FileNotFoundError as exc:
            raise ArtifactNotFound(f"no file at {uri}") from exc
        if _sha256_file(partial) != sha256:
            partial.unlink()
            raise ArtifactCorrupt(f"{uri} does not match its recorded sha256")
        partial.rename(target)
        return target

    def delete(self, uri: str) -> None:
        """Remove a file or directory artifact (its manifest first: it stops existing at once)."""
        fs, path = self._fs(uri)
        if fs.exists(f"{path}/{MANIFEST_NAME}"):
            fs.rm(f"{path}/{MANIFEST_NAME}")
        if fs.exists(path):
            fs.rm(path, recursive=True)

    def download_dir(self, uri: str, local_dir: Path) -> Path:
        """Download and verify a directory artifact into `local_dir` (replaced if present)."""
        local_dir = Path(local_dir)
        manifest = self.read_manifest(uri)
        fs, root = self._fs(uri)
        local_dir.parent.mkdir(parents=True, exist_ok=True)
        # Download beside the target, then rename: a half-downloaded directory is never seen.
        staging = Path(tempfile.mkdtemp(prefix=f".{local_dir.name}-", dir=local_dir.parent))
        try:
            for rel, entry in manifest["files"].items():
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{root}/{rel}", str(target))
                if _sha256_file(target) != entry["sha256"]:
                    raise ArtifactCorrupt(f"{rel} in {uri} does not match its recorded sha256")
            (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            if local_dir.exists():
                shutil.rmtree(local_dir)
            staging.rename(local_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        return local_dir

    def iter_archive(self, uri: str, prefix: str | None = None) -> Iterator[bytes]:
        """Stream a directory artifact as a tar.gz, file by file, without holding it in memory.

        Entries are named `<prefix>/<file>` (prefix defaults to the artifact's last path part).
        """
        manifest = self.read_manifest(uri)
        fs, root = self._fs(uri)
        prefix = (prefix if prefix is not None else root.rsplit("/", 1)[-1]).strip("/")
        # wbits=31: a gzip container, so the stream is a plain .tar.gz.
        compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
        now = int(time.time())
        names = [*manifest["files"], MANIFEST_NAME]
        for rel in names:
            size = fs.size(f"{root}/{rel}")
            info = tarfile.TarInfo(name=f"{prefix}/{rel}" if prefix else rel)
            info.size = size
            info.mtime = now
            info.mode = 0o644
            yield compressor.compress(info.tobuf(format=tarfile.PAX_FORMAT))
            with fs.open(f"{root}/{rel}", "rb") as handle:
                while chunk := handle.read(CHUNK_BYTES):
                    yield compressor.compress(chunk)
            yield compressor.compress(b"\0" * (-size % _TAR_BLOCK))
        # End of archive: two zero blocks.
        yield compressor.compress(b"\0" * (2 * _TAR_BLOCK))
        yield compressor.flush()


def get_artifact_store() -> ArtifactStore:
    config = get_config()
    return ArtifactStore(config.resolved_artifacts_uri, s3_endpoint_url=config.s3_endpoint_url)
