"""One reaper pass on the real Postgres: a lost worker's job goes back to the queue and is sent
again; a queued job whose message was lost is sent again; a job out of attempts fails."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from store import jobs
from store.config import get_config
from store.db import reset_engine, session_scope, upgrade
from store.queue import reset_celery_app
from tests.integration.e2e._service import job_body
from worker.reaper import sweep

pytestmark = pytest.mark.integration


@pytest.fixture
def db(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("AMID_DATABASE_URL", postgres_url)
    monkeypatch.setenv("AMID_HEARTBEAT_SECONDS", "0.1")
    monkeypatch.setenv("AMID_STALE_AFTER_SECONDS", "0.5")
    monkeypatch.setenv("AMID_REDISPATCH_AFTER_SECONDS", "0.5")
    get_config.cache_clear()
    reset_engine()
    reset_celery_app()
    upgrade(postgres_url)
    # Jobs other tests of this session left queued or running are not this test's business.
    with session_scope() as session:
        for (job_id,) in session.execute(
            sa.text("SELECT id FROM jobs WHERE status IN ('queued', 'running')")
        ):
            jobs.fail_job(session, job_id, "Test", "cleared by the reaper test")
    yield postgres_url
    reset_celery_app()
    reset_engine()


def _sent(tmp_path: Path) -> list[str]:
    folder = tmp_path / "amid-home" / "broker" / "queue"
    ids = []
    for message in sorted(folder.glob("*.msg")):
        ids.append(json.loads(message.read_text())["headers"]["argsrepr"].strip("()[]',\""))
    return ids


def test_stale_job_is_requeued_and_sent_again(db: str, tmp_path: Path) -> None:
    with session_scope() as session:
        job, _ = jobs.create_job(session, job_body(), "tester", None, 2)
        job_id = job.id
    with session_scope() as session:
        assert jobs.claim_job(session, job_id, "lost-worker") is not None
    time.sleep(0.7)  # the lost worker never heartbeats again

    done = sweep()
    assert done["requeued"] == [job_id]
    assert job_id in done["redispatched"]
    assert job_id in _sent(tmp_path)
    with session_scope() as session:
        assert jobs.get_job(session, job_id).status == "queued"

    # Second life: claimed and lost again, with no attempt left -> failed.
    with session_scope() as session:
        assert jobs.claim_job(session, job_id, "lost-again") is not None
    time.sleep(0.7)
    done = sweep()
    assert done["finished"] == [job_id]
    with session_scope() as session:
        job = jobs.get_job(session, job_id)
        assert (job.status, job.error_code) == ("failed", "WorkerLost")


def test_queued_job_with_a_lost_message_is_sent_again(db: str, tmp_path: Path) -> None:
    with session_scope() as session:
        job, _ = jobs.create_job(session, job_body(), "tester", None, 3)
        job_id = job.id
    assert _sent(tmp_path) == []
    time.sleep(0.7)
    done = sweep()
    assert done["redispatched"] == [job_id]
    assert _sent(tmp_path) == [job_id]
    # Marked as sent: the next pass right away does not send it a second time.
    assert sweep()["redispatched"] == []


def test_a_backlog_holds_one_message_per_job(
    db: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twelve jobs waiting behind a busy worker: pass after pass, the reaper adds no second
    message for any of them; when the broker loses its messages, each is sent again, once."""
    queue = f"amid-backlog-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("AMID_BROKER_URL", redis_url)
    monkeypatch.setenv("AMID_QUEUE", queue)
    get_config.cache_clear()
    reset_celery_app()
    broker = redis.Redis.from_url(redis_url)
    try:
        with session_scope() as session:
            waiting = [
                jobs.create_job(session, job_body(), "tester", None, 3)[0].id for _ in range(12)
            ]
        for _ in range(4):
            sweep()
            time.sleep(0.6)  # past AMID_REDISPATCH_AFTER_SECONDS every time
        assert broker.llen(queue) == len(waiting)

        broker.delete(queue)  # a broker restarted without its data
        assert set(sweep()["redispatched"]) == set(waiting)
        time.sleep(0.6)
        assert sweep()["redispatched"] == []
        assert broker.llen(queue) == len(waiting)
    finally:
        broker.delete(queue)
        broker.close()
