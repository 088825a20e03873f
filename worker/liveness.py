"""Liveness files for container health checks.

A long-running process (the worker's main loop, the reaper's loop) touches its file each time its
own loop turns; `amid worker --check` / `amid reaper --check`, run by the health check in the same
container, reads how old the file is. A process that is still there but stuck (a wedged event
loop, a pass that never returns) goes unhealthy, which a check of the process table would miss.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import bootsteps


def default_path(role: str) -> Path:
    """Per container, not per volume: each process checks its own file."""
    return Path(tempfile.gettempdir()) / f"amid-{role}.alive"


def touch(path: Path) -> None:
    path.touch()


def problem(path: Path, max_age_seconds: float) -> str | None:
    """Why the process writing `path` is unhealthy, or None if it touched it in time."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return f"{path} does not exist (the loop has not started)"
    if age > max_age_seconds:
        return f"the loop last turned {age:.0f}s ago (limit {max_age_seconds:.0f}s)"
    return None


def consumer_step(path: Path, interval_seconds: float) -> type[bootsteps.StartStopStep]:
    """A Celery consumer step that touches `path` every `interval_seconds` from the consumer's
    timer, which fires only while the worker's main loop (the one taking messages) turns."""
    # Here, not at the top: `amid worker --check` runs every few seconds and needs no Celery.
    from celery import bootsteps

    class TouchLivenessFile(bootsteps.StartStopStep):
        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.entry: Any = None

        def start(self, parent: Any) -> None:
            touch(path)
            self.entry = parent.timer.call_repeatedly(interval_seconds, touch, (path,))

        def stop(self, parent: Any) -> None:
            if self.entry is not None:
                self.entry.cancel()
                self.entry = None

    return TouchLivenessFile
