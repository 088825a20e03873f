"""The `--check` of `amid worker` and `amid reaper`: a container health check's exit status."""

from __future__ import annotations

from pathlib import Path

from worker import liveness


def run_check(liveness_file: Path, max_age_seconds: float) -> int:
    problem = liveness.problem(liveness_file, max_age_seconds)
    print(f"unhealthy: {problem}" if problem else "healthy")
    return 1 if problem else 0
