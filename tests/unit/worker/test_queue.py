"""The shared Celery app: long-job settings, the embedded filesystem queue, quick failure on a dead broker."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu.exceptions import OperationalError

from store import queue
from store.config import get_config


@pytest.fixture(autouse=True)
def _fresh_app() -> Iterator[None]:
    queue.reset_celery_app()
    yield
    queue.reset_celery_app()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_long_job_settings() -> None:
    conf = queue.get_celery_app().conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_concurrency == 1
    assert conf.worker_max_tasks_per_child == 1
    assert conf.task_ignore_result is True
    assert conf.task_default_queue == "amid-gpu"
    assert conf.broker_transport_options["visibility_timeout"] >= 24 * 3600
    assert conf.broker_connection_max_retries is None  # a worker outlives a Redis outage
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is False


def test_embedded_enqueue_writes_a_message_under_home(tmp_path: Path) -> None:
    queue.enqueue("job-123")
    folder = tmp_path / "amid-home" / "broker" / "queue"
    messages = list(folder.glob("*.amid-gpu.msg"))
    assert len(messages) == 1
    payload = json.loads(messages[0].read_text())
    assert payload["headers"]["task"] == queue.RUN_JOB_TASK
    assert "job-123" in payload["headers"]["argsrepr"]
    assert queue.broker_reachable(1.0)


def test_app_is_rebuilt_after_the_environment_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert queue.get_celery_app().conf.task_default_queue == "amid-gpu"
    monkeypatch.setenv("AMID_QUEUE", "other")
    get_config.cache_clear()
    queue.reset_celery_app()
    assert queue.get_celery_app().conf.task_default_queue == "other"


def test_dead_broker_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMID_BROKER_URL", f"redis://127.0.0.1:{_closed_port()}/0")
    get_config.cache_clear()
    started = time.monotonic()
    assert not queue.broker_reachable(1.0)
    with pytest.raises(OperationalError):
        queue.enqueue("job-123")
    assert time.monotonic() - started < 10
