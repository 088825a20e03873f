"""The AMiD loss: distil a student towards an α-mixture assistant of teacher and student.

Teacher next-token distribution p, student q, c = (1 − α)/2 and teacher weight λ:

    r̃ = (λ·p^c + (1−λ)·q^c)^(1/c)     α ≠ 1
    r̃ = p^λ · q^(1−λ)                  α = 1 (the c → 0 limit)
    r  = r̃ / Σ r̃

and the loss of one token is D(x, r) with x = p (anchor "teacher") or x = q (anchor "student").

Layout (Liger-Kernel's chunked distillation losses): one base, `amid_loss`, owns validation,
masking, chunking, the fp32 upcast, the mixture r and the single division by the number of valid
tokens; each divergence is a small function of `(log_x, log_r)` that returns the per-chunk sum.

Memory: the loss never builds the [tokens × vocab] autograd graph. A custom autograd Function
walks the masked positions chunk by chunk, computes each chunk's loss and its gradient w.r.t.
the student logits right there and writes the gradient into one preallocated buffer; backward
only scales that buffer. A chunk's temporaries come from a small pool of [chunk × vocab]
buffers that every chunk of the call reuses (`_Scratch`), so peak extra memory is that gradient
buffer plus those few buffers, whatever the batch, and no chunk pays for fresh pages.

Gradients, in closed form: each divergence also has a fused function giving its value and its
partials w.r.t. log x and log r (checked in the tests against autograd through the plain
definition), and the chain through the normalisation of r, the mixture and the student's
log-softmax is written out. That is faster than autograd, keeps fewer tensors alive, and lets
padded vocabulary entries (−inf in both logits) get an exact zero instead of the NaN that
autograd produces through log 0.

The fused path, `fused_amid_loss`, goes one step further for training: it takes both models'
hidden states and head weights, makes each chunk's logits itself and returns the gradients
w.r.t. the student's hidden states and head, so no [tokens × vocab] tensor exists at all.

Precision: log-softmax is z − logsumexp(z) and chunk sums use cascaded summation, so values at
a 50k vocabulary agree with float64 to ~1e-8 relative. The mixture is computed in log space
without ever forming p^c, through log1p/expm1 when |c| is small so that α near 1 keeps fp32
precision; below |c| = 1e-20 the geometric limit itself is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from core.presets import ANCHORS, DEFAULT_LOSS_CHUNK_SIZE, DIVERGENCES

__all__ = [
    "DIVERGENCE_FUNCTIONS",
    "ab_divergence",
    "amid_loss",
    "assistant_log_probs",
    "fused_amid_loss",
    "js",
    "kl",
    "rkl",
    "tvd",
]

_LOG_HALF = math.log(0.5)
# Below this |c| the generalised mean is the geometric one to far better than fp32 resolution
# (they differ by O(c·(log p − log q)²)), and c·log p could underflow: use the α = 1 formula.
_GEOMETRIC_C = 1e-20
# Below this |c| the mixture goes through log1p/expm1 (precise as c → 0); above it through
# softplus, taken as the log of the mixture's weight (one pass, and already precise).
_LOG1P_BELOW_C = 0.1
_LARGE_U = 30.0
# Beyond this y, softplus(y) = y + log1p(e^−y) is y to fp32 precision, and sigmoid(−y) is no
# longer a normal float (below 2^−126 from y ≈ 87.3).
_SOFTPLUS_IS_LINEAR = 80.0
# Rows whose largest logit lies within ±this of 0 take their softmax sum without the shift by
# the maximum: e^60 times a 2^18-wide vocabulary stays far below fp32's largest float.
_UNSHIFTED_EXP = 60.0


# -- divergences ---------------------------------------------------------------------------------
# Each takes fp32 log-probabilities of one chunk, [N, V], where −inf marks an entry without mass
# (never on both sides at once: the base gives such entries the neutral value log 1 on both sides),
# and returns the sum over the chunk's tokens. They must stay NaN-free in value and gradient when
# one side is −inf, so a product with a probability that may be 0 is guarded by `torch.where`
# *before* anything infinite can enter it.


def _plogratio(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Element-wise a·(log a − log b), with the convention 0·log(0/b) = 0 (gradient included)."""
    a = log_a.exp()
    # The difference is replaced where a = 0, so no inf ever meets the zero factor.
    diff = torch.where(a > 0, log_a - log_b, torch.zeros_like(log_a))
    return a * diff


def kl(log_x: Tensor, log_r: Tensor, **_: float) -> Tensor:
    """KL(x‖r) = Σ x·log(x/r)."""
    return _plogratio(log_x, log_r).sum()


def rkl(log_x: Tensor, log_r: Tensor, **_: float) -> Tensor:
    """KL(r‖x) = Σ r·log(r/x)."""
    return _plogratio(log_r, log_x).sum()


def js(log_x: Tensor, log_r: Tensor, **_: float) -> Tensor:
    """Jensen–Shannon with mixture weight ½: ½·KL(x‖m) + ½·KL(r‖m), m = ½(x + r).

    Symmetric, bounded by log 2 per token, and zero only when x = r.
    """
    log_m = torch.logaddexp(log_x, log_r) + _LOG_HALF
    return 0.5 * (_plogratio(log_x, log_m).sum() + _plogratio(log_r, log_m).sum())


def tvd(log_x: Tensor, log_r: Tensor, **_: float) -> Tensor:
    """Total variation ½·Σ|x − r|."""
    return 0.5 * (log_x.exp() - log_r.exp()).abs().sum()


