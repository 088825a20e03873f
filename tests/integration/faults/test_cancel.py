"""Cancel in every state: a queued job is cancelled at once and never starts; a running one stops
at a step boundary, its training process exits within seconds and the worker takes the next job;
a finished job (succeeded, failed, cancelled) refuses with 409 and a JSON error body."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.e2e._service import DEMO, job_body, wait_for
from tests.integration.faults._stack import PrivateRedis, Stack, pid_alive
from tests.integration.faults.conftest import FaultRecord

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

JOB_TIMEOUT = 180.0
CANCEL_TO_IDLE_LIMIT = 10.0


def test_cancel_queued_running_and_finished_jobs(
    own_database: str,
    private_redis: PrivateRedis,
    make_stack: Callable[..., Stack],
    fault_record: FaultRecord,
    tmp_path: Path,
) -> None:
    # A model root of this test's own: a teacher copied there can vanish after it was accepted.
    models = tmp_path / "models"
    vanishing_teacher = models / "teacher"
    shutil.copytree(DEMO / "assets" / "teacher", vanishing_teacher)
    stack = make_stack(own_database, private_redis.url, AMID_MODEL_ROOTS=f"{DEMO}:{models}")
    stack.up(reaper=False)  # no worker yet: the first job stays queued
    client = stack.client
    http = client.http

    # -- queued: cancelled at once; a worker that starts later never runs it --------------------
    queued = client.submit(job_body()).json()["id"]
    response = http.post(f"/v1/jobs/{queued}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    worker = stack.start_worker()
    stack.wait_worker(worker)
    # Its message is dropped by the worker's main process: no job process is started for it.
    wait_for(lambda: worker.task_outcomes() == ["dropped"], 60, "the cancelled job's message")
    row = stack.row(queued)
    assert (row["status"], row["attempt"], row["started_at"]) == ("cancelled", 0, None)
    assert [e["type"] for e in stack.events(queued)] == ["queued", "cancelled"]

    # -- running: stops at a step boundary; its process exits; the worker is free ----------------
    running = client.submit(job_body(max_steps=100_000, checkpoint_interval=5)).json()["id"]
    wait_for(lambda: client.items(running, "checkpoints"), JOB_TIMEOUT, "a first checkpoint", 0.1)
    trainer = stack.training_pid(running)
    assert trainer in worker.children()
    # Waits behind the running job; its teacher disappears before a worker gets to it.
    failing = client.submit(job_body(teacher=str(vanishing_teacher))).json()["id"]
    shutil.rmtree(vanishing_teacher)

    response = http.post(f"/v1/jobs/{running}/cancel")
    cancelled_at = time.monotonic()
    assert response.status_code == 200, response.text
    assert response.json()["cancel_requested"] is True
    wait_for(
        lambda: client.job(running)["status"] == "cancelled" and not pid_alive(trainer),
        60,
        "the running job to be cancelled and its training process to exit",
        interval=0.05,
    )
    cancel_to_idle = time.monotonic() - cancelled_at
    assert cancel_to_idle < CANCEL_TO_IDLE_LIMIT, (cancel_to_idle, stack.logs())
    job = client.job(running)
    assert 0 < job["progress"]["step"] < 100_000
    checkpoints = client.items(running, "checkpoints")
    assert checkpoints and all(stack.artifacts.exists(c["uri"]) for c in checkpoints)

    # The same worker goes on: the job behind fails for its own reason, the next one succeeds.
    failed = stack.wait_finished(failing, JOB_TIMEOUT)
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "ModelUnloadable", failed["error"]
    succeeding = client.submit(job_body(max_steps=2, checkpoint_interval=0)).json()["id"]
    succeeded = stack.wait_finished(succeeding, JOB_TIMEOUT)
    assert succeeded["status"] == "succeeded", (succeeded, stack.logs())
    assert worker.alive()
    assert worker.task_outcomes() == ["dropped", "cancelled", "failed", "succeeded"]

    # -- finished: 409 with the one error shape -------------------------------------------------
    for job_id, status in (
        (succeeding, "succeeded"),
        (failing, "failed"),
        (running, "cancelled"),
        (queued, "cancelled"),
    ):
        response = http.post(f"/v1/jobs/{job_id}/cancel")
        assert response.status_code == 409, response.text
        body = response.json()
        assert body["error"] == "JobNotCancellable"
        assert f"already {status}" in body["detail"]
        assert client.job(job_id)["status"] == status

    outcomes = {
        queued: client.job(queued)["status"] == "cancelled",
        running: client.job(running)["status"] == "cancelled",
        failing: client.job(failing)["status"] == "failed",
        succeeding: client.job(succeeding)["status"] == "succeeded",
    }
    fault_record(
        fault="cancel in each state",
        action=(
            "cancelled a queued job before any worker ran, a running 100000-step job after its "
            "first checkpoint, and then jobs that had succeeded, failed and been cancelled"
        ),
        held=(
            "the queued job never started, the running one stopped with its checkpoints kept and "
            "its process gone in seconds, the worker ran the next jobs, finished jobs answered 409"
        ),
        jobs_submitted=len(outcomes),
        jobs_lost=sum(not ok for ok in outcomes.values()),
        measured={"cancel_to_idle_seconds": round(cancel_to_idle, 2)},
    )
