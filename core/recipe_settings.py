"""Settings of the paper's training recipe around the loss: an SFT phase before distilling,
student-generated outputs, a language-modelling term, best-checkpoint selection and how
evaluation samples.

Torch-free like `core.settings`, which embeds these models as fields of `DistillSettings`.
Defaults follow the official AMiD / DistiLLM runs where they have one.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(ge=1)]
RunKind = Literal["distill", "sft"]
# The metrics a run can select its final student by; loss-like ones are minimised.
SELECTABLE_METRICS: tuple[str, ...] = (
    "eval/rouge_l",
    "eval/rouge_l_greedy",
    "eval/exact_match",
    "eval/loss",
    "eval/teacher_kl",
)
MINIMISED_METRICS = frozenset({"eval/loss", "eval/teacher_kl"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class InitSettings(_Strict):
    """Fine-tune the student on the reference responses before distilling (the paper's SFT)."""

    sft_steps: PositiveInt = Field(description="Cross-entropy steps before the distillation.")
    learning_rate: float = Field(
        description="Peak learning rate of the SFT phase (cosine decay over its steps).", gt=0
    )


class StudentOutputSettings(_Strict):
    """Train on responses the student samples itself, scored by the teacher (DistiLLM's SGO)."""

    fraction: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description=(
            "Share of micro-batches whose responses the student samples (with `adaptive`: the "
            "starting share)."
        ),
    )
    adaptive: bool = Field(
        False,
        description=(
            "DistiLLM's adaptive schedule: the share rises by `increment` whenever the eval loss "
            "rises by at least `loss_eps` from one evaluation to the next."
        ),
    )
    increment: float = Field(0.1, gt=0, le=1, description="Step of the adaptive share.")
    loss_eps: float = Field(0.1, ge=0, description="Eval-loss rise that raises the share.")
    buffer_size: PositiveInt = Field(
        1000, description="Replay buffer capacity (generated sequences kept and re-drawn)."
    )
    max_new_tokens: PositiveInt | None = Field(
        None, description="Tokens sampled per response (default: up to max_length)."
    )


class EvalSettings(_Strict):
    """How evaluation measures the student beyond the run's `generation` settings."""

    sample_seeds: PositiveInt = Field(
        1,
        description=(
            "Sampling seeds eval/rouge_l averages over (the paper: 5); eval/rouge_l_sd is their "
            "standard deviation."
        ),
    )
    greedy: bool = Field(
        False, description="Also decode greedily: eval/rouge_l_greedy and eval/exact_match_greedy."
    )
    teacher_kl: bool = Field(
        True, description="Also measure KL(p‖q) per response token: eval/teacher_kl."
    )
