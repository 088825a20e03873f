"""The AMiD loss against a plain float64 reference, its special cases, and its properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from core.losses import DIVERGENCE_FUNCTIONS, amid_loss, assistant_log_probs
from core.presets import ANCHORS, DIVERGENCES, PRESETS

B, T, V = 2, 5, 11
PAD = 2  # the last PAD vocabulary entries are padding: −inf in both models' logits

ALPHAS = (-5.0, -3.0, -1.0, 0.0, 0.5, 1.0, 3.0)
LAMS = (0.0, 0.1, 0.5, 0.9)


# -- a float64 reference, written plainly from the formulas ------------------------------------


def reference_assistant(p: torch.Tensor, q: torch.Tensor, alpha: float, lam: float) -> torch.Tensor:
    if alpha == 1.0:
        r_tilde = p**lam * q ** (1.0 - lam)
    else:
        c = (1.0 - alpha) / 2.0
        r_tilde = (lam * p**c + (1.0 - lam) * q**c) ** (1.0 / c)
    return r_tilde / r_tilde.sum(-1, keepdim=True)


def reference_ab(x: torch.Tensor, r: torch.Tensor, a: float, b: float) -> torch.Tensor:
    if a == 0 and b == 0:
        return 0.5 * ((x.log() - r.log()) ** 2).sum(-1)
    if b == 0:
        return (x**a * torch.log(x**a / r**a) - x**a + r**a).sum(-1) / a**2
    if a == 0:
        return (r**b * torch.log(r**b / x**b) - r**b + x**b).sum(-1) / b**2
    if a + b == 0:
        return (torch.log(r**a / x**a) + (r**a / x**a) ** -1 - 1).sum(-1) / a**2
    s = a + b
    return -(x**a * r**b - a / s * x**s - b / s * r**s).sum(-1) / (a * b)


def reference_divergence(
    name: str, x: torch.Tensor, r: torch.Tensor, a: float = 0.2, b: float = 0.7
) -> torch.Tensor:
    """Per-token divergence, [...]."""
    if name == "kl":
        return (x * torch.log(x / r)).sum(-1)
    if name == "rkl":
        return (r * torch.log(r / x)).sum(-1)
    if name == "js":
        m = (x + r) / 2
        return 0.5 * (x * torch.log(x / m)).sum(-1) + 0.5 * (r * torch.log(r / m)).sum(-1)
    if name == "tvd":
        return 0.5 * (x - r).abs().sum(-1)
    assert name == "ab"
    return reference_ab(x, r, a, b)


def reference_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    *,
    alpha: float,
    lam: float,
    divergence: str,
    anchor: str,
    vocab: int,
    ab_alpha: float = 0.2,
    ab_beta: float = 0.7,
) -> torch.Tensor:
    """Dense float64 loss on the first `vocab` entries (the rest are padding, outside the vocab)."""
    p = torch.softmax(teacher[..., :vocab].double(), -1)
    q = torch.softmax(student[..., :vocab].double(), -1)
    r = reference_assistant(p, q, alpha, lam)
    x = p if anchor == "teacher" else q
    per_token = reference_divergence(divergence, x, r, ab_alpha, ab_beta)
    return per_token[mask].mean()


def make_inputs(
    seed: int, *, pad: int = PAD, scale: float = 2.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=gen) * scale
    teacher = torch.randn(B, T, V, generator=gen) * scale
    if pad:
        student[..., V - pad :] = -math.inf
        teacher[..., V - pad :] = -math.inf
    mask = torch.rand(B, T, generator=gen) < 0.7
    mask[0, 0] = True
    return student.to(dtype), teacher.to(dtype), mask


def loss_and_grad(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, **kwargs: object
) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = student.detach().clone().requires_grad_()
    loss = amid_loss(leaf, teacher, mask, **kwargs)  # type: ignore[arg-type]
    loss.backward()
    assert leaf.grad is not None
    return loss.detach(), leaf.grad


# -- agreement with the reference ---------------------------------------------------------------


@pytest.mark.parametrize("anchor", ANCHORS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_matches_float64_reference(alpha: float, lam: float, divergence: str, anchor: str) -> None:
    student, teacher, mask = make_inputs(seed=hash((alpha, lam)) % 1000)
    if anchor == "student" and lam == 0.0:
        # r = q = x: the loss is identically zero, nothing for a relative tolerance to compare.
        lam = 0.25
    knobs = {"alpha": alpha, "lam": lam, "divergence": divergence, "anchor": anchor}
    loss, grad = loss_and_grad(student, teacher, mask, chunk_size=3, **knobs)

    ref_leaf = student.detach().double().requires_grad_()
    ref = reference_loss(ref_leaf, teacher.double(), mask, vocab=V - PAD, **knobs)  # type: ignore[arg-type]
    ref.backward()
    assert ref_leaf.grad is not None
    ref_grad = ref_leaf.grad

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-7)
    assert torch.isfinite(grad).all()
    assert (grad - ref_grad).norm() <= 1e-3 * ref_grad.norm() + 1e-7
    # Padded vocabulary entries and unmasked positions get exactly zero gradient.
    assert torch.all(grad[..., V - PAD :] == 0)
    assert torch.all(grad[~mask] == 0)


@pytest.mark.parametrize(
    ("ab_alpha", "ab_beta"),
    [(0.2, 0.7), (0.0, 0.7), (0.5, 0.0), (0.0, 0.0), (0.6, -0.6), (-0.3, 1.2), (1.5, -0.4)],
)
@pytest.mark.parametrize("alpha", [-5.0, 1.0, 3.0])
def test_ab_branches_match_reference(alpha: float, ab_alpha: float, ab_beta: float) -> None:
    student, teacher, mask = make_inputs(seed=7)
    knobs = {"alpha": alpha, "lam": 0.3, "divergence": "ab", "anchor": "teacher"}
    loss, grad = loss_and_grad(student, teacher, mask, ab_alpha=ab_alpha, ab_beta=ab_beta, **knobs)
    ref_leaf = student.detach().double().requires_grad_()
    ref = reference_loss(
        ref_leaf,
        teacher.double(),
        mask,
        vocab=V - PAD,
        ab_alpha=ab_alpha,
        ab_beta=ab_beta,
        **knobs,  # type: ignore[arg-type]
    )
    ref.backward()
    assert ref_leaf.grad is not None
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-7)
    assert (grad - ref_leaf.grad).norm() <= 1e-3 * ref_leaf.grad.norm()


@pytest.mark.parametrize(("a", "b"), [(0.0, 0.7), (0.5, 0.0), (0.0, 0.0), (0.6, -0.6)])
def test_ab_limit_branches_are_limits_of_the_general_formula(a: float, b: float) -> None:
    """Each special branch equals the general formula evaluated a hair away (float64)."""
    gen = torch.Generator().manual_seed(3)
    log_x = torch.log_softmax(torch.randn(4, 9, generator=gen, dtype=torch.float64), -1)
    log_r = torch.log_softmax(torch.randn(4, 9, generator=gen, dtype=torch.float64), -1)
    ab = DIVERGENCE_FUNCTIONS["ab"]
    exact = ab(log_x, log_r, ab_alpha=a, ab_beta=b)
    eps = 1e-5
    near = ab(log_x, log_r, ab_alpha=a + eps, ab_beta=b + 2 * eps)
    assert exact.item() == pytest.approx(near.item(), rel=1e-3)


def test_ab_unit_cases_are_kl_and_reverse_kl() -> None:
    gen = torch.Generator().manual_seed(4)
    log_x = torch.log_softmax(torch.randn(4, 9, generator=gen, dtype=torch.float64), -1)
    log_r = torch.log_softmax(torch.randn(4, 9, generator=gen, dtype=torch.float64), -1)
    ab = DIVERGENCE_FUNCTIONS["ab"]
    kl_xr = F.kl_div(log_r, log_x, reduction="sum", log_target=True)
    kl_rx = F.kl_div(log_x, log_r, reduction="sum", log_target=True)
    assert ab(log_x, log_r, ab_alpha=1.0, ab_beta=0.0).item() == pytest.approx(kl_xr.item())
    assert ab(log_x, log_r, ab_alpha=0.0, ab_beta=1.0).item() == pytest.approx(kl_rx.item())


def test_registry_matches_preset_names() -> None:
    assert set(DIVERGENCE_FUNCTIONS) == set(DIVERGENCES)


# -- special cases ------------------------------------------------------------------------------


def _loss_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax as the loss computes it (z − logsumexp z), whose precision the reference
    tests check."""
    from core.losses import _log_softmax, _Scratch

    return _log_softmax(logits, _Scratch())


