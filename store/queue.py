"""The Celery app shared by the API (which enqueues) and the GPU workers (which consume).

The message carries only a job id; the database is the source of truth. The API sends the task
by name, so it never imports `worker/` (nor torch). The app is built lazily from `get_config()`;
tests that change the environment call `reset_celery_app()`.

Settings that matter for long GPU jobs (see the design notes): one task at a time per worker
(prefetch 1), a fresh process per job (`worker_max_tasks_per_child=1`, a fresh CUDA context),
`acks_late` together with the DB claim so a lost worker's message comes back and a duplicate
delivery claims nothing, and a broker visibility timeout above the longest job so Redis does not
hand a running job's message to a second worker.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from celery import Celery
from kombu.exceptions import ChannelError

from store.config import ServiceConfig, get_config

logger = logging.getLogger(__name__)

RUN_JOB_TASK = "amid.run_job"

# Redis re-delivers an unacknowledged message after this long. A job may run for days; the DB
# claim makes an early re-delivery harmless, but a late one is what we want.
VISIBILITY_TIMEOUT_SECONDS = 7 * 24 * 3600

# How long `enqueue` may spend on a broker that does not answer before it gives up: the job row
# is already committed as queued, and the reaper sends it again later.
ENQUEUE_MAX_RETRIES = 2
ENQUEUE_RETRY_INTERVAL_SECONDS = 0.5

_app: Celery | None = None


def filesystem_folders(config: ServiceConfig) -> dict[str, Path]:
    """The folders of kombu's filesystem transport under AMID_HOME (created on demand)."""
    root = config.broker_directory
    return {
        "data_folder_in": root / "queue",
        "data_folder_out": root / "queue",
        "processed_folder": root / "processed",
        "control_folder": root / "control",
    }


def celery_settings(config: ServiceConfig) -> dict[str, Any]:
    """The Celery configuration of amid, from the service config."""
    broker_url = config.resolved_broker_url
    transport_options: dict[str, Any] = {"visibility_timeout": VISIBILITY_TIMEOUT_SECONDS}
    if broker_url.startswith("filesystem://"):
        folders = filesystem_folders(config)
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        transport_options.update({name: str(path) for name, path in folders.items()})
        # A consumed message is moved here (not to the shared temp dir) so each home is self-contained.
        transport_options["store_processed"] = True
    return {
        "broker_url": broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        # A worker outlives any Redis outage (Celery's default gives up after 100 tries and the
        # worker exits); the API's sends have their own short retry policy in `enqueue`.
        "broker_connection_max_retries": None,
        "task_default_queue": config.queue,
        "task_routes": {RUN_JOB_TASK: {"queue": config.queue}},
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_ignore_result": True,
        "result_backend": None,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "worker_max_tasks_per_child": 1,
        # A broker that goes away (Redis restarted) must not take a running job with it: the job
        # needs only the DB, and its unackable message is harmless. Celery 6 flips this default.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_hijack_root_logger": False,
        # Liveness is the DB heartbeat; Celery's own chatter between workers adds nothing.
        "worker_enable_remote_control": False,
        "worker_send_task_events": False,
    }


def build_celery_app(config: ServiceConfig | None = None) -> Celery:
    config = config or get_config()
    app = Celery("amid", set_as_current=False)
    app.conf.update(celery_settings(config))
    return app


def get_celery_app() -> Celery:
    """The process's Celery app, built on first use from the current config."""
    global _app  # noqa: PLW0603 - one lazily built app per process, reset by tests
    if _app is None:
        _app = build_celery_app()
    return _app


def reset_celery_app() -> None:
    """Forget the app so the next use rebuilds it from the (changed) environment."""
    global _app  # noqa: PLW0603
    _app = None


def enqueue(job_id: str) -> None:
    """Send "run job X" to the GPU queue; raises quickly (kombu's OperationalError) if the broker is down."""
    app = get_celery_app()
    app.send_task(
        RUN_JOB_TASK,
        args=[job_id],
        queue=app.conf.task_default_queue,
        retry=True,
        retry_policy={
            "max_retries": ENQUEUE_MAX_RETRIES,
            "interval_start": 0,
            "interval_step": ENQUEUE_RETRY_INTERVAL_SECONDS,
            "interval_max": ENQUEUE_RETRY_INTERVAL_SECONDS,
        },
    )


def broker_reachable(timeout: float = 2.0) -> bool:
    """Whether the broker answers within `timeout` seconds (for the API's readiness probe)."""
    app = get_celery_app()
    try:
        with app.connection_for_write(connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=0, interval_start=0, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"; the reason is logged
        logger.warning("broker unreachable: %s", exc)
        return False
    return True


def queue_is_empty(timeout: float = 2.0) -> bool:
    """Whether no message waits in the GPU queue (messages a worker has taken do not count).

    The reaper's test for lost messages; a broker that cannot be asked counts as not empty, so
    nothing is re-sent on a guess.
    """
    app = get_celery_app()
    try:
        with app.connection_for_write(connect_timeout=timeout) as conn, conn.channel() as channel:
            _, waiting, _ = channel.queue_declare(app.conf.task_default_queue, passive=True)
    except ChannelError:
        return True  # Redis drops the key of an empty list: no queue is an empty queue
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot tell"; the reason is logged
        logger.warning("broker queue length unknown: %s", exc)
        return False
    return int(waiting) == 0
