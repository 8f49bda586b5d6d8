r"""The threshold family: soft top-k masks of the form :math:`y_i = \mathrm{clip}(\varphi((x_i-\tau)/t), 0, 1)`.

For the *normalised* members the threshold :math:`\tau` solves :math:`\sum_i y_i = k`; each is the solution of a
regularised linear program over the capped simplex :math:`\{0 \le y \le 1, \sum y = k\}`:

==============  ===============================  =========================================================
family          :math:`\varphi(z)`               regulariser / paper
==============  ===============================  =========================================================
``sigmoid``     :math:`1/(1+e^{-z})`             binary entropy; LML layer, Amos, Xu & Kolter (2019)
``sparse`` p=2  :math:`z`                        :math:`t\|y\|^2/2`; Sander et al. (2023)
``sparse`` 4/3  :math:`\max(z,0)^3`              :math:`t\sum|y|^{4/3}/(4/3)`; Sander et al. (2023)
``lapsum``      Laplace CDF                      LapSum, Struski et al. (2025)
==============  ===============================  =========================================================

One safeguarded, vectorised Newton root-finder serves them all (Newton on :math:`\log S` / :math:`\log(n-S)` for
the families with exponential tails, plain Newton for the piecewise-polynomial ones, where it is exact on the
final piece), and one closed-form backward, the implicit function theorem applied to :math:`\sum_i y_i = k`:

.. math::
    \frac{\partial y}{\partial x} = \mathrm{diag}(d) - \frac{d d^\top}{\sum_j d_j},\quad
    \frac{\partial y}{\partial k} = \frac{d}{\sum_j d_j},\quad
    \frac{\partial y}{\partial t} = -\frac{\partial y}{\partial x} z,

with :math:`d_i = \varphi'(z_i)/t` on the entries strictly inside (0, 1) and 0 elsewhere.

DFTopK (Zhu et al., 2025) is the unnormalised member: :math:`\tau` is the midpoint of the k-th and (k+1)-th
largest scores, found by O(n) selection.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._utils import can_read_data

__all__ = ["Family", "FAMILIES", "threshold_mask_solve", "dftopk", "soft_scores"]


# --------------------------------------------------------------------------------------------------------------
# The maths of each family, in three small hooks (entmax-style): subclasses override, the solver is shared.
# --------------------------------------------------------------------------------------------------------------
class Family:
    """:math:`\\varphi` and what the solver needs of it. All hooks work on tensors, elementwise."""

    name = "?"
    #: exponential tails: Newton on logit(S/n) instead of S (exact for a single exponential tail).
    log_newton = False

    @staticmethod
    def phi(z: Tensor) -> Tensor:
        """The mask value clip(φ(z), 0, 1)."""
        raise NotImplementedError

    @staticmethod
    def dphi(y: Tensor) -> Tensor:
        """φ'(z) written through y = φ(z); exactly 0 where y is 0 or 1 (clipped or saturated)."""
        raise NotImplementedError

    @staticmethod
    def phi_inv(p: Tensor) -> Tensor:
        """z with φ(z) = p for p in (0, 1)."""
        raise NotImplementedError


class Sigmoid(Family):
    name = "sigmoid"
    log_newton = True
    phi = staticmethod(torch.sigmoid)

    @staticmethod
    def dphi(y):
        return torch.addcmul(y, y, y, value=-1.0)  # y (1 - y)

    phi_inv = staticmethod(torch.logit)


class Laplace(Family):
    name = "lapsum"
    log_newton = True

    @staticmethod
    def phi(z):
        e = torch.exp(-z.abs()).mul_(0.5)
        return torch.where(z < 0, e, 1.0 - e)

    @staticmethod
    def dphi(y):
        return torch.minimum(y, 1.0 - y)  # ½ e^{-|z|}

    @staticmethod
    def phi_inv(p):
        return torch.where(p < 0.5, torch.log(2.0 * p), -torch.log(2.0 - 2.0 * p))


class Euclidean(Family):
    """Sander et al., p = 2: φ(z) = z, i.e. the Euclidean projection of x/t onto the capped simplex."""

    name = "sparse"

    @staticmethod
    def phi(z):
        return z.clamp(0.0, 1.0)

    @staticmethod
    def dphi(y):
        return ((y > 0) & (y < 1)).to(y.dtype)

    @staticmethod
    def phi_inv(p):
        return p


