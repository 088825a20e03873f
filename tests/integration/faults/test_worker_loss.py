"""Workers lost with SIGKILL: the reaper notices the stale heartbeat and re-queues the job; the
next worker resumes it from its last uploaded checkpoint and ends with the very student an
uninterrupted run makes; a job whose worker dies on every attempt fails with WorkerLost."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from tests.integration.e2e._service import DEMO, job_body, wait_for
from tests.integration.faults._stack import TRAINING_THREADS, PrivateRedis, Stack, pid_alive
from tests.integration.faults.conftest import FaultRecord

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

JOB_TIMEOUT = 180.0
# Long enough that worker A is still training when its first checkpoint is recorded.
STEPS = 80
CHECKPOINT_INTERVAL = 5
# The engine's promise is 1e-5 on CPU; the worker and this process may split matmuls differently.
WEIGHT_TOLERANCE = 1e-4


def _max_abs_diff(left: Path, right: Path) -> float:
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(left).state_dict()
    b = AutoModelForCausalLM.from_pretrained(right).state_dict()
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def _stamp(event: dict[str, object]) -> float:
    return datetime.fromisoformat(str(event["created_at"])).timestamp()


def test_worker_sigkill_mid_job_resumes_on_another_worker_with_the_same_student(
    own_database: str,
    private_redis: PrivateRedis,
    make_stack: Callable[..., Stack],
    fault_record: FaultRecord,
    tmp_path: Path,
) -> None:
    stack = make_stack(own_database, private_redis.url)
    (worker_a,) = stack.up("worker-a")
    client = stack.client

    job_id = client.submit(
        job_body(max_steps=STEPS, checkpoint_interval=CHECKPOINT_INTERVAL)
    ).json()["id"]
    wait_for(lambda: client.items(job_id, "checkpoints"), JOB_TIMEOUT, "a first checkpoint", 0.1)
    trainer = stack.training_pid(job_id)
    assert trainer in worker_a.children(), "the lease holder is worker A's training child"
    worker_a.kill()
    killed_at = time.time()
    wait_for(lambda: not pid_alive(trainer), 30, "the training child to die")

    row = stack.row(job_id)
    assert (row["status"], row["attempt"]) == ("running", 1), row
    assert row["progress_step"] < STEPS, "worker A was killed mid-run"
    saved = max(c["step"] for c in client.items(job_id, "checkpoints"))

    worker_b = stack.start_worker("worker-b")
    job = stack.wait_finished(job_id, JOB_TIMEOUT)
    assert job["status"] == "succeeded", (job, stack.logs())
    assert job["attempt"] == 2
    assert job["progress"]["step"] == STEPS

    events = stack.events(job_id)
    started = [e for e in events if e["type"] == "started"]
    assert [e["data"]["attempt"] for e in started] == [1, 2]
    assert started[0]["data"]["worker"] != started[1]["data"]["worker"]
    assert str(worker_b.pid) not in started[0]["data"]["worker"]
    requeued = [e for e in events if e["type"] == "requeued"]
    assert len(requeued) == 1 and requeued[0]["data"]["worker"] == started[0]["data"]["worker"]
    resumed = [e for e in events if e["type"] == "resumed"]
    assert [e["data"]["step"] for e in resumed] == [saved], "B resumed from A's last checkpoint"

    # The uninterrupted reference: the same stored settings, run here on the CPU from scratch,
    # with as many compute threads as the workers had.
    import torch

    from core.settings import DistillSettings
    from core.train import distill

    threads = torch.get_num_threads()
    torch.set_num_threads(TRAINING_THREADS)
    try:
        reference = distill(DistillSettings.model_validate(job["settings"]), tmp_path / "reference")
    finally:
        torch.set_num_threads(threads)
    assert reference.status == "completed" and reference.final_path is not None
    student = stack.artifacts.download_dir(job["student_uri"], tmp_path / "student")
    diff = _max_abs_diff(student, reference.final_path)
    assert diff <= WEIGHT_TOLERANCE, f"resumed student differs from uninterrupted by {diff}"
    # The comparison means something only if training moved the weights well past the tolerance.
    moved = _max_abs_diff(reference.final_path, DEMO / "assets" / "student")
    assert moved > 100 * WEIGHT_TOLERANCE, moved

    fault_record(
        fault="worker SIGKILL mid-job",
        action=(
            f"SIGKILLed worker A's process group after checkpoint {saved} of a {STEPS}-step job, "
            "then started worker B"
        ),
        held=(
            "the reaper re-queued the job (attempt 2), B resumed from the last uploaded "
            "checkpoint and the job succeeded with the student of an uninterrupted run"
        ),
        jobs_submitted=1,
        jobs_lost=0 if job["status"] == "succeeded" else 1,
        measured={
            "kill_to_requeue_seconds": round(_stamp(requeued[0]) - killed_at, 2),
            "resumed_from_step": saved,
            "max_abs_weight_diff": diff,
        },
    )


def test_a_job_whose_worker_dies_on_every_attempt_fails_with_worker_lost(
    own_database: str,
    private_redis: PrivateRedis,
    make_stack: Callable[..., Stack],
    fault_record: FaultRecord,
) -> None:
    stack = make_stack(own_database, private_redis.url, AMID_MAX_ATTEMPTS="2")
    (worker,) = stack.up("worker")

    job_id = stack.client.submit(job_body(max_steps=100_000, checkpoint_interval=0)).json()["id"]
    for attempt in (1, 2):
        wait_for(
            lambda n=attempt: (r := stack.row(job_id))["status"] == "running" and r["attempt"] == n,
            JOB_TIMEOUT,
            f"attempt {attempt} to run",
        )
        trainer = stack.training_pid(job_id)
        assert trainer in worker.children()
        # Only the training child: the worker's main process lives on and takes the next try.
        os.kill(trainer, signal.SIGKILL)
        wait_for(lambda pid=trainer: not pid_alive(pid), 30, "the training child to die")

    job = stack.wait_finished(job_id, JOB_TIMEOUT)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "WorkerLost"
    assert "lost on each of its 2 attempts (max_attempts=2)" in job["error"]["message"]
    assert job["attempt"] == 2
    types = [e["type"] for e in stack.events(job_id)]
    assert (types.count("started"), types.count("requeued"), types.count("failed")) == (2, 1, 1)
    assert worker.alive()

    fault_record(
        fault="worker lost on every attempt",
        action="SIGKILLed the training child of each of the job's max_attempts=2 attempts",
        held="the reaper re-queued it once, then failed it as WorkerLost with the reason",
        jobs_submitted=1,
        jobs_lost=0 if job["status"] == "failed" else 1,
        measured={"attempts": job["attempt"]},
    )