def ab_divergence(
    log_x: Tensor, log_r: Tensor, *, ab_alpha: float = 0.2, ab_beta: float = 0.7, **_: float
) -> Tensor:
    """The α-β divergence D_AB^(a,b)(x‖r) of Cichocki, Cruces and Amari (2011), as ABKD uses it.

    With a = ab_alpha, b = ab_beta:

        a, b, a+b ≠ 0:  −1/(ab) · Σ (x^a r^b − a/(a+b)·x^(a+b) − b/(a+b)·r^(a+b))
        a ≠ 0, b = 0:   1/a²   · Σ (x^a·log(x^a/r^a) − x^a + r^a)
        a = 0, b ≠ 0:   1/b²   · Σ (r^b·log(r^b/x^b) − r^b + x^b)
        a = −b ≠ 0:     1/a²   · Σ (log(r^a/x^a) + (x/r)^a − 1)
        a = b = 0:      ½      · Σ (log x − log r)²

    Each branch is the limit of the general one, so the family is continuous in (a, b);
    (1, 0) is KL(x‖r) and (0, 1) is KL(r‖x). Every power is taken as exp(k·log ·).
    """
    a, b = float(ab_alpha), float(ab_beta)
    if a == 0.0 and b == 0.0:
        return 0.5 * (log_x - log_r).square().sum()
    if b == 0.0:
        return (_plogratio(a * log_x, a * log_r) - (a * log_x).exp() + (a * log_r).exp()).sum() / (
            a * a
        )
    if a == 0.0:
        return (_plogratio(b * log_r, b * log_x) - (b * log_r).exp() + (b * log_x).exp()).sum() / (
            b * b
        )
    if a + b == 0.0:
        log_ratio = a * (log_x - log_r)
        return (log_ratio.exp() - log_ratio - 1.0).sum() / (a * a)
    s = a + b
    cross = (a * log_x + b * log_r).exp()
    return -(cross - (a / s) * (s * log_x).exp() - (b / s) * (s * log_r).exp()).sum() / (a * b)


DivergenceFn = Callable[..., Tensor]

# The closed registry users pick from by name; its keys are `core.presets.DIVERGENCES`.
DIVERGENCE_FUNCTIONS: dict[str, DivergenceFn] = {
    "kl": kl,
    "rkl": rkl,
    "ab": ab_divergence,
    "js": js,
    "tvd": tvd,
}


# -- scratch buffers -------------------------------------------------------------------------------


class _Scratch:
    """Free [rows, V] tensors, handed out and taken back, so that every chunk of one call computes
    in the same few buffers.

    At a 50k vocabulary each temporary of a chunk is megabytes. Allocated afresh per chunk, the C
    allocator returns many of them to the system on free and the next chunk pays a page fault per
    4 KiB to get them back: a third of the loss's CPU time on a 2,048-token batch went to that.
    Reused, they are faulted in once per call and are still in cache for the next operation.
    A tensor given back must be one this pool handed out, after its last use.
    """

    def __init__(self) -> None:
        self._free: dict[tuple[torch.Size, torch.dtype, torch.device], list[Tensor]] = {}

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor of this shape, dtype and device."""
        free = self._free.get((shape, dtype, device))
        return free.pop() if free else torch.empty(shape, dtype=dtype, device=device)

    def take_like(self, tensor: Tensor) -> Tensor:
        return self.take(tensor.shape, tensor.dtype, tensor.device)

    def give(self, *tensors: Tensor | float | None) -> None:
        """Takes back each tensor given (numbers and None are skipped, a tensor named twice in
        one call counts once)."""
        seen: list[Tensor] = []
        for tensor in tensors:
            if not isinstance(tensor, Tensor) or any(tensor is other for other in seen):
                continue
            seen.append(tensor)
            free = self._free.setdefault((tensor.shape, tensor.dtype, tensor.device), [])
            if any(tensor is other for other in free):
                raise RuntimeError("a scratch tensor was given back twice")
            free.append(tensor)


# -- the same divergences with their gradients, in closed form ------------------------------------
# The training path needs each chunk's value and its partial derivatives w.r.t. log x and log r.
# Autograd through the functions above would keep every intermediate alive and cost a backward
# pass; these compute the value and both partials together from a handful of tensors. The tests
# check them against autograd through the functions above. `grad_x` is None unless asked for.
# They leave `log_x` and `log_r` untouched, and take their temporaries and results from
# `scratch`; the results belong to the caller, who gives them back. `may_have_zeros` False
# promises that neither side holds −inf, which lets them skip the guards a zero needs.

ValueAndGrads = tuple[Tensor, Tensor | None, Tensor]


def _dot(a: Tensor, b: Tensor, scratch: _Scratch) -> Tensor:
    """Σ a·b. The product is materialised on purpose: `torch.vdot` over a chunk of [N, V]
    accumulates in plain fp32 and drifts by ~3e-5 relative at N·V ≈ 6e6, where the cascaded
    summation of `sum` stays within ~1e-7."""
    product = torch.mul(a, b, out=scratch.take_like(a))
    total = product.sum()
    scratch.give(product)
    return total


def _exp(log_a: Tensor, scratch: _Scratch) -> Tensor:
    return torch.exp(log_a, out=scratch.take_like(log_a))


def _guarded_diff(
    prob: Tensor, log_a: Tensor, log_b: Tensor, scratch: _Scratch, may_have_zeros: bool
) -> Tensor:
    """log a − log b where prob > 0, else 0 (so 0·log(0/b) is 0 and no inf meets a zero)."""
    diff = torch.sub(log_a, log_b, out=scratch.take_like(log_a))
    if may_have_zeros:
        diff.masked_fill_(prob == 0, 0.0)
    return diff


def _plogratio_grads(
    log_a: Tensor,
    log_b: Tensor,
    need: tuple[bool, bool],
    scratch: _Scratch,
    may_have_zeros: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Σ a·(log a − log b) and, where `need` asks, its partials ∂/∂log a = a(log a − log b + 1)
    and ∂/∂log b = −a: KL(x‖r) with a = x, reverse KL with a = r."""
    a = _exp(log_a, scratch)
    diff = _guarded_diff(a, log_a, log_b, scratch, may_have_zeros)
    grad_a = None
    if need[0]:
        value = _dot(a, diff, scratch)
        grad_a = diff.add_(1.0).mul_(a)
    else:  # the difference is not needed again: the product is made in its place
        value = diff.mul_(a).sum()
        scratch.give(diff)
    grad_b = a.neg_() if need[1] else None
    if grad_b is None:
        scratch.give(a)
    return value, grad_a, grad_b