def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return values[mask].mean().item()


def test_lambda_zero_is_plain_kd_rkl_and_abkd() -> None:
    student, teacher, mask = make_inputs(seed=11, pad=0)
    log_p, log_q = torch.log_softmax(teacher, -1), torch.log_softmax(student, -1)
    for alpha in ALPHAS:
        r = assistant_log_probs(student, teacher, alpha=alpha, lam=0.0)
        # Exactly q, as the loss computes log q: no mixture is formed.
        assert torch.equal(r, _loss_log_softmax(student))
        kd = amid_loss(student, teacher, mask, alpha=alpha, lam=0.0, divergence="kl")
        kl_pq = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
        assert kd.item() == pytest.approx(_token_mean(kl_pq, mask), rel=1e-5)
        rkl = amid_loss(student, teacher, mask, alpha=alpha, lam=0.0, divergence="rkl")
        kl_qp = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
        assert rkl.item() == pytest.approx(_token_mean(kl_qp, mask), rel=1e-5)
        abkd = amid_loss(student, teacher, mask, alpha=alpha, lam=0.0, divergence="ab")
        ref = reference_ab(log_p.double().exp(), log_q.double().exp(), 0.2, 0.7)
        assert abkd.item() == pytest.approx(_token_mean(ref, mask), rel=1e-4)


