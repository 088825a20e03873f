"""The job process's watchdog: a job that does not stop when told to, or that stops making
progress, has its process ended.

Cancel is cooperative (the run checks between micro-batches and evaluation batches), but a run
can sit in one long call that never returns to such a check: loading a model, reading data,
generating. Once the worker has seen the cancel, the run has `AMID_CANCEL_GRACE_SECONDS`; after
that the job is recorded as cancelled and its process is terminated (SIGTERM), then killed
(SIGKILL) if it is still there after the same grace. A run that reports no progress (no step,
evaluation, checkpoint or event) for `AMID_STALL_AFTER_SECONDS` fails as `Stalled` the same
way: the heartbeat thread would keep its lease fresh for ever, so the reaper never sees it.
The Celery pool replaces the process; the job's message comes back and finds nothing to claim.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from store import jobs
from store.states import JobStatus
from worker.db_retry import with_session
from worker.reporter import DbReporter

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.25


class Watchdog(threading.Thread):
    def __init__(
        self, reporter: DbReporter, *, cancel_grace_seconds: float, stall_after_seconds: float
    ) -> None:
        super().__init__(name=f"watchdog-{reporter.job_id}", daemon=True)
        self.reporter = reporter
        self.cancel_grace = cancel_grace_seconds
        self.stall_after = stall_after_seconds
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        stop_seen: float | None = None
        while not self._stopped.wait(POLL_SECONDS):
            now = time.monotonic()
            if self.reporter.should_stop():
                stop_seen = stop_seen or now
                if now - stop_seen >= self.cancel_grace:
                    self._end("cancelled", JobStatus.CANCELLED)
                    return
            elif now - self.reporter.last_progress >= self.stall_after:
                self._end("stalled", JobStatus.FAILED)
                return

    def _end(self, why: str, status: JobStatus) -> None:
        reporter = self.reporter
        if not reporter.lease_lost.is_set():
            message = (
                f"no progress for {self.stall_after:g}s (AMID_STALL_AFTER_SECONDS); "
                "its process was ended"
            )
            with_session(
                lambda s: jobs.finish_job(
                    s,
                    reporter.job_id,
                    reporter.worker_id,
                    status,
                    error_code="Stalled" if status == JobStatus.FAILED else None,
                    error_message=message if status == JobStatus.FAILED else None,
                ),
                what=f"record {why} job",
            )
        logger.warning("job %s %s: ending its process %d", reporter.job_id, why, os.getpid())
        if self._stopped.is_set():
            return  # the run ended on its own meanwhile
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(self.cancel_grace)
        os.kill(os.getpid(), signal.SIGKILL)