def _kl_grads(
    log_x: Tensor,
    log_r: Tensor,
    need_x: bool,
    *,
    scratch: _Scratch,
    may_have_zeros: bool,
    **_: float,
) -> ValueAndGrads:
    # D = Σ x(log x − log r):  ∂/∂log x = x(log x − log r + 1),  ∂/∂log r = −x.
    value, grad_x, grad_r = _plogratio_grads(log_x, log_r, (need_x, True), scratch, may_have_zeros)
    assert grad_r is not None  # asked for
    return value, grad_x, grad_r


def _rkl_grads(
    log_x: Tensor,
    log_r: Tensor,
    need_x: bool,
    *,
    scratch: _Scratch,
    may_have_zeros: bool,
    **_: float,
) -> ValueAndGrads:
    # D = Σ r(log r − log x):  ∂/∂log r = r(log r − log x + 1),  ∂/∂log x = −r.
    value, grad_r, grad_x = _plogratio_grads(log_r, log_x, (True, need_x), scratch, may_have_zeros)
    assert grad_r is not None  # asked for
    return value, grad_x, grad_r


def _js_grads(
    log_x: Tensor,
    log_r: Tensor,
    need_x: bool,
    *,
    scratch: _Scratch,
    may_have_zeros: bool,
    **_: float,
) -> ValueAndGrads:
    # With m = ½(x + r) the terms through log m cancel: ∂/∂log x = ½x(log x − log m), likewise r.
    log_m = torch.logaddexp(log_x, log_r, out=scratch.take_like(log_x)).add_(_LOG_HALF)
    halves = []
    for log_a in (log_r, log_x):
        a = _exp(log_a, scratch)
        halves.append(_guarded_diff(a, log_a, log_m, scratch, may_have_zeros).mul_(a).mul_(0.5))
        scratch.give(a)
    scratch.give(log_m)
    grad_r, grad_x = halves
    value = grad_x.sum() + grad_r.sum()
    if not need_x:
        scratch.give(grad_x)
    return value, (grad_x if need_x else None), grad_r


def _tvd_grads(
    log_x: Tensor,
    log_r: Tensor,
    need_x: bool,
    *,
    scratch: _Scratch,
    **_: float,
) -> ValueAndGrads:
    # ∂/∂log x = ½·sign(x − r)·x, ∂/∂log r = −½·sign(x − r)·r (0 at the kink x = r).
    x = _exp(log_x, scratch)
    r = _exp(log_r, scratch)
    diff = torch.sub(x, r, out=scratch.take_like(x))
    value = 0.5 * diff.abs_().sum()
    sign = torch.sub(x, r, out=diff).sign_()
    grad_x = x.mul_(sign).mul_(0.5) if need_x else None
    grad_r = r.mul_(sign).mul_(-0.5)
    scratch.give(sign, None if need_x else x)
    return value, grad_x, grad_r


def _ab_grads(
    log_x: Tensor,
    log_r: Tensor,
    need_x: bool,
    *,
    scratch: _Scratch,
    may_have_zeros: bool,
    ab_alpha: float = 0.2,
    ab_beta: float = 0.7,
    **_: float,
) -> ValueAndGrads:
    a, b = float(ab_alpha), float(ab_beta)
    if a == 0.0 and b == 0.0:
        delta = torch.sub(log_x, log_r, out=scratch.take_like(log_x))
        value = 0.5 * _dot(delta, delta, scratch)
        grad_x = torch.clone(delta) if need_x else None
        return value, grad_x, delta.neg_()
    if b == 0.0:
        # ∂/∂log x = x^a(log x − log r), ∂/∂log r = (r^a − x^a)/a.
        xa = torch.mul(log_x, a, out=scratch.take_like(log_x)).exp_()
        diff = _guarded_diff(xa, log_x, log_r, scratch, may_have_zeros)
        grad_r = torch.mul(log_r, a, out=scratch.take_like(log_r)).exp_().sub_(xa).div_(a)
        value = (a * _dot(xa, diff, scratch) + a * grad_r.sum()) / (a * a)
        grad_x = diff.mul_(xa) if need_x else None
        scratch.give(xa, None if need_x else diff)
        return value, grad_x, grad_r
    if a == 0.0:
        rb = torch.mul(log_r, b, out=scratch.take_like(log_r)).exp_()
        diff = _guarded_diff(rb, log_r, log_x, scratch, may_have_zeros)
        grad_x = torch.mul(log_x, b, out=scratch.take_like(log_x)).exp_().sub_(rb).div_(b)
        value = (b * _dot(rb, diff, scratch) + b * grad_x.sum()) / (b * b)
        grad_r = diff.mul_(rb)
        scratch.give(rb, None if need_x else grad_x)
        return value, (grad_x if need_x else None), grad_r
    if a + b == 0.0:
        # With L = a(log x − log r): D = Σ(e^L − L − 1)/a², ∂/∂log x = (e^L − 1)/a = −∂/∂log r.
        ratio = torch.sub(log_x, log_r, out=scratch.take_like(log_x)).mul_(a)
        value = (ratio.exp().sum() - ratio.sum() - ratio.numel()) / (a * a)
        grad_x = ratio.expm1_().div_(a)
        return value, (grad_x.clone() if need_x else None), grad_x.neg_()
    # General: ∂/∂log x = −(x^a r^b − x^(a+b))/b, ∂/∂log r = −(x^a r^b − r^(a+b))/a, and
    # D = (Σ∂/∂log x + Σ∂/∂log r)/(a+b): summing the element-wise differences rather than three
    # separate sums of size ~1 keeps D accurate where x ≈ r.
    s = a + b
    cross = torch.mul(log_x, a, out=scratch.take_like(log_x)).add_(log_r, alpha=b).exp_()
    # b·∂/∂log x = x^(a+b) − x^a r^b; divided by b only where it is returned.
    partial_x = torch.mul(log_x, s, out=scratch.take_like(log_x)).exp_().sub_(cross)
    sum_x = partial_x.sum() / b
    # Unless asked for, ∂/∂log x is given back before ∂/∂log r exists: one [N, V] less.
    kept_x = partial_x.div_(b) if need_x else None
    if kept_x is None:
        scratch.give(partial_x)
    grad_r = torch.mul(log_r, s, out=scratch.take_like(log_r)).exp_().sub_(cross).div_(a)
    scratch.give(cross)
    value = (sum_x + grad_r.sum()) / s
    return value, kept_x, grad_r


