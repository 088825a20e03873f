"""Webhooks in the production shape: API, a Celery worker and `amid reaper` as real processes on
the local Postgres and Redis, a receiver in the test. A job that succeeds, one that fails in the
worker and one cancelled while queued each reach the receiver, signed as the docs say."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.e2e._service import DEMO, job_body, wait_for
from tests.integration.faults._stack import Stack
from tests.integration.webhook_receiver import Receiver, documented_verifier

pytestmark = [pytest.mark.integration, pytest.mark.slow]

JOB_TIMEOUT = 180.0


def test_each_end_of_a_job_reaches_the_receiver_signed(
    own_database: str, redis_url: str, tmp_path: Path, make_stack: Callable[..., Stack]
) -> None:
    # A database of its own: its worker takes the pool's next job and its reaper sweeps every
    # job, so in the session's shared database they would act on jobs other tests left behind.
    # A model root of this test's own: a teacher copied there can vanish after it was accepted.
    models = tmp_path / "models"
    vanishing_teacher = models / "teacher"
    shutil.copytree(DEMO / "assets" / "teacher", vanishing_teacher)
    stack = make_stack(
        own_database,
        redis_url,
        AMID_MODEL_ROOTS=f"{DEMO}:{models}",
        AMID_REAPER_INTERVAL_SECONDS="0.5",
    )
    stack.up("worker")
    client = stack.client
    verify = documented_verifier()
    secret = client.http.get("/v1/webhook-secret").json()["secret"]
    with Receiver() as receiver:
        hook = {"webhook_url": f"{receiver.url}/hooks"}
        succeeds = client.submit(job_body(max_steps=2, checkpoint_interval=0, **hook))
        fails = client.submit(job_body(teacher=str(vanishing_teacher), **hook))
        shutil.rmtree(vanishing_teacher)
        # Queued behind the others (one worker): cancelled by the API at once.
        cancelled = client.submit(job_body(**hook)).json()["id"]
        assert client.http.post(f"/v1/jobs/{cancelled}/cancel").json()["status"] == "cancelled"

        ended = {
            job_id: client.wait_status(job_id, {"succeeded", "failed", "cancelled"}, JOB_TIMEOUT)
            for job_id in (succeeds.json()["id"], fails.json()["id"], cancelled)
        }
        received = receiver.wait(3, timeout=60)
    statuses = [ended[job_id]["status"] for job_id in ended]
    assert statuses == ["succeeded", "failed", "cancelled"], ended
    by_job = {json.loads(r.body)["job"]["id"]: r for r in received}
    assert set(by_job) == set(ended)
    for job_id, job in ended.items():
        delivery = by_job[job_id]
        assert verify(secret, delivery.body, delivery.headers["amid-signature"])
        body = json.loads(delivery.body)
        assert body["type"] == f"job.{job['status']}"
        assert body["job"]["status"] == job["status"]
        assert body["job"]["error"] == job["error"]
        assert body["job"]["student_uri"] == job["student_uri"]

        def delivered(job_id: str = job_id) -> list[str]:
            events = client.items(job_id, "events")
            return [e["data"]["delivery_id"] for e in events if e["type"] == "webhook_delivered"]

        # The attempt is recorded just after the receiver has answered it.
        assert wait_for(delivered, 10, f"job {job_id}'s delivery event") == [body["id"]]