class Cubic(Family):
    """Sander et al., p = 4/3: φ(z) = max(z, 0)³."""

    name = "sparse(p=4/3)"

    @staticmethod
    def phi(z):
        return z.clamp(0.0, 1.0).pow(3)

    @staticmethod
    def dphi(y):
        return torch.where(y < 1, 3.0 * y.pow(2.0 / 3.0), 0.0)

    @staticmethod
    def phi_inv(p):
        return p.pow(1.0 / 3.0)


FAMILIES: dict[str, type[Family]] = {
    "sigmoid": Sigmoid,
    "lapsum": Laplace,
    "sparse2": Euclidean,
    "sparse4/3": Cubic,
}


# --------------------------------------------------------------------------------------------------------------
# The root-finder.
# --------------------------------------------------------------------------------------------------------------
_SUBSAMPLE = 1024  # rows longer than 4x this get a warm start from a strided subsample


def _row_stats(u: Tensor, eager: bool):
    """(min, max) over finite entries, count of entries > -inf, count of +inf; all of shape (..., 1)."""
    umin = u.amin(-1, keepdim=True)
    umax = u.amax(-1, keepdim=True)
    n = u.shape[-1]
    if eager and bool(torch.isfinite(umin).all() & torch.isfinite(umax).all()):
        return umin, umax, n, 0
    finite = torch.isfinite(u)
    umin = torch.where(finite, u, math.inf).amin(-1, keepdim=True)
    umax = torch.where(finite, u, -math.inf).amax(-1, keepdim=True)
    n_live = (u > -math.inf).sum(-1, keepdim=True).to(u.dtype)
    n_pinf = (u == math.inf).sum(-1, keepdim=True).to(u.dtype)
    return umin, umax, n_live, n_pinf


def _newton(family, u, k, n_live, tau, lo, hi, done, tol, max_iter, eager):
    """Safeguarded Newton on S(τ) = Σ φ(u − τ) = k. Returns (y, τ, converged) with y evaluated at τ."""
    logit_k = torch.log(k / (n_live - k)) if family.log_newton else None
    for it in range(max_iter + 1):
        y = family.phi(u - tau)
        s = y.sum(-1, keepdim=True)
        resid = s - k
        done = done | (resid.abs() <= tol)
        if it == max_iter or (eager and bool(done.all())):
            break
        dsum = family.dphi(y).sum(-1, keepdim=True)  # -dS/dτ
        lo = torch.where(resid > 0, tau, lo)
        hi = torch.where(resid < 0, tau, hi)
        if family.log_newton:
            # Newton on logit(S/n) = logit(k/n): linear in τ in both exponential tails and for large t.
            rest = n_live - s
            f = torch.log(s / rest) - logit_k
            step = f * (s * rest) / (dsum * n_live)
        else:
            step = resid / dsum
        new = tau + step
        inside = (new > lo) & (new < hi)  # false for NaN/inf too
        new = torch.where(inside, new, 0.5 * (lo + hi))
        done = done | (new == tau)  # stalled at machine precision
        tau = torch.where(done, tau, new)
    return y, tau, done


def threshold_mask_solve(family: type[Family], x: Tensor, k: Tensor, t: Tensor, tol: float, max_iter: int):
    """Forward of a normalised threshold mask along the last dim. Returns (y, τ) with τ in units of x / t.

    ``x`` (..., n) in the compute dtype; ``k`` and ``t`` of shape (..., 1).
    """
    eager = can_read_data(x)
    u = x / t
    n = u.shape[-1]
    umin, umax, n_live, n_pinf = _row_stats(u, eager)
    finite_count = n_live - n_pinf
    # Rows with nothing left to choose among the finite entries are exact 0/1 masks (τ = ±∞).
    k_fin = k - n_pinf
    none = k_fin <= 0
    full = k >= n_live
    degenerate = none | full
    p = (k_fin / finite_count).clamp(1e-30, 1.0 - 1e-7 if x.dtype != torch.float64 else 1.0 - 1e-16)
    zp = family.phi_inv(p)
    lo = torch.where(degenerate, 0.0, umin - zp)  # S(lo) >= k
    hi = torch.where(degenerate, 0.0, umax - zp)  # S(hi) <= k
    tau0 = 0.5 * (lo + hi)
    if n > 4 * _SUBSAMPLE and not isinstance(n_live, Tensor):
        # Warm start: the same problem on a strided subsample, solved loosely.
        stride = n // _SUBSAMPLE
        sub = u[..., ::stride].contiguous()
        m = sub.shape[-1]
        k_sub = (k * (m / n)).clamp(1e-3, m - 1e-3)
        _, tau_sub, _ = _newton(
            family, sub, k_sub, m, tau0, lo, hi, degenerate, 1e-3 * k_sub.clamp(min=1.0), 30, eager
        )
        tau0 = torch.minimum(torch.maximum(tau_sub, lo), hi)
    scale = tol * k.clamp(min=1.0)
    y, tau, done = _newton(family, u, k, n_live, tau0, lo, hi, degenerate, scale, max_iter, eager)
    if eager and not bool(done.all()):
        worst = (y.sum(-1, keepdim=True) - k).abs().max().item()
        warnings.warn(
            f"topk_mask({family.name}): threshold search stopped after max_iter={max_iter} iterations with "
            f"|sum(y) - k| = {worst:.3g}; raise max_iter or tol",
            RuntimeWarning,
            stacklevel=4,
        )
    if not eager or bool(degenerate.any()):
        exact = torch.where(none, (u == math.inf).to(y.dtype), (u > -math.inf).to(y.dtype))
        y = torch.where(degenerate, exact, y)
    return y, tau


