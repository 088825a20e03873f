"""The one Celery task: claim the job in the DB, then hand it to the runner.

The message carries only a job id. Acks are late, so a worker lost mid-job leaves the message to
be delivered again; the DB claim makes that (and any duplicate delivery) harmless: a job that is
not `queued` is not claimed, and the task returns without doing anything.
"""

from __future__ import annotations

import logging
import os
import socket

from celery import Celery

from store import jobs
from store.queue import RUN_JOB_TASK, get_celery_app
from worker import broker
from worker.db_retry import with_session

logger = logging.getLogger(__name__)

app: Celery = get_celery_app()
# A worker that fails to ack while Redis is down must still consume afterwards (see worker.broker).
broker.use_in(app)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:gpu{os.environ.get('CUDA_VISIBLE_DEVICES', '-')}"


@app.task(name=RUN_JOB_TASK, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    me = worker_id()
    claimed = with_session(lambda s: jobs.claim_job(s, job_id, me) is not None, what="claim")
    if not claimed:
        logger.info("job %s: nothing to claim (already taken, finished or cancelled)", job_id)
        return "not_claimed"
    from worker.runner import run_job as run_claimed

    return run_claimed(job_id, me)
