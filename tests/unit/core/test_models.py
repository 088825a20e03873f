"""Loading a teacher/student pair: the shared-tokenizer check and the logits width."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from core.callbacks import Callback
from core.models import (
    ModelUnloadable,
    TokenizerMismatch,
    VocabularyMismatch,
    check_tokenizers,
    load_pair,
    plan_vocab,
)
from core.settings import DistillSettings
from core.train import distill


def _other_tokenizer(target: Path) -> Path:
    """A byte-level BPE trained on other text: the same size, different ids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(["zebra quilt jazz " * 20, "xylophone vortex"], trainer=trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>"
    ).save_pretrained(target)
    return target


def test_same_tokenizer_passes(save_model: Callable[..., Path]) -> None:
    teacher, student = save_model("teacher"), save_model("student", n_embd=16)
    assert len(check_tokenizers(str(teacher), str(student))) == 1024


def test_tokenizer_with_an_extra_token_is_refused_with_sizes_and_first_difference(
    tmp_path: Path, save_model: Callable[..., Path], demo_tokenizer: PreTrainedTokenizerBase
) -> None:
    teacher = save_model("teacher")
    grown = demo_tokenizer.__class__.from_pretrained(demo_tokenizer.name_or_path)
    grown.add_tokens(["<|tool|>"])
    grown.save_pretrained(tmp_path / "student")
    with pytest.raises(TokenizerMismatch) as caught:
        check_tokenizers(str(teacher), str(tmp_path / "student"))
    message = caught.value.message
    assert "teacher has 1024 tokens, student 1025" in message
    assert "id 1024: teacher None vs student '<|tool|>'" in message
    assert caught.value.status_code == 422


def test_differently_trained_tokenizer_is_refused(
    tmp_path: Path, save_model: Callable[..., Path]
) -> None:
    teacher = save_model("teacher")
    student = _other_tokenizer(tmp_path / "student")
    with pytest.raises(
        TokenizerMismatch, match=r"ids differ, first id \d+: teacher '.*' vs student"
    ):
        check_tokenizers(str(teacher), str(student))


def test_different_eos_is_refused(
    tmp_path: Path, save_model: Callable[..., Path], demo_tokenizer: PreTrainedTokenizerBase
) -> None:
    teacher = save_model("teacher")
    changed = demo_tokenizer.__class__.from_pretrained(demo_tokenizer.name_or_path)
    changed.eos_token = "<|pad|>"
    changed.save_pretrained(tmp_path / "student")
    with pytest.raises(
        TokenizerMismatch, match=r"eos_token: teacher '<\|endoftext\|>' vs student '<\|pad\|>'"
    ):
        check_tokenizers(str(teacher), str(tmp_path / "student"))


def test_missing_model_source_names_the_role(
    tmp_path: Path, save_model: Callable[..., Path]
) -> None:
    with pytest.raises(ModelUnloadable) as caught:
        check_tokenizers(str(tmp_path / "absent"), str(save_model("student")))
    assert caught.value.field == "teacher"


@pytest.mark.parametrize(
    ("teacher_width", "student_width", "message"),
    [
        (1024, 1000, "student's logits have 1000 columns"),
        (1000, 1024, "teacher's logits have 1000 columns"),
        (1024, 1088, "wider than the teacher's"),
    ],
)
def test_vocab_widths_that_cannot_be_aligned_are_refused(
    teacher_width: int, student_width: int, message: str
) -> None:
    with pytest.raises(VocabularyMismatch, match=message):
        plan_vocab(teacher_width, student_width, tokenizer_size=1024)


def test_teacher_is_frozen_and_student_is_trainable(save_model: Callable[..., Path]) -> None:
    pair = load_pair(
        str(save_model("teacher")), str(save_model("student")), device=torch.device("cpu")
    )
    assert not pair.teacher.training
    assert not any(p.requires_grad for p in pair.teacher.parameters())
    assert all(p.requires_grad for p in pair.student.parameters())
    assert pair.compute_dtype == torch.float32  # "auto" on CPU


class _Events(Callback):
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any] | None]] = []

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.events.append((kind, data))


def test_padded_teacher_vocabulary_is_truncated_and_trains(
    tmp_path: Path,
    save_model: Callable[..., Path],
    make_settings: Callable[..., DistillSettings],
) -> None:
    # Teacher embedding rounded up past the 1024-token vocabulary, as many released models are.
    teacher = save_model("teacher", vocab_size=1024 + 64)
    student = save_model("student", n_embd=16)
    events = _Events()
    result = distill(make_settings(teacher, student, max_steps=3), tmp_path / "run", [events])
    assert result.status == "completed"
    truncated = [data for kind, data in events.events if kind == "vocab_truncated"]
    assert truncated == [{"teacher_width": 1088, "width": 1024}]
    assert torch.isfinite(torch.tensor(result.final_metrics["train/loss"]))
    assert result.final_metrics["train/loss"] > 0
