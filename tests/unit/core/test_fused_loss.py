"""`fused_amid_loss` against `amid_loss` on explicit logits, and its memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from core.losses import amid_loss, fused_amid_loss
from core.presets import ANCHORS, DIVERGENCES
from tests.unit.core.conftest import tiny_gpt2

B, T, V = 2, 6, 13
STUDENT_WIDTH, TEACHER_WIDTH = 6, 9
ALPHAS = (-5.0, -1.0, 0.0, 0.5, 1.0, 3.0)

Tensors = dict[str, torch.Tensor | None]


def make_heads(seed: int, *, bias: bool, mask: bool, teacher_width: int) -> Tensors:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    chosen = torch.rand(B, T, generator=gen) < 0.6
    chosen[0, 0] = True
    return {
        "student_hidden": randn(B, T, STUDENT_WIDTH),
        "student_weight": randn(V, STUDENT_WIDTH, scale=0.8),
        "student_bias": randn(V, scale=0.5) if bias else None,
        "teacher_hidden": randn(B, T, teacher_width),
        "teacher_weight": randn(V, teacher_width, scale=0.8),
        "teacher_bias": randn(V, scale=0.5) if bias else None,
        "mask": chosen if mask else None,
        "targets": torch.randint(0, V, (B, T), generator=gen),
    }


STUDENT_PARTS = ("student_hidden", "student_weight", "student_bias")


def leaves(inputs: Tensors) -> Tensors:
    return {
        name: (
            value.clone().requires_grad_() if value is not None and name in STUDENT_PARTS else value
        )
        for name, value in inputs.items()
    }


def explicit_loss(inputs: Tensors, ce_weight: float = 0.0, **knobs: object) -> torch.Tensor:
    """The same loss through materialised logits: amid_loss plus plain cross-entropy."""
    student = inputs["student_hidden"] @ inputs["student_weight"].T  # type: ignore[operator,union-attr]
    teacher = inputs["teacher_hidden"] @ inputs["teacher_weight"].T  # type: ignore[operator,union-attr]
    if inputs["student_bias"] is not None:
        student = student + inputs["student_bias"]
        teacher = teacher + inputs["teacher_bias"]  # type: ignore[operator]
    mask = inputs["mask"]
    loss = amid_loss(student, teacher, mask, **knobs)  # type: ignore[arg-type]
    if ce_weight:
        chosen = torch.ones(B, T, dtype=torch.bool) if mask is None else mask
        ce = torch.nn.functional.cross_entropy(student[chosen], inputs["targets"][chosen])  # type: ignore[index]
        loss = loss + ce_weight * ce
    return loss


def fused(inputs: Tensors, ce_weight: float = 0.0, **knobs: object) -> torch.Tensor:
    return fused_amid_loss(
        inputs["student_hidden"],  # type: ignore[arg-type]
        inputs["student_weight"],  # type: ignore[arg-type]
        inputs["teacher_hidden"],  # type: ignore[arg-type]
        inputs["teacher_weight"],  # type: ignore[arg-type]
        inputs["mask"],
        student_bias=inputs["student_bias"],
        teacher_bias=inputs["teacher_bias"],
        targets=inputs["targets"] if ce_weight else None,
        ce_weight=ce_weight,
        **knobs,  # type: ignore[arg-type]
    )


def assert_same(inputs: Tensors, ce_weight: float = 0.0, **knobs: object) -> None:
    ours, theirs = leaves(inputs), leaves(inputs)
    got = fused(ours, ce_weight, **knobs)
    expected = explicit_loss(theirs, ce_weight, **knobs)
    got.backward()
    expected.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-8)
    for name in STUDENT_PARTS:
        mine, reference = ours[name], theirs[name]
        if reference is None:
            assert mine is None
            continue
        assert mine is not None and mine.grad is not None and reference.grad is not None
        assert (mine.grad - reference.grad).norm() <= 1e-4 * reference.grad.norm() + 1e-9, name


@pytest.mark.parametrize("anchor", ANCHORS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_equals_amid_loss_on_explicit_logits(alpha: float, divergence: str, anchor: str) -> None:
    seed = int(alpha * 10) % 97 + DIVERGENCES.index(divergence)
    lam = 0.1 if anchor == "teacher" else 0.6
    knobs = {"alpha": alpha, "lam": lam, "divergence": divergence, "anchor": anchor}
    # Masked and whole batch, with and without biases, teacher as wide as the student or not;
    # chunks of 3 rows so that several chunks (and a ragged last one) are walked.
    for variant, (mask, bias, width) in enumerate(
        [(True, True, TEACHER_WIDTH), (False, False, STUDENT_WIDTH), (True, False, TEACHER_WIDTH)]
    ):
        inputs = make_heads(seed + variant, bias=bias, mask=mask, teacher_width=width)
        assert_same(inputs, chunk_size=3, **knobs)


@pytest.mark.parametrize("divergence", ["kl", "ab"])
def test_cross_entropy_rides_in_the_same_pass(divergence: str) -> None:
    inputs = make_heads(5, bias=True, mask=True, teacher_width=TEACHER_WIDTH)
    assert_same(inputs, 0.7, alpha=-5.0, lam=0.1, divergence=divergence, chunk_size=4)


def test_tied_embeddings_get_both_gradients() -> None:
    """GPT-2's head is its token embedding: the fused path must give every parameter the
    gradient the logits path gives it."""
    teacher = tiny_gpt2(V, n_embd=24, seed=1).eval()
    reference = tiny_gpt2(V, n_embd=16, seed=2)
    student = tiny_gpt2(V, n_embd=16, seed=2)
    assert student.lm_head.weight is student.transformer.wte.weight
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) < 0.7
    knobs = {"alpha": -5.0, "lam": 0.1, "divergence": "ab"}
    with torch.no_grad():
        teacher_hidden = teacher.transformer(input_ids=ids).last_hidden_state
        teacher_logits = teacher(input_ids=ids).logits
    amid_loss(reference(input_ids=ids).logits, teacher_logits, mask, **knobs).backward()  # type: ignore[arg-type]
    hidden = student.transformer(input_ids=ids).last_hidden_state
    loss = fused_amid_loss(
        hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, mask, **knobs
    )  # type: ignore[arg-type]
    loss.backward()
    for (name, mine), (_, theirs) in zip(
        student.named_parameters(), reference.named_parameters(), strict=True
    ):
        assert mine.grad is not None and theirs.grad is not None, name
        assert (mine.grad - theirs.grad).norm() <= 1e-4 * theirs.grad.norm() + 1e-9, name


def test_empty_mask_gives_zero_and_zero_gradient() -> None:
    inputs = make_heads(6, bias=True, mask=True, teacher_width=TEACHER_WIDTH)
    inputs["mask"] = torch.zeros(B, T, dtype=torch.bool)
    ours = leaves(inputs)
    loss = fused(ours, alpha=-5.0, lam=0.1)
    loss.backward()
    assert loss.item() == 0.0
    for name in STUDENT_PARTS:
        grad = ours[name].grad  # type: ignore[union-attr]
        assert grad is not None and torch.all(grad == 0)


def test_no_gradient_work_without_requires_grad() -> None:
    inputs = make_heads(7, bias=False, mask=True, teacher_width=TEACHER_WIDTH)
    loss = fused(inputs, alpha=0.5, lam=0.3, divergence="js")
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(
        explicit_loss(inputs, alpha=0.5, lam=0.3, divergence="js").item(), rel=1e-5
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"student_weight": torch.zeros(V, STUDENT_WIDTH + 1)}, "student_weight"),
        (
            {"teacher_weight": torch.zeros(V + 1, TEACHER_WIDTH), "teacher_bias": None},
            "teacher_weight",
        ),
        ({"student_bias": torch.zeros(V + 2)}, "student_bias"),
        ({"teacher_hidden": torch.zeros(B, T + 1, TEACHER_WIDTH)}, "teacher_hidden"),
        ({"mask": torch.ones(B, T)}, "mask"),
    ],
)
def test_bad_shapes_name_the_argument(change: Tensors, field: str) -> None:
    inputs = {**make_heads(8, bias=True, mask=True, teacher_width=TEACHER_WIDTH), **change}
    with pytest.raises(ValueError, match=rf"^{field}:"):
        fused(inputs, alpha=0.0, lam=0.1)


def test_cross_entropy_needs_targets() -> None:
    inputs = make_heads(9, bias=False, mask=True, teacher_width=TEACHER_WIDTH)
    with pytest.raises(ValueError, match=r"^targets:"):
        fused_amid_loss(
            inputs["student_hidden"],  # type: ignore[arg-type]
            inputs["student_weight"],  # type: ignore[arg-type]
            inputs["teacher_hidden"],  # type: ignore[arg-type]
            inputs["teacher_weight"],  # type: ignore[arg-type]
            alpha=0.0,
            lam=0.1,
            ce_weight=1.0,
        )


# -- memory ---------------------------------------------------------------------------------------

# Runs in a fresh process with glibc's mmap threshold pinned low, so that resident memory follows
# the bytes live (every large block is mapped on allocation and unmapped on free).
_MEMORY_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from core.losses import fused_amid_loss

    tokens, vocab, width = (int(a) for a in sys.argv[1:4])
    torch.manual_seed(0)

    def call(n):
        hidden = torch.randn(1, n, width, requires_grad=True)
        weight = torch.randn(vocab, width, requires_grad=True)
        teacher_hidden = torch.randn(1, n, width)
        teacher_weight = torch.randn(vocab, width)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fused_amid_loss(hidden, weight, teacher_hidden, teacher_weight, alpha=-5.0, lam=0.1,
                        divergence="ab", chunk_size=64).backward()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024

    call(64)  # loads kernels and autograd's threads, which belong to no call
    print(json.dumps(call(tokens)))
    """
)


def _peak_extra_bytes(tokens: int, vocab: int, width: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(tokens), str(vocab), str(width)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    return int(json.loads(out.stdout.strip().splitlines()[-1]))


def test_peak_extra_memory_does_not_grow_with_tokens_times_vocab() -> None:
    vocab, width = 32_000, 16
    small, large = 256, 2_048
    grown = _peak_extra_bytes(large, vocab, width) - _peak_extra_bytes(small, vocab, width)
    # Logits of the extra tokens alone would be (large − small) × vocab × 4 bytes = 219 MiB for
    # each model; what grows is only the hidden-state gradient (tokens × width) and noise.
    one_logits_block = (large - small) * vocab * 4
    assert grown < 0.05 * one_logits_block, f"grew by {grown / 2**20:.0f} MiB"