def test_lambda_one_is_the_teacher() -> None:
    student, teacher, _ = make_inputs(seed=12)
    for alpha in ALPHAS:
        r = assistant_log_probs(student, teacher, alpha=alpha, lam=1.0)
        assert torch.equal(r, _loss_log_softmax(teacher))


def test_alpha_one_is_the_geometric_mixture_and_alpha_minus_one_the_arithmetic() -> None:
    student, teacher, _ = make_inputs(seed=13, pad=0)
    log_p, log_q = torch.log_softmax(teacher, -1), torch.log_softmax(student, -1)
    lam = 0.3
    geometric = torch.log_softmax(lam * log_p + (1 - lam) * log_q, -1)
    torch.testing.assert_close(assistant_log_probs(student, teacher, alpha=1.0, lam=lam), geometric)
    arithmetic = torch.log(lam * log_p.exp() + (1 - lam) * log_q.exp())
    torch.testing.assert_close(
        assistant_log_probs(student, teacher, alpha=-1.0, lam=lam), arithmetic
    )


@pytest.mark.parametrize("alpha", [0.95, 0.999, 0.99999, 1.0 - 1e-9, 1.00001, 1.001])
def test_mixture_keeps_fp32_precision_near_alpha_one(alpha: float) -> None:
    """c = (1 − α)/2 → 0 must not amplify rounding: compare with the float64 formula."""
    student, teacher, _ = make_inputs(seed=31, pad=0, scale=3.0)
    p, q = torch.softmax(teacher.double(), -1), torch.softmax(student.double(), -1)
    expected = reference_assistant(p, q, alpha, 0.3).log()
    got = assistant_log_probs(student, teacher, alpha=alpha, lam=0.3).double()
    assert (got - expected).abs().max() < 1e-5


def test_alpha_above_one_keeps_only_the_support_intersection() -> None:
    student, teacher, mask = make_inputs(seed=14, pad=0)
    teacher[..., 0] = -math.inf  # entry 0: zero under p only
    for alpha in (1.5, 3.0, 9.0):
        r = assistant_log_probs(student, teacher, alpha=alpha, lam=0.4)
        assert torch.all(torch.isneginf(r[..., 0]))
        assert torch.isfinite(r[..., 1:]).all()
        torch.testing.assert_close(r.exp().sum(-1), torch.ones(B, T))
    # Below α = 1 the union is kept: entry 0 still has the student's share.
    r = assistant_log_probs(student, teacher, alpha=-1.0, lam=0.4)
    assert torch.isfinite(r).all()
    for divergence in DIVERGENCES:
        for anchor in ANCHORS:
            if anchor == "student" and divergence in ("kl", "ab"):
                continue  # q > 0 where r = 0: these are truly infinite
            loss, grad = loss_and_grad(
                student, teacher, mask, alpha=3.0, lam=0.4, divergence=divergence, anchor=anchor
            )
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), (divergence, anchor)