_VALUE_AND_GRADS: dict[str, Callable[..., ValueAndGrads]] = {
    "kl": _kl_grads,
    "rkl": _rkl_grads,
    "ab": _ab_grads,
    "js": _js_grads,
    "tvd": _tvd_grads,
}

# -- the assistant distribution ----------------------------------------------------------------


def _mixture(
    log_p: Tensor,
    log_q: Tensor,
    alpha: float,
    lam: float,
    scratch: _Scratch,
    *,
    may_have_zeros: bool = True,
) -> tuple[Tensor, Tensor | float]:
    """log r (normalised) and w = ∂log r̃/∂log q, the q-weight of the mixture at each entry.

    λ = 0 and λ = 1 return log q and log p themselves (no log 0 term is ever formed), and for
    them w is the scalar 1 or 0. Entries where both p and q are 0 get log r = −inf and w = 0.
    Otherwise log r and w are scratch tensors, the caller's to give back.
    """
    if lam == 0.0:
        return log_q, 1.0
    if lam == 1.0:
        return log_p, 0.0
    c = (1.0 - alpha) / 2.0
    log_rt = scratch.take_like(log_p)
    if abs(c) < _GEOMETRIC_C:
        torch.mul(log_p, lam, out=log_rt).add_(log_q, alpha=1.0 - lam)
        weight: Tensor | float = 1.0 - lam
        # A zero on either side is a zero of p^λ·q^(1−λ); spelled out because a λ below fp32's
        # range turns λ·log 0 into 0·(−inf) = NaN.
        if may_have_zeros:
            either_zero = torch.isneginf(log_p) | torch.isneginf(log_q)
            log_rt.masked_fill_(either_zero, -math.inf)
    else:
        # With u = c·(log p − log q) and y = u + log(λ/(1−λ)), taken relative to the student:
        #   log r̃ = log q + log(1 − λ + λ·e^u)/c = log q + (log(1−λ) + softplus(y))/c,
        #   ∂log r̃/∂log q = (1−λ)/(1 − λ + λ·e^u) = sigmoid(−y).
        # p = q gives u = 0 everywhere. For c < 0 a zero on either side sends log r̃ to −inf:
        # the support intersection.
        logit = math.log(lam) - math.log1p(-lam)
        # −y = c·(log q − log p) − log(λ/(1−λ)), made where the weight sigmoid(−y) will lie.
        weight = torch.sub(log_q, log_p, out=scratch.take_like(log_p)).mul_(c).sub_(logit)
        if abs(c) >= _LOG1P_BELOW_C:
            # softplus(y) = −log sigmoid(−y): one pass over the weight, where softplus itself
            # costs four passes' time on CPU. The weight keeps 1e-7 relative precision while it
            # is a normal float; beyond y = 80 it is not, and softplus(y) is y to fp32 precision.
            # The constant log(1−λ)/c is left out (the normalisation below removes it).
            # (Where p = q = 0 the weight is NaN, which `amin` would return: then compare.)
            linear_somewhere = (
                bool((weight < -_SOFTPLUS_IS_LINEAR).any())
                if may_have_zeros
                else float(weight.amin()) < -_SOFTPLUS_IS_LINEAR
            )
            neg_y = weight.clone() if linear_somewhere else None
            torch.log(weight.sigmoid_(), out=log_rt)  # −softplus(y)
            if neg_y is not None:
                torch.where(neg_y < -_SOFTPLUS_IS_LINEAR, neg_y, log_rt, out=log_rt)
            step, left_out = -1.0 / c, math.log1p(-lam)
        else:
            # Small |c|: with u = c·(log p − log q), log1p(λ·expm1(u)) keeps full precision as
            # c → 0, where the form above would divide its rounding error by c (as would leaving
            # out the constant here, or taking u from y). It overflows only for u beyond ~88,
            # which needs |log p − log q| > 88/|c|; there log(1−λ) + softplus(y) is exact enough.
            u = torch.sub(log_p, log_q, out=scratch.take_like(log_p)).mul_(c)
            weight.sigmoid_()
            torch.expm1(u, out=log_rt).mul_(lam).log1p_()
            large = u > _LARGE_U
            if bool(large.any()):
                exact = F.softplus(u.add_(logit)).add_(math.log1p(-lam))
                torch.where(large, exact, log_rt, out=log_rt)
            scratch.give(u)
            step, left_out = 1.0 / c, 0.0
        torch.add(log_q, log_rt, alpha=step, out=log_rt)
        q_zero = torch.isneginf(log_q) if may_have_zeros else None
        if q_zero is not None and bool(q_zero.any()):
            p_zero = torch.isneginf(log_p)
            if c > 0:
                # q = 0 < p: r̃ = λ^(1/c)·p, which the form around log q cannot express (∞ − ∞);
                # less the constant left out above.
                only_p = q_zero & ~p_zero
                shifted_p = log_p + (math.log(lam) - left_out) / c
                torch.where(only_p, shifted_p, log_rt, out=log_rt)
                weight.masked_fill_(only_p, 0.0)
            # p = q = 0: no mass and no gradient (t is NaN there).
            both_zero = q_zero & p_zero
            log_rt.masked_fill_(both_zero, -math.inf)
            weight.masked_fill_(both_zero, 0.0)
    log_r = _log_softmax(log_rt, scratch, in_place=True)
    return log_r, weight


def _check_knobs(alpha: float, lam: float) -> None:
    if not math.isfinite(alpha):
        raise ValueError(f"alpha: must be a finite number, got {alpha!r}")
    if not math.isfinite(lam) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam: must lie in [0, 1], got {lam!r}")


