"""Redis stopped under a running job and started again after it: the API says the broker is down
(503 on /readyz) yet still takes a job (committed as queued, 201); the running job finishes; the
restarted Redis has lost every message, so the reaper sends the queued job again, and the worker's
consumer, which lost the broker, reconnects and runs it."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.integration.e2e._service import job_body, wait_for
from tests.integration.faults._stack import PrivateRedis, Stack, readyz
from tests.integration.faults.conftest import FaultRecord

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

JOB_TIMEOUT = 180.0


def test_redis_restart_under_a_running_job(
    own_database: str,
    private_redis: PrivateRedis,
    make_stack: Callable[..., Stack],
    fault_record: FaultRecord,
) -> None:
    stack = make_stack(own_database, private_redis.url)
    (worker,) = stack.up("worker")
    client = stack.client
    assert stack.api_url is not None

    first = client.submit(job_body(max_steps=150, checkpoint_interval=0)).json()["id"]
    wait_for(
        lambda: client.job(first)["progress"]["step"] > 0, JOB_TIMEOUT, "the first job to train"
    )

    private_redis.stop()
    stopped_at = time.monotonic()
    assert client.job(first)["status"] == "running"
    ready = readyz(stack.api_url)
    assert ready.status_code == 503, ready.text
    body = ready.json()
    assert body["checks"] == {"database": "ok", "broker": "unreachable"}, body
    assert body["detail"] == "broker unavailable"

    # Submitting while the broker is down: the job is committed as queued, the message unsent.
    before = time.monotonic()
    response = client.http.post("/v1/jobs", json=job_body(max_steps=2, checkpoint_interval=0))
    submit_seconds = time.monotonic() - before
    assert response.status_code == 201, response.text
    second = response.json()["id"]
    assert response.json()["status"] == "queued"
    assert stack.row(second)["enqueued_at"] is None

    # Redis stays down until the first job is over: the worker acknowledges its message into the
    # void and goes back to a broker that is not there, so its consumer has to reconnect.
    done = stack.wait_finished(first, JOB_TIMEOUT)
    assert done["status"] == "succeeded", (done, stack.logs())
    wait_for(
        lambda: "Connection to broker lost" in worker.output(), 60, "the worker to lose the broker"
    )
    private_redis.start()
    outage = time.monotonic() - stopped_at
    wait_for(lambda: readyz(stack.api_url).status_code == 200, 30, "/readyz to recover")  # type: ignore[arg-type]

    jobs = {job_id: stack.wait_finished(job_id, JOB_TIMEOUT) for job_id in (first, second)}
    for job in jobs.values():
        assert job["status"] == "succeeded", (job, stack.logs())
        assert job["attempt"] == 1
    # Sent by the reaper once Redis was back, and run by the same (reconnected) worker.
    assert stack.row(second)["enqueued_at"] is not None
    assert worker.alive()
    second_started = next(e for e in stack.events(second) if e["type"] == "started")

    fault_record(
        fault="Redis restart",
        action=(
            "stopped Redis (SIGTERM) under a running job, submitted a second job while it was "
            "down, started Redis again on the same port once the first job had finished"
        ),
        held=(
            "/readyz said 503 broker unavailable, the submit answered 201 queued, the reaper "
            "re-sent the lost message, the worker reconnected and both jobs succeeded"
        ),
        jobs_submitted=2,
        jobs_lost=sum(job["status"] != "succeeded" for job in jobs.values()),
        measured={
            "broker_down_seconds": round(outage, 2),
            "submit_while_down_seconds": round(submit_seconds, 2),
            "second_job_attempt": int(second_started["data"]["attempt"]),
        },
    )
