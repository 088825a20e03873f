"""The one Celery task: claim the next job in the DB, then hand it to the runner.

The message only wakes a worker: it carries the id of the job whose submission sent it, but the
store's turn order decides which job the worker claims (`store.scheduling.claim_next`). Acks are
late, so a worker lost mid-job leaves the message to be delivered again; the DB claim makes that
(and any duplicate delivery) harmless: a job is claimed once, and a message that finds nothing
to claim returns without doing anything.

A message that finds no job able to start at all (the queue is empty, or every waiting job's
key is at its running limit) does not even get that far: the worker's main process asks the
store when it takes the message off the queue and drops it there, so a stale message costs a
query, not a fresh job process. The store then counts the message as used up, which tells the
reaper to send a new one when a job still waits for it.
"""

from __future__ import annotations

from collections.abc import Callable

from celery import Celery
from celery.utils.log import get_logger
from celery.worker.request import Request
from celery.worker.state import task_ready

from store import scheduling
from store.models import Job
from store.queue import RUN_JOB_TASK, get_celery_app
from worker import broker, registry
from worker.db_retry import with_session
from worker.registry import worker_id

# Celery's logger family: the worker's main process configures it (and only it) for output.
logger = get_logger(__name__)

app: Celery = get_celery_app()
# A worker that fails to ack while Redis is down must still consume afterwards (see worker.broker).
broker.use_in(app)


STALE_MESSAGE_LOG = "job %s: stale message dropped (no job can start now)"
HANDED_BACK_LOG = "job %s: message handed back to the queue (this worker is draining)"


class DropStaleMessages(Request):
    """Checked in the worker's main process, before the message reaches a job process.

    Celery asks `revoked()` right before it hands a message to the pool (its request class
    wraps the hand-over itself), so a stale message is treated the way Celery treats a revoked
    one: taken off the worker's books, acknowledged, and never run. A draining worker treats
    every message so, except that it hands the message back to the queue, unacknowledged, for
    another worker (before the job's row is touched: the message is still outstanding).
    """

    def revoked(self) -> bool:
        if super().revoked():
            return True
        job_id = self.args[0] if self.args else None
        if registry.draining.is_set():
            logger.info(HANDED_BACK_LOG, job_id)
            self._set_aside(lambda: self.reject(requeue=True))
            registry.stop_consuming()
            return True
        if not isinstance(job_id, str) or with_session(
            lambda s: scheduling.take_message(s, job_id), what="take message"
        ):
            return False
        logger.info(STALE_MESSAGE_LOG, job_id)
        self._set_aside(self.acknowledge)
        return True

    def _set_aside(self, settle: Callable[[], None]) -> None:
        task_ready(self)
        settle()
        self._already_revoked = True


@app.task(name=RUN_JOB_TASK, acks_late=True, ignore_result=True, Request=DropStaleMessages)
def run_job(message_job_id: str) -> str:
    me = worker_id()
    claimed = with_session(
        lambda s: _claimed_id(scheduling.claim_next(s, me, message_job_id)), what="claim"
    )
    if claimed is None:
        logger.info(
            "job %s: nothing to claim (its message found no job that can start now)", message_job_id
        )
        return "not_claimed"
    from worker.runner import run_job as run_claimed

    return run_claimed(claimed, me)


def _claimed_id(job: Job | None) -> str | None:
    return job.id if job is not None else None