# -- gradients, masks and inputs ------------------------------------------------------------------


def test_teacher_gets_no_gradient() -> None:
    student, teacher, mask = make_inputs(seed=18)
    student.requires_grad_()
    teacher.requires_grad_()
    loss = amid_loss(student, teacher, mask, alpha=-5.0, lam=0.5, divergence="ab")
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_all_false_mask_gives_zero_and_zero_gradient() -> None:
    student, teacher, _ = make_inputs(seed=19)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for divergence in DIVERGENCES:
        loss, grad = loss_and_grad(
            student, teacher, mask, alpha=-5.0, lam=0.1, divergence=divergence
        )
        assert loss.item() == 0.0
        assert torch.all(grad == 0)


def test_no_mask_means_every_position() -> None:
    student, teacher, _ = make_inputs(seed=20)
    everything = torch.ones(B, T, dtype=torch.bool)
    a = amid_loss(student, teacher, None, alpha=-3.0, lam=0.1, divergence="js")
    b = amid_loss(student, teacher, everything, alpha=-3.0, lam=0.1, divergence="js")
    assert a.item() == b.item()


def test_upstream_gradient_scales_the_student_gradient() -> None:
    student, teacher, mask = make_inputs(seed=21)
    _, grad = loss_and_grad(student, teacher, mask, alpha=-5.0, lam=0.1, divergence="ab")
    leaf = student.clone().requires_grad_()
    (3.0 * amid_loss(leaf, teacher, mask, alpha=-5.0, lam=0.1, divergence="ab")).backward()
    assert leaf.grad is not None
    torch.testing.assert_close(leaf.grad, 3.0 * grad)


def test_matches_autograd_gradcheck_in_float64() -> None:
    gen = torch.Generator().manual_seed(22)
    student = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64)
    for divergence in ("kl", "rkl", "ab", "js"):
        for anchor in ANCHORS:
            assert torch.autograd.gradcheck(
                lambda s, d=divergence, a=anchor: amid_loss(
                    s, teacher, alpha=-3.0, lam=0.4, divergence=d, anchor=a, chunk_size=2
                ),
                (student,),
                fast_mode=True,
            )


def test_no_gradient_work_without_requires_grad() -> None:
    student, teacher, mask = make_inputs(seed=23)
    loss = amid_loss(student, teacher, mask, alpha=-5.0, lam=0.1)
    assert not loss.requires_grad
    with torch.no_grad():
        leaf = student.clone().requires_grad_()
        assert amid_loss(leaf, teacher, mask, alpha=-5.0, lam=0.1).item() == loss.item()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"divergence": "kld"}, "divergence"),
        ({"anchor": "both"}, "anchor"),
        ({"alpha": math.nan}, "alpha"),
        ({"alpha": math.inf}, "alpha"),
        ({"lam": -0.1}, "lam"),
        ({"lam": 1.5}, "lam"),
        ({"lam": math.nan}, "lam"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"ab_alpha": math.inf}, "ab_alpha"),
        ({"ab_beta": math.nan}, "ab_beta"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, object], field: str) -> None:
    student, teacher, mask = make_inputs(seed=24)
    call: dict[str, object] = {"alpha": -5.0, "lam": 0.1, **kwargs}
    with pytest.raises(ValueError, match=rf"^{field}:"):
        amid_loss(student, teacher, mask, **call)  # type: ignore[arg-type]


def test_bad_shapes_name_the_argument() -> None:
    student, teacher, mask = make_inputs(seed=25)
    with pytest.raises(ValueError, match=r"^teacher_logits:"):
        amid_loss(student, teacher[..., :-1], mask, alpha=0.0, lam=0.1)
    with pytest.raises(ValueError, match=r"^mask:"):
        amid_loss(student, teacher, mask[:, :-1], alpha=0.0, lam=0.1)
    with pytest.raises(ValueError, match=r"^mask:"):
        amid_loss(student, teacher, mask.float(), alpha=0.0, lam=0.1)


