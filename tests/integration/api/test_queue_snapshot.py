"""Queue places are read once per second per API process, not per request: a place shown may be
up to that old, and a job submitted since is never shown without one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api import queue_snapshot
from store import jobs
from store.db import session_scope
from store.scheduling import queue_places

pytestmark = pytest.mark.integration

Headers = dict[str, str]
BODY: dict[str, Any] = {"teacher": "gpt2", "student": "distilgpt2", "dataset": "data/train.jsonl"}


def _submit(client: TestClient, headers: Headers) -> str:
    response = client.post("/v1/jobs", json=BODY, headers=headers)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _shown_place(client: TestClient, headers: Headers, job_id: str) -> int | None:
    job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert job["status"] == "queued", job
    return job["queue_position"]


def _fresh_place(job_id: str) -> int:
    with session_scope() as session:
        return queue_places(session, [job_id])[job_id].position


def test_a_place_is_read_at_most_once_a_second_and_a_new_job_always_has_one(
    client: TestClient,
    make_key: Callable[..., Headers],
    roots: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(queue_snapshot, "SNAPSHOT_SECONDS", 3600.0)
    headers = make_key()
    first, second = _submit(client, headers), _submit(client, headers)
    shown = _shown_place(client, headers, second)
    assert shown == _fresh_place(second)

    # The job ahead of it starts: the queue moves, the snapshot does not (yet).
    with session_scope() as session:
        assert jobs.claim_job(session, first, "worker-test") is not None
    moved = _fresh_place(second)
    assert moved < shown
    assert _shown_place(client, headers, second) == shown

    # A job submitted after the snapshot was read is not in it: it gets a fresh reading.
    third = _submit(client, headers)
    assert _shown_place(client, headers, third) == _fresh_place(third)
    assert _shown_place(client, headers, second) == moved

    # Once the snapshot is older than its lifetime, the next read takes a new one.
    before = _shown_place(client, headers, third)
    with session_scope() as session:
        assert jobs.claim_job(session, second, "worker-test") is not None
    monkeypatch.setattr(queue_snapshot, "SNAPSHOT_SECONDS", 0.0)
    assert _fresh_place(third) < before
    assert _shown_place(client, headers, third) == _fresh_place(third)
