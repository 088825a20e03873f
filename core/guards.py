"""Checks that stop a run from ending well with bad numbers or from running past a stop request.

- `NonFiniteWatch`: a step whose loss or gradient norm is not finite is skipped (its update
  would turn every weight into NaN); `max_nonfinite_steps` of them in a row fail the run with
  `NonFiniteLoss`.
- `check_finite_weights`: the final student is refused (`NonFiniteWeights`) if any weight is
  NaN or infinite, so a job never succeeds with a broken model.
- `check_positions`: `max_length` must fit the models' position embeddings, checked right after
  the models load, before any step.
- `StopRequested`: raised inside a step (between micro-batches, between evaluation batches) once
  a callback asks to stop, so a stop never waits for a whole step of a huge `grad_accum_steps`.
"""

from __future__ import annotations

import math

import torch

from core.errors import AmidError
from core.settings import DistillSettings


class NonFiniteLoss(AmidError):
    status_code = 422


class NonFiniteWeights(AmidError):
    status_code = 422


class SequenceTooLong(AmidError):
    status_code = 422


class StopRequested(Exception):
    """A callback asked the run to stop; the run ends as "stopped" where this is caught."""


class NonFiniteWatch:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0

    def step_is_finite(self, step: int, loss: float, grad_norm: float) -> bool:
        """Whether the step may update the weights; raises after `limit` bad steps in a row."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteLoss(
                f"the loss or its gradient was not finite for {self.in_a_row} steps in a row "
                f"(up to step {step + 1}; loss {loss}, gradient norm {grad_norm}); lower "
                "learning_rate, alpha or ce_weight",
                field="max_nonfinite_steps",
            )
        return False


def check_finite_weights(model: torch.nn.Module) -> None:
    bad = sum(int((~torch.isfinite(p)).sum()) for p in model.parameters())
    if bad:
        total = sum(p.numel() for p in model.parameters())
        raise NonFiniteWeights(
            f"{bad} of the student's {total} weights are not finite; the student is not saved"
        )


def _positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None  # no learned positions (rotary models read any length)


def check_positions(settings: DistillSettings, *models: torch.nn.Module) -> None:
    limits = [n for n in (_positions(model) for model in models) if n is not None]
    if not limits:
        return
    limit = min(limits)
    if settings.max_length > limit:
        raise SequenceTooLong(
            f"max_length {settings.max_length} exceeds the {limit} positions of the models",
            field="max_length",
        )