def _log_softmax(
    logits: Tensor, scratch: _Scratch, dtype: torch.dtype | None = None, in_place: bool = False
) -> Tensor:
    """log-softmax along the last dimension as z − logsumexp(z), in a scratch tensor of `dtype`
    (default the logits' own), or in `logits` itself with `in_place` (a scratch tensor then).

    `torch.log_softmax`'s CPU kernel sums the exponentials of a 50k-wide row in plain fp32 and
    comes out biased by about +1e-6 per row, which becomes a 2e-6 relative error in a KL value;
    `sum` sums in cascade (bias ~1e-8). `torch.logsumexp` sums the same way, but makes two
    [N, V] temporaries and takes twice the time of the four operations written out here.
    """
    work = scratch.take(logits.shape, dtype or logits.dtype, logits.device)
    top = logits.amax(dim=-1, keepdim=True).to(work.dtype)
    low, high = torch.aminmax(top)
    if low > -_UNSHIFTED_EXP and high < _UNSHIFTED_EXP:
        # Every row's maximum lies within e^±60 of 1, so the exponentials of the logits as they
        # are neither overflow nor sum to zero, and are as precise as shifted ones: one pass less.
        # Logits of a narrower dtype are upcast first (exp would run in their own precision).
        upcast = logits if logits.dtype == work.dtype else work.copy_(logits)
        log_total = torch.exp(upcast, out=work).sum(dim=-1, keepdim=True).log_()
    else:
        # As in logsumexp: a row whose maximum is infinite is not shifted (inf − inf is NaN).
        top.masked_fill_(top.isinf(), 0.0)
        total = torch.sub(logits, top, out=work).exp_().sum(dim=-1, keepdim=True)
        log_total = total.log_().add_(top)
    if in_place:
        scratch.give(work)
        return logits.sub_(log_total)
    return torch.sub(logits, log_total, out=work)


def _has_neginf(tensor: Tensor) -> bool:
    # One read of the tensor and no [N, V] mask, where `isneginf(...).any()` makes one.
    return bool(tensor.amin() == -math.inf)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 at least (bf16/fp16 logits are upcast); float64 inputs keep float64.
    return torch.promote_types(dtype, torch.float32)


def assistant_log_probs(
    student_logits: Tensor, teacher_logits: Tensor, *, alpha: float, lam: float
) -> Tensor:
    """The normalised log r of the AMiD assistant, [..., V], in fp32 (or float64 inputs' dtype).

    For inspection and evaluation; the result carries no gradient, as `amid_loss` is the
    training path (chunked, NaN-free on padded entries).
    """
    alpha, lam = float(alpha), float(lam)
    _check_knobs(alpha, lam)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits: shape {tuple(teacher_logits.shape)} differs from student_logits "
            f"{tuple(student_logits.shape)}"
        )
    dtype = _compute_dtype(torch.promote_types(student_logits.dtype, teacher_logits.dtype))
    scratch = _Scratch()
    with torch.no_grad():
        log_q = _log_softmax(student_logits, scratch, dtype)
        log_p = _log_softmax(teacher_logits, scratch, dtype)
        log_r, _ = _mixture(log_p, log_q, alpha, lam, scratch)
    return log_r


# -- the chunked loss ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    alpha: float
    lam: float
    name: str
    divergence: DivergenceFn
    student_anchor: bool
    params: dict[str, float]
    chunk_size: int
    need_grad: bool  # False when the student needs no gradient (evaluation): value only
    ce_weight: float = 0.0  # weight of the cross-entropy to the targets (fused path only)