# -- properties -----------------------------------------------------------------------------------

alphas = st.floats(-10.0, 10.0, allow_nan=False)
divergences = st.sampled_from(DIVERGENCES)
anchors = st.sampled_from(ANCHORS)
seeds = st.integers(0, 10_000)


@settings(max_examples=40, deadline=None)
@given(alphas, st.floats(0.0, 0.99), divergences, anchors, seeds)
def test_equal_models_give_zero_loss_and_gradient(
    alpha: float, lam: float, divergence: str, anchor: str, seed: int
) -> None:
    student, _, mask = make_inputs(seed)
    loss, grad = loss_and_grad(
        student, student.clone(), mask, alpha=alpha, lam=lam, divergence=divergence, anchor=anchor
    )
    assert abs(loss.item()) < 1e-6
    if divergence != "tvd":
        # |x − r| has a kink at x = r, where any sign is a valid subgradient.
        assert grad.abs().max() < 1e-6


@settings(max_examples=25, deadline=None)
@given(seeds, st.floats(0.1, 8.0), st.sampled_from(["skl", "srkl"]))
def test_skew_presets_are_distillm_skew_divergences(seed: int, scale: float, name: str) -> None:
    """skl = KL(p‖0.1p+0.9q) and srkl = KL(q‖0.9p+0.1q), computed directly."""
    student, teacher, mask = make_inputs(seed, pad=0, scale=scale)
    loss = amid_loss(student, teacher, mask, **PRESETS[name].loss_kwargs())
    p, q = torch.softmax(teacher.double(), -1), torch.softmax(student.double(), -1)
    if name == "skl":
        skew = (p * torch.log(p / (0.1 * p + 0.9 * q))).sum(-1)
    else:
        skew = (q * torch.log(q / (0.9 * p + 0.1 * q))).sum(-1)
    assert loss.item() == pytest.approx(_token_mean(skew, mask), rel=1e-4, abs=1e-7)


