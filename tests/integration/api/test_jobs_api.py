"""/v1/jobs end to end: create, read, list, cancel, auth, limits, and a job's history."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from store import jobs
from store.artifacts import final_key, get_artifact_store
from store.db import session_scope
from tests.integration.api.conftest import Sent

pytestmark = pytest.mark.integration

Headers = dict[str, str]
MakeKey = Callable[..., Headers]
BODY: dict[str, Any] = {"teacher": "gpt2", "student": "distilgpt2", "dataset": "data/train.jsonl"}


def _submit(client: TestClient, headers: Headers, **overrides: Any) -> dict[str, Any]:
    response = client.post("/v1/jobs", json={**BODY, **overrides}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def _run_to_end(job_id: str, status: str, final_uri: str | None = None) -> None:
    with session_scope() as session:
        assert jobs.claim_job(session, job_id, "worker-test") is not None
        assert jobs.finish_job(session, job_id, "worker-test", status, final_uri=final_uri)


# -- create and read -----------------------------------------------------------------------------


def test_create_returns_the_job_and_enqueues_after_commit(
    client: TestClient, make_key: MakeKey, sent: Sent, db: Session, roots: Any
) -> None:
    response = client.post("/v1/jobs", json={**BODY, "preset": "amid"}, headers=make_key())
    assert response.status_code == 201
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["attempt"] == 0 and job["error"] is None
    assert job["progress"] == {
        "step": 0,
        "total_steps": None,
        "fraction": None,
        "eta_seconds": None,
    }
    settings = job["settings"]
    assert "lambda" in settings and "lam" not in settings
    assert settings["batch_size"] == 8  # defaults filled in
    # A local source is stored as the resolved path that was checked.
    assert settings["dataset"]["source"] == str((roots.data / "train.jsonl").resolve())
    assert sent.ids == [job["id"]] and sent.visible_at_send == [True]
    stored = jobs.get_job(db, job["id"])
    assert stored.enqueued_at is not None


def test_enqueue_failure_leaves_the_job_queued_for_the_dispatcher(
    client: TestClient, make_key: MakeKey, sent: Sent, db: Session
) -> None:
    sent.fail = True
    job = _submit(client, make_key())
    assert job["status"] == "queued"
    assert jobs.get_job(db, job["id"]).enqueued_at is None
    assert job["id"] in jobs.jobs_to_redispatch(db, older_than_seconds=60)


def test_get_returns_what_create_returned(client: TestClient, make_key: MakeKey) -> None:
    headers = make_key()
    job = _submit(client, headers)
    fetched = client.get(f"/v1/jobs/{job['id']}", headers=headers)
    assert fetched.status_code == 200 and fetched.json() == job


@pytest.mark.parametrize("job_id", ["0" * 32, "not-a-job", "x" * 500])
def test_unknown_job_is_404_in_the_error_shape(
    client: TestClient, make_key: MakeKey, job_id: str
) -> None:
    response = client.get(f"/v1/jobs/{job_id}", headers=make_key())
    assert response.status_code == 404
    assert response.json()["error"] == "JobNotFound"


# -- idempotency ---------------------------------------------------------------------------------


def test_idempotency_key_replays_the_same_job(
    client: TestClient, make_key: MakeKey, sent: Sent
) -> None:
    headers = {**make_key(), "Idempotency-Key": "submit-1"}
    first = client.post("/v1/jobs", json=BODY, headers=headers)
    again = client.post("/v1/jobs", json=BODY, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert sent.ids == [first.json()["id"]]  # enqueued once
    listed = client.get("/v1/jobs", headers=headers).json()["items"]
    assert [job["id"] for job in listed] == [first.json()["id"]]

    changed = client.post("/v1/jobs", json={**BODY, "seed": 7}, headers=headers)
    assert changed.status_code == 409
    assert changed.json()["field"] == "Idempotency-Key"

    other = client.post(
        "/v1/jobs", json=BODY, headers={**make_key(), "Idempotency-Key": "submit-1"}
    )
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]


def test_malformed_idempotency_key_names_the_header(client: TestClient, make_key: MakeKey) -> None:
    response = client.post(
        "/v1/jobs", json=BODY, headers={**make_key(), "Idempotency-Key": "has space"}
    )
    assert response.status_code == 422 and response.json()["field"] == "Idempotency-Key"


# -- listing -------------------------------------------------------------------------------------


def test_list_pages_by_cursor_and_filters_by_status(client: TestClient, make_key: MakeKey) -> None:
    headers = make_key()
    made = [_submit(client, headers)["id"] for _ in range(5)]
    client.post(f"/v1/jobs/{made[1]}/cancel", headers=headers)

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["after"] = cursor
        page = client.get("/v1/jobs", params=params, headers=headers).json()
        seen += [job["id"] for job in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(made)) and pages == 3

    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}, headers=headers).json()
    assert [job["id"] for job in cancelled["items"]] == [made[1]]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"status": "sleeping"}, "status"),
        ({"after": "garbage!"}, "after"),
        # Given twice, a value would otherwise go unchecked: only the last one is read.
        ({"name": ["\x0f", "fine"]}, "name"),
        ({"limit": ["5", "5"]}, "limit"),
    ],
)
def test_bad_list_parameters_name_the_field(
    client: TestClient, make_key: MakeKey, params: dict[str, Any], field: str
) -> None:
    response = client.get("/v1/jobs", params=params, headers=make_key())
    assert response.status_code == 422
    assert response.json()["field"] == field


# -- cancel --------------------------------------------------------------------------------------


def test_cancel_in_each_state(client: TestClient, make_key: MakeKey) -> None:
    headers = make_key()
    queued = _submit(client, headers)["id"]
    response = client.post(f"/v1/jobs/{queued}/cancel", headers=headers)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"

    running = _submit(client, headers)["id"]
    with session_scope() as session:
        assert jobs.claim_job(session, running, "w") is not None
    response = client.post(f"/v1/jobs/{running}/cancel", headers=headers)
    assert response.status_code == 200
    assert response.json()["status"] == "running" and response.json()["cancel_requested"]

    for end in ("succeeded", "failed"):
        finished = _submit(client, headers)["id"]
        _run_to_end(finished, end)
        response = client.post(f"/v1/jobs/{finished}/cancel", headers=headers)
        assert response.status_code == 409 and response.json()["error"] == "JobNotCancellable"
    response = client.post(f"/v1/jobs/{queued}/cancel", headers=headers)
    assert response.status_code == 409


# -- auth ----------------------------------------------------------------------------------------


def test_every_v1_route_needs_a_valid_key(client: TestClient, make_key: MakeKey) -> None:
    job_id = _submit(client, make_key())["id"]
    routes = [
        ("post", "/v1/jobs"),
        ("get", "/v1/jobs"),
        ("get", f"/v1/jobs/{job_id}"),
        ("post", f"/v1/jobs/{job_id}/cancel"),
        ("get", f"/v1/jobs/{job_id}/events"),
        ("get", f"/v1/jobs/{job_id}/metrics"),
        ("get", f"/v1/jobs/{job_id}/checkpoints"),
        ("get", f"/v1/jobs/{job_id}/student"),
    ]
    for headers in ({}, {"Authorization": "Bearer amid_wrong"}, {"X-API-Key": "nope"}):
        for method, path in routes:
            response = client.request(method, path, headers=headers, json=BODY)
            assert response.status_code == 401, (method, path, headers)
            assert response.json()["error"] == "Unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"


def test_x_api_key_header_works_like_bearer(client: TestClient, make_key: MakeKey) -> None:
    secret = make_key()["Authorization"].removeprefix("Bearer ")
    assert client.get("/v1/jobs", headers={"X-API-Key": secret}).status_code == 200


def test_users_see_only_their_jobs_admins_see_all(client: TestClient, make_key: MakeKey) -> None:
    alice, bob, admin = make_key(), make_key(), make_key(admin=True)
    job_id = _submit(client, alice)["id"]
    for method, path in [
        ("get", f"/v1/jobs/{job_id}"),
        ("get", f"/v1/jobs/{job_id}/events"),
        ("post", f"/v1/jobs/{job_id}/cancel"),
    ]:
        assert client.request(method, path, headers=bob).status_code == 404
    assert job_id not in {job["id"] for job in client.get("/v1/jobs", headers=bob).json()["items"]}
    assert client.get(f"/v1/jobs/{job_id}", headers=admin).status_code == 200
    listed = client.get("/v1/jobs", params={"limit": 100}, headers=admin).json()["items"]
    assert job_id in {job["id"] for job in listed}
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=admin).json()["status"] == "cancelled"


# -- limits --------------------------------------------------------------------------------------


def test_queued_limit_per_key_is_429_but_replays_pass(
    client: TestClient, make_key: MakeKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    from store.config import get_config

    monkeypatch.setenv("AMID_MAX_QUEUED_PER_KEY", "2")
    get_config.cache_clear()
    headers = make_key()
    first = client.post("/v1/jobs", json=BODY, headers={**headers, "Idempotency-Key": "a"})
    _submit(client, headers)
    refused = client.post("/v1/jobs", json=BODY, headers=headers)
    assert refused.status_code == 429
    assert refused.json()["error"] == "QueueLimitReached" and "2" in refused.json()["detail"]
    replay = client.post("/v1/jobs", json=BODY, headers={**headers, "Idempotency-Key": "a"})
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    # Another key has its own allowance; cancelling frees a slot.
    assert client.post("/v1/jobs", json=BODY, headers=make_key()).status_code == 201
    client.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=headers)
    assert client.post("/v1/jobs", json=BODY, headers=headers).status_code == 201


def test_body_over_the_limit_is_413(
    client: TestClient, make_key: MakeKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    from store.config import get_config

    monkeypatch.setenv("AMID_MAX_BODY_BYTES", "2048")
    get_config.cache_clear()
    headers = {**make_key(), "content-type": "application/json"}
    big = {**BODY, "teacher": "a" * 4096}
    declared = client.post("/v1/jobs", json=big, headers=headers)
    assert declared.status_code == 413 and declared.json()["error"] == "RequestTooLarge"

    def chunks() -> Any:  # no Content-Length: counted as it streams
        yield b'{"teacher": "'
        for _ in range(10):
            yield b"a" * 512
        yield b'"}'

    streamed = client.post("/v1/jobs", content=chunks(), headers=headers)
    assert streamed.status_code == 413 and streamed.json()["error"] == "RequestTooLarge"
    assert client.post("/v1/jobs", json=BODY, headers=headers).status_code == 201


@pytest.mark.parametrize("payload", [b"{not json", b"", b"[1, 2]", b'"text"', b"null"])
def test_malformed_bodies_are_json_4xx(
    client: TestClient, make_key: MakeKey, payload: bytes
) -> None:
    response = client.post(
        "/v1/jobs", content=payload, headers={**make_key(), "content-type": "application/json"}
    )
    assert 400 <= response.status_code < 500
    assert response.json()["error"] and "detail" in response.json()


# -- a job's history -----------------------------------------------------------------------------


def test_events_metrics_and_checkpoints(client: TestClient, make_key: MakeKey) -> None:
    headers = make_key()
    job_id = _submit(client, headers)["id"]
    with session_scope() as session:
        jobs.claim_job(session, job_id, "w")
        jobs.update_progress(
            session,
            job_id,
            "w",
            step=5,
            total_steps=20,
            eta_seconds=30.0,
            latest_metrics={"train/loss": 1.25},
        )
        jobs.add_metrics(session, job_id, [(5, "train/loss", 1.25), (5, "train/lr", 1e-4)])
        for step, best in [(5, True), (10, False)]:
            jobs.add_checkpoint(
                session,
                job_id,
                step=step,
                uri=f"file:///c/{step}",
                sha256="a" * 64,
                metrics={"eval/rouge_l": 0.1 * step},
                is_best=best,
            )

    job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert job["progress"] == {"step": 5, "total_steps": 20, "fraction": 0.25, "eta_seconds": 30.0}
    assert job["latest_metrics"] == {"train/loss": 1.25}

    events = client.get(f"/v1/jobs/{job_id}/events", headers=headers).json()
    assert [event["type"] for event in events["items"]] == ["queued", "started"]
    later = client.get(
        f"/v1/jobs/{job_id}/events", params={"after": events["next_after"]}, headers=headers
    ).json()
    assert later["items"] == [] and later["next_after"] == events["next_after"]

    loss = client.get(
        f"/v1/jobs/{job_id}/metrics", params={"name": "train/loss"}, headers=headers
    ).json()
    assert [(p["step"], p["name"], p["value"]) for p in loss["items"]] == [(5, "train/loss", 1.25)]

    checkpoints = client.get(f"/v1/jobs/{job_id}/checkpoints", headers=headers).json()["items"]
    assert [(c["step"], c["best"]) for c in checkpoints] == [(5, True), (10, False)]
    assert set(checkpoints[0]) == {
        "step",
        "uri",
        "download_url",
        "sha256",
        "metrics",
        "best",
        "created_at",
    }
    assert checkpoints[0]["download_url"] == f"/v1/jobs/{job_id}/checkpoints/5/archive"


def test_student_download_streams_the_final_directory(
    client: TestClient, make_key: MakeKey, tmp_path: Path
) -> None:
    headers = make_key()
    job_id = _submit(client, headers)["id"]
    early = client.get(f"/v1/jobs/{job_id}/student", headers=headers)
    assert early.status_code == 409 and early.json()["error"] == "StudentNotReady"

    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text('{"n_layer": 2}')
    (student / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    uploaded = get_artifact_store().upload_dir(student, final_key(job_id))
    _run_to_end(job_id, "succeeded", final_uri=uploaded.uri)

    response = client.get(f"/v1/jobs/{job_id}/student", headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as archive:
        names = {Path(name).name: name for name in archive.getnames()}
        weights = archive.extractfile(names["model.safetensors"])
        assert weights is not None
        assert weights.read() == (student / "model.safetensors").read_bytes()
    assert client.get(f"/v1/jobs/{job_id}", headers=headers).json()["student_uri"] == uploaded.uri


def test_concurrent_submissions_with_one_idempotency_key_make_one_job(
    client: TestClient, make_key: MakeKey, sent: Sent
) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    headers = {**make_key(), "Idempotency-Key": "together"}
    barrier = threading.Barrier(4)

    def submit(_: int) -> tuple[int, str]:
        with TestClient(client.app, raise_server_exceptions=False) as own:
            barrier.wait()
            response = own.post("/v1/jobs", json=BODY, headers=headers)
            return response.status_code, response.json()["id"]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(submit, range(4)))
    assert len({job_id for _, job_id in results}) == 1
    assert sorted(code for code, _ in results) == [200, 200, 200, 201]
    assert len(sent.ids) == 1


# -- the queue -----------------------------------------------------------------------------------


def test_a_queued_job_shows_its_place_and_priority_orders_a_keys_own_jobs(
    client: TestClient, make_key: MakeKey, roots: Any
) -> None:
    headers = make_key()
    first = _submit(client, headers)
    urgent = _submit(client, headers, priority=5)
    places = {
        job["id"]: job["queue_position"]
        for job in client.get("/v1/jobs", params={"status": "queued"}, headers=headers).json()[
            "items"
        ]
    }
    assert urgent["priority"] == 5
    assert 1 <= places[urgent["id"]] < places[first["id"]]
    assert (
        client.get(f"/v1/jobs/{first['id']}", headers=headers).json()["queue_position"]
        == (places[first["id"]])
    )

    _run_to_end(urgent["id"], "succeeded")
    done = client.get(f"/v1/jobs/{urgent['id']}", headers=headers).json()
    assert (done["queue_position"], done["start_eta_seconds"]) == (None, None)


@pytest.mark.parametrize("priority", [11, -11, 1.5, "high"])
def test_a_priority_out_of_bounds_is_refused_naming_the_field(
    client: TestClient, make_key: MakeKey, roots: Any, priority: Any
) -> None:
    response = client.post("/v1/jobs", json={**BODY, "priority": priority}, headers=make_key())
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "priority"
