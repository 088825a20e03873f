"""The job process's watchdog ends a run that does not stop when told to (terminate, then kill)
and a run that makes no progress, in a real process of its own."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

# A job process whose run neither stops nor makes progress. The lease is marked lost, so the
# watchdog records nothing in a database and only ends the process.
SCRIPT = """
import signal, sys, threading, time, types
from worker.watchdog import Watchdog
if sys.argv[1] == "deaf":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a run that does not even end on SIGTERM
lease_lost = threading.Event()
lease_lost.set()
reporter = types.SimpleNamespace(
    job_id="job", worker_id="worker", lease_lost=lease_lost,
    should_stop=lambda: sys.argv[2] == "cancelled", last_progress=time.monotonic(),
)
Watchdog(reporter, cancel_grace_seconds=0.3, stall_after_seconds=1.0).start()
time.sleep(60)
"""


def _run(*args: str) -> tuple[int, float]:
    started = time.monotonic()
    process = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], cwd=REPO, timeout=30, check=False
    )
    return process.returncode, time.monotonic() - started


def test_a_cancelled_run_is_terminated_after_the_grace() -> None:
    code, took = _run("plain", "cancelled")
    assert code == -signal.SIGTERM
    assert took < 10


def test_a_run_deaf_to_sigterm_is_killed() -> None:
    code, took = _run("deaf", "cancelled")
    assert code == -signal.SIGKILL
    assert took < 10


def test_a_run_without_progress_is_ended_as_stalled() -> None:
    code, took = _run("plain", "running")
    assert code == -signal.SIGTERM
    assert took < 10