@settings(max_examples=25, deadline=None)
@given(alphas, st.floats(0.0, 1.0), divergences, anchors, seeds, st.integers(1, 12))
def test_chunked_equals_unchunked(
    alpha: float, lam: float, divergence: str, anchor: str, seed: int, chunk_size: int
) -> None:
    student, teacher, mask = make_inputs(seed)
    knobs = {"alpha": alpha, "lam": lam, "divergence": divergence, "anchor": anchor}
    whole, whole_grad = loss_and_grad(student, teacher, mask, chunk_size=B * T, **knobs)
    part, part_grad = loss_and_grad(student, teacher, mask, chunk_size=chunk_size, **knobs)
    torch.testing.assert_close(part, whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(part_grad, whole_grad, rtol=1e-5, atol=1e-8)


@settings(max_examples=25, deadline=None)
@given(alphas, st.floats(0.0, 0.99), divergences, anchors, seeds)
def test_huge_logits_stay_finite(
    alpha: float, lam: float, divergence: str, anchor: str, seed: int
) -> None:
    student, teacher, mask = make_inputs(seed, scale=1e4 / 3)
    student, teacher = student.clamp(-1e4, 1e4), teacher.clamp(-1e4, 1e4)
    loss, grad = loss_and_grad(
        student, teacher, mask, alpha=alpha, lam=lam, divergence=divergence, anchor=anchor
    )
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all()


@settings(max_examples=20, deadline=None)
@given(
    st.floats(-8.0, 8.0),
    st.floats(0.0, 1.0),
    divergences,
    anchors,
    seeds,
    st.sampled_from([torch.bfloat16, torch.float16]),
)
def test_half_precision_inputs_give_the_fp32_answer(
    alpha: float, lam: float, divergence: str, anchor: str, seed: int, dtype: torch.dtype
) -> None:
    student, teacher, mask = make_inputs(seed, dtype=dtype)
    knobs = {"alpha": alpha, "lam": lam, "divergence": divergence, "anchor": anchor}
    half, half_grad = loss_and_grad(student, teacher, mask, **knobs)
    full, full_grad = loss_and_grad(student.float(), teacher.float(), mask, **knobs)
    assert half.dtype == torch.float32
    assert half_grad.dtype == dtype
    # The loss is computed in fp32 from the same (rounded) logits; only the stored gradient is
    # rounded to the input dtype.
    torch.testing.assert_close(half, full, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(half_grad.float(), full_grad, rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("need_x", [True, False])
@pytest.mark.parametrize(
    ("name", "params", "x_zero", "r_zero"),
    [
        # x_zero / r_zero: put a zero-probability entry on that side where the divergence stays
        # finite with it.
        ("kl", {}, True, False),
        ("rkl", {}, False, True),
        ("js", {}, True, True),
        ("tvd", {}, True, True),
        ("ab", {"ab_alpha": 0.2, "ab_beta": 0.7}, True, True),
        ("ab", {"ab_alpha": 0.0, "ab_beta": 0.7}, False, True),
        ("ab", {"ab_alpha": 0.5, "ab_beta": 0.0}, True, False),
        ("ab", {"ab_alpha": 0.0, "ab_beta": 0.0}, False, False),
        ("ab", {"ab_alpha": 0.6, "ab_beta": -0.6}, False, False),
        ("ab", {"ab_alpha": 1.5, "ab_beta": -0.4}, True, False),
    ],
)
def test_closed_form_gradients_match_autograd_of_the_divergence(
    name: str, params: dict[str, float], x_zero: bool, r_zero: bool, need_x: bool
) -> None:
    """The training path's fused value-and-gradient equals autograd through the registry entry,
    with zero-probability entries on one side (where both sides are 0 the base never calls it)."""
    from core.losses import _VALUE_AND_GRADS, _Scratch

    gen = torch.Generator().manual_seed(5)
    log_x = torch.log_softmax(torch.randn(4, 9, generator=gen, dtype=torch.float64), -1)
    log_r = torch.log_softmax(torch.randn(4, 9, generator=gen, dtype=torch.float64), -1)
    if x_zero:
        log_x[:, 0] = -math.inf
    if r_zero:
        log_r[:, 1] = -math.inf
    leaf_x = log_x.clone().requires_grad_()
    leaf_r = log_r.clone().requires_grad_()
    expected = DIVERGENCE_FUNCTIONS[name](leaf_x, leaf_r, **params)
    expected.backward()
    value, grad_x, grad_r = _VALUE_AND_GRADS[name](
        log_x, log_r, need_x, scratch=_Scratch(), may_have_zeros=x_zero or r_zero, **params
    )
    assert torch.isfinite(expected)
    torch.testing.assert_close(value, expected.detach())
    torch.testing.assert_close(grad_r, leaf_r.grad)
    if need_x:
        torch.testing.assert_close(grad_x, leaf_x.grad)
    else:
        assert grad_x is None


def test_sliced_non_contiguous_logits_match_contiguous_ones() -> None:
    """The engine passes logits[:, :-1]; the loss must read it in place, not a flattened copy."""
    gen = torch.Generator().manual_seed(32)
    full_student = torch.randn(B, T + 1, V, generator=gen)
    full_teacher = torch.randn(B, T + 1, V, generator=gen)
    mask = torch.rand(B, T, generator=gen) < 0.6
    mask[1, 2] = True
    knobs = {"alpha": -3.0, "lam": 0.2, "divergence": "ab", "chunk_size": 3}
    leaf = full_student.clone().requires_grad_()
    sliced = amid_loss(leaf[:, :-1], full_teacher[:, :-1], mask, **knobs)  # type: ignore[arg-type]
    sliced.backward()
    assert not leaf[:, :-1].is_contiguous()
    loss, grad = loss_and_grad(
        full_student[:, :-1].contiguous(), full_teacher[:, :-1].contiguous(), mask, **knobs
    )
    assert leaf.grad is not None
    assert sliced.item() == loss.item()
    torch.testing.assert_close(leaf.grad[:, :-1], grad, rtol=0, atol=0)
    assert torch.all(leaf.grad[:, -1] == 0)


@pytest.mark.slow
def test_kl_value_agrees_with_float64_at_full_vocabulary() -> None:
    """2,048 tokens × GPT-2's 50,257: fp32 sums over chunks this wide must not drift (a plain
    fp32 dot product or log-softmax kernel is off by 2–5e-5 relative here)."""
    tokens, vocab, alpha, lam = 2_048, 50_257, -5.0, 0.1
    gen = torch.Generator().manual_seed(40)
    student = torch.randn(tokens, vocab, generator=gen).mul_(3).requires_grad_()
    teacher = torch.randn(tokens, vocab, generator=gen).mul_(3)
    loss = amid_loss(student, teacher, alpha=alpha, lam=lam, divergence="kl")
    expected = 0.0
    for start in range(0, tokens, 256):  # float64 reference, a block of rows at a time
        p = torch.softmax(teacher[start : start + 256].double(), -1)
        q = torch.softmax(student.detach()[start : start + 256].double(), -1)
        r = reference_assistant(p, q, alpha, lam)
        expected += (p * torch.log(p / r)).sum().item()
    expected /= tokens
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("alpha", [-5.0, 0.5])
@pytest.mark.parametrize("divergence", ["ab", "kl"])
def test_the_paper_setting_equals_the_authors_formulation(divergence: str, alpha: float) -> None:
    """At the loss benchmark's settings (λ = 0.1, anchor teacher), the loss and its gradient are
    those of the authors' `amid()` as the benchmark writes it, in float64: the method, not a
    variant of it."""
    from benchmarks.loss import AB_ALPHA, AB_BETA, ALPHAS, LAM, dense_loss

    assert alpha in ALPHAS
    student, teacher, mask = make_inputs(11, pad=0, dtype=torch.float64)
    theirs_leaf = student.clone().requires_grad_()
    theirs = dense_loss(theirs_leaf, teacher, mask, divergence, alpha)
    theirs.backward()
    ours, grad = loss_and_grad(
        student,
        teacher,
        mask,
        alpha=alpha,
        lam=LAM,
        divergence=divergence,
        anchor="teacher",
        ab_alpha=AB_ALPHA,
        ab_beta=AB_BETA,
    )
    assert theirs_leaf.grad is not None
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(grad, theirs_leaf.grad, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunks_reuse_the_same_scratch_buffers(
    divergence: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every chunk of a call computes in the buffers the first chunk made: the number of [N, V]
    tensors allocated does not grow with the number of chunks (allocating afresh per chunk
    costs page faults at a real vocabulary)."""
    from core import losses

    made: list[int] = []
    take = losses._Scratch.take

    def counting_take(
        self: losses._Scratch, shape: torch.Size, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        free = self._free.get((shape, dtype, device))
        if not free:
            made.append(1)
        return take(self, shape, dtype, device)

    monkeypatch.setattr(losses._Scratch, "take", counting_take)
    student, teacher, _ = make_inputs(41, pad=0)
    counts = []
    for chunk_size in (B * T, 1):  # one chunk, then one per position
        made.clear()
        loss_and_grad(
            student,
            teacher,
            None,
            alpha=-5.0,
            lam=0.1,
            divergence=divergence,
            chunk_size=chunk_size,
        )
        counts.append(len(made))
    assert counts[0] > 0
    assert counts[1] == counts[0]


def test_a_scratch_tensor_given_back_twice_is_an_error() -> None:
    from core.losses import _Scratch

    scratch = _Scratch()
    tensor = scratch.take(torch.Size((2, 3)), torch.float32, torch.device("cpu"))
    scratch.give(tensor, tensor)  # named twice in one call: counted once
    with pytest.raises(RuntimeError, match="twice"):
        scratch.give(tensor)


@pytest.mark.parametrize("alpha", [-5.0, -3.0])
def test_padding_beside_an_entry_far_below_the_teacher_stays_exact(alpha: float) -> None:
    """A chunk holding padded entries (−inf in both logits) and an entry where the student is
    e^50 below the teacher: there the mixture's weight underflows fp32, and the exact form must
    still be taken although the padding puts NaN beside it."""
    student, teacher, mask = make_inputs(seed=43)
    student[0, 0, 0], teacher[0, 0, 0] = -40.0, 10.0
    mask[0, 0] = True
    knobs = {"alpha": alpha, "lam": 0.1, "divergence": "kl"}
    ours, grad = loss_and_grad(student, teacher, mask, **knobs)
    exact, exact_grad = loss_and_grad(student.double(), teacher.double(), mask, **knobs)
    assert torch.isfinite(ours) and torch.isfinite(grad).all()
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-4, atol=1e-7)
