"""`amid worker --gpu auto` as compose runs it: replicas that share AMID_HOME and see the same
GPUs each take their own index, and a replica beyond the GPUs refuses to start."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.integration.e2e._service import base_env, start, stop, wait_for
from worker import liveness

FAKE_SMI = """#!/bin/sh
echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0a)"
echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1b)"
"""


def _gpu_of(log: Path) -> str:
    """The GPU a worker named itself after, from Celery's "amid-gpuN@host ready." line."""
    found = re.search(r"amid-(gpu\d+)@\S+ ready\.", log.read_text())
    assert found, log.read_text()[-2000:]
    return found.group(1)


def test_replicas_take_distinct_gpus_and_report_their_liveness(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = base_env(tmp_path / "home")  # a filesystem queue under the shared AMID_HOME
    env["PATH"] = f"{bin_dir}:{env['PATH']}"

    def worker(name: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
        log, alive = tmp_path / f"{name}.log", tmp_path / f"{name}.alive"
        argv = ["cli.main", "worker", "--gpu", "auto", "--liveness-file", str(alive)]
        return start(argv, env, log), log, alive

    started = [worker("first"), worker("second")]
    try:
        for process, log, alive in started:
            wait_for(lambda log=log: " ready." in log.read_text(), 60, f"{log.name} ready")
            assert process.poll() is None
            assert liveness.problem(alive, 60) is None
        assert sorted(_gpu_of(log) for _, log, _ in started) == ["gpu0", "gpu1"]

        extra, extra_log, extra_alive = worker("third")
        assert extra.wait(timeout=60) != 0
        assert "all 2 GPUs are held by other workers" in extra_log.read_text()
        assert not extra_alive.exists()

        # A replica that dies gives its GPU back to the next one to start.
        holder = next(process for process, log, _ in started if _gpu_of(log) == "gpu0")
        stop(holder)
        again, again_log, _ = worker("again")
        started.append((again, again_log, tmp_path / "again.alive"))
        wait_for(lambda: " ready." in again_log.read_text(), 60, "the restarted worker ready")
        assert _gpu_of(again_log) == "gpu0"
    finally:
        for process, _, _ in started:
            stop(process)
