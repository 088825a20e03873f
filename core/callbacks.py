"""How a distillation run talks to whoever runs it (the CLI's progress bar, the worker's DB writer).

`core.train.distill` calls these hooks in order; a hook never changes the training math. The
run stops cleanly at the next step boundary once any callback's `should_stop()` is true (that is
how the service cancels a job). Torch-free, so the worker's reporter imports it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunInfo:
    total_steps: int
    start_step: int  # > 0 when resumed from a checkpoint
    train_examples: int
    eval_examples: int
    device: str


@dataclass(frozen=True)
class StepReport:
    step: int  # optimizer steps done, 1-based
    total_steps: int
    metrics: dict[
        str, float
    ]  # train/loss, train/lr, train/grad_norm, train/tokens_per_s, alpha, lambda
    elapsed_seconds: float
    eta_seconds: float | None


@dataclass(frozen=True)
class EvalReport:
    step: int
    metrics: dict[str, float]  # eval/rouge_l, eval/loss, ...
    samples: list[dict[str, str]] = field(default_factory=list)  # prompt, reference, generated


@dataclass(frozen=True)
class CheckpointReport:
    step: int
    path: Path  # a complete checkpoint directory: weights, tokenizer, training state, settings
    metrics: dict[str, float]
    is_best: bool  # best eval/rouge_l (or the run's select_best metric) so far


@dataclass(frozen=True)
class SweepStudent:
    """One student of a completed sweep, where it ranks among the others."""

    index: int  # its place in the job's `sweep` list
    knobs: dict[str, Any]  # its sweep entry, as the user wrote it
    final_path: Path  # its final student directory
    metrics: dict[str, float]  # its last train and eval metrics
    score: float | None  # its value of the ranking metric (None: never measured)
    rank: int  # 1 is the best


@dataclass(frozen=True)
class RunResult:
    status: str  # "completed" or "stopped" (a callback asked to stop)
    steps_done: int
    final_path: Path | None  # the final student directory (None when stopped early)
    final_metrics: dict[str, float]
    best_step: int | None
    # A completed sweep: every student, best first (final_path is the first one's), ranked by
    # `rank_metric`.
    students: tuple[SweepStudent, ...] = ()
    rank_metric: str | None = None


class Callback:
    """Base with no-op hooks; subclasses override what they need."""

    def on_start(self, info: RunInfo) -> None:
        """Called once, after models and data are loaded, before the first step."""

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        """A notable moment (data loaded, rows skipped, vocabulary truncated, resumed, ...)."""

    def on_step(self, report: StepReport) -> None:
        """After every optimizer step."""

    def on_eval(self, report: EvalReport) -> None:
        """After every evaluation."""

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Measures taken outside a step or an evaluation (the pre-flight, the best step)."""

    def on_checkpoint(self, report: CheckpointReport) -> None:
        """After a checkpoint directory is completely written."""

    def should_stop(self) -> bool:
        """Checked at every step boundary; True stops the run there."""
        return False

    def on_end(self, result: RunResult) -> None:
        """Called once at the end, also after a stop."""
