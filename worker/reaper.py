"""The sweeper: re-queue jobs of lost workers, re-send queued jobs whose message is gone
(one message per job at a time: see `store.jobs.jobs_to_redispatch`), and send the webhook
deliveries that are due (`worker.webhooks`).

One pass is `sweep()`. Compose runs `amid reaper` (a loop of passes) as its own service; the
embedded `amid serve` runs the same loop in a thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.orm import Session

from store import jobs
from store.config import get_config
from store.queue import enqueue, queue_is_empty
from worker import liveness
from worker.db_retry import with_session
from worker.webhooks import deliver_due

logger = logging.getLogger(__name__)


def sweep() -> dict[str, list[str]]:
    """One pass; returns what it did: {"requeued": [...], "finished": [...], "redispatched": [...],
    "webhooks": [delivery ids attempted]}."""
    config = get_config()
    changed = with_session(
        lambda s: jobs.requeue_stale(
            s,
            stale_after_seconds=config.stale_after_seconds,
            max_attempts_default=config.max_attempts,
        ),
        what="requeue stale jobs",
    )
    done: dict[str, list[str]] = {
        "requeued": [],
        "finished": [],
        "redispatched": [],
        "webhooks": [],
    }
    for job_id, status in changed:
        (done["requeued"] if status == "queued" else done["finished"]).append(job_id)
    broker_empty = queue_is_empty()
    pending = with_session(
        lambda s: jobs.jobs_to_redispatch(
            s, older_than_seconds=config.redispatch_after_seconds, broker_empty=broker_empty
        ),
        what="find queued jobs",
    )
    for job_id in dict.fromkeys([*done["requeued"], *pending]):
        # Counted before it is sent: a worker may take the message at once (store.scheduling).
        _record(jobs.mark_enqueued, job_id, "mark enqueued")
        try:
            enqueue(job_id)
        except Exception:
            # The broker is down: the row stays queued and the next pass sends it again.
            logger.exception("could not enqueue job %s", job_id)
            _record(jobs.unmark_enqueued, job_id, "unmark enqueued")
            continue
        done["redispatched"].append(job_id)
    # Last: the jobs this pass failed or cancelled owe their deliveries already.
    done["webhooks"] = deliver_due()
    if any(done.values()):
        logger.info("reaper pass: %s", done)
    return done


def _record(change: Callable[[Session, str], None], job_id: str, what: str) -> None:
    with_session(lambda s: change(s, job_id), what=what)


def run_forever(
    stop: threading.Event, interval: float | None = None, liveness_file: Path | None = None
) -> None:
    """Passes every `interval` until `stop`; each turn of the loop touches `liveness_file`."""
    interval = interval or get_config().reaper_interval_seconds
    while not stop.is_set():
        if liveness_file is not None:
            liveness.touch(liveness_file)
        try:
            sweep()
        except Exception:
            logger.exception("reaper pass failed; trying again in %.0fs", interval)
        stop.wait(interval)
