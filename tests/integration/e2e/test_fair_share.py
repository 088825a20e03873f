"""Sharing the pool, end to end: the API, one real Celery worker on Redis and Postgres. One key
queues a backlog behind its own running job; a second key's one job is the next to start, the
jobs start in the order of the queue positions the API showed, and once runs have finished a
queued job shows an estimated start."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from sqlalchemy.orm import Session

from store.db import make_engine
from store.keys import create_api_key
from tests.integration.e2e._service import Client, job_body, wait_for
from tests.integration.faults._stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BACKLOG = 9
FINISHED = {"succeeded", "failed", "cancelled"}
JOB_TIMEOUT = 240.0


def _client(stack: Stack, name: str) -> Client:
    engine = make_engine(stack.database_url)
    try:
        with Session(engine) as session:
            _, secret = create_api_key(session, name)
            session.commit()
    finally:
        engine.dispose()
    assert stack.api_url is not None
    return Client(stack.api_url, secret)


def _start_etas(client: Client, jobs: list[str]) -> list[float] | None:
    """The start estimates of those of `jobs` still queued, in order, once each has one (a job
    that starts meanwhile drops out)."""
    shown = [client.job(job_id) for job_id in jobs]
    etas = [job["start_eta_seconds"] for job in shown if job["status"] == "queued"]
    if len(etas) < 2 or None in etas:
        return None
    return etas


def test_a_second_key_starts_before_the_first_keys_backlog(
    own_database: str, redis_url: str, make_stack: Callable[..., Stack]
) -> None:
    stack = make_stack(own_database, redis_url)
    stack.up("worker", reaper=False)
    alice, bob = _client(stack, "alice"), _client(stack, "bob")
    try:
        # Alice's long job holds the only worker while the queue forms behind it.
        holder = alice.submit(job_body(max_steps=100_000, checkpoint_interval=0)).json()["id"]
        alice.wait_status(holder, {"running"}, JOB_TIMEOUT)
        quick = job_body(max_steps=1, checkpoint_interval=0, eval_max_samples=1)
        backlog = [alice.submit(quick).json()["id"] for _ in range(BACKLOG)]
        late = bob.submit(quick).json()["id"]

        shown = {job_id: alice.job(job_id) for job_id in backlog}
        shown[late] = bob.job(late)
        assert all(job["status"] == "queued" for job in shown.values())
        positions = {job_id: job["queue_position"] for job_id, job in shown.items()}
        assert positions[late] == 1
        # Alice's own jobs keep her submission order, behind Bob's.
        assert [positions[job_id] for job_id in backlog] == list(range(2, BACKLOG + 2))

        alice.http.post(f"/v1/jobs/{holder}/cancel").raise_for_status()
        order = sorted(positions, key=positions.__getitem__)
        owner_of = {job_id: bob if job_id == late else alice for job_id in order}

        # Three runs show the order (a run is mostly a fresh process importing torch); the
        # store's tests follow whole queues.
        for job_id in order[:2]:
            done = owner_of[job_id].wait_status(job_id, FINISHED, JOB_TIMEOUT)
            assert done["status"] == "succeeded", stack.logs()
        owner_of[order[2]].wait_status(order[2], {"running", *FINISHED}, JOB_TIMEOUT)
        now = {job_id: owner_of[job_id].job(job_id) for job_id in order}
        started = [job_id for job_id in order if now[job_id]["started_at"] is not None]
        assert started[:3] == order[:3]
        assert sorted(started, key=lambda job_id: now[job_id]["started_at"]) == started

        # With runs finished, each job still queued shows when it may start, later the further
        # back it is (from the running job's ETA, or the mean run time until it reports one).
        queued = [job_id for job_id in order if now[job_id]["status"] == "queued"]
        etas = wait_for(
            lambda: _start_etas(alice, queued), JOB_TIMEOUT, "start estimates", interval=0.5
        )
        assert all(0 <= before < after for before, after in itertools.pairwise(etas)), etas
        for job_id in queued:
            alice.http.post(f"/v1/jobs/{job_id}/cancel").raise_for_status()
    finally:
        alice.close()
        bob.close()