def _chunk_loss(
    student: Tensor,
    teacher: Tensor,
    spec: _Spec,
    dtype: torch.dtype,
    scratch: _Scratch,
    *,
    targets: Tensor | None = None,
    in_place: tuple[bool, bool] = (False, False),
    grad_scale: float = 1.0,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Sum of D(x, r) over one chunk's rows of logits, [N, V] each (plus `spec.ce_weight` times
    the cross-entropy to `targets` where given) and, if `spec.need_grad`, its gradient w.r.t.
    the student's rows times `grad_scale`, written to `out` where given, else to a scratch
    tensor of `dtype` (fp32 or float64) that the caller gives back.
    `in_place` says whether the student's and the teacher's logits are scratch tensors of
    `dtype`, to be turned into log-probabilities where they lie.
    Every temporary is given back to `scratch` after its last use, so the few buffers in use at
    once set the loss's peak extra memory.
    """
    log_q = _log_softmax(student, scratch, dtype, in_place=in_place[0])
    log_p = _log_softmax(teacher, scratch, dtype, in_place=in_place[1])
    # Finite logits give finite log-probabilities: the −inf bookkeeping below is then skipped.
    may_have_zeros = _has_neginf(log_q) or _has_neginf(log_p)
    log_r, weight = _mixture(
        log_p, log_q, spec.alpha, spec.lam, scratch, may_have_zeros=may_have_zeros
    )
    log_x = log_q if spec.student_anchor else log_p

    # Entries with no mass on either side contribute nothing to any divergence; handing the
    # divergence log 1 on both sides there keeps −inf − (−inf) out of it, and the gradient it
    # returns for them is discarded below. (Copies: log q and log r are still needed as they are.)
    neutral: Tensor | None = None
    if may_have_zeros:
        found = torch.isneginf(log_x) & torch.isneginf(log_r)
        neutral = found if bool(found.any()) else None
    div_x, div_r = log_x, log_r
    if neutral is not None:
        div_x = log_x.masked_fill(neutral, 0.0)
        div_r = log_r.masked_fill(neutral, 0.0)

    # Cross-entropy to the references rides in the same pass: −Σ log q[target].
    target_log_q = None
    if targets is not None and spec.ce_weight > 0:
        target_log_q = log_q.gather(-1, targets.unsqueeze(-1))

    if not spec.need_grad:
        value = spec.divergence(div_x, div_r, **spec.params)
        if target_log_q is not None:
            value = value - spec.ce_weight * target_log_q.sum()
        scratch.give(log_q, log_p, log_r, weight)
        return value, None

    value, grad_x, grad_r = _VALUE_AND_GRADS[spec.name](
        div_x,
        div_r,
        spec.student_anchor,
        scratch=scratch,
        may_have_zeros=may_have_zeros,
        **spec.params,
    )
    if log_p is not log_r:  # at λ = 1, r is p
        scratch.give(log_p)
    if neutral is not None:
        grad_r.masked_fill_(neutral, 0.0)
        if grad_x is not None:
            grad_x.masked_fill_(neutral, 0.0)

    # Through r = r̃/Σr̃ (skipped at λ ∈ {0, 1}, where r is q or p itself): g − r·Σg.
    if isinstance(weight, Tensor) or weight not in (0.0, 1.0):
        total = grad_r.sum(dim=-1, keepdim=True)
        r = log_r.exp_()  # log_r is a tensor of its own here, no longer needed as a log
        if neutral is not None:
            r.masked_fill_(neutral, 0.0)
        grad_r.addcmul_(r, total, value=-1.0)
        scratch.give(r)
    elif log_r is log_p:
        scratch.give(log_p)
    # Through the mixture into log q, plus the anchor's own path when the anchor is q.
    grad_log_q = grad_r if isinstance(weight, float) and weight == 1.0 else grad_r.mul_(weight)
    scratch.give(weight)
    if grad_x is not None:
        grad_log_q.add_(grad_x)
        scratch.give(grad_x)
    if target_log_q is not None and targets is not None:
        value = value - spec.ce_weight * target_log_q.sum()
        grad_log_q.scatter_add_(
            -1, targets.unsqueeze(-1), target_log_q.new_full(target_log_q.shape, -spec.ce_weight)
        )
    # Through log q = z − logsumexp(z): scale·(g − q·Σg), in one pass from q·(−scale·Σg).
    total = grad_log_q.sum(dim=-1, keepdim=True).mul_(-grad_scale)
    q = log_q.exp_().mul_(total)
    grad = torch.add(q, grad_log_q, alpha=grad_scale, out=grad_log_q if out is None else out)
    scratch.give(q, None if out is None else grad_log_q)
    return value, grad


def _chunk_runs(rows: Tensor, chunk_size: int) -> list[slice | None]:
    """For each chunk of `rows` (ascending flat positions), the slice of positions it covers when
    they are consecutive, else None. Read once, so the loop does not synchronise per chunk."""
    starts = torch.arange(0, rows.numel(), chunk_size, device=rows.device)
    ends = (starts + chunk_size).clamp_max_(rows.numel())
    firsts, lasts = rows[starts].tolist(), rows[ends - 1].tolist()
    sizes = (ends - starts).tolist()
    return [
        slice(first, last + 1) if last - first == size - 1 else None
        for first, last, size in zip(firsts, lasts, sizes, strict=True)
    ]


def _flat_rows(tensor: Tensor) -> Tensor | None:
    """A [positions, V] view of a contiguous tensor (None where one would need a copy)."""
    return tensor.view(-1, tensor.shape[-1]) if tensor.is_contiguous() else None


class _AmidLoss(torch.autograd.Function):
    """Forward computes the loss and the student's gradient chunk by chunk; backward scales it."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        student_logits: Tensor,
        teacher_logits: Tensor,
        rows: Tensor,
        spec: _Spec,
    ) -> Tensor:
        chunk_size, need_grad = spec.chunk_size, spec.need_grad
        student = student_logits.detach()
        teacher = teacher_logits.detach()
        leading = student.shape[:-1]
        dtype = _compute_dtype(torch.promote_types(student.dtype, teacher.dtype))
        count = rows.numel()
        # The buffer is the only [B, T, V] allocation. Positions outside the mask keep a zero
        # gradient; with every position in it, each is written and none needs zeroing first.
        grad = None
        if need_grad:
            allocate = torch.empty if count == leading.numel() else torch.zeros
            grad = allocate(student.shape, dtype=student.dtype, device=student.device)
        # A run of consecutive positions is read as a view of contiguous logits and its gradient
        # written straight into the buffer; other chunks are gathered by multi-dimensional index
        # (the logits are often a non-contiguous slice such as logits[:, :-1], which nothing
        # copies or flattens whole). Advanced indexing, not index_select: same copy, but
        # index_select's CPU kernel is an order of magnitude slower on rows this wide.
        flat_student, flat_teacher = _flat_rows(student), _flat_rows(teacher)
        flat_grad = None if grad is None else _flat_rows(grad)
        scratch = _Scratch()
        total = torch.zeros((), dtype=torch.float64, device=student.device)
        for start, run in zip(
            range(0, count, chunk_size), _chunk_runs(rows, chunk_size), strict=True
        ):
            index = None
            if run is None or flat_student is None or flat_teacher is None:
                index = torch.unravel_index(rows[start : start + chunk_size], leading)
                student_rows, teacher_rows = student[index], teacher[index]
            else:
                student_rows, teacher_rows = flat_student[run], flat_teacher[run]
            # A run's gradient goes straight into the buffer; the mean's 1/count rides along.
            into = None if run is None or flat_grad is None else flat_grad[run]
            value, chunk_grad = _chunk_loss(
                student_rows,
                teacher_rows,
                spec,
                dtype,
                scratch,
                grad_scale=1.0 / count,
                out=into,
            )
            total += value.double()
            if grad is not None and chunk_grad is not None and into is None and index is not None:
                grad.index_put_(index, chunk_grad.to(grad.dtype))
                scratch.give(chunk_grad)
        loss = (total / max(count, 1)).to(dtype)
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.need_grad = need_grad  # type: ignore[attr-defined]
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        if not ctx.need_grad:
            return None, None, None, None
        (grad,) = ctx.saved_tensors
        # Out of place: scaling the saved buffer in place would break a second backward
        # (retain_graph); the common unit-weight case costs nothing.
        if not torch.equal(grad_output, torch.ones_like(grad_output)):
            grad = grad * grad_output.to(grad.dtype)
        return grad, None, None, None


