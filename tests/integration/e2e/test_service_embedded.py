"""The embedded default end to end: `amid serve` with no URLs (SQLite, filesystem queue, local
artifacts), one job over HTTP, and every process it started gone after SIGTERM."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from store.artifacts import ArtifactStore
from tests.integration.e2e._service import (
    Client,
    base_env,
    free_port,
    job_body,
    make_key,
    start,
    stop,
    wait_ready,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (Linux /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_amid_serve_runs_a_job_and_stops_everything(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from store.db import upgrade

    home = tmp_path / "home"
    env = base_env(home)
    database_url = f"sqlite:///{(home / 'amid.db').resolve()}"
    home.mkdir()
    upgrade(database_url)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start(["cli.main", "serve", "--port", str(port)], env, tmp_path / "serve.log")
    client = Client(url, make_key(database_url))
    try:
        wait_ready(url, [server])
        job_id = client.submit(job_body()).json()["id"]
        job = client.wait_status(job_id, {"succeeded", "failed", "cancelled"}, 120)
        assert job["status"] == "succeeded", job

        assert job["student_uri"].startswith((home / "artifacts").resolve().as_uri())
        local = ArtifactStore(job["student_uri"]).download_dir(job["student_uri"], tmp_path / "s")
        AutoModelForCausalLM.from_pretrained(local)
        assert client.items(job_id, "metrics")
        assert client.items(job_id, "events")
        assert client.items(job_id, "checkpoints")
        # The embedded queue lives under AMID_HOME, nowhere else.
        assert any((home / "broker").rglob("*.msg"))

        children = _descendants(server.pid)
        assert children, "amid serve started no worker"
        os.kill(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        assert not [pid for pid in children if _alive(pid)], "amid serve left processes behind"
    finally:
        client.close()
        stop(server)
