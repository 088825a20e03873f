"""Splitting a causal LM into body and head for the fused loss, and the trainer's use of it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from core.callbacks import Callback
from core.heads import SplitModel, split_head
from core.losses import fused_amid_loss
from core.settings import DistillSettings
from core.train import distill
from tests.unit.core.conftest import tiny_gpt2


def test_tied_gpt2_splits_into_body_and_its_embedding() -> None:
    model = tiny_gpt2(40, n_embd=16)
    split = split_head(model, 40)
    assert isinstance(split, SplitModel)
    assert split.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    ids = torch.randint(0, 40, (2, 5))
    attention = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits
        hidden = split.hidden_states(ids, attention)
    torch.testing.assert_close(hidden @ split.weight.T, logits)


def test_a_soft_capping_head_is_refused_with_the_reason() -> None:
    config = Gemma2Config(
        vocab_size=40,  # Gemma 2: 256000
        hidden_size=16,  # Gemma 2 2B: 2304
        intermediate_size=32,  # 9216
        num_hidden_layers=1,  # 26
        num_attention_heads=2,  # 8
        num_key_value_heads=1,  # 4
        head_dim=8,  # 256
        final_logit_softcapping=30.0,
    )
    reason = split_head(Gemma2ForCausalLM(config), 40)
    assert isinstance(reason, str) and "final_logit_softcapping" in reason


class Events(Callback):
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any] | None]] = []

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.events.append((kind, data))


def _losses(output: Path) -> list[float]:
    lines = (output / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["train/loss"] for line in lines if "train/loss" in line]


def test_trainer_fused_path_trains_as_the_logits_path(
    tmp_path: Path,
    save_model: Callable[..., Path],
    make_settings: Callable[..., DistillSettings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Same losses step after step, fused by default; a head that cannot be fused falls back to
    the logits path and says so in an event."""
    teacher = save_model("teacher", n_embd=48)
    student = save_model("student", seed=1)
    settings = make_settings(teacher, student, max_steps=3, ce_weight=0.5)
    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return fused_amid_loss(*args, **kwargs)

    monkeypatch.setattr("core.train.fused_amid_loss", counted)
    fused_events = Events()
    distill(settings, tmp_path / "fused", [fused_events])
    assert all(kind != "fused_loss_off" for kind, _ in fused_events.events)
    assert len(calls) == 3  # one per training step; evaluation keeps the logits path

    monkeypatch.setattr("core.train.split_head", lambda model, width: "a test says so")
    logits_events = Events()
    distill(settings, tmp_path / "logits", [logits_events])
    assert len(calls) == 3
    off = [data for kind, data in logits_events.events if kind == "fused_loss_off"]
    assert off == [{"role": "teacher", "reason": "a test says so"}]

    fused, logits = _losses(tmp_path / "fused"), _losses(tmp_path / "logits")
    assert len(fused) == 3
    assert fused == pytest.approx(logits, rel=1e-5)
