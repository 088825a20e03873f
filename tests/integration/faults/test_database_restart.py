"""Postgres stopped for several seconds under a running job, on a private cluster: the API answers
503 with its JSON error body (never 500) and /readyz names the database; the worker keeps the job,
retries its writes and heartbeats through the outage, and the job succeeds with every metric."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from tests.integration.e2e._service import job_body, wait_for
from tests.integration.faults._stack import PrivatePostgres, PrivateRedis, Stack, readyz
from tests.integration.faults.conftest import FaultRecord
from worker.db_retry import RETRY_DELAYS_SECONDS

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

JOB_TIMEOUT = 180.0
STEPS = 300
# How long the database stays down: well inside the workers' retry budget and the stale threshold.
OUTAGE_SECONDS = 6.0
STALE_AFTER_SECONDS = 60.0


def test_postgres_restart_under_a_running_job(
    private_postgres: PrivatePostgres,
    private_redis: PrivateRedis,
    make_stack: Callable[..., Stack],
    fault_record: FaultRecord,
) -> None:
    assert min(sum(RETRY_DELAYS_SECONDS), STALE_AFTER_SECONDS) > OUTAGE_SECONDS
    stack = make_stack(
        private_postgres.url,
        private_redis.url,
        AMID_STALE_AFTER_SECONDS=str(STALE_AFTER_SECONDS),
    )
    (worker,) = stack.up("worker")
    client = stack.client
    api_url = stack.api_url
    assert api_url is not None

    job_id = client.submit(job_body(max_steps=STEPS, checkpoint_interval=100)).json()["id"]
    wait_for(lambda: client.job(job_id)["progress"]["step"] > 0, JOB_TIMEOUT, "the job to train")

    private_postgres.stop("fast")
    stopped_at = time.monotonic()
    ready = readyz(api_url)
    assert ready.status_code == 503, ready.text
    body = ready.json()
    assert body["checks"]["broker"] == "ok" and body["checks"]["database"] != "ok", body
    assert body["detail"] == "database unavailable"
    down_answers = {
        "POST /v1/jobs": client.http.post("/v1/jobs", json=job_body()),
        "GET /v1/jobs": client.http.get("/v1/jobs"),
        "GET /v1/jobs/{id}": client.http.get(f"/v1/jobs/{job_id}"),
    }
    for route, response in down_answers.items():
        assert response.status_code == 503, (route, response.status_code, response.text)
        assert response.json()["error"] == "DatabaseUnavailable", (route, response.text)
        assert response.headers["Retry-After"]
    # The fault itself lasts this long; nothing to wait for but the clock.
    time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped_at)))
    private_postgres.start()
    restarted = datetime.now(UTC)
    outage = time.monotonic() - stopped_at
    wait_for(lambda: readyz(api_url).status_code == 200, 30, "/readyz to recover")

    job = stack.wait_finished(job_id, JOB_TIMEOUT)
    assert job["status"] == "succeeded", (job, stack.logs())
    assert job["attempt"] == 1 and job["progress"]["step"] == STEPS
    types = [e["type"] for e in stack.events(job_id)]
    assert "requeued" not in types
    assert types.count("started") == 1 and types.count("succeeded") == 1
    # Every step's metrics were written: the points batched during the outage were retried.
    losses = client.http.get(f"/v1/jobs/{job_id}/metrics", params={"name": "train/loss"}).json()
    assert [p["step"] for p in losses["items"]] == list(range(1, STEPS + 1))
    assert [c["step"] for c in client.items(job_id, "checkpoints")] == [100, 200, 300]
    # The heartbeat thread met the outage, retried, and never gave up; the lease was refreshed
    # after the database came back.
    log = worker.output()
    assert "heartbeat: database unavailable" in log
    assert f"heartbeat of job {job_id} failed" not in log
    assert stack.row(job_id)["heartbeat_at"] > restarted

    fault_record(
        fault="Postgres restart",
        action=(
            f"stopped Postgres (pg_ctl stop -m fast) for {outage:.0f} seconds under a running "
            "job, then started it again"
        ),
        held=(
            "/readyz and the job routes answered 503 with a JSON error body, the worker retried "
            "its writes and heartbeats, and the job succeeded with every metric on attempt 1"
        ),
        jobs_submitted=1,
        jobs_lost=0 if job["status"] == "succeeded" else 1,
        measured={"database_down_seconds": round(outage, 2)},
    )
