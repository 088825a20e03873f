"""Starting and stopping the real service processes for end-to-end tests, always bounded in time."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.orm import Session

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "core" / "demo"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def base_env(home: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AMID_") and k not in {"CUDA_VISIBLE_DEVICES"}
    }
    env.update(
        {
            "AMID_HOME": str(home),
            "AMID_MODEL_ROOTS": str(DEMO),
            "AMID_DATA_ROOTS": str(DEMO),
            "AMID_HEARTBEAT_SECONDS": "1",
            "AMID_STALE_AFTER_SECONDS": "60",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", *argv],
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a group of its own: stopping it stops its children
        )
    finally:
        handle.close()


def stop(process: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    # Whatever is left of the group (a training child, say) goes too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait(timeout=grace)


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_ready(url: str, processes: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    def ready() -> bool:
        for process in processes:
            if process.poll() is not None:
                raise AssertionError(f"{process.args} exited with {process.returncode}")
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout, "the API to be ready")


def make_key(database_url: str, *, is_admin: bool = False) -> str:
    from store.db import make_engine
    from store.keys import create_api_key

    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            _, secret = create_api_key(session, "e2e", is_admin=is_admin)
            session.commit()
    finally:
        engine.dispose()
    return secret


def job_body(**overrides: Any) -> dict[str, Any]:
    """The demo distillation, shrunk to seconds on a CPU."""
    body: dict[str, Any] = {
        "teacher": str(DEMO / "assets" / "teacher"),
        "student": str(DEMO / "assets" / "student"),
        "dataset": {
            "source": str(DEMO / "data" / "demo.jsonl"),
            "format": "dolly",
            "eval_size": 8,
            "max_rows": 200,
        },
        "preset": "amid",
        "ce_weight": 0.5,
        "max_steps": 4,
        "batch_size": 4,
        "learning_rate": 3e-3,
        "max_prompt_length": 64,
        "max_length": 96,
        "checkpoint_interval": 2,
        "eval_max_samples": 4,
        "generation": {"max_new_tokens": 8, "do_sample": False},
    }
    body.update(overrides)
    return body


class Client:
    def __init__(self, url: str, key: str) -> None:
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> httpx.Response:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = self.http.post("/v1/jobs", json=body, headers=headers)
        assert response.status_code in (200, 201), response.text
        return response

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def items(self, job_id: str, what: str) -> list[dict[str, Any]]:
        response = self.http.get(f"/v1/jobs/{job_id}/{what}")
        assert response.status_code == 200, response.text
        result: list[dict[str, Any]] = response.json()["items"]
        return result

    def wait_status(self, job_id: str, statuses: set[str], timeout: float) -> dict[str, Any]:
        job: dict[str, Any] = wait_for(
            lambda: (j := self.job(job_id))["status"] in statuses and j,
            timeout,
            f"job {job_id} to reach {statuses}",
            interval=0.5,
        )
        return job

    def close(self) -> None:
        self.http.close()
