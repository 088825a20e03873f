"""Loss presets: well-formed data that `amid_loss` accepts, and the methods they name."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.losses import amid_loss, assistant_log_probs
from core.presets import ANCHORS, DIVERGENCES, PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_is_well_formed_and_runs(name: str) -> None:
    preset = PRESETS[name]
    assert preset.divergence in DIVERGENCES
    assert preset.anchor in ANCHORS
    assert math.isfinite(preset.alpha) and 0.0 <= preset.lam <= 1.0
    assert preset.description
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 4, 13, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 4, 13, generator=gen)
    loss = amid_loss(student, teacher, **preset.loss_kwargs())
    loss.backward()
    assert loss.item() > 0
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["kd", "rkl", "abkd"])
def test_lambda_zero_presets_use_the_student_as_assistant(name: str) -> None:
    preset = PRESETS[name]
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 9, generator=gen), torch.randn(3, 9, generator=gen)
    log_r = assistant_log_probs(student, teacher, alpha=preset.alpha, lam=preset.lam)
    torch.testing.assert_close(log_r, F.log_softmax(student, -1))


def test_kd_and_rkl_presets_are_the_plain_divergences() -> None:
    gen = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 3, 9, generator=gen), torch.randn(2, 3, 9, generator=gen)
    log_p, log_q = F.log_softmax(teacher, -1), F.log_softmax(student, -1)
    for name, target, source in (("kd", log_p, log_q), ("rkl", log_q, log_p)):
        preset = PRESETS[name]
        loss = amid_loss(
            student, teacher, alpha=preset.alpha, lam=preset.lam, divergence=preset.divergence
        )
        expected = F.kl_div(source, target, reduction="sum", log_target=True) / 6
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
