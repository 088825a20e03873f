"""Schedules for α and λ over training: a pure function of the step.

The paper fixes α and λ for a run and leaves α curricula open; a schedule moves a knob from
`start` to `end` over the run's optimizer steps.
"""

from __future__ import annotations

import math
from typing import Literal

ScheduleKind = Literal["constant", "linear", "cosine", "adaptive"]
SCHEDULE_KINDS: tuple[str, ...] = ("constant", "linear", "cosine")
# `adaptive` (α only) is not a function of the step: `core.alpha_control` moves it from what the
# run measures.
ADAPTIVE = "adaptive"


def schedule_value(kind: str, start: float, end: float, step: int, total_steps: int) -> float:
    """The knob's value at optimizer `step` (0-based) of `total_steps`.

    `constant` stays at `start`; `linear` and `cosine` reach `end` at the last step.
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"schedule kind: unknown {kind!r}; expected one of {SCHEDULE_KINDS}")
    if total_steps < 1:
        raise ValueError(f"total_steps: must be at least 1, got {total_steps}")
    if kind == "constant":
        return start
    progress = min(max(step, 0), total_steps - 1) / max(total_steps - 1, 1)
    if kind == "linear":
        return start + (end - start) * progress
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
