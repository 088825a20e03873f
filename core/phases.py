"""The phases of one run: what each optimizer step trains, and its learning rate.

A distillation is one phase; with `init`, a supervised fine-tuning phase (cross-entropy on the
reference responses, the paper's SFT) comes first, with its own learning rate and cosine decay,
in the same loop and the same job. A `kind: sft` run is that fine-tuning phase alone. Steps are
counted across phases: step n of the run is step n − first_step of its phase.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from core.settings import DistillSettings

Objective = Literal["cross_entropy", "distill"]


@dataclass(frozen=True)
class Phase:
    name: str  # "sft", "init" or "distill": the phase_started events name it
    objective: Objective
    first_step: int
    steps: int
    learning_rate: float
    metric_prefix: str  # "init" for an init phase (its own series), "train" otherwise

    @property
    def end_step(self) -> int:
        return self.first_step + self.steps


def plan_phases(settings: DistillSettings, main_steps: int) -> list[Phase]:
    """The run's phases in order; `main_steps` are those of the distillation (or SFT run)."""
    if settings.kind == "sft":
        return [Phase("sft", "cross_entropy", 0, main_steps, settings.learning_rate, "train")]
    phases: list[Phase] = []
    if settings.init is not None:
        init = settings.init
        phases.append(Phase("init", "cross_entropy", 0, init.sft_steps, init.learning_rate, "init"))
    start = phases[-1].end_step if phases else 0
    phases.append(Phase("distill", "distill", start, main_steps, settings.learning_rate, "train"))
    return phases


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase that optimizer step `step` (0-based) belongs to (the last one past the end)."""
    for phase in phases:
        if step < phase.end_step:
            return phase
    return phases[-1]


def lr_shape(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warmup, then constant, linear or cosine decay over the rest of `total_steps`."""
    warmup = min(warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min((step - warmup) / decay_steps, 1.0)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def lr_factor(phases: list[Phase], settings: DistillSettings) -> Callable[[int], float]:
    """The LambdaLR factor over the whole run (the optimizer's base rate: settings' rate).

    The main phase follows the settings' warmup and schedule; an init phase warms up over the
    same number of steps (at most a tenth of its own) and decays by cosine, like the paper's SFT.
    """
    shapes = []
    for phase in phases:
        if phase.metric_prefix == "init":
            shape = lr_shape("cosine", min(settings.warmup_steps, phase.steps // 10), phase.steps)
        else:
            shape = lr_shape(settings.lr_schedule, settings.warmup_steps, phase.steps)
        shapes.append((phase, shape, phase.learning_rate / settings.learning_rate))

    def factor(step: int) -> float:
        phase, shape, scale = shapes[phases.index(phase_at(phases, step))]
        return scale * shape(step - phase.first_step)

    return factor