def _implicit_backward(family, x, t, y, tau, gy, needs_k, needs_t):
    # ∂y/∂x = diag(d) − d dᵀ/Σd,  ∂y/∂k = d/Σd,  ∂y/∂t = −(∂y/∂x) z,   d = φ'(z)/t on 0 < y < 1.
    d = family.dphi(y) / t
    gd = gy * d
    dsum = d.sum(-1, keepdim=True)
    gbar = torch.where(dsum > 0, gd.sum(-1, keepdim=True) / dsum, 0.0)
    gx = torch.addcmul(gd, d, gbar, value=-1.0)
    gk = gbar if needs_k else None
    gt = None
    if needs_t:
        z = x / t - tau
        gt = -torch.where(d > 0, z * gx, 0.0).sum(-1, keepdim=True)
    return gx, gk, gt


def _make_function(family: type[Family]) -> type[torch.autograd.Function]:
    class ThresholdMask(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x, k, t, tol, max_iter):
            return threshold_mask_solve(family, x, k, t, tol, max_iter)

        @staticmethod
        def setup_context(ctx, inputs, output):
            x, k, t, _, _ = inputs
            y, tau = output
            ctx.mark_non_differentiable(tau)
            ctx.save_for_backward(x, t, y, tau)

        @staticmethod
        @once_differentiable
        def backward(ctx, gy, _gtau):
            x, t, y, tau = ctx.saved_tensors
            gx, gk, gt = _implicit_backward(
                family, x, t, y, tau, gy, ctx.needs_input_grad[1], ctx.needs_input_grad[2]
            )
            return gx, gk, gt, None, None

    ThresholdMask.__name__ = ThresholdMask.__qualname__ = f"ThresholdMask_{family.__name__}"
    return ThresholdMask


_FUNCTIONS = {name: _make_function(fam) for name, fam in FAMILIES.items()}


def normalised_mask(
    family: str, x: Tensor, k: Tensor, t: Tensor, *, tol: float | None = None, max_iter: int = 100
) -> Tensor:
    """Normalised threshold mask along the last dim of ``x`` (compute dtype); ``k``, ``t`` of shape (..., 1)."""
    if tol is None:
        tol = 1e-9 if x.dtype == torch.float64 else 1e-5
    y, _ = _FUNCTIONS[family].apply(x, k, t, tol, max_iter)
    return y


