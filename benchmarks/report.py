"""What the benchmark scripts share: the machine they name, the fresh processes they measure in,
and BENCHMARKS.md, where each rewrites only its own section."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

TITLE = "# Benchmarks"


def run_measurement(module: str, flag: str, payload: dict[str, Any], *, for_memory: bool) -> Any:
    """Runs `python -m <module> <flag> <payload as JSON>` in a fresh process and returns the JSON
    value its last line of output prints.

    `for_memory` pins glibc's mmap threshold low: every large block is then mapped on allocation
    and unmapped on free, so peak RSS follows the bytes actually live rather than what the
    allocator caches. Times are measured without it, with the allocator as a user runs it: the
    pinned threshold turns every large allocation into fresh pages and slows each side by how
    much it allocates.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if for_memory else dict(os.environ)
    out = subprocess.run(
        [sys.executable, "-m", module, flag, json.dumps(payload)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_section(path: Path, name: str, lines: list[str]) -> None:
    """Put `lines` between this section's markers in `path`, leaving the other sections as they are."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = "\n".join([begin, *lines, end])
    text = path.read_text() if path.exists() else f"{TITLE}\n"
    pattern = re.compile(rf"{re.escape(begin)}.*?{re.escape(end)}", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = f"{text.rstrip()}\n\n{block}\n"
    path.write_text(text)


def cpu_model() -> str:
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return model


def load_average() -> str:
    """The 1, 5 and 15-minute load averages: a figure means little without what else ran beside it."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def machine_description(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    model = cpu_model()
    return (
        f"{model}, {torch.get_num_threads()} torch threads "
        f"({len(os.sched_getaffinity(0))} cores), torch {torch.__version__}"
    )
