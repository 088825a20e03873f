"""A job's metrics reported to Weights & Biases, when the worker is configured for it.

With AMID_WANDB_PROJECT set, every job the worker runs is one W&B run in that project, named and
identified by the job id (a retried attempt resumes the same run), its configuration the job's
settings. W&B's own environment (WANDB_API_KEY, WANDB_ENTITY, WANDB_MODE=offline, ...) is read
by W&B itself. The `wandb` package is not a dependency of the worker: installing it is part of
configuring W&B, and a worker configured without it says so in the job's events and trains on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.callbacks import Callback, EvalReport, RunResult, StepReport


class WandbReporter(Callback):
    def __init__(self, project: str, job_id: str, settings: dict[str, Any], log_dir: Path) -> None:
        import wandb

        log_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            id=job_id,
            name=job_id,
            resume="allow",
            config=settings,
            dir=str(log_dir),
        )

    def on_step(self, report: StepReport) -> None:
        self.run.log(report.metrics, step=report.step)

    def on_eval(self, report: EvalReport) -> None:
        self.run.log(report.metrics, step=report.step)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        # One-off measures (the pre-flight, the best step) belong in the run's summary: W&B's
        # history takes steps in order only, and the pre-flight's step 0 comes after the init
        # phase's steps.
        self.run.summary.update(metrics)

    def on_end(self, result: RunResult) -> None:
        self.run.summary.update({"status": result.status, "steps_done": result.steps_done})
        self.run.finish()