# --------------------------------------------------------------------------------------------------------------
# SOFT (Xie et al., 2020): the converged two-anchor entropic OT mask is a sigmoid mask of rescaled scores.
# --------------------------------------------------------------------------------------------------------------
def soft_scores(x: Tensor, largest: bool) -> Tensor:
    r"""Scores whose sigmoid mask (temperature ε) is the converged SOFT top-k mask.

    SOFT transports the uniform measure on the scores to anchors 0 and 1 with cost
    :math:`C_{ij} = (x_i - a_j)^2 / \max C`. At the optimum :math:`\Gamma_{ij} = e^{(f_i + g_j - C_{ij})/\varepsilon}`,
    so the share of row i on anchor 1 is :math:`\sigma((C_{i0} - C_{i1} - c)/\varepsilon)` with
    :math:`C_{i0} - C_{i1} = (2 x_i - 1)/\max C` and one constant c per row, fixed by the column mass
    :math:`\sum_i y_i = k`. ``largest=False`` is the paper's (and its code's) convention: mass k/n on anchor 0,
    which selects the k smallest scores; ``largest=True`` puts that mass on anchor 1 instead.
    ``max C`` is taken per row over the finite scores (the official code takes it over the whole batch).
    """
    finite = torch.isfinite(x)
    # max C = max_i max(x_i², (x_i − 1)²) = m² with m = max(max x, 1 − min x) over the finite scores
    # (m ≥ 1/2 always); s is formed as (x/m)/m so that scores near the float range do not overflow.
    xmax = torch.where(finite, x, -math.inf).amax(-1, keepdim=True)
    xmin = torch.where(finite, x, math.inf).amin(-1, keepdim=True)
    m = torch.maximum(xmax, 1.0 - xmin)
    m = torch.where(torch.isfinite(m), m, 1.0)  # rows without a finite score
    s = (x / m) / m * 2.0
    return s if largest else -s


# --------------------------------------------------------------------------------------------------------------
# DFTopK (Zhu et al., 2025): sigmoid((x − τ)/t), τ = midpoint of the k-th and (k+1)-th largest scores.
# --------------------------------------------------------------------------------------------------------------
def _kth_pair(x: Tensor, k: Tensor | int):
    """Values and indices of the k-th and (k+1)-th largest entries along the last dim, by selection.

    Missing order statistics are +inf (k = 0) and -inf (k = n), with index -1.
    """
    n = x.shape[-1]
    if isinstance(k, int):
        if 0 < k < n:
            top, idx = torch.topk(x, k + 1, sorted=False)  # O(n) selection, no sort of the row
            v2, i2 = torch.topk(top, 2, largest=False, sorted=True)  # (x_(k+1), x_(k))
            return v2.flip(-1), idx.gather(-1, i2).flip(-1)
        m = 1
        vals, idx = torch.topk(x, 1)
        kk = torch.full(x.shape[:-1] + (1,), k, device=x.device, dtype=torch.long)
    else:
        kk = k.long()
        kmax = int(kk.max()) + 1 if can_read_data(x) else n
        m = min(kmax, n)
        vals, idx = torch.topk(x, m, sorted=True)
    # pad ranks: position 0 is "x_(0) = +inf", position m + 1 is "-inf"
    pad_v = vals.new_full(vals.shape[:-1] + (1,), math.inf)
    vals = torch.cat([pad_v, vals, -pad_v], -1)
    pad_i = idx.new_full(idx.shape[:-1] + (1,), -1)
    idx = torch.cat([pad_i, idx, pad_i], -1)
    pos = torch.cat([kk, kk + 1], -1).clamp(max=m + 1)
    return vals.gather(-1, pos), idx.gather(-1, pos)


class _DFTopK(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, t, kth_vals, kth_idx):
        tau = kth_vals.mean(-1, keepdim=True)  # ±inf when k = 0 or n: the mask is then exact
        rt = t.reciprocal()
        return torch.addcmul(-tau * rt, x, rt).sigmoid_(), tau  # σ((x − τ)/t) in two passes

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, t, _, kth_idx = inputs
        y, tau = output
        ctx.mark_non_differentiable(tau)
        ctx.save_for_backward(x, t, y, tau, kth_idx)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, _gtau):
        # y = σ(z), z = (x − τ)/t, τ = (x_a + x_b)/2:
        #   ∂L/∂x = s − (Σ s)(e_a + e_b)/2,  s = g σ'(z)/t;   ∂L/∂t = −Σ s z.
        x, t, y, tau, idx = ctx.saved_tensors
        s = torch.addcmul(y, y, y, value=-1.0).mul_(gy).div_(t)
        gt = None
        if ctx.needs_input_grad[1]:
            z = (x - tau) / t
            gt = -torch.where(s != 0, s * z, 0.0).sum(-1, keepdim=True)
        share = (-0.5 * s.sum(-1, keepdim=True)).expand_as(idx)
        gx = s.scatter_add_(-1, idx.clamp(min=0), torch.where(idx >= 0, share, 0.0))
        return gx, gt, None, None


def dftopk(x: Tensor, k: int | Tensor, t: Tensor) -> Tensor:
    """DFTopK along the last dim of ``x``; ``k`` an int or a (..., 1) integer-valued tensor."""
    vals, idx = _kth_pair(x.detach(), k)
    y, _ = _DFTopK.apply(x, t, vals, idx)
    return y
