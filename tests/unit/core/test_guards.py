"""The run never ends well with bad numbers, never outruns a stop, and refuses what it can know
before the first step: a stop inside a huge gradient-accumulation step, a loss that goes NaN,
non-finite final weights, a max_length past the models' positions, an eval_size that leaves
nothing to train on."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from core.callbacks import Callback, StepReport
from core.data import DatasetUnreadable
from core.demo import DATA_FILE
from core.guards import NonFiniteLoss, NonFiniteWeights, SequenceTooLong, check_finite_weights
from core.settings import MAX_GRAD_ACCUM_STEPS, DistillSettings
from core.train import TrainingRun, distill
from tests.unit.core.conftest import tiny_gpt2

# A stop asked for during a step of MAX_GRAD_ACCUM_STEPS micro-batches (minutes on a CPU) must
# end the run in about one micro-batch.
STOP_BOUND_SECONDS = 5.0


@pytest.fixture
def pair(save_model: Callable[..., Path]) -> tuple[Path, Path]:
    return save_model("teacher", n_layer=2), save_model("student", n_layer=1, seed=1)


class StopAfterChecks(Callback):
    """Asks to stop from its `checks`-th look on, the way a cancelled job's reporter does."""

    def __init__(self, checks: int) -> None:
        self.checks = checks
        self.looked = 0
        self.asked_at: float | None = None
        self.steps: list[StepReport] = []

    def should_stop(self) -> bool:
        self.looked += 1
        if self.looked >= self.checks and self.asked_at is None:
            self.asked_at = time.monotonic()
        return self.asked_at is not None

    def on_step(self, report: StepReport) -> None:
        self.steps.append(report)


def test_a_stop_inside_a_huge_accumulation_step_ends_the_run_within_the_bound(
    pair: tuple[Path, Path], make_settings: Callable[..., DistillSettings], tmp_path: Path
) -> None:
    settings = make_settings(*pair, grad_accum_steps=MAX_GRAD_ACCUM_STEPS, batch_size=2)
    stopper = StopAfterChecks(checks=3)  # the step boundary, then two micro-batches in
    result = distill(settings, tmp_path / "run", callbacks=[stopper])
    stopped_after = time.monotonic() - (stopper.asked_at or 0.0)
    assert result.status == "stopped"
    assert result.steps_done == 0 and not stopper.steps
    assert stopped_after < STOP_BOUND_SECONDS


def _nan_losses(monkeypatch: pytest.MonkeyPatch, bad: Callable[[int], bool]) -> list[int]:
    """Make the loss of micro-batch n (1-based) NaN where `bad(n)`; returns the calls made."""
    real_loss = TrainingRun._loss
    calls: list[int] = []

    def loss(self: TrainingRun, *args: object, **kwargs: object) -> tuple[torch.Tensor, int]:
        value, count = real_loss(self, *args, **kwargs)  # type: ignore[arg-type]
        calls.append(len(calls) + 1)
        return (value * float("nan") if bad(len(calls)) else value), count

    monkeypatch.setattr(TrainingRun, "_loss", loss)
    return calls


def test_a_loss_that_stays_nan_fails_the_run_after_the_configured_steps(
    pair: tuple[Path, Path],
    make_settings: Callable[..., DistillSettings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _nan_losses(monkeypatch, lambda _: True)
    settings = make_settings(*pair, max_steps=20, max_nonfinite_steps=3, checkpoint_interval=0)
    with pytest.raises(NonFiniteLoss, match="3 steps in a row") as raised:
        distill(settings, tmp_path / "run")
    assert raised.value.field == "max_nonfinite_steps"
    assert len(calls) == 3  # the third bad step ends it, not the twentieth


def test_a_single_non_finite_step_is_skipped_not_applied(
    pair: tuple[Path, Path],
    make_settings: Callable[..., DistillSettings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _nan_losses(monkeypatch, lambda call: call == 2)
    settings = make_settings(*pair, max_steps=3, checkpoint_interval=0)
    result = distill(settings, tmp_path / "run")
    assert result.status == "completed" and result.final_path is not None
    # The NaN step left the weights as they were: the saved student is finite.
    from transformers import AutoModelForCausalLM

    check_finite_weights(AutoModelForCausalLM.from_pretrained(result.final_path))


def test_non_finite_weights_are_refused() -> None:
    model = tiny_gpt2(64)
    check_finite_weights(model)
    with torch.no_grad():
        next(model.parameters()).view(-1)[:3] = float("inf")
    with pytest.raises(NonFiniteWeights, match="3 of the student's"):
        check_finite_weights(model)


def test_max_length_past_the_models_positions_fails_before_any_step(
    pair: tuple[Path, Path], make_settings: Callable[..., DistillSettings], tmp_path: Path
) -> None:
    stopper = StopAfterChecks(checks=10**9)
    settings = make_settings(*pair, max_length=129)  # the tiny models have 128 positions
    with pytest.raises(SequenceTooLong, match="128 positions") as raised:
        distill(settings, tmp_path / "run", callbacks=[stopper])
    assert raised.value.field == "max_length"
    assert stopper.looked == 0


def test_an_eval_size_that_leaves_nothing_to_train_on_fails_before_any_step(
    pair: tuple[Path, Path], make_settings: Callable[..., DistillSettings], tmp_path: Path
) -> None:
    dataset = {"source": str(DATA_FILE), "max_rows": 10, "eval_size": 10}
    settings = make_settings(*pair, dataset=dataset)
    with pytest.raises(DatasetUnreadable, match="eval_size 10 leaves nothing") as raised:
        distill(settings, tmp_path / "run")
    assert raised.value.field == "dataset.eval_size"
