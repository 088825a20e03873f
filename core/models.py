"""Teacher and student: loading, the shared-tokenizer check, and the shared logits width.

Sources are hub ids or local directories (the worker resolves `job:<id>` before core sees it).
Distillation compares two next-token distributions position by position, so both models must
read and write the same token ids: the tokenizers must agree exactly. The only difference
tolerated is a logits matrix padded past the tokenizer's vocabulary (common: embedding rows are
rounded up to a multiple of 64 or 128 for speed), which is cut off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from core.errors import AmidError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Special tokens that change what the models read or when generation stops. The pad token is
# left out on purpose: it only fills batches and never carries a label.
_COMPARED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token")


class TokenizerMismatch(AmidError):
    """Teacher and student tokenize differently, so their distributions cannot be compared."""

    status_code = 422

    def __init__(self, message: str):
        super().__init__(message, field="student")


class ModelUnloadable(AmidError):
    """A model or tokenizer source cannot be loaded (missing, not a causal LM, no access)."""

    status_code = 422


class VocabularyMismatch(AmidError):
    """The models' logits do not cover the shared vocabulary in the same way."""

    status_code = 422

    def __init__(self, message: str):
        super().__init__(message, field="teacher")


def load_tokenizer(
    source: str, *, trust_remote_code: bool = False, role: str = "student"
) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelUnloadable(
            f"{role} tokenizer {source!r} cannot be loaded: {exc}", field=role
        ) from exc
    return tokenizer


def _describe_vocab_difference(
    teacher: dict[str, int], student: dict[str, int], limit: int = 5
) -> str:
    parts = [f"teacher has {len(teacher)} tokens, student {len(student)}"]
    by_id_t = {i: tok for tok, i in teacher.items()}
    by_id_s = {i: tok for tok, i in student.items()}
    differing = [
        i for i in sorted(by_id_t.keys() | by_id_s.keys()) if by_id_t.get(i) != by_id_s.get(i)
    ]
    if differing:
        shown = ", ".join(
            f"id {i}: teacher {by_id_t.get(i)!r} vs student {by_id_s.get(i)!r}"
            for i in differing[:limit]
        )
        parts.append(f"{len(differing)} ids differ, first {shown}")
    return "; ".join(parts)


def compare_tokenizers(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> None:
    """Raise `TokenizerMismatch` saying how the two tokenizers differ, if they do."""
    problems: list[str] = []
    teacher_vocab, student_vocab = teacher.get_vocab(), student.get_vocab()
    if teacher_vocab != student_vocab:
        problems.append(_describe_vocab_difference(teacher_vocab, student_vocab))
    for name in _COMPARED_SPECIAL_TOKENS:
        mine, theirs = getattr(teacher, name), getattr(student, name)
        if mine != theirs:
            problems.append(f"{name}: teacher {mine!r} vs student {theirs!r}")
    if problems:
        raise TokenizerMismatch(
            "teacher and student tokenizers differ (distillation needs the same token ids): "
            + "; ".join(problems)
        )


def check_tokenizers(
    teacher_source: str, student_source: str, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load only the two tokenizers and check they agree; returns the student's.

    Cheap (no weights): the service calls it before a GPU minute is spent.
    """
    teacher = load_tokenizer(teacher_source, trust_remote_code=trust_remote_code, role="teacher")
    student = load_tokenizer(student_source, trust_remote_code=trust_remote_code, role="student")
    compare_tokenizers(teacher, student)
    return student


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype: "auto" is bf16 on CUDA (fast, fp32's range) and fp32 on CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_model(
    source: str, *, dtype: torch.dtype, trust_remote_code: bool, role: str
) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelUnloadable(
            f"{role} model {source!r} cannot be loaded: {exc}", field=role
        ) from exc
    return model


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode and no parameter asks for a gradient: the teacher never holds grads."""
    model.eval()
    model.requires_grad_(False)
    return model


def logits_width(model: PreTrainedModel) -> int:
    output = model.get_output_embeddings()
    if output is None:
        raise ModelUnloadable("the model has no output embedding (not a causal LM head)")
    return int(output.weight.shape[0])


@dataclass(frozen=True)
class VocabPlan:
    """How many logits columns both models share, and whether the teacher is cut to it."""

    width: int
    teacher_width: int
    student_width: int
    tokenizer_size: int

    @property
    def truncates_teacher(self) -> bool:
        return self.teacher_width > self.width


def plan_vocab(teacher_width: int, student_width: int, tokenizer_size: int) -> VocabPlan:
    """Compare logits widths with the tokenizer's size.

    Both models must cover every token id; rows past the tokenizer are padding that no token
    ever reads, so a teacher padded further than the student is cut to the student's width.
    Anything else (a model narrower than its tokenizer, a student wider than its teacher) is
    refused: the extra student columns would never be trained and could be sampled.
    """
    if student_width < tokenizer_size:
        raise VocabularyMismatch(
            f"the student's logits have {student_width} columns but the tokenizer has "
            f"{tokenizer_size} tokens"
        )
    if teacher_width < tokenizer_size:
        raise VocabularyMismatch(
            f"the teacher's logits have {teacher_width} columns but the tokenizer has "
            f"{tokenizer_size} tokens"
        )
    if student_width > teacher_width:
        raise VocabularyMismatch(
            f"the student's logits ({student_width} columns) are wider than the teacher's "
            f"({teacher_width}); only a teacher padded past the shared vocabulary is supported"
        )
    return VocabPlan(student_width, teacher_width, student_width, tokenizer_size)


@dataclass
class ModelPair:
    teacher: PreTrainedModel | None  # None for an SFT run
    student: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    vocab: VocabPlan
    compute_dtype: torch.dtype


def load_pair(
    teacher_source: str | None,
    student_source: str,
    *,
    device: torch.device,
    precision: str = "auto",
    trust_remote_code: bool = False,
    loaded_teacher: PreTrainedModel | None = None,
) -> ModelPair:
    """Teacher (frozen, in the compute dtype) and student (fp32 master weights) on `device`.

    Without a teacher source (an SFT run) only the student and its tokenizer are loaded;
    `loaded_teacher` is `teacher_source` already loaded by this function (a sweep's students
    share one).
    """
    if teacher_source is None:
        tokenizer = load_tokenizer(student_source, trust_remote_code=trust_remote_code)
    else:
        tokenizer = check_tokenizers(teacher_source, student_source, trust_remote_code)
    compute_dtype = resolve_precision(precision, device)
    teacher = loaded_teacher
    if teacher_source is not None and teacher is None:
        # The teacher only runs forward, so it is stored in the compute dtype: half the memory
        # of fp32 in bf16. The student keeps fp32 weights for AdamW's small updates; autocast
        # gives its matmuls the compute dtype.
        teacher = freeze(
            load_model(
                teacher_source,
                dtype=compute_dtype,
                trust_remote_code=trust_remote_code,
                role="teacher",
            )
        )
        # transformers types `.to` through a decorator that mypy reads as taking the model.
        teacher.to(device)  # type: ignore[arg-type]
    student = load_model(
        student_source, dtype=torch.float32, trust_remote_code=trust_remote_code, role="student"
    )
    student.to(device)  # type: ignore[arg-type]
    student_width = logits_width(student)
    teacher_width = student_width if teacher is None else logits_width(teacher)
    vocab = plan_vocab(teacher_width, student_width, len(tokenizer))
    if tokenizer.pad_token is None:
        # Batches need a filler id; EOS is the usual choice and is never labelled as padding.
        tokenizer.pad_token = tokenizer.eos_token
    return ModelPair(teacher, student, tokenizer, vocab, compute_dtype)
