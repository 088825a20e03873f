"""Webhook deliveries owed for jobs' ends: what to send, to where, and how each attempt went.

A delivery row is written in the same transaction that ends its job (`schedule_delivery`, called
by every path of `store.jobs` that finishes a job), so a process that dies right after cannot
lose it. The reaper's sender (`worker.webhooks`) takes due rows (`claim_due`), POSTs them
outside any transaction, and records each attempt (`record_attempt`): delivered, retried later
with exponential backoff, or given up after `AMID_WEBHOOK_MAX_ATTEMPTS`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.orm import Session

from store.models import WEBHOOK_URL_MAX_LENGTH, ApiKey, Job, WebhookDelivery, new_id, utcnow

SCHEMES = frozenset({"http", "https"})
SIGNATURE_HEADER = "amid-signature"
EVENT_HEADER = "amid-event"
DELIVERY_HEADER = "amid-delivery"
# An error message is the one unbounded part of a job's end; clipped, the body stays a few KiB.
ERROR_MESSAGE_MAX_CHARS = 1000
# However many attempts an operator allows, no retry waits longer than this.
MAX_RETRY_DELAY_SECONDS = 6 * 3600.0


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


def check_webhook_url(url: str) -> str:
    """`url` if a webhook may be sent to it; else ValueError saying why."""
    if len(url) > WEBHOOK_URL_MAX_LENGTH:
        raise ValueError(f"must be at most {WEBHOOK_URL_MAX_LENGTH} characters")
    if any(char.isspace() or ord(char) < 0x20 or ord(char) == 0x7F for char in url):
        raise ValueError("must not contain spaces or control characters")
    try:
        url.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate: no database or request can carry it
        raise ValueError("must be valid Unicode text") from exc
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port that is no number raises here
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from exc
    if parts.scheme.lower() not in SCHEMES:
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must name a host")
    return url


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The `amid-signature` header: HMAC-SHA256 over `{timestamp}.{body}` with the key's secret."""
    signed = f"{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def encode_body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def retry_delay(attempts: int, backoff_seconds: float) -> timedelta:
    """How long to wait after the `attempts`-th failed attempt: backoff, then twice that, ..."""
    seconds = backoff_seconds * 2.0 ** min(attempts - 1, 64)
    return timedelta(seconds=min(seconds, MAX_RETRY_DELAY_SECONDS))


# -- owed: written with the job's end ------------------------------------------------------------


def schedule_delivery(session: Session, job: Job) -> WebhookDelivery | None:
    """Owe a POST of `job`'s end to its webhook URL (the job's own, else its key's default);
    None if it has neither."""
    url = (
        job.webhook_url
        or session.execute(
            sa.select(ApiKey.webhook_url).where(ApiKey.id == job.owner)
        ).scalar_one_or_none()
    )
    if url is None:
        return None
    now = utcnow()
    delivery_id = new_id()
    event = f"job.{job.status}"
    delivery = WebhookDelivery(
        id=delivery_id,
        job_id=job.id,
        url=url,
        event=event,
        payload=_payload(delivery_id, event, job),
        status=DeliveryStatus.PENDING.value,
        attempts=0,
        next_attempt_at=now,
        created_at=now,
    )
    session.add(delivery)
    return delivery


def _payload(delivery_id: str, event: str, job: Job) -> dict[str, Any]:
    error = None
    if job.error_code is not None:
        error = {
            "code": job.error_code,
            "message": (job.error_message or "")[:ERROR_MESSAGE_MAX_CHARS],
        }
    return {
        "id": delivery_id,
        "type": event,
        "created_at": utcnow().isoformat(),
        "job": {
            "id": job.id,
            "name": job.name,
            "status": job.status,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "error": error,
            "student_uri": job.final_uri,
        },
    }


# -- the sender's side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DueDelivery:
    """A delivery taken for one attempt, with the secret that signs it (None: the job's key is
    gone, and nothing can sign it)."""

    id: str
    job_id: str
    url: str
    event: str
    payload: dict[str, Any]
    secret: str | None


def claim_due(session: Session, *, lease_seconds: float, limit: int) -> list[DueDelivery]:
    """Pending deliveries whose time has come, taken for `lease_seconds`: their next attempt is
    pushed past the lease, so another sender skips them while this one is sending, and a sender
    that dies mid-send leaves them due again once the lease is over."""
    now = utcnow()
    rows = session.execute(
        sa.select(WebhookDelivery, ApiKey.webhook_secret)
        .join(Job, Job.id == WebhookDelivery.job_id)
        .outerjoin(ApiKey, ApiKey.id == Job.owner)
        .where(
            WebhookDelivery.status == DeliveryStatus.PENDING.value,
            WebhookDelivery.next_attempt_at <= now,
        )
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True, of=WebhookDelivery),
        execution_options={"populate_existing": True},
    ).all()
    taken = []
    for delivery, secret in rows:
        delivery.next_attempt_at = now + timedelta(seconds=lease_seconds)
        taken.append(
            DueDelivery(
                id=delivery.id,
                job_id=delivery.job_id,
                url=delivery.url,
                event=delivery.event,
                payload=dict(delivery.payload),
                secret=secret,
            )
        )
    session.flush()
    return taken


def record_attempt(
    session: Session,
    delivery_id: str,
    *,
    status_code: int | None,
    error: str | None,
    max_attempts: int,
    backoff_seconds: float,
) -> WebhookDelivery:
    """Count one attempt: a 2xx answer delivers; anything else is retried after a backoff, until
    `max_attempts` attempts have failed and the delivery is given up."""
    delivery = session.execute(
        sa.select(WebhookDelivery).where(WebhookDelivery.id == delivery_id).with_for_update(),
        execution_options={"populate_existing": True},
    ).scalar_one()
    now = utcnow()
    delivery.attempts += 1
    delivery.last_status_code = status_code
    delivery.last_error = error
    if status_code is not None and 200 <= status_code < 300:
        delivery.status = DeliveryStatus.DELIVERED.value
        delivery.delivered_at = now
        delivery.next_attempt_at = None
    elif delivery.attempts >= max_attempts:
        delivery.status = DeliveryStatus.FAILED.value
        delivery.next_attempt_at = None
    else:
        delivery.next_attempt_at = now + retry_delay(delivery.attempts, backoff_seconds)
    session.flush()
    return delivery
