"""Named loss settings that reproduce earlier distillation methods through `amid_loss`.

A preset is data: the AMiD knobs that make the assistant mixture collapse to the method it
names. Torch-free, so the API can validate preset names without the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Divergence = Literal["kl", "rkl", "ab", "js", "tvd"]
Anchor = Literal["teacher", "student"]

# The closed registry of divergence names; `core.losses.DIVERGENCE_FUNCTIONS` has the same keys.
DIVERGENCES: tuple[str, ...] = ("kl", "rkl", "ab", "js", "tvd")
ANCHORS: tuple[str, ...] = ("teacher", "student")

# Tokens per chunk inside `amid_loss`. Peak extra memory is about six [chunk × V] fp32 tensors
# plus the gradient buffer; 128 keeps it 6× below a dense loss at 2,048 tokens × 50,257 with no
# loss of speed on CPU (BENCHMARKS.md), where 1,024 gave only 2×.
DEFAULT_LOSS_CHUNK_SIZE = 128


@dataclass(frozen=True)
class LossPreset:
    alpha: float
    lam: float
    divergence: Divergence
    anchor: Anchor = "teacher"
    ab_alpha: float = 0.2
    ab_beta: float = 0.7
    description: str = ""
    # When set, α starts here and moves to `alpha` as the student earns it (an adaptive schedule).
    adaptive_alpha_start: float | None = None
    # A run of this preset refuses a student the pre-flight finds too far from the teacher.
    refuses_far_student: bool = False

    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `core.losses.amid_loss` that this preset fixes."""
        return {
            "alpha": self.alpha,
            "lam": self.lam,
            "divergence": self.divergence,
            "anchor": self.anchor,
            "ab_alpha": self.ab_alpha,
            "ab_beta": self.ab_beta,
        }


PRESETS: dict[str, LossPreset] = {
    # λ = 0 makes r = q for every α, so α is irrelevant there; 0.0 is a neutral value.
    "kd": LossPreset(0.0, 0.0, "kl", description="plain KD: KL(p‖q)"),
    "rkl": LossPreset(0.0, 0.0, "rkl", description="reverse KL: KL(q‖p)"),
    "abkd": LossPreset(0.0, 0.0, "ab", description="ABKD: D_AB^(0.2,0.7)(p‖q)"),
    # α = −1 gives c = 1, the arithmetic mixture r = λp + (1−λ)q: DistiLLM's skew divergences.
    "skl": LossPreset(-1.0, 0.1, "kl", "teacher", description="DistiLLM skew KL: KL(p‖0.1p+0.9q)"),
    "srkl": LossPreset(
        -1.0, 0.9, "kl", "student", description="DistiLLM skew reverse KL: KL(q‖0.9p+0.1q)"
    ),
    # The paper's strongest setting on GPT-2 / Dolly.
    "amid": LossPreset(-5.0, 0.1, "ab", "teacher", description="AMiD: α=−5, λ=0.1, D_AB^(0.2,0.7)"),
    # The paper's setting with α moved by the student's progress: α starts at 0.5, where a
    # student far from the teacher still gets gradient, and reaches −5 as w rises (README).
    "amid-auto": LossPreset(
        -5.0,
        0.1,
        "ab",
        "teacher",
        adaptive_alpha_start=0.5,
        refuses_far_student=True,
        description="AMiD with adaptive α: 0.5 → −5 as the assistant's weight on the student rises",
    ),
}
