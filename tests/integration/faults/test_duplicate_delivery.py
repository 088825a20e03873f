"""The same run_job message twice, to two workers on one queue: the DB claim lets one run it and
the other take nothing, so the job runs exactly once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from store.config import ServiceConfig
from store.queue import RUN_JOB_TASK, build_celery_app
from tests.integration.e2e._service import job_body, wait_for
from tests.integration.faults._stack import PrivateRedis, Stack
from tests.integration.faults.conftest import FaultRecord

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

JOB_TIMEOUT = 180.0


def test_a_message_delivered_twice_runs_the_job_once(
    own_database: str,
    private_redis: PrivateRedis,
    make_stack: Callable[..., Stack],
    fault_record: FaultRecord,
) -> None:
    stack = make_stack(own_database, private_redis.url)
    workers = stack.up("worker-a", "worker-b", reaper=False)

    # The API sends the message once; a second copy follows at once, so both workers' claims race.
    job_id = stack.client.submit(job_body(max_steps=4, checkpoint_interval=0)).json()["id"]
    app = build_celery_app(
        ServiceConfig(
            home=Path(stack.env["AMID_HOME"]), broker_url=stack.broker_url, queue=stack.queue
        )
    )
    try:
        app.send_task(RUN_JOB_TASK, args=[job_id], queue=stack.queue)
    finally:
        app.close()

    job = stack.wait_finished(job_id, JOB_TIMEOUT)
    assert job["status"] == "succeeded", (job, stack.logs())

    # Both deliveries are consumed, one by each worker: one ran the job; the other claimed
    # nothing, or, when its copy came after the claim, dropped it before starting a job process.
    def outcomes() -> list[str]:
        return sorted(o for w in workers for o in w.task_outcomes())

    wait_for(
        lambda: outcomes() in (["not_claimed", "succeeded"], ["dropped", "succeeded"]),
        60,
        f"both deliveries to be handled\n{stack.logs()}",
    )
    loser = next(w for w in workers if w.task_outcomes() != ["succeeded"])
    assert len(loser.task_outcomes()) == 1
    said = (
        "nothing to claim" if loser.task_outcomes() == ["not_claimed"] else "stale message dropped"
    )
    assert f"job {job_id}: {said}" in loser.output()

    assert job["attempt"] == 1
    types = [e["type"] for e in stack.events(job_id)]
    assert types.count("started") == 1
    assert types.count("run_started") == 1
    assert types.count("succeeded") == 1

    fault_record(
        fault="duplicate delivery",
        action="sent the run_job message of one job twice to a queue consumed by two workers",
        held=(
            "one worker ran the job once (attempt 1, one started event) and the other's "
            "delivery claimed nothing"
        ),
        jobs_submitted=1,
        jobs_lost=0 if job["status"] == "succeeded" else 1,
        measured={"runs": types.count("run_started")},
    )