def _make_spec(
    *,
    alpha: float,
    lam: float,
    divergence: str,
    anchor: str,
    ab_alpha: float,
    ab_beta: float,
    chunk_size: int,
    need_grad: bool,
    ce_weight: float = 0.0,
) -> _Spec:
    """Validate the loss's knobs (errors name the argument) and bundle them."""
    alpha, lam = float(alpha), float(lam)
    _check_knobs(alpha, lam)
    if divergence not in DIVERGENCE_FUNCTIONS:
        raise ValueError(f"divergence: unknown {divergence!r}; expected one of {DIVERGENCES}")
    if anchor not in ANCHORS:
        raise ValueError(f"anchor: unknown {anchor!r}; expected one of {ANCHORS}")
    ab_alpha, ab_beta = float(ab_alpha), float(ab_beta)
    if not math.isfinite(ab_alpha):
        raise ValueError(f"ab_alpha: must be a finite number, got {ab_alpha!r}")
    if not math.isfinite(ab_beta):
        raise ValueError(f"ab_beta: must be a finite number, got {ab_beta!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: must be a positive integer, got {chunk_size!r}")
    ce_weight = float(ce_weight)
    if not math.isfinite(ce_weight) or ce_weight < 0:
        raise ValueError(f"ce_weight: must be a finite number ≥ 0, got {ce_weight!r}")
    return _Spec(
        alpha=alpha,
        lam=lam,
        name=divergence,
        divergence=DIVERGENCE_FUNCTIONS[divergence],
        student_anchor=anchor == "student",
        params={"ab_alpha": ab_alpha, "ab_beta": ab_beta},
        chunk_size=chunk_size,
        need_grad=need_grad,
        ce_weight=ce_weight,
    )


def _masked_rows(mask: Tensor | None, leading: torch.Size, device: torch.device) -> Tensor:
    """Flat indices of the positions that count: all of them without a mask."""
    if mask is None:
        return torch.arange(leading.numel(), device=device)
    if mask.shape != leading or mask.dtype != torch.bool:
        raise ValueError(
            f"mask: expected a bool tensor of shape {tuple(leading)}, got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )
    return mask.to(device).reshape(-1).nonzero().squeeze(-1)


def amid_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    alpha: float,
    lam: float,
    divergence: str = "kl",
    anchor: str = "teacher",
    ab_alpha: float = 0.2,
    ab_beta: float = 0.7,
    chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE,
) -> Tensor:
    """Mean over the masked tokens of D(x, r), a 0-dim fp32 tensor (float64 for float64 logits).

    `student_logits` and `teacher_logits` are [..., V] (usually [B, T, V]) of any float dtype,
    already aligned so that position t of both predicts the same token; `mask` is a bool tensor
    of their leading shape (None: every position counts). The result is differentiable w.r.t.
    the student logits only (through q and through r); the teacher is a constant. With no
    masked position the loss is 0 and its gradient is 0.

    `chunk_size` tokens are processed at a time in fp32; peak extra memory is one gradient
    buffer the size of the student logits plus a few [chunk_size, V] fp32 tensors.
    """
    spec = _make_spec(
        alpha=alpha,
        lam=lam,
        divergence=divergence,
        anchor=anchor,
        ab_alpha=ab_alpha,
        ab_beta=ab_beta,
        chunk_size=chunk_size,
        need_grad=torch.is_grad_enabled() and student_logits.requires_grad,
    )
    if student_logits.dim() < 1 or not student_logits.is_floating_point():
        raise ValueError("student_logits: must be a floating-point tensor [..., V]")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits: shape {tuple(teacher_logits.shape)} differs from student_logits "
            f"{tuple(student_logits.shape)}"
        )
    if not teacher_logits.is_floating_point():
        raise ValueError("teacher_logits: must be a floating-point tensor")
    rows = _masked_rows(mask, student_logits.shape[:-1], student_logits.device)
    loss: Tensor = _AmidLoss.apply(student_logits, teacher_logits, rows, spec)
    return loss


# -- the fused head and loss ----------------------------------------------------------------------


def _head(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, scratch: _Scratch, dtype: torch.dtype
) -> tuple[Tensor, bool]:
    """hidden @ weight.T + bias in the wider of the two dtypes (as PyTorch promotes them), and
    whether it is a scratch tensor (so when that dtype is the compute `dtype`), which the chunk's
    loss then turns into log-probabilities in place and gives back."""
    logit_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    hidden, weight = hidden.to(logit_dtype), weight.to(logit_dtype)
    if logit_dtype != dtype:
        logits = hidden @ weight.T
        return (logits if bias is None else logits + bias.to(logit_dtype)), False
    out = scratch.take(torch.Size((hidden.shape[0], weight.shape[0])), dtype, hidden.device)
    if bias is None:
        return torch.mm(hidden, weight.T, out=out), True
    return torch.addmm(bias.to(dtype), hidden, weight.T, out=out), True


@dataclass(frozen=True)
class _FusedConstants:
    """What the fused loss reads but never differentiates: the teacher's side and the rows."""

    teacher_hidden: Tensor
    teacher_weight: Tensor
    teacher_bias: Tensor | None
    rows: Tensor
    targets: Tensor | None
    spec: _Spec


