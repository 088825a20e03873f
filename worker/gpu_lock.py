"""`amid worker --gpu auto`: each worker of a box takes a GPU index no other worker holds.

Every worker container sees all the box's GPUs; the first free index wins, held by an exclusive
lock on a file per index in a directory all the box's workers share (AMID_HOME, a volume in
compose). The lock goes when the worker's process does, whatever way it ends, so a restarted
worker takes the index back. `--scale worker=N` then needs no per-GPU configuration.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class NoFreeGPU(RuntimeError):
    pass


def visible_count() -> int:
    """GPUs this process can see, counted by nvidia-smi (never by CUDA: the worker's main
    process must not initialise it)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise NoFreeGPU("--gpu auto counts the GPUs with nvidia-smi, which is not on the PATH")
    listing = subprocess.run([smi, "--list-gpus"], check=True, capture_output=True, text=True)
    return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())


@contextmanager
def claimed_gpu(lock_dir: Path, count: int) -> Iterator[int]:
    """Hold the lowest of GPU indices 0..count-1 that no other process holds, for the block."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        with (lock_dir / f"gpu{index}.lock").open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            yield index
            return
    raise NoFreeGPU(
        f"all {count} GPUs are held by other workers sharing {lock_dir}: "
        "run at most one worker per GPU"
    )
