"""How much the AMiD assistant lets the student learn: the weight w it puts on the student.

With c = (1 − α)/2, the assistant r̃ = (λp^c + (1−λ)q^c)^(1/c) gives the student the share
w = (1−λ)q^c / (λp^c + (1−λ)q^c) of each token's mixture. For α < 1, w → 0 wherever q ≪ p: an
untrained student, which puts almost no mass on the teacher's tokens, gets almost no gradient
from α = −5 (the loss is near its ceiling and flat). w at the teacher's top token is the number
that says so, and it drives three things here:

- the pre-flight measure at job start (median w and the teacher–student KL on a few batches),
  with advice when w is too small for the chosen α;
- `AdaptiveAlpha`, which starts α where w is large and moves it to the target α as the
  student's w under the target rises;
- eval/teacher_kl, the one yardstick every preset is measured by.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.data import IGNORE_INDEX, Batch

# Below this median w the target α leaves the student little gradient: a warning.
LOW_W = 0.1
# Below this, almost none (an untrained student: ~1e-8): a run that asks refuses to start.
REFUSE_W = 0.01


def student_weight(
    teacher_logprob: torch.Tensor, student_logprob: torch.Tensor, alpha: float, lam: float
) -> torch.Tensor:
    """w elementwise from log p and log q, in log space (never forms p^c)."""
    if lam == 0.0:
        return torch.ones_like(student_logprob)
    if lam == 1.0:
        return torch.zeros_like(student_logprob)
    c = (1.0 - alpha) / 2.0
    if c == 0.0:  # α = 1, the geometric mixture: the student's exponent is 1 − λ everywhere
        return torch.full_like(student_logprob, 1.0 - lam)
    student_term = math.log(1.0 - lam) + c * student_logprob
    teacher_term = math.log(lam) + c * teacher_logprob
    return torch.exp(student_term - torch.logaddexp(student_term, teacher_term))


@dataclass(frozen=True)
class BatchMeasure:
    top_weights: list[float]  # w at the teacher's top token, one per response token
    kl_sum: float  # Σ KL(p‖q) over the response tokens
    tokens: int


@torch.inference_mode()
def measure_batch(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    batch: Batch,
    *,
    vocab_width: int,
    alpha: float,
    lam: float,
    device: torch.device,
) -> BatchMeasure:
    """w at the teacher's top token and KL(p‖q) on the batch's response tokens (no gradient)."""
    input_ids = batch.input_ids.to(device)
    attention = batch.attention_mask.to(device)
    mask = (batch.labels[:, 1:] != IGNORE_INDEX).to(device)
    teacher_logits = teacher(input_ids=input_ids, attention_mask=attention).logits
    student_logits = student(input_ids=input_ids, attention_mask=attention).logits
    log_p = F.log_softmax(teacher_logits[:, :-1, :vocab_width][mask].float(), dim=-1)
    log_q = F.log_softmax(student_logits[:, :-1, :vocab_width][mask].float(), dim=-1)
    top = log_p.argmax(dim=-1, keepdim=True)
    weights = student_weight(log_p.gather(-1, top), log_q.gather(-1, top), alpha, lam)
    kl = (log_p.exp() * (log_p - log_q)).nan_to_num(0.0).sum(dim=-1)
    return BatchMeasure(weights.flatten().tolist(), float(kl.sum()), int(mask.sum()))


@dataclass(frozen=True)
class Preflight:
    w_median: float
    teacher_kl: float  # per response token
    alpha: float
    lam: float

    @property
    def too_far(self) -> bool:
        return self.w_median < LOW_W

    @property
    def hopeless(self) -> bool:
        return self.w_median < REFUSE_W

    def advice(self) -> str:
        head = (
            f"pre-flight: median assistant weight on the student w = {self.w_median:.3f} at the "
            f"teacher's top token (α = {self.alpha:g}, λ = {self.lam:g}), teacher–student KL "
            f"{self.teacher_kl:.3f}"
        )
        if not self.too_far:
            return head
        return (
            f"{head}. The student is too far from the teacher for α = {self.alpha:g}: it gets "
            f"almost no gradient (w < {LOW_W}): fine-tune first (init.sft_steps), or raise α "
            "(preset amid-auto starts α high and moves it to the target as the student learns)."
        )


def preflight(measures: Iterable[BatchMeasure], alpha: float, lam: float) -> Preflight:
    """Median w and mean KL(p‖q) per token over the measured batches."""
    weights: list[float] = []
    kl_sum, tokens = 0.0, 0
    for measure in measures:
        weights.extend(measure.top_weights)
        kl_sum += measure.kl_sum
        tokens += measure.tokens
    return Preflight(
        w_median=statistics.median(weights) if weights else 1.0,
        teacher_kl=kl_sum / max(tokens, 1),
        alpha=alpha,
        lam=lam,
    )


class AdaptiveAlpha:
    """α = start + (target − start) · progress, progress = min(1, median w / w_ready).

    w is measured under the target α, so progress says how much gradient the target would give
    now. Progress only grows: a noisy batch never moves α back toward `start`.
    """

    def __init__(self, start: float, target: float, w_ready: float, progress: float = 0.0):
        self.start = start
        self.target = target
        self.w_ready = w_ready
        self.progress = progress

    @property
    def alpha(self) -> float:
        return self.start + (self.target - self.start) * self.progress

    def update(self, measure: BatchMeasure) -> None:
        if not measure.top_weights:
            return
        w = statistics.median(measure.top_weights)
        self.progress = max(self.progress, min(1.0, w / self.w_ready))
