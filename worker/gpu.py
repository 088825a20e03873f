"""Which GPU a worker's jobs will see: its name and memory, as torch reports them.

The worker's main process must never initialise CUDA (its job processes are forked from it, and a
forked CUDA context is unusable), so torch is asked in a process of its own: `python -m
worker.gpu` prints the answer as JSON. It sees the same CUDA_VISIBLE_DEVICES as the jobs.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CPU = "cpu"
# The NVIDIA driver's control device: without it torch finds no CUDA device either, and the
# probe (seconds of importing torch) is skipped.
NVIDIA_CONTROL_DEVICE = Path("/dev/nvidiactl")
PROBE_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class GpuInfo:
    name: str  # "cpu" when no CUDA device is visible
    memory_bytes: int | None


def torch_gpu() -> GpuInfo:
    """The first visible CUDA device, asked of torch in this process (initialises CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return GpuInfo(CPU, None)
    properties = torch.cuda.get_device_properties(0)
    return GpuInfo(properties.name, int(properties.total_memory))


def describe_gpu() -> GpuInfo:
    """This worker's GPU, asked of torch in a child process; "cpu" when there is none, or when
    the probe fails (logged: the pool then shows the worker as a CPU one)."""
    if not NVIDIA_CONTROL_DEVICE.exists():
        return GpuInfo(CPU, None)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "worker.gpu"],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_SECONDS,
            check=True,
        )
        answer = json.loads(done.stdout)
        return GpuInfo(str(answer["name"]), answer["memory_bytes"])
    except (subprocess.SubprocessError, OSError, ValueError, KeyError) as exc:
        logger.warning("could not ask torch for this worker's GPU (%s); reporting it as cpu", exc)
        return GpuInfo(CPU, None)


if __name__ == "__main__":
    sys.stdout.write(json.dumps(asdict(torch_gpu())) + "\n")
