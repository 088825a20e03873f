"""The sweeper: re-queue jobs of lost workers and re-send queued jobs whose message is gone
(one message per job at a time: see `store.jobs.jobs_to_redispatch`).

One pass is `sweep()`. Compose runs `amid reaper` (a loop of passes) as its own service; the
embedded `amid serve` runs the same loop in a thread.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from store import jobs
from store.config import get_config
from store.queue import enqueue, queue_is_empty
from worker import liveness
from worker.db_retry import with_session

logger = logging.getLogger(__name__)


def sweep() -> dict[str, list[str]]:
    """One pass; returns what it did: {"requeued": [...], "finished": [...], "redispatched": [...]}."""
    config = get_config()
    changed = with_session(
        lambda s: jobs.requeue_stale(
            s,
            stale_after_seconds=config.stale_after_seconds,
            max_attempts_default=config.max_attempts,
        ),
        what="requeue stale jobs",
    )
    done: dict[str, list[str]] = {"requeued": [], "finished": [], "redispatched": []}
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
        try:
            enqueue(job_id)
        except Exception:
            # The broker is down: the row stays queued and the next pass sends it again.
            logger.exception("could not enqueue job %s", job_id)
            continue
        _mark_enqueued(job_id)
        done["redispatched"].append(job_id)
    if any(done.values()):
        logger.info("reaper pass: %s", done)
    return done


def _mark_enqueued(job_id: str) -> None:
    with_session(lambda s: jobs.mark_enqueued(s, job_id), what="mark enqueued")


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
