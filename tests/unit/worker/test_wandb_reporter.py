"""W&B reporting: what a job's run receives, and a worker configured without the package.

W&B itself (its service and servers) is not what these tests are about: `wandb` is replaced by
the recorder of `tests/conftest.py` (the `wandb_runs` fixture).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from core.callbacks import Callback, EvalReport, RunResult, StepReport
from tests.conftest import RecordedWandbRun
from worker import runner
from worker.wandb_reporter import WandbReporter


def test_a_job_is_one_run_with_its_settings_steps_and_evaluations(
    wandb_runs: list[RecordedWandbRun], tmp_path: Path
) -> None:
    settings = {"preset": "amid", "alpha": -5.0, "lambda": 0.1}
    reporter = WandbReporter("team-distill", "job123", settings, tmp_path / "wandb")
    reporter.on_metrics(0, {"preflight/w_median": 0.4})
    reporter.on_step(StepReport(1, 2, {"train/loss": 2.0}, 0.1, 0.1))
    reporter.on_step(StepReport(2, 2, {"train/loss": 1.5}, 0.2, 0.0))
    reporter.on_eval(EvalReport(2, {"eval/rouge_l": 0.3}))
    reporter.on_end(RunResult("completed", 2, tmp_path / "final", {}, None))

    [run] = wandb_runs
    assert run.init["project"] == "team-distill"
    assert run.init["id"] == run.init["name"] == "job123"
    assert run.init["resume"] == "allow"  # a retried attempt continues the same run
    assert run.init["config"] == settings
    assert (tmp_path / "wandb").is_dir()
    assert run.logged == [
        (1, {"train/loss": 2.0}),
        (2, {"train/loss": 1.5}),
        (2, {"eval/rouge_l": 0.3}),
    ]
    assert run.summary == {"preflight/w_median": 0.4, "status": "completed", "steps_done": 2}
    assert run.finished


class Events(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, Any] | None]] = []

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.seen.append((kind, message, data))


def test_a_worker_configured_without_wandb_says_so_and_trains_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    events = Events()
    callbacks = runner._wandb("team-distill", "job123", {}, tmp_path, events)
    assert callbacks == []
    [(kind, message, data)] = events.seen
    assert kind == "wandb_unavailable"
    assert "pip install wandb" in message and data == {"project": "team-distill"}


def test_a_configured_worker_hands_the_run_its_reporter(
    wandb_runs: list[RecordedWandbRun], tmp_path: Path
) -> None:
    events = Events()
    [callback] = runner._wandb("team-distill", "job123", {"seed": 0}, tmp_path, events)
    assert isinstance(callback, WandbReporter) and events.seen == []
    assert wandb_runs[0].init["dir"] == str(tmp_path / "wandb")
