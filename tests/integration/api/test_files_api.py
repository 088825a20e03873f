"""/v1/files end to end on the real app and Postgres: uploads, their checks and limits, who sees
them, and jobs that name them as `file:<id>`."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from store.config import get_config

pytestmark = pytest.mark.integration

Headers = dict[str, str]
MakeKey = Callable[..., Headers]
DOLLY_ROWS = b"".join(
    json.dumps({"instruction": f"say {word}", "response": word}).encode() + b"\n"
    for word in ("one", "two", "three")
)
DEMO_STUDENT = Path(__file__).resolve().parents[3] / "core" / "demo" / "assets" / "student"


def _upload(
    client: TestClient, headers: Headers, content: bytes, filename: str, purpose: str = "dataset"
) -> Any:
    return client.post(
        "/v1/files",
        params={"purpose": purpose, "filename": filename},
        content=content,
        headers={**headers, "Content-Type": "application/octet-stream"},
    )


def _stored_files() -> list[Path]:
    root = get_config().home / "artifacts" / "files"
    return [path for path in root.rglob("*") if path.is_file()] if root.exists() else []


def _model_archive(top: str = "student") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(DEMO_STUDENT, arcname=top)
    return buffer.getvalue()


def test_upload_list_get_delete_and_owners_see_only_their_own(
    client: TestClient, make_key: MakeKey
) -> None:
    alice, bob = make_key(name="alice"), make_key(name="bob")
    response = _upload(client, alice, DOLLY_ROWS, "rows.jsonl")
    assert response.status_code == 201, response.text
    upload = response.json()
    assert upload["ref"] == f"file:{upload['id']}"
    assert upload["size"] == len(DOLLY_ROWS)
    assert upload["sha256"] == hashlib.sha256(DOLLY_ROWS).hexdigest()
    assert (upload["purpose"], upload["filename"]) == ("dataset", "rows.jsonl")
    [stored] = _stored_files()
    assert stored.read_bytes() == DOLLY_ROWS

    assert [item["id"] for item in client.get("/v1/files", headers=alice).json()["items"]] == [
        upload["id"]
    ]
    assert client.get(f"/v1/files/{upload['id']}", headers=alice).json() == upload
    # Another key: as if the file did not exist.
    assert client.get("/v1/files", headers=bob).json()["items"] == []
    assert client.get(f"/v1/files/{upload['id']}", headers=bob).status_code == 404
    assert client.delete(f"/v1/files/{upload['id']}", headers=bob).status_code == 404

    assert client.delete(f"/v1/files/{upload['id']}", headers=alice).status_code == 204
    assert client.get(f"/v1/files/{upload['id']}", headers=alice).status_code == 404
    assert _stored_files() == []


@pytest.mark.parametrize(
    ("filename", "content", "field", "reason"),
    [
        ("rows.txt", DOLLY_ROWS, "filename", "a dataset must be one of"),
        ("../rows.jsonl", DOLLY_ROWS, "filename", "plain file name"),
        ("rows.jsonl", b"", "body", "the upload is empty"),
        ("rows.jsonl", b'{"instruction": "x", \n', "body", "not valid JSON"),
        ("rows.jsonl", b'["q", "a"]\n', "body", "rows.jsonl is not a JSON object"),
        ("rows.parquet", DOLLY_ROWS, "body", "not a Parquet file"),
    ],
)
def test_a_dataset_the_worker_could_not_read_is_refused_and_nothing_is_kept(
    client: TestClient, make_key: MakeKey, filename: str, content: bytes, field: str, reason: str
) -> None:
    headers = make_key()
    response = _upload(client, headers, content, filename)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["field"] == field and reason in body["detail"], body
    # The server's scratch copy is never named to the client.
    assert str(get_config().home) not in body["detail"]
    assert client.get("/v1/files", headers=headers).json()["items"] == []
    assert _stored_files() == []


def test_an_upload_over_the_limit_is_a_413_and_leaves_nothing(
    client: TestClient, make_key: MakeKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    headers = make_key()
    monkeypatch.setenv("AMID_MAX_UPLOAD_BYTES", "2048")
    get_config.cache_clear()
    rows = DOLLY_ROWS * 100

    def chunks() -> Any:  # streamed, no Content-Length: counted as it arrives
        for start in range(0, len(rows), 500):
            yield rows[start : start + 500]

    response = client.post(
        "/v1/files",
        params={"purpose": "dataset", "filename": "big.jsonl"},
        content=chunks(),
        headers=headers,
    )
    assert response.status_code == 413, response.text
    assert response.json()["field"] == "body"
    assert client.get("/v1/files", headers=headers).json()["items"] == []
    assert _stored_files() == []
    assert not any((get_config().home / "uploads").iterdir())


def test_a_job_names_an_uploaded_dataset_with_the_same_checks_as_a_local_file(
    client: TestClient, make_key: MakeKey
) -> None:
    alice, bob = make_key(name="alice"), make_key(name="bob")
    ref = _upload(client, alice, DOLLY_ROWS, "rows.jsonl").json()["ref"]
    body = {"teacher": "gpt2", "student": "distilgpt2"}

    response = client.post("/v1/jobs", json={**body, "dataset": ref}, headers=alice)
    assert response.status_code == 201, response.text
    assert response.json()["settings"]["dataset"]["source"] == ref

    # The job's own reading of the first row: alpaca asked for, dolly rows given.
    wrong_format = {**body, "dataset": {"source": ref, "format": "alpaca"}}
    refused = client.post("/v1/jobs", json=wrong_format, headers=alice)
    assert refused.status_code == 422 and refused.json()["field"] == "dataset.format", refused.text
    assert "rows.jsonl" in refused.json()["detail"]
    renamed = {**body, "dataset": {"source": ref, "fields": {"response": "answer"}}}
    refused = client.post("/v1/jobs", json=renamed, headers=alice)
    assert refused.status_code == 422, refused.text

    others = client.post("/v1/jobs", json={**body, "dataset": ref}, headers=bob)
    assert others.status_code == 422
    assert others.json()["field"] == "dataset.source" and "no such file" in others.json()["detail"]
    # Rows of no known format upload fine: a job maps their columns.
    columns = b'{"question": "q", "answer": "a"}\n'
    ref = _upload(client, alice, columns, "qa.jsonl").json()["ref"]
    mapped = {"source": ref, "fields": {"instruction": "question", "response": "answer"}}
    accepted = client.post("/v1/jobs", json={**body, "dataset": mapped}, headers=alice)
    assert accepted.status_code == 201, accepted.text
    unmapped = client.post("/v1/jobs", json={**body, "dataset": ref}, headers=alice)
    assert unmapped.status_code == 422 and unmapped.json()["field"] == "dataset.format"

    as_model = client.post(
        "/v1/jobs", json={**body, "dataset": "gpt2", "student": ref}, headers=alice
    )
    assert as_model.status_code == 422 and "not a model" in as_model.json()["detail"]


def test_a_model_uploads_as_an_archive_and_a_job_names_it(
    client: TestClient, make_key: MakeKey
) -> None:
    headers = make_key()
    response = _upload(client, headers, _model_archive(), "student.tar.gz", purpose="model")
    assert response.status_code == 201, response.text
    ref = response.json()["ref"]
    stored = {path.name for path in _stored_files()}
    assert {"config.json", "model.safetensors", "MANIFEST.json"} <= stored

    job = client.post(
        "/v1/jobs",
        json={"teacher": "gpt2", "student": ref, "dataset": "data/train.jsonl"},
        headers=headers,
    )
    assert job.status_code == 201, job.text
    assert job.json()["settings"]["student"] == ref

    no_model = io.BytesIO()
    with tarfile.open(fileobj=no_model, mode="w:gz") as tar:
        info = tarfile.TarInfo("notes.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    refused = _upload(client, headers, no_model.getvalue(), "notes.tar.gz", purpose="model")
    assert refused.status_code == 422 and "config.json" in refused.json()["detail"]
    garbage = _upload(client, headers, b"not a tar at all", "x.tar.gz", purpose="model")
    assert garbage.status_code == 422 and garbage.json()["field"] == "body"