class _FusedAmidLoss(torch.autograd.Function):
    """Per chunk of masked rows: both heads' logits, the loss and the student's gradients w.r.t.
    its hidden states, head weight and bias, in buffers that the next chunk reuses."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        student_hidden: Tensor,
        student_weight: Tensor,
        student_bias: Tensor | None,
        constants: _FusedConstants,
    ) -> Tensor:
        spec, rows, targets = constants.spec, constants.rows, constants.targets
        teacher_bias = constants.teacher_bias
        hidden, weight = student_hidden.detach(), student_weight.detach()
        bias = None if student_bias is None else student_bias.detach()
        t_hidden = constants.teacher_hidden.detach()
        t_weight = constants.teacher_weight.detach()
        t_bias = None if teacher_bias is None else teacher_bias.detach()
        leading = hidden.shape[:-1]
        logit_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        dtype = _compute_dtype(
            torch.promote_types(logit_dtype, torch.promote_types(t_hidden.dtype, t_weight.dtype))
        )
        count = rows.numel()
        scale = 1.0 / max(count, 1)
        need_grad = spec.need_grad
        # Gradients are accumulated in the compute dtype and cast once at the end; the buffers
        # are the size of the parameters and hidden states, never tokens × vocab.
        grad_hidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
        grad_bias = (
            None if bias is None else torch.zeros(bias.shape, dtype=dtype, device=bias.device)
        )
        scratch = _Scratch()
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for start in range(0, count, spec.chunk_size):
            index = torch.unravel_index(rows[start : start + spec.chunk_size], leading)
            rows_hidden = hidden[index]
            student_logits, own_student = _head(rows_hidden, weight, bias, scratch, dtype)
            teacher_logits, own_teacher = _head(t_hidden[index], t_weight, t_bias, scratch, dtype)
            chunk_targets = None if targets is None else targets[index]
            value, grad_logits = _chunk_loss(
                student_logits,
                teacher_logits,
                spec,
                dtype,
                scratch,
                targets=chunk_targets,
                in_place=(own_student, own_teacher),
                grad_scale=scale,
            )
            total += value.double()
            if need_grad and grad_logits is not None:
                grad = grad_logits.to(logit_dtype)
                grad_hidden.index_put_(index, (grad @ weight.to(logit_dtype)).to(hidden.dtype))
                grad_weight.addmm_(grad.T.to(dtype), rows_hidden.to(dtype))
                if grad_bias is not None:
                    grad_bias.add_(grad.sum(0).to(dtype))
            scratch.give(grad_logits)
        loss = (total / max(count, 1)).to(dtype)
        if need_grad:
            saved = [grad_hidden, grad_weight.to(weight.dtype)]
            if grad_bias is not None and bias is not None:
                saved.append(grad_bias.to(bias.dtype))
            ctx.save_for_backward(*saved)
        ctx.need_grad = need_grad  # type: ignore[attr-defined]
        ctx.has_bias = grad_bias is not None  # type: ignore[attr-defined]
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        if not ctx.need_grad:
            return None, None, None, None
        grads = list(ctx.saved_tensors)
        if not torch.equal(grad_output, torch.ones_like(grad_output)):
            grads = [g * grad_output.to(g.dtype) for g in grads]
        grad_bias = grads[2] if ctx.has_bias else None
        return grads[0], grads[1], grad_bias, None


def fused_amid_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    mask: Tensor | None = None,
    *,
    alpha: float,
    lam: float,
    divergence: str = "kl",
    anchor: str = "teacher",
    ab_alpha: float = 0.2,
    ab_beta: float = 0.7,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    targets: Tensor | None = None,
    ce_weight: float = 0.0,
    chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE,
) -> Tensor:
    """`amid_loss(student_hidden @ student_weight.T + student_bias, teacher_hidden @
    teacher_weight.T + teacher_bias, mask, ...)` without ever building the logits.

    Hidden states are [..., H] (the teacher's width may differ from the student's), head weights
    [V, H], biases [V]. Only masked positions are visited, `chunk_size` at a time: each chunk's
    logits, loss and gradients are made in turn in the same few [chunk_size, V] buffers, so peak
    extra memory is those buffers plus gradient buffers the size of the hidden states and the
    head.
    The result is differentiable w.r.t. the student's hidden states, weight and bias (tied
    embeddings work: autograd adds this gradient to the embedding's own); the teacher is a
    constant. With `targets` (token ids of the masked positions' next tokens, the leading shape)
    and `ce_weight` > 0, the mean cross-entropy to them times `ce_weight` is added in the same
    pass.
    """
    spec = _make_spec(
        alpha=alpha,
        lam=lam,
        divergence=divergence,
        anchor=anchor,
        ab_alpha=ab_alpha,
        ab_beta=ab_beta,
        chunk_size=chunk_size,
        need_grad=torch.is_grad_enabled()
        and any(
            t is not None and t.requires_grad
            for t in (student_hidden, student_weight, student_bias)
        ),
        ce_weight=ce_weight,
    )
    for name, hidden, weight, bias in (
        ("student", student_hidden, student_weight, student_bias),
        ("teacher", teacher_hidden, teacher_weight, teacher_bias),
    ):
        if hidden.dim() < 1 or not hidden.is_floating_point():
            raise ValueError(f"{name}_hidden: must be a floating-point tensor [..., H]")
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(
                f"{name}_weight: expected [V, {hidden.shape[-1]}], got {tuple(weight.shape)}"
            )
        if bias is not None and bias.shape != weight.shape[:1]:
            raise ValueError(f"{name}_bias: expected [{weight.shape[0]}], got {tuple(bias.shape)}")
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            f"teacher_hidden: leading shape {tuple(teacher_hidden.shape[:-1])} differs from "
            f"student_hidden {tuple(student_hidden.shape[:-1])}"
        )
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"teacher_weight: {teacher_weight.shape[0]} rows (vocabulary) differ from "
            f"student_weight {student_weight.shape[0]}"
        )
    leading = student_hidden.shape[:-1]
    if targets is None and spec.ce_weight > 0:
        raise ValueError("targets: needed when ce_weight > 0")
    if targets is not None and (targets.shape != leading or targets.is_floating_point()):
        raise ValueError(
            f"targets: expected integer token ids of shape {tuple(leading)}, got "
            f"{targets.dtype} {tuple(targets.shape)}"
        )
    rows = _masked_rows(mask, leading, student_hidden.device)
    constants = _FusedConstants(
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        rows=rows,
        targets=None if targets is None else targets.to(student_hidden.device),
        spec=spec,
    )
    loss: Tensor = _FusedAmidLoss.apply(student_hidden, student_weight, student_bias, constants)
    return loss
