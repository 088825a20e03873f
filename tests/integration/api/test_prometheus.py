"""GET /metrics on Postgres: the pool's series as Prometheus reads them, for admin keys only.

The database is shared with the other API tests, so store-wide counts are checked as changes
across the test's own writes, and per-owner series through keys made here.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from store import jobs, workers
from store.keys import create_api_key
from store.models import Job, Worker
from tests.integration.e2e._service import job_body


def _scrape(client: TestClient, headers: dict[str, str]) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _change(
    before: dict[tuple[str, tuple], float], after: dict[tuple[str, tuple], float]
) -> Callable[..., float]:
    """How much a series moved between two scrapes (the database is shared with other tests)."""

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    return delta


def test_metrics_carry_states_queues_waits_and_speeds(
    client: TestClient, make_key, db: Session
) -> None:
    admin = make_key(admin=True)
    before = _scrape(client, admin)
    owner, _ = create_api_key(db, "team-a")
    queued = [jobs.create_job(db, job_body(), owner.id, None, 3)[0] for _ in range(3)]
    db.commit()
    running = jobs.claim_job(db, queued[0].id, "gpu-host:7:gpu0")
    assert running is not None
    # 30 steps in the 10 s between its start and its last heartbeat; it waited 4 s in the queue.
    row = db.get(Job, running.id)
    assert row is not None and row.started_at is not None
    row.created_at = row.started_at - timedelta(seconds=4)
    row.heartbeat_at = row.started_at + timedelta(seconds=10)
    row.progress_step = 30
    db.commit()
    after = _scrape(client, admin)
    delta = _change(before, after)

    assert delta("amid_jobs", state="queued") == 2
    assert delta("amid_jobs", state="running") == 1
    assert after[("amid_queue_depth", (("owner", owner.id), ("owner_name", "team-a")))] == 2
    assert delta("amid_queue_wait_seconds_count") == 1
    assert delta("amid_queue_wait_seconds_bucket", le="1") == 0
    assert delta("amid_queue_wait_seconds_bucket", le="5") == 1
    assert delta("amid_queue_wait_seconds_sum") == pytest.approx(4.0)
    speed = after[
        (
            "amid_job_steps_per_second",
            (("job", running.id), ("owner", owner.id), ("worker", "gpu-host:7:gpu0")),
        )
    ]
    assert speed == 3.0


def test_metrics_count_workers_up_and_busy_from_the_registry(
    client: TestClient, make_key, db: Session
) -> None:
    admin = make_key(admin=True)
    before = _scrape(client, admin)
    owner, _ = create_api_key(db, "team-b")
    job, _ = jobs.create_job(db, job_body(), owner.id, None, 3)
    busy, idle, silent = (
        workers.WorkerIdentity(f"box-{uuid.uuid4().hex[:8]}:7:gpu{n}", "box", "cpu", None, "0.1.0")
        for n in range(3)
    )
    for me in (busy, idle, silent):
        workers.register(db, me)
    assert jobs.claim_job(db, job.id, "box:8:gpu0") is not None
    workers.heartbeat(db, busy.id, job_leases=["box:8:gpu0"], settled=False)
    row = db.get(Worker, silent.id)
    assert row is not None
    row.last_seen_at -= timedelta(minutes=5)
    db.commit()
    after = _scrape(client, admin)
    delta = _change(before, after)

    assert delta("amid_workers_up") == 2
    assert delta("amid_workers_busy") == 1
    assert delta("amid_workers", state="busy") == 1
    assert delta("amid_workers", state="idle") == 1
    assert delta("amid_workers", state="offline") == 1
    assert delta("amid_workers", state="drained") == 0


def test_metrics_are_for_admin_keys(client: TestClient, make_key) -> None:
    assert client.get("/metrics").status_code == 401
    response = client.get("/metrics", headers=make_key())
    assert response.status_code == 403
    assert response.json()["error"] == "Forbidden"
    assert "admin" in response.json()["detail"]
