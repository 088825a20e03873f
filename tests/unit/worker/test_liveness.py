"""The liveness files behind the worker's and the reaper's container health checks."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from cli.main import main
from worker import liveness
from worker.reaper import run_forever


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_missing_fresh_and_stale_files(tmp_path: Path) -> None:
    alive = tmp_path / "alive"
    assert "does not exist" in (liveness.problem(alive, 60) or "")
    liveness.touch(alive)
    assert liveness.problem(alive, 60) is None
    _age(alive, 90)
    assert "last turned 90s ago (limit 60s)" in (liveness.problem(alive, 60) or "")


def test_worker_check_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    alive = tmp_path / "worker.alive"
    argv = ["worker", "--check", "--liveness-file", str(alive)]
    assert main(argv) == 1
    liveness.touch(alive)
    assert main(argv) == 0
    _age(alive, 61)
    assert main(argv) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"unhealthy: {alive} does not exist (the loop has not started)",
        "healthy",
        "unhealthy: the loop last turned 61s ago (limit 60s)",
    ]


def test_reaper_check_allows_three_intervals(tmp_path: Path) -> None:
    alive = tmp_path / "reaper.alive"
    liveness.touch(alive)
    _age(alive, 200)
    argv = ["reaper", "--check", "--liveness-file", str(alive)]
    assert main([*argv, "--interval", "100"]) == 0
    assert main([*argv, "--interval", "60"]) == 1
    # Short intervals still get 30 s: one slow pass must not mark the reaper unhealthy.
    _age(alive, 25)
    assert main([*argv, "--interval", "1"]) == 0


def test_each_turn_of_the_reaper_loop_touches_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alive = tmp_path / "reaper.alive"
    passes: list[float] = []
    stop = threading.Event()

    def sweep() -> dict[str, list[str]]:
        passes.append(alive.stat().st_mtime)
        if len(passes) == 3:
            stop.set()
        raise RuntimeError("the database is down")  # a failed pass still turns the loop

    monkeypatch.setattr("worker.reaper.sweep", sweep)
    run_forever(stop, interval=0.05, liveness_file=alive)
    assert len(passes) == 3
    assert passes == sorted(passes)
    assert liveness.problem(alive, 5) is None
