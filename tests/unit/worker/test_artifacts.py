"""Artifacts are complete or absent, verified by sha256, and stream as a valid tar.gz."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from store.artifacts import (
    MANIFEST_NAME,
    ArtifactCorrupt,
    ArtifactNotFound,
    ArtifactStore,
    checkpoint_key,
    get_artifact_store,
)


def _make_dir(root: Path) -> dict[str, bytes]:
    files = {
        "model.safetensors": bytes(range(256)) * 4096,  # > one streaming chunk
        "config.json": b'{"n_layer": 2}',
        "tokenizer/vocab.json": b'{"a": 0}',
    }
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    return files


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore((tmp_path / "artifacts").as_uri())


def test_upload_download_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    files = _make_dir(tmp_path / "ckpt")
    uploaded = store.upload_dir(tmp_path / "ckpt", checkpoint_key("j1", 5))

    assert uploaded.uri == store.base_uri + "/jobs/j1/checkpoints/step-5"
    assert store.exists(uploaded.uri)
    manifest = store.read_manifest(uploaded.uri)
    assert manifest["sha256"] == uploaded.sha256
    for rel, content in files.items():
        assert manifest["files"][rel]["sha256"] == hashlib.sha256(content).hexdigest()

    out = store.download_dir(uploaded.uri, tmp_path / "out")
    for rel, content in files.items():
        assert (out / rel).read_bytes() == content


def test_upload_cut_short_is_not_an_artifact(
    store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _make_dir(tmp_path / "ckpt")
    fs, _ = store._fs(store.base_uri)
    real_put = fs.put_file
    calls = {"n": 0}

    def put_then_die(lpath: str, rpath: str, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("connection reset mid-upload")
        real_put(lpath, rpath, **kwargs)

    monkeypatch.setattr(type(fs), "put_file", lambda self, *a, **k: put_then_die(*a, **k))
    with pytest.raises(OSError, match="mid-upload"):
        store.upload_dir(tmp_path / "ckpt", "jobs/j1/final")

    uri = store.uri_for("jobs/j1/final")
    # Some files landed, but with no manifest there is no artifact.
    assert any((tmp_path / "artifacts/jobs/j1/final").rglob("*"))
    assert not store.exists(uri)
    with pytest.raises(ArtifactNotFound):
        store.download_dir(uri, tmp_path / "out")
    with pytest.raises(ArtifactNotFound):
        list(store.iter_archive(uri))


def test_retried_upload_unpublishes_the_previous_one_first(
    store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _make_dir(tmp_path / "ckpt")
    uri = store.upload_dir(tmp_path / "ckpt", "jobs/j1/final").uri
    fs, _ = store._fs(uri)
    monkeypatch.setattr(
        type(fs), "put_file", lambda self, *a, **k: (_ for _ in ()).throw(OSError("down"))
    )
    with pytest.raises(OSError):
        store.upload_dir(tmp_path / "ckpt", "jobs/j1/final")
    assert not store.exists(uri)


def test_download_verifies_sha256(store: ArtifactStore, tmp_path: Path) -> None:
    _make_dir(tmp_path / "ckpt")
    uploaded = store.upload_dir(tmp_path / "ckpt", "jobs/j1/final")
    (tmp_path / "artifacts/jobs/j1/final/config.json").write_bytes(b'{"n_layer": 3}')

    with pytest.raises(ArtifactCorrupt, match=r"config\.json"):
        store.download_dir(uploaded.uri, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_iter_archive_is_a_valid_tar_gz(store: ArtifactStore, tmp_path: Path) -> None:
    files = _make_dir(tmp_path / "ckpt")
    uploaded = store.upload_dir(tmp_path / "ckpt", "jobs/j1/final")

    data = b"".join(store.iter_archive(uploaded.uri))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        names = set(archive.getnames())
        assert names == {f"final/{rel}" for rel in files} | {f"final/{MANIFEST_NAME}"}
        for rel, content in files.items():
            member = archive.extractfile(f"final/{rel}")
            assert member is not None
            assert member.read() == content
        manifest = json.loads(archive.extractfile(f"final/{MANIFEST_NAME}").read())  # type: ignore[union-attr]
        assert manifest["sha256"] == uploaded.sha256


def test_upload_file(store: ArtifactStore, tmp_path: Path) -> None:
    local = tmp_path / "metrics.jsonl"
    local.write_text('{"step": 1, "name": "train/loss", "value": 2.0}\n')
    uploaded = store.upload_file(local, "jobs/j1/metrics.jsonl")
    assert store.exists(uploaded.uri)
    assert uploaded.sha256 == hashlib.sha256(local.read_bytes()).hexdigest()
    assert (tmp_path / "artifacts/jobs/j1/metrics.jsonl").read_bytes() == local.read_bytes()
    assert not (tmp_path / "artifacts/jobs/j1/metrics.jsonl.partial").exists()


def test_s3_uses_the_configured_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from store.config import get_config

    monkeypatch.setenv("AMID_ARTIFACTS_URI", "s3://amid-artifacts/")
    monkeypatch.setenv("AMID_S3_ENDPOINT_URL", "http://minio:9000")
    get_config.cache_clear()
    store = get_artifact_store()
    assert store.base_uri == "s3://amid-artifacts"
    assert store.storage_options == {"client_kwargs": {"endpoint_url": "http://minio:9000"}}
    assert store.uri_for("jobs/x/final") == "s3://amid-artifacts/jobs/x/final"


def test_default_store_lives_under_home(tmp_path: Path) -> None:
    store = get_artifact_store()
    assert store.base_uri == (tmp_path / "amid-home" / "artifacts").resolve().as_uri()
