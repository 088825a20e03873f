"""The webhook sender on the real Postgres, POSTing to a real receiver on 127.0.0.1: every way a
job ends owes a signed delivery; failed attempts are retried with backoff and given up in the
end; redirects are not followed; each attempt is an event of the job."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from store import jobs
from store.config import get_config
from store.db import reset_engine, session_scope, upgrade
from store.keys import create_api_key
from store.models import WebhookDelivery
from store.webhooks import signature
from tests.integration.e2e._service import job_body
from tests.integration.webhook_receiver import Received, Receiver, documented_verifier
from worker.reaper import sweep
from worker.webhooks import deliver_due

pytestmark = pytest.mark.integration

BACKOFF = 0.2


@pytest.fixture
def db(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("AMID_DATABASE_URL", postgres_url)
    monkeypatch.setenv("AMID_HEARTBEAT_SECONDS", "0.1")
    monkeypatch.setenv("AMID_STALE_AFTER_SECONDS", "0.5")
    monkeypatch.setenv("AMID_WEBHOOK_BACKOFF_SECONDS", str(BACKOFF))
    monkeypatch.setenv("AMID_WEBHOOK_TIMEOUT_SECONDS", "2")
    get_config.cache_clear()
    reset_engine()
    upgrade(postgres_url)
    # Deliveries other tests of this session left pending are not this test's business.
    with session_scope() as session:
        session.execute(
            sa.update(WebhookDelivery)
            .where(WebhookDelivery.status == "pending")
            .values(status="failed", next_attempt_at=None)
        )
    yield postgres_url
    reset_engine()


def _key(webhook_url: str | None = None) -> tuple[str, str]:
    """A new key's id and webhook signing secret."""
    with session_scope() as session:
        key, _ = create_api_key(session, "hooks", webhook_url=webhook_url)
        return key.id, key.webhook_secret


def _job(owner: str, webhook_url: str | None, **overrides: Any) -> str:
    with session_scope() as session:
        job, _ = jobs.create_job(
            session, job_body(**overrides), owner, None, 1, webhook_url=webhook_url
        )
        return job.id


def _run(job_id: str, status: str, **outcome: Any) -> None:
    with session_scope() as session:
        assert jobs.claim_job(session, job_id, "worker-test") is not None
        assert jobs.finish_job(session, job_id, "worker-test", status, **outcome) is not None


def _events(job_id: str) -> list[dict[str, Any]]:
    with session_scope() as session:
        return [
            {"type": e.type, "level": e.level, "data": e.data}
            for e in jobs.list_events(session, job_id)
            if e.type.startswith("webhook_")
        ]


def _by_job(received: list[Received]) -> dict[str, Received]:
    return {json.loads(r.body)["job"]["id"]: r for r in received}


def test_every_way_a_job_ends_is_posted_signed(db: str) -> None:
    verify = documented_verifier()
    with Receiver() as receiver:
        key_id, secret = _key(webhook_url=f"{receiver.url}/key-default")
        hook = f"{receiver.url}/hooks"
        succeeded = _job(key_id, hook)
        _run(succeeded, "succeeded", final_uri="file:///artifacts/final")
        worker_failed = _job(key_id, hook)
        _run(worker_failed, "failed", error_code="TokenizerMismatch", error_message="x" * 100_000)
        cancelled_queued = _job(key_id, hook)
        with session_scope() as session:
            jobs.request_cancel(session, cancelled_queued, key_id)
        cancelled_running = _job(key_id, hook)
        _run(cancelled_running, "cancelled")
        refused = _job(key_id, hook)
        with session_scope() as session:
            jobs.fail_job(session, refused, "SettingRefused", "refused at claim time")
        # No URL of its own: the key's default.
        defaulted = _job(key_id, None)
        _run(defaulted, "succeeded")
        # The reaper fails a job whose worker was lost on its last attempt.
        lost = _job(key_id, hook)
        with session_scope() as session:
            assert jobs.claim_job(session, lost, "lost-worker") is not None
        time.sleep(0.7)
        done = sweep()
        assert lost in done["finished"]

        received = _by_job(receiver.wait(7, timeout=20))
        ended = {
            succeeded: "succeeded",
            worker_failed: "failed",
            cancelled_queued: "cancelled",
            cancelled_running: "cancelled",
            refused: "failed",
            defaulted: "succeeded",
            lost: "failed",
        }
        assert set(received) == set(ended)
        with session_scope() as session:
            finished_at = {job_id: jobs.get_job(session, job_id).finished_at for job_id in ended}
        for job_id, status in ended.items():
            delivery = received[job_id]
            assert delivery.path == ("/key-default" if job_id == defaulted else "/hooks")
            assert delivery.headers["content-type"] == "application/json"
            assert verify(secret, delivery.body, delivery.headers["amid-signature"])
            body = json.loads(delivery.body)
            assert body["type"] == delivery.headers["amid-event"] == f"job.{status}"
            assert body["id"] == delivery.headers["amid-delivery"]
            assert body["job"]["status"] == status
            stamp = finished_at[job_id]
            assert stamp is not None and body["job"]["finished_at"] == stamp.isoformat()
        assert json.loads(received[succeeded].body)["job"]["student_uri"] == (
            "file:///artifacts/final"
        )
        assert json.loads(received[lost].body)["job"]["error"]["code"] == "WorkerLost"
        error = json.loads(received[worker_failed].body)["job"]["error"]
        assert error["code"] == "TokenizerMismatch"
        # A 100 kB error message does not make a 100 kB body.
        assert len(received[worker_failed].body) < 4096
        assert json.loads(received[cancelled_queued].body)["job"]["error"] is None
        # The reaper's pass sent the one it owed at once.
        assert received[lost].headers["amid-delivery"] in done["webhooks"]
        for job_id in ended:
            assert [e["type"] for e in _events(job_id)] == ["webhook_delivered"]
        # Delivered once: the next pass sends nothing more.
        assert deliver_due() == []
        assert len(receiver.received) == 7


