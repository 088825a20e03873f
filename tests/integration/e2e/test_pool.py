"""The pool in view, with real processes: the API and Celery workers on the local Postgres and
Redis. A worker lists itself with the job it runs (`amid pool`) and shows offline once stopped;
a drained worker finishes its job, then leaves every other job to the rest of the pool."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.api._client import run_amid
from tests.integration.e2e._service import job_body, make_key, stop, wait_for
from tests.integration.faults._stack import Service, Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

JOB_TIMEOUT = 180.0
FINISHED = {"succeeded", "failed", "cancelled"}


@pytest.fixture
def stack(own_database: str, redis_url: str, make_stack: Callable[..., Stack]) -> Stack:
    # A database of its own: a worker takes the pool's next job, which in the session's shared
    # database could be one another test left queued.
    return make_stack(own_database, redis_url)


def member_id(worker: Service) -> str:
    """The pool id of a worker started by the stack: its main process is the started process."""
    return f"{socket.gethostname()}:{worker.pid}:gpu-"


def pool_entry(stack: Stack, worker: Service) -> dict[str, Any] | None:
    response = stack.client.http.get("/v1/workers")
    assert response.status_code == 200, response.text
    found = [w for w in response.json()["items"] if w["id"] == member_id(worker)]
    return found[0] if found else None


def wait_entry(stack: Stack, worker: Service, what: str, **expected: Any) -> dict[str, Any]:
    def matches() -> dict[str, Any] | None:
        entry = pool_entry(stack, worker)
        if entry and all(entry[key] == value for key, value in expected.items()):
            return entry
        return None

    try:
        entry: dict[str, Any] = wait_for(matches, JOB_TIMEOUT, what, interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {pool_entry(stack, worker)}\n{stack.logs()}") from exc
    return entry


def test_amid_pool_lists_a_live_worker_with_the_job_it_runs(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    [worker] = stack.up("worker", reaper=False)
    idle = wait_entry(stack, worker, "the worker to join the pool", state="idle")
    assert (idle["host"], idle["gpu"], idle["gpu_memory_bytes"]) == (
        socket.gethostname(),
        "cpu",
        None,
    )
    assert idle["job"] is None and idle["version"]

    body = job_body(max_steps=5000, checkpoint_interval=0, eval_interval=0)
    job_id = stack.client.submit(body).json()["id"]
    wait_entry(stack, worker, "the worker to report its job", state="busy", job=job_id)

    assert stack.api_url is not None
    key = stack.client.http.headers["Authorization"].removeprefix("Bearer ")
    code, out, err = run_amid(capsys, "pool", "--url", stack.api_url, "--api-key", key)
    assert code == 0, err
    header, *lines = out.splitlines()
    assert header.split() == ["ID", "HOST", "GPU", "STATE", "JOB", "LAST", "SEEN"]
    [line] = [line for line in lines if line.startswith(member_id(worker) + " ")]
    assert line.split()[1:5] == [socket.gethostname(), "cpu", "busy", job_id]
    assert line.endswith("s ago")

    stack.client.http.post(f"/v1/jobs/{job_id}/cancel")
    assert stack.wait_finished(job_id, JOB_TIMEOUT)["status"] == "cancelled"
    wait_entry(stack, worker, "the worker to be idle again", state="idle", job=None)

    # Stopped as an orchestrator stops it (SIGTERM), it says so rather than fading out.
    stop(worker.process)
    entry = pool_entry(stack, worker)
    assert entry is not None and entry["state"] == "offline"


def test_a_drained_worker_finishes_its_job_and_leaves_the_next_to_another(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    [first] = stack.up("first", reaper=False)
    wait_entry(stack, first, "the first worker to join the pool", state="idle")
    running = stack.client.submit(job_body(max_steps=24, checkpoint_interval=0)).json()["id"]
    wait_entry(stack, first, "the first worker to run the job", state="busy", job=running)

    assert stack.api_url is not None
    admin = make_key(stack.database_url, is_admin=True)
    drain = ("pool", "drain", member_id(first), "--url", stack.api_url, "--api-key", admin)
    code, out, err = run_amid(capsys, *drain)
    assert code == 0, err
    assert out.strip() == f"{member_id(first)}: draining, finishing job {running}"
    # Queued while the drained worker still runs: its message waits for a worker to take it.
    waiting = stack.client.submit(job_body(max_steps=2, checkpoint_interval=0)).json()["id"]

    assert stack.wait_finished(running, JOB_TIMEOUT)["status"] == "succeeded"
    wait_entry(stack, first, "the first worker to settle as drained", state="drained", job=None)
    # The drained worker took the waiting job's message only to hand it back, and runs nothing.
    wait_for(lambda: "handed back to the queue" in first.output(), 30, "the message handed back")
    assert stack.client.job(waiting)["status"] == "queued"
    assert first.task_outcomes() == ["succeeded"]

    [second] = [stack.start_worker("second")]
    stack.wait_worker(second)
    assert stack.wait_finished(waiting, JOB_TIMEOUT)["status"] == "succeeded"
    assert second.task_outcomes() == ["succeeded"]
    assert first.task_outcomes() == ["succeeded"]
    entry = pool_entry(stack, first)
    assert entry is not None and entry["state"] == "drained"
