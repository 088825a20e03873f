"""The webhook sender: POSTs the deliveries that are due, signed, and records every attempt as
an event of its job (`webhook_delivered`, `webhook_failed`, `webhook_gave_up`).

One pass is `deliver_due()`; the reaper runs one after each sweep, so deliveries go out of the
request path and out of the training process. A pass never holds a transaction while it waits
on a receiver: it takes the due rows (pushing their next attempt past a lease), sends, then
records each outcome in a short transaction of its own.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
from sqlalchemy.orm import Session

from store import jobs, webhooks
from store.config import ServiceConfig, get_config
from store.models import WebhookDelivery
from worker.db_retry import with_session

logger = logging.getLogger(__name__)

USER_AGENT = "amid-webhooks/1"
# Receivers answered at once; a batch is a few rounds of them.
SEND_CONCURRENCY = 8
BATCH = 32
# An attempt is at most connect + send + answer, each under the timeout.
STEPS_PER_ATTEMPT = 3
ERROR_MAX_CHARS = 500


@dataclass(frozen=True)
class Attempt:
    status_code: int | None  # None: no answer (refused, timed out, no key to sign with)
    error: str | None  # None: delivered


def deliver_due() -> list[str]:
    """One pass: attempt every due delivery (up to a batch); returns the ids attempted."""
    config = get_config()
    due = with_session(
        lambda s: webhooks.claim_due(s, lease_seconds=_lease_seconds(config), limit=BATCH),
        what="take due webhook deliveries",
    )
    if not due:
        return []
    # follow_redirects=False (httpx's default, spelled out): a redirect is an answer, not a hop
    # to wherever the receiver points.
    with (
        httpx.Client(timeout=config.webhook_timeout_seconds, follow_redirects=False) as client,
        ThreadPoolExecutor(min(SEND_CONCURRENCY, len(due)), "webhook") as pool,
    ):
        attempts = list(pool.map(lambda delivery: _attempt(client, delivery), due))
    for delivery, attempt in zip(due, attempts, strict=True):
        _record(delivery, attempt, config)
    return [delivery.id for delivery in due]


def _lease_seconds(config: ServiceConfig) -> float:
    # Longer than the slowest batch can take, so no other sender takes these rows meanwhile.
    rounds = -(-BATCH // SEND_CONCURRENCY)
    return rounds * STEPS_PER_ATTEMPT * config.webhook_timeout_seconds + 60.0


def _attempt(client: httpx.Client, delivery: webhooks.DueDelivery) -> Attempt:
    if delivery.secret is None:
        return Attempt(None, "the job's API key no longer exists: nothing can sign the delivery")
    body = webhooks.encode_body(delivery.payload)
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        webhooks.EVENT_HEADER: delivery.event,
        webhooks.DELIVERY_HEADER: delivery.id,
        webhooks.SIGNATURE_HEADER: webhooks.signature(delivery.secret, int(time.time()), body),
    }
    try:
        # Streamed and closed unread: only the status counts, and the answer could be any size.
        with client.stream("POST", delivery.url, content=body, headers=headers) as response:
            return Attempt(response.status_code, _refusal(response))
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return Attempt(None, reason[:ERROR_MAX_CHARS])


def _refusal(response: httpx.Response) -> str | None:
    if response.is_success:
        return None
    if response.is_redirect:
        target = response.headers.get("location", "")[:200]
        return f"HTTP {response.status_code}: redirects are not followed (to {target!r})"
    return f"HTTP {response.status_code}"


def _record(delivery: webhooks.DueDelivery, attempt: Attempt, config: ServiceConfig) -> None:
    """The attempt's outcome on the delivery row and its job event, in one transaction."""

    def record(session: Session) -> jobs.EventIn:
        row = webhooks.record_attempt(
            session,
            delivery.id,
            status_code=attempt.status_code,
            error=attempt.error,
            max_attempts=config.webhook_max_attempts,
            backoff_seconds=config.webhook_backoff_seconds,
        )
        event = _event(row, config.webhook_max_attempts)
        jobs.add_events(session, delivery.job_id, [event])
        return event

    event = with_session(record, what="record webhook attempt")
    if event.level != "info":
        logger.warning("job %s: %s", delivery.job_id, event.message)


def _event(row: WebhookDelivery, max_attempts: int) -> jobs.EventIn:
    next_at = row.next_attempt_at.isoformat() if row.next_attempt_at else None
    data = {
        "delivery_id": row.id,
        "url": row.url,
        "event": row.event,
        "attempt": row.attempts,
        "status_code": row.last_status_code,
        "error": row.last_error,
        "next_attempt_at": next_at,
    }
    about = f"webhook {row.event} to {row.url}"
    level: jobs.EventLevel
    if row.status == webhooks.DeliveryStatus.DELIVERED:
        level, kind = "info", "webhook_delivered"
        message = f"{about} delivered (HTTP {row.last_status_code}, attempt {row.attempts})"
    elif row.status == webhooks.DeliveryStatus.FAILED:
        level, kind = "error", "webhook_gave_up"
        message = f"{about} given up after {row.attempts} attempts (last: {row.last_error})"
    else:
        level, kind = "warning", "webhook_failed"
        message = (
            f"{about}: attempt {row.attempts} of {max_attempts} failed ({row.last_error}); "
            f"next attempt at {next_at}"
        )
    return jobs.EventIn(level, kind, message, data)
