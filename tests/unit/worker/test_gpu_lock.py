"""`--gpu auto`: one GPU index per worker, held by a file lock that dies with the process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worker.gpu_lock import NoFreeGPU, claimed_gpu, visible_count

HOLD_ONE = """
import sys, time
from pathlib import Path
from worker.gpu_lock import claimed_gpu
with claimed_gpu(Path(sys.argv[1]), int(sys.argv[2])) as index:
    print(index, flush=True)
    time.sleep(60)
"""


def _hold(lock_dir: Path, count: int) -> tuple[subprocess.Popen[str], int]:
    """Another worker's process holding a GPU, and the index it took."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_ONE, str(lock_dir), str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    return process, int(process.stdout.readline())


def test_workers_take_distinct_indices_and_a_dead_ones_comes_back(tmp_path: Path) -> None:
    locks = tmp_path / "gpu-locks"
    first, first_index = _hold(locks, 2)
    try:
        assert first_index == 0
        with claimed_gpu(locks, 2) as index:
            assert index == 1
            with pytest.raises(NoFreeGPU, match="all 2 GPUs are held"), claimed_gpu(locks, 2):
                pass
        first.kill()
        first.communicate(timeout=10)
        with claimed_gpu(locks, 2) as index:
            assert index == 0
    finally:
        first.kill()
        first.communicate(timeout=10)


def test_gpus_are_counted_by_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        '[ "$1" = --list-gpus ] || exit 2\n'
        'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0a)"\n'
        'echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1b)"\n'
    )
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert visible_count() == 2
    smi.unlink()
    with pytest.raises(NoFreeGPU, match="nvidia-smi, which is not on the PATH"):
        visible_count()