def test_a_job_without_any_url_owes_nothing(db: str) -> None:
    key_id, _ = _key()
    job_id = _job(key_id, None)
    _run(job_id, "succeeded")
    with session_scope() as session:
        owed = session.execute(
            sa.select(sa.func.count()).where(WebhookDelivery.job_id == job_id)
        ).scalar_one()
    assert owed == 0


def test_a_failed_attempt_is_retried_after_the_backoff(db: str) -> None:
    verify = documented_verifier()
    with Receiver(answers=[500]) as receiver:
        key_id, secret = _key()
        job_id = _job(key_id, f"{receiver.url}/hooks")
        _run(job_id, "succeeded")

        assert len(deliver_due()) == 1
        first = _events(job_id)
        assert [e["type"] for e in first] == ["webhook_failed"]
        assert first[0]["level"] == "warning"
        assert (first[0]["data"]["status_code"], first[0]["data"]["attempt"]) == (500, 1)
        # Not due again before the backoff is over.
        assert deliver_due() == []
        time.sleep(BACKOFF + 0.1)
        assert len(deliver_due()) == 1

        attempts = receiver.wait(2, timeout=5)
        assert [e["type"] for e in _events(job_id)] == ["webhook_failed", "webhook_delivered"]
        # One delivery, attempted twice, each attempt signed on its own.
        assert {a.headers["amid-delivery"] for a in attempts} == {first[0]["data"]["delivery_id"]}
        assert all(verify(secret, a.body, a.headers["amid-signature"]) for a in attempts)
        with session_scope() as session:
            row = session.get_one(WebhookDelivery, first[0]["data"]["delivery_id"])
            assert (row.status, row.attempts, row.last_status_code) == ("delivered", 2, 200)
            assert row.delivered_at is not None and row.next_attempt_at is None


def test_a_tampered_body_a_wrong_secret_or_an_old_signature_does_not_verify(db: str) -> None:
    verify = documented_verifier()
    with Receiver() as receiver:
        key_id, secret = _key()
        _, other_secret = _key()
        job_id = _job(key_id, f"{receiver.url}/hooks")
        _run(job_id, "failed", error_code="Stalled", error_message="no progress")
        deliver_due()
        (delivery,) = receiver.wait(1, timeout=5)
    header = delivery.headers["amid-signature"]
    assert verify(secret, delivery.body, header)
    tampered = delivery.body.replace(b'"failed"', b'"succeeded"')
    assert tampered != delivery.body
    assert not verify(secret, tampered, header)
    assert not verify(other_secret, delivery.body, header)
    assert not verify(secret, delivery.body, "t=oops,v1=00")
    # Correctly signed, but an hour ago: a replay, refused by the tolerance.
    replayed = signature(secret, int(time.time()) - 3600, delivery.body)
    assert not verify(secret, delivery.body, replayed)


def test_redirects_are_not_followed_and_the_delivery_is_given_up(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMID_WEBHOOK_MAX_ATTEMPTS", "2")
    get_config.cache_clear()
    with Receiver(answers=[302, 302]) as receiver:
        key_id, _ = _key()
        job_id = _job(key_id, f"{receiver.url}/hooks")
        _run(job_id, "cancelled")
        deliver_due()
        time.sleep(BACKOFF + 0.1)
        deliver_due()
        time.sleep(BACKOFF + 0.1)
        assert deliver_due() == []
        assert [r.path for r in receiver.received] == ["/hooks", "/hooks"]
    events = _events(job_id)
    assert [(e["type"], e["level"]) for e in events] == [
        ("webhook_failed", "warning"),
        ("webhook_gave_up", "error"),
    ]
    assert all("redirects are not followed" in e["data"]["error"] for e in events)
    assert events[1]["data"]["next_attempt_at"] is None


def test_an_unreachable_receiver_is_a_failed_attempt_with_its_error(db: str) -> None:
    with Receiver() as receiver:
        gone = f"{receiver.url}/hooks"
    key_id, _ = _key()
    job_id = _job(key_id, gone)
    _run(job_id, "succeeded")
    deliver_due()
    (event,) = _events(job_id)
    assert event["type"] == "webhook_failed"
    assert event["data"]["status_code"] is None
    assert "ConnectError" in event["data"]["error"]
