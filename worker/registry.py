"""This worker's place in the pool: it registers once it consumes, reports its state and current
job every `AMID_HEARTBEAT_SECONDS`, and drains when an admin asks (see `store.workers`).

All of it lives in the worker's long-lived main process: a thread started on Celery's
`worker_ready` signal and stopped on `worker_shutdown`. Job processes are forked from this
process while the thread runs; `store.db` makes engines fork-safe, so a job never touches the
thread's connections, and the thread never imports torch (`worker.gpu` asks torch in a process
of its own).

Draining is enforced where messages are handled, on the consumer's own thread: once `draining` is
set, the next message is handed back to the queue unacknowledged (`worker.tasks`) and this
worker stops consuming, so the pool's other workers get every job it does not run.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from importlib.metadata import version
from typing import Any, TypeVar

from celery.signals import worker_ready, worker_shutdown
from celery.worker import state as celery_state
from celery.worker.consumer import Consumer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from store import workers
from store.config import get_config
from store.db import session_scope
from worker.gpu import describe_gpu

logger = logging.getLogger(__name__)

# Set once this worker has read a drain request; it runs no job after that.
draining = threading.Event()
LEAVE_TIMEOUT_SECONDS = 10.0

T = TypeVar("T")


def worker_id(pid: int | None = None) -> str:
    """`host:pid:gpuN`: the main process's pid names the worker in the pool, a job process's pid
    the lease it claims jobs under."""
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "-")
    return f"{socket.gethostname()}:{pid or os.getpid()}:gpu{gpu}"


class PoolMember(threading.Thread):
    def __init__(self, consumer: Consumer, interval: float) -> None:
        super().__init__(name="pool-member", daemon=True)
        self.consumer = consumer
        self.interval = interval
        self.worker_id = worker_id()
        self._stopped = threading.Event()

    def run(self) -> None:
        gpu = describe_gpu()
        me = workers.WorkerIdentity(
            id=self.worker_id,
            host=socket.gethostname(),
            gpu_name=gpu.name,
            gpu_memory_bytes=gpu.memory_bytes,
            version=version("amid"),
        )
        registered = False
        while True:
            try:
                if not registered:
                    self._write(lambda s: workers.register(s, me))
                    registered = True
                    logger.info("joined the pool as %s (%s)", me.id, me.gpu_name)
                registered = self._beat()
            except SQLAlchemyError as exc:
                # A missed report is only a late one: the next tries again (a worker silent past
                # the stale threshold shows as offline meanwhile).
                logger.warning("pool heartbeat failed: %s", exc)
            if self._stopped.wait(self.interval):
                return

    def _beat(self) -> bool:
        """One report; False when the row is gone and the worker must register again."""
        # The requests handed to the pool, and the job processes running them (their pids).
        active = list(celery_state.active_requests)
        leases = [worker_id(request.worker_pid) for request in active if request.worker_pid]
        settled = draining.is_set() and not active and not celery_state.reserved_requests
        drain = self._write(
            lambda s: workers.heartbeat(s, self.worker_id, job_leases=leases, settled=settled)
        )
        if drain and not draining.is_set():
            logger.warning("drain requested: finishing the current job and taking no other")
            draining.set()
        return drain is not None

    @staticmethod
    def _write(work: Callable[[Session], T]) -> T:
        # Not worker.db_retry's retries: a report that fails is simply followed by the next one.
        with session_scope() as session:
            return work(session)

    def leave(self) -> None:
        self._stopped.set()
        self.join(LEAVE_TIMEOUT_SECONDS)
        try:
            self._write(lambda s: workers.leave(s, self.worker_id))
        except SQLAlchemyError as exc:
            logger.warning(
                "could not mark %s offline (%s); it shows so once stale", self.worker_id, exc
            )


_member: PoolMember | None = None


@worker_ready.connect
def _join_pool(sender: Consumer, **_: Any) -> None:
    global _member  # noqa: PLW0603 - one member per worker process, started once it consumes
    _member = PoolMember(sender, get_config().heartbeat_seconds)
    _member.start()


@worker_shutdown.connect
def _leave_pool(**_: Any) -> None:
    if _member is not None:
        _member.leave()


def stop_consuming() -> None:
    """Cancel this worker's queues (called on the consumer's thread, where Celery's consumer may
    be changed): a draining worker takes no more messages, so other workers get them."""
    if _member is None or _member.consumer.task_consumer is None:
        return
    for queue in list(_member.consumer.task_consumer.queues):
        _member.consumer.cancel_task_queue(queue.name)
