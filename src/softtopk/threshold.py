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

from . import kernels
from ._eager import eager_apply, needs_graph, once
from ._prepare import SOLVERS, can_read_data, is_transformed

__all__ = [
    "FAMILIES",
    "Family",
    "dftopk",
    "kernel_dftopk",
    "kernel_hard_mask",
    "kernel_mask",
    "normalised_mask",
    "soft_temperature",
    "threshold_mask_solve",
]


# --------------------------------------------------------------------------------------------------------------
# The maths of each family, in three small hooks (entmax-style): subclasses override, the solver is shared.
# --------------------------------------------------------------------------------------------------------------
class Family:
    """:math:`\\varphi` and what the solver needs of it, as small elementwise hooks.

    :meth:`phi` is the definition, out of place (used under torch.compile and vmap); :meth:`phi_` is the same
    in place on buffers the solver owns (eager), so that an iteration allocates nothing: a fresh multi-megabyte
    tensor costs more than the arithmetic on CPU.
    """

    name = "?"
    #: exponential tails: Newton on logit(S/n) instead of S (exact for a single exponential tail).
    log_newton = False
    #: the warm start samples this many times ``_SUBSAMPLE`` entries (compact support needs more: S of a sample
    #: counts only the entries near the top, so it is noisier)
    sample_factor = 1
    #: φ'(z) where φ(z) = 1/2: the factor from a temperature T in the width convention of ``topk_mask`` (the slope
    #: of the mask at 1/2 is 1/T) to the family's own t = T · slope_at_half
    slope_at_half = 1.0

    @staticmethod
    def phi(z: Tensor) -> tuple[Tensor, Tensor]:
        """(clip(φ(z), 0, 1), Σ φ'(z) along the last dim)."""
        raise NotImplementedError

    @staticmethod
    def phi_(z: Tensor, scratch: Tensor) -> Tensor:
        """:meth:`phi` in place: overwrites z with the mask, may use ``scratch`` (z's shape); returns Σ φ'."""
        raise NotImplementedError

    @staticmethod
    def dphi(y: Tensor) -> Tensor:
        """φ'(z) written through y = φ(z); exactly 0 where y is 0 or 1."""
        raise NotImplementedError

    @staticmethod
    def dphi_(y: Tensor, out: Tensor) -> Tensor:
        """:meth:`dphi` written into ``out`` (eager)."""
        raise NotImplementedError

    @staticmethod
    def phi_inv(p: Tensor) -> Tensor:
        """z with φ(z) = p for p in (0, 1)."""
        raise NotImplementedError


def _rowsum(v: Tensor) -> Tensor:
    return v.sum(-1, keepdim=True)


class Sigmoid(Family):
    name = "sigmoid"
    slope_at_half = 0.25  # σ'(0)
    log_newton = True

    @staticmethod
    def phi(z):
        y = torch.sigmoid(z)
        return y, _rowsum(y * (1.0 - y))

    @staticmethod
    def phi_(z, scratch):
        z.sigmoid_()
        return _rowsum(torch.addcmul(z, z, z, value=-1.0, out=scratch))

    @staticmethod
    def dphi(y):
        return y * (1.0 - y)

    @staticmethod
    def dphi_(y, out):
        return torch.addcmul(y, y, y, value=-1.0, out=out)

    @staticmethod
    def phi_inv(p):
        return torch.logit(p)


class Laplace(Family):
    name = "lapsum"
    slope_at_half = 0.5
    log_newton = True

    @staticmethod
    def phi(z):
        half_e = 0.5 * torch.exp(-torch.abs(z))  # = φ'(z)
        return torch.where(z < 0, half_e, 1.0 - half_e), _rowsum(half_e)

    @staticmethod
    def phi_(z, scratch):
        e = torch.abs(z, out=scratch).neg_().exp_()  # e^{-|z|} = 2 φ'(z)
        dsum = 0.5 * _rowsum(e)
        # φ(z) = ½ + ½ copysign(1 − e^{-|z|}, z) (copysign takes |e − 1|); ±inf entries give exactly 0 and 1
        torch.copysign(e.sub_(1.0), z, out=z).lerp_(z.new_ones(()), 0.5)  # (w + 1)/2 in one pass
        return dsum

    @staticmethod
    def dphi(y):
        return torch.minimum(y, 1.0 - y)  # ½ e^{-|z|}

    @staticmethod
    def dphi_(y, out):
        return torch.minimum(y, torch.neg(y, out=out).add_(1.0), out=out)

    @staticmethod
    def phi_inv(p):
        return torch.where(p < 0.5, torch.log(2.0 * p), -torch.log(2.0 - 2.0 * p))


class Euclidean(Family):
    """Sander et al., p = 2: φ(z) = z, i.e. the Euclidean projection of x/t onto the capped simplex."""

    name = "sparse"
    sample_factor = 4

    @staticmethod
    def phi(z):
        y = z.clamp(0.0, 1.0)
        return y, _rowsum(Euclidean.dphi(y))

    @staticmethod
    def phi_(z, scratch):  # Σφ' counts 0 < y < 1, by float ops (boolean reductions are slow on CPU)
        z.clamp_(0.0, 1.0)
        return _rowsum(torch.addcmul(z, z, z, value=-1.0, out=scratch).sign_())

    @staticmethod
    def dphi(y):
        return torch.sign(y * (1.0 - y))

    @staticmethod
    def dphi_(y, out):
        return torch.addcmul(y, y, y, value=-1.0, out=out).sign_()

    @staticmethod
    def phi_inv(p):
        return p


class Cubic(Family):
    """Sander et al., p = 4/3: φ(z) = max(z, 0)³."""

    name = "sparse(p=4/3)"
    slope_at_half = 3.0 * 2.0 ** (-2.0 / 3.0)  # φ = z³ is 1/2 at z = 2^(-1/3)
    sample_factor = 4

    @staticmethod
    def phi(z):
        c = z.clamp(0.0, 1.0)
        return c * c * c, 3.0 * _rowsum(torch.where(c < 1, c * c, 0.0))  # φ'(z) = 3 z² on 0 < z < 1

    @staticmethod
    def phi_(z, scratch):
        c = z.clamp_(0.0, 1.0)
        dsum = 3.0 * _rowsum(torch.neg(c, out=scratch).add_(1.0).sign_().mul_(c).mul_(c))  # 3 c² on c < 1
        c.pow_(3)
        return dsum

    @staticmethod
    def dphi(y):
        return torch.where(y < 1, 3.0 * y.pow(2.0 / 3.0), 0.0)

    @staticmethod
    def dphi_(y, out):
        return torch.pow(y, 2.0 / 3.0, out=out).mul_(3.0).masked_fill_(y >= 1, 0.0)

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
_SUBSAMPLE = 2048  # rows longer than 4x this get a warm start from a strided subsample of about this size
#: Newton iterations at most. Eager mode stops at convergence; under torch.compile / vmap all of them run.
MAX_ITER = SOLVERS["threshold"]["max_iter"]
_BLOCK = 1 << 20  # elements per block of rows (see _row_blocks)
_CHUNK = 1 << 20  # elements per column chunk of an evaluation (see _evaluate)


def _row_stats(x: Tensor, eager: bool):
    """(min, max) over finite entries, count of entries > -inf, count of +inf; all of shape (..., 1)."""
    xmin = x.amin(-1, keepdim=True)
    xmax = x.amax(-1, keepdim=True)
    if eager and bool(torch.isfinite(xmin).all() & torch.isfinite(xmax).all()):
        return xmin, xmax, x.shape[-1], 0
    finite = torch.isfinite(x)
    xmin = torch.where(finite, x, math.inf).amin(-1, keepdim=True)
    xmax = torch.where(finite, x, -math.inf).amax(-1, keepdim=True)
    n_live = (x > -math.inf).sum(-1, keepdim=True).to(x.dtype)
    n_pinf = (x == math.inf).sum(-1, keepdim=True).to(x.dtype)
    return xmin, xmax, n_live, n_pinf


def _chunks(x: Tensor, scratch: bool = True):
    """(column slice, scratch view) pairs covering the last dim of ``x`` in chunks of about ``_CHUNK`` elements
    (at least 1024 columns), with one scratch buffer of a chunk's shape shared by all of them (or None)."""
    n = x.shape[-1]
    width = min(max(_CHUNK // max(x.numel() // max(n, 1), 1), 1024), n)
    buf = x.new_empty(x.shape[:-1] + (width,)) if scratch else None
    for j in range(0, n, width):
        cols = slice(j, min(j + width, n))
        yield cols, None if buf is None else buf[..., : cols.stop - cols.start]


def _evaluate(family, x, rt, centre, tau, out):
    """y = clip(φ((x − c)/t − τ), 0, 1) into ``out``, with S = Σ y and Σ φ' (both (..., 1)).

    In eager mode the work runs over column chunks of about ``_CHUNK`` elements: each chunk of y is finished
    while it sits in the cache, and the families' scratch space is one chunk instead of a second full-size
    tensor (fresh multi-megabyte tensors cost page faults, more than the arithmetic on CPU). Under
    torch.compile and vmap (``out`` None) it is one whole-tensor expression.
    """
    if out is None:
        y, dsum = family.phi((x * rt if centre is None else (x - centre) * rt) - tau)
        return y, _rowsum(y), dsum
    s = dsum = 0.0
    for cols, sc in _chunks(x):
        xc, zc = x[..., cols], out[..., cols]
        if centre is None:
            torch.mul(xc, rt, out=zc)
        else:
            torch.sub(xc, centre, out=zc).mul_(rt)
        dsum = dsum + family.phi_(zc.sub_(tau), sc)
        s = s + _rowsum(zc)
    return out, s, dsum


def _warm_start(family, x, rt, k, lo, hi, tau, degenerate, eager):
    """τ of the same problem on a strided subsample of each row (k scaled), started from the midpoint of the
    sample's order statistics around rank k and solved loosely: within a few percent of the full solution."""
    n = x.shape[-1]
    sub = x[..., :: n // (_SUBSAMPLE * family.sample_factor)] * rt
    m = sub.shape[-1]
    k_sub = (k * (m / n)).clamp(1e-3, m - 1e-3)
    rank = k_sub.floor().long().clamp(1, m - 1)
    top = int(rank.max()) + 1 if eager else m
    ranked = torch.topk(sub, top).values if top <= m // 2 else sub.sort(-1, descending=True).values
    mid = 0.5 * (ranked.gather(-1, rank - 1) + ranked.gather(-1, rank)) - family.phi_inv(torch.full_like(k_sub, 0.5))
    tau = torch.where((mid > lo) & (mid < hi), mid, tau)
    one = torch.ones_like(rt)
    tol = 1e-3 * k_sub.clamp(min=1.0)
    buf = torch.empty_like(sub) if eager else None
    tau = _newton(family, sub, one, None, k_sub, m, tau, lo, hi, degenerate, tol, 30, eager, buf)[1]
    return torch.minimum(torch.maximum(tau, lo), hi)


def _newton(family, x, rt, centre, k, n_live, tau, lo, hi, done, tol, max_iter, eager, buf=None):
    """Safeguarded Newton on S(τ) = Σ φ((x − c)/t − τ) = k.

    Keeps a bracket [lo, hi] with S(lo) ≥ k ≥ S(hi) and falls back to bisection when a Newton step leaves it.
    Stops a row at |S − k| ≤ tol or when the step no longer moves τ. Returns (y, τ, ok, Σφ') with y and Σφ'
    evaluated at τ (y in ``buf`` when given; None allocates) and ok the rows within tol (or given as ``done``).
    """
    logit_k = torch.log(k / (n_live - k)) if family.log_newton else None
    ok = done
    for it in range(max_iter + 1):
        y, s, dsum = _evaluate(family, x, rt, centre, tau, buf)  # dsum = Σ φ' = −dS/dτ
        if it == max_iter:
            break
        resid = s - k
        ok = ok | (resid.abs() <= tol)
        done = done | ok
        if eager and bool(done.all()):
            break
        lo = torch.where(resid > 0, tau, lo)
        hi = torch.where(resid < 0, tau, hi)
        if family.log_newton:
            # Newton on logit(S/n) = logit(k/n): linear in τ in both exponential tails and for large t.
            rest = n_live - s
            step = (torch.log(s / rest) - logit_k) * (s * rest) / (dsum * n_live)
        else:
            step = resid / dsum
        new = tau + step
        inside = (new > lo) & (new < hi)  # false for NaN/inf too
        new = torch.where(inside, new, (0.5 * lo + 0.5 * hi))
        done = done | (new == tau)  # stalled at machine precision (ok tells whether within tol)
        tau = torch.where(done, tau, new)
        if eager and buf is not None and it + 1 < max_iter:
            left = int((~done).sum())
            if 0 < 4 * left <= 3 * done.numel() and x.is_contiguous() and buf.is_contiguous():
                # Most rows have converged: iterate on the others only (their y is already final in buf).
                state = (rt, centre, k, n_live, tau, lo, hi, tol)
                return _finish_rows(family, x, state, done, ok, y, dsum, max_iter - it - 1)
    return y, tau, ok, dsum


def _finish_rows(family, x, state, done, ok, y, dsum, max_iter):
    """:func:`_newton` continued on the rows that are not done, gathered into a smaller problem; their results
    are written back into y (in place), τ, ok and Σφ'."""
    n = x.shape[-1]
    act = (~done).reshape(-1).nonzero().squeeze(-1)

    def rows_of(a):
        if not isinstance(a, Tensor):
            return a
        return torch.broadcast_to(a, done.shape).reshape(-1, 1).index_select(0, act)

    rt, centre, k, n_live, tau, lo, hi, tol = (rows_of(a) for a in state)
    xs = x.reshape(-1, n).index_select(0, act)
    none_done = torch.zeros_like(tau, dtype=torch.bool)
    ys, taus, oks, dsums = _newton(
        family, xs, rt, centre, k, n_live, tau, lo, hi, none_done, tol, max_iter, True, torch.empty_like(xs)
    )

    def merged(full, part):
        return torch.broadcast_to(full, done.shape).reshape(-1, 1).index_copy(0, act, part).reshape(done.shape)

    y.reshape(-1, n).index_copy_(0, act, ys)
    return y, merged(state[4], taus), merged(ok, oks), merged(dsum, dsums)


def _row_blocks(fn, *args):
    """``fn(*args)`` applied to blocks of rows of its tensor arguments, each (..., n) or (..., 1), in eager mode.

    Inputs of more than 4 ``_BLOCK`` elements are cut into blocks of about ``_BLOCK`` elements so that a block
    and the temporaries of the iteration stay in the cache (3.5x faster passes at n = 1e6 on the 2-core
    reference machine). ``fn`` returns a tuple of (rows, ·) tensors or None.
    """
    x = next(a for a in args if isinstance(a, Tensor))
    n = max(x.shape[-1], 1)
    rows = x.numel() // n
    step = max(1, _BLOCK // n)
    if x.numel() <= 4 * _BLOCK or not can_read_data(x):  # fits in the cache as a whole: no blocking
        return fn(*args)
    flat = [a.reshape(rows, a.shape[-1]) if isinstance(a, Tensor) else a for a in args]
    outs = None
    for r0 in range(0, rows, step):
        res = fn(*[a[r0 : r0 + step] if isinstance(a, Tensor) else a for a in flat])
        if outs is None:
            outs = [None if r is None else r.new_empty((rows, r.shape[-1])) for r in res]
        for out, r in zip(outs, res):
            if out is not None:
                out[r0 : r0 + step] = r
    return tuple(None if o is None else o.reshape(x.shape[:-1] + o.shape[-1:]) for o in outs)


def threshold_mask_solve(family: type[Family], x: Tensor, k: Tensor, t: Tensor, tol: float, max_iter: int):
    """Forward of a normalised threshold mask along the last dim. Returns (y, Σφ', τ, c) with
    y = clip(φ((x − c)/t − τ), 0, 1), Σφ' its row sums of derivatives (for the backward) and c a per-row
    centre (0 unless the row needed re-centring for precision).

    ``x`` (..., n) in the compute dtype; ``k`` and ``t`` of shape (..., 1).
    """
    return _row_blocks(_solve, family, x, k, t, tol, max_iter)


def _solve(family, x, k, t, tol, max_iter):
    eager = can_read_data(x)
    n = x.shape[-1]
    xmin, xmax, n_live, n_pinf = _row_stats(x, eager)
    rt = t.reciprocal()
    if eager and x.dtype != torch.float64 and not bool(torch.isfinite(torch.maximum(-xmin, xmax) * rt).all()):
        # |x|/t beyond the dtype's range (float32 scores near 1e38 at t < 1): solved in float64, where it is not
        y, dsum, tau, centre = _solve(family, x.double(), k.double(), t.double(), tol, max_iter)
        return y.to(x.dtype), dsum.to(x.dtype), tau.to(x.dtype), centre.to(x.dtype)
    # Rows with nothing left to choose among the finite entries are exact 0/1 masks (τ = ±∞).
    k_fin = k - n_pinf
    none = k_fin <= 0
    full = k >= n_live
    degenerate = none | full
    p_max = 1.0 - 1e-16 if x.dtype == torch.float64 else 1.0 - 1e-7
    zp = family.phi_inv((k_fin / (n_live - n_pinf)).clamp(1e-30, p_max))
    # S(lo) >= k and S(hi) <= k, in units of t; finite even where |x|/t overflows (τ = (lo + hi)/2 must not be NaN)
    big = torch.finfo(x.dtype).max
    lo = torch.where(degenerate, 0.0, (xmin * rt - zp).clamp(min=-big))
    hi = torch.where(degenerate, 0.0, (xmax * rt - zp).clamp(max=big))
    tau = 0.5 * lo + 0.5 * hi
    if n > 4 * _SUBSAMPLE:
        tau = _warm_start(family, x, rt, k, lo, hi, tau, degenerate, eager)
    tol = tol * k.clamp(min=1.0)
    buf = torch.empty_like(x) if eager else None  # every iteration writes y here (see _evaluate)
    y, tau, ok, dsum = _newton(family, x, rt, None, k, n_live, tau, lo, hi, degenerate, tol, max_iter, eager, buf)
    centre = torch.zeros_like(tau)
    if eager:
        # x/t carries an error of ulp(|x/t|): near the threshold that is ulp(|τ|), too coarse for the tolerance
        # when |τ| is large (offset logits, tiny t), and a row may stall short of it. Such rows are polished in
        # a frame centred at the threshold, where x − c is exact for the entries that matter (Sterbenz).
        far = (tau.abs() > 0.1 * tol / torch.finfo(x.dtype).eps) & ~degenerate
        redo = far | ~ok
        if bool(redo.any()):
            # Rows within tol are polished around their own τ (centre τ·t). Rows that stalled short of it restart
            # centred on the score nearest the threshold, where x − c is exact for the entries that matter, ties
            # at the threshold included (τ·t itself is known only to ulp(τ)·t), with the bracket found anew in that
            # frame (the first one, at the coarse resolution of x/t, may have collapsed onto no bracket at all),
            # starting as the first solve did, with that score at φ⁻¹(k/n).
            fresh = redo & ~ok
            nearest = x.gather(-1, (x * rt - tau).abs().nan_to_num(math.inf).argmin(-1, keepdim=True))
            nearest = torch.where(torch.isfinite(nearest), nearest, 0.0)
            shift = torch.where(redo & ~fresh, tau, 0.0)  # the polished rows' τ, in units of t
            centre = torch.where(fresh, nearest, shift * t)  # not nearest/t·t: |x|/t may overflow
            lo_c = torch.where(fresh, ((xmin - centre) * rt - zp).clamp(min=-big), lo - shift)
            hi_c = torch.where(fresh, ((xmax - centre) * rt - zp).clamp(max=big), hi - shift)
            start = torch.where(fresh, torch.minimum(torch.maximum(-zp, lo_c), hi_c), tau - shift)
            y, tau2, ok, dsum = _newton(
                family, x, rt, centre, k, n_live, start, lo_c, hi_c, ~redo, tol, max_iter, eager, buf
            )
            tau = torch.where(redo, tau2, tau)
    if eager and not bool(ok.all()):
        worst = (y.sum(-1, keepdim=True) - k).abs().max().item()
        warnings.warn(
            f"topk_mask({family.name}): threshold search stopped after max_iter={max_iter} iterations with "
            f"|sum(y) - k| = {worst:.3g}; raise max_iter or tol",
            RuntimeWarning,
            stacklevel=4,
        )
    if not eager or bool(degenerate.any()):
        exact = torch.where(none, (x == math.inf).to(y.dtype), (x > -math.inf).to(y.dtype))
        y = torch.where(degenerate, exact, y)
        dsum = torch.where(degenerate, 0.0, dsum)
    return y, dsum, tau, centre


def _implicit_backward(family, y, dsum, x, t, tau, centre, gy, needs_k, needs_t):
    # ∂y/∂x = diag(d) − d dᵀ/Σd,  ∂y/∂k = d/Σd,  ∂y/∂t = −(∂y/∂x) z,   d = φ'(z)/t on 0 < y < 1.
    if not can_read_data(y):  # under torch.compile / vmap: out of place
        p = family.dphi(y)
        gbar = torch.where(dsum > 0, _rowsum(gy * p) / dsum, 0.0)
        gx = (gy - gbar) * p / t
    else:
        # Two passes over column chunks: φ' is written into the gradient buffer and Σ g φ' summed through a chunk
        # of scratch, which gives ḡ = Σ g d / Σ d; then gx = φ' (g − ḡ) / t in place. The gradient is the only
        # full-size tensor allocated.
        gx = torch.empty_like(y)
        num = 0.0
        for cols, sc in _chunks(y):
            p = family.dphi_(y[..., cols], gx[..., cols])
            num = num + _rowsum(torch.mul(gy[..., cols], p, out=sc))
        gbar = torch.where(dsum > 0, num / dsum, 0.0)
        rt = t.reciprocal()
        for cols, sc in _chunks(y):
            gx[..., cols].mul_(torch.sub(gy[..., cols], gbar, out=sc)).mul_(rt)
    gk = gbar if needs_k else None
    gt = None
    if needs_t:
        # −Σ z gx with z = (x − c)/t − τ; gx = 0 wherever φ' = 0, which covers the infinite x (inf·0 → nan → 0)
        if not can_read_data(y):
            gt = -_rowsum(torch.nan_to_num(((x - centre) / t - tau) * gx, 0.0, 0.0, 0.0))
        else:
            gt = 0.0
            for cols, sc in _chunks(y):
                zg = torch.sub(x[..., cols], centre, out=sc).mul_(rt).sub_(tau).mul_(gx[..., cols])
                gt = gt - _rowsum(zg.nan_to_num_(0.0, 0.0, 0.0))
    return gx, gk, gt


# --------------------------------------------------------------------------------------------------------------
# The numba kernel (optional): the whole solve of a row, and the backward, in one call each, rows in parallel.
# --------------------------------------------------------------------------------------------------------------
_KERNEL_MODULE: object = None


def _kernel():
    """The numba kernel module, or None when numba is not installed (imported on first use)."""
    global _KERNEL_MODULE
    if _KERNEL_MODULE is None:
        try:
            from . import _threshold_numba

            _KERNEL_MODULE = _threshold_numba
        except ImportError:
            _KERNEL_MODULE = False
    return _KERNEL_MODULE or None


#: ``"numba"`` (the default: the kernel for float32 CPU tensors in eager mode when numba imports) or ``"torch"``
#: (the reference solver everywhere); tests set it to compare the two.
BACKEND = {"threshold": "numba"}


def _triton(x: Tensor) -> bool:
    """Whether ``x`` takes the Triton kernels (:mod:`softtopk.kernels`): CUDA tensors when triton imports (see
    :func:`softtopk.kernels.available`), in eager mode and under ``torch.compile`` (custom ops), not under a
    ``torch.func`` transform (the ops have no batching rule)."""
    return kernels.available(x) and not is_transformed(x)


def threshold_backend(x: Tensor) -> str:
    """The solver :func:`normalised_mask` uses for ``x`` (compute dtype): ``"numba"`` for float32 CPU tensors in
    eager mode (not under ``torch.compile`` or a ``torch.func`` transform) when numba is installed, else
    ``"torch"``, the pure-torch reference."""
    return "numba" if kernel_ready(x) else "torch"


def kernel_ready(x: Tensor, *params) -> bool:
    """Whether the numba kernel takes ``x`` (see :func:`threshold_backend`) with these per-row parameters (numbers,
    or tensors whose data can be read), in one test: it runs on every call."""
    if x.dtype != torch.float32 or not x.is_cpu or x.numel() == 0 or not can_read_data(x):
        return False
    for p in params:
        if isinstance(p, Tensor) and is_transformed(p):
            return False
    return _kernel_available()


def _kernel_available() -> bool:
    """Whether the kernels run at all: numba imports and :data:`BACKEND` asks for them."""
    return BACKEND["threshold"] == "numba" and _kernel() is not None


def _params(a, x: Tensor, dtype: torch.dtype = torch.float64):
    """A parameter of ``x``'s rows (a number, or a tensor broadcastable to (..., 1)) as a numpy vector of ``dtype``
    for a kernel: (1,) when it holds one value for every row (nothing to copy), else one per row of ``x``."""
    np_dtype = _NUMPY[dtype]
    if not isinstance(a, Tensor):
        return _number(a, np_dtype)
    if _one_value(a):  # one scalar read instead of a conversion (a few torch operations fewer per call)
        return _number(a.as_strided((1,), (1,)).item(), np_dtype)
    return a.detach().to(dtype).expand(x.shape[:-1] + (1,)).reshape(-1).contiguous().numpy()


_NUMPY = {torch.float64: "float64", torch.int64: "int64"}
_NUMBERS: dict = {}  # (number, numpy dtype) -> its (1,) array, made once (the kernels only read their parameters)


def _number(value, np_dtype: str):
    """``value`` as a (1,) numpy array of ``np_dtype`` for a kernel, shared by every call with that value (making
    the array cost a small call a few percent)."""
    key = (value, np_dtype)
    a = _NUMBERS.get(key)
    if a is None:
        if len(_NUMBERS) >= 256:  # (a loop over many temperatures: the memo stays small)
            _NUMBERS.clear()
        a = _NUMBERS[key] = _kernel().np.array([value], dtype=np_dtype)
    return a


def _reciprocals(t, x: Tensor):
    """1/t as :func:`_params` gives t (a number divided in Python: no array operation)."""
    return _params(1.0 / t, x) if not isinstance(t, Tensor) else 1.0 / _params(t, x)


def _one_value(a: Tensor) -> bool:
    """Whether ``a`` holds one value for all its entries by construction (an expanded number: stride 0 wherever the
    size exceeds 1)."""
    return all(st == 0 for st, size in zip(a.stride(), a.shape) if size > 1)


def _output(x: Tensor) -> Tensor:
    """An uninitialised tensor like ``x`` (C-contiguous float32, from :func:`_dense`) for a kernel to write,
    allocated by torch (so that torch's memory accounting, the profiler's included, sees the kernels' outputs)."""
    return torch.empty_like(x)


def _vector(*shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """An uninitialised tensor for a kernel's per-row numbers (τ, gradients, indices), read by address like
    :func:`_dense`'s."""
    return torch.empty(shape, dtype=dtype)


def _dense(x: Tensor) -> tuple[Tensor, int, int]:
    """(``x`` C-contiguous, its rows, its last dim n) for a kernel that reads its memory as (rows, n) by
    ``data_ptr()``: ``x`` itself when it is contiguous (``x`` float32 with entries). The kernels take their large
    arrays by address: a numpy view of a tensor costs a call about a microsecond each."""
    xc = x if x.is_contiguous() else x.contiguous()
    n = xc.shape[-1]
    return xc, xc.numel() // n, n


def kernel_mask(
    family: str, x: Tensor, k, t, tol: float, max_iter: int, *, hard: bool = False, plain: bool = False
) -> Tensor | None:
    """The normalised mask of :func:`normalised_mask` by the numba kernel, in one call; with ``hard`` (k whole) the
    straight-through mask: the exact top-k mask forward, the soft mask's gradient backward, both from that call
    (which also starts the threshold search at the k-th and (k+1)-th largest it selects). ``k`` and ``t`` numbers
    or (..., 1) tensors. None when the kernel does not take the call (not float32 on the CPU in eager mode, no
    numba) or leaves it to the reference: a non-finite score, |x|/t beyond 1e12, no convergence, or with ``hard`` a
    tie at some row's k-th value. Every row is finite when it answers. ``plain``: the caller has checked that ``x``
    is a float32 CPU tensor with entries in eager mode and that ``k`` and ``t`` are numbers."""
    if not (_kernel_available() if plain else kernel_ready(x, k, t)):
        return None
    if needs_graph(x, k, t):
        out = _kernel_mask_apply(x, k, t, family, tol, max_iter, hard)
        return out if out.dim() else None  # 0-d: declined
    return _solve_kernel(family, x, k, t, tol, max_iter, hard)[0]


def _solve_kernel(family: str, x: Tensor, k, t, tol: float, max_iter: int, hard: bool):
    """(the mask, or the hard mask with ``hard``; (y or None, τ, 1/t) for the backward), or (None, None) where the
    kernel declines a row. A call with ``hard`` of at least ``_FROM_Z_MIN`` entries keeps no soft mask (the solve's
    scratch is the hard mask's array, y None): its backward takes φ' from z (``backward_z``), so that it holds as
    much memory as a soft call rather than a third more."""
    mod = _kernel()
    xc, rows, n = _dense(x)
    y, tau, rt = _output(xc), _vector(rows), _reciprocals(t, x)
    soft = not hard or xc.numel() < _FROM_Z_MIN
    h = (_output(xc) if soft else y) if hard else None
    declined, declined_hard = mod.launch(
        mod.forward, rows, mod.CODES[family], rows, n, xc.data_ptr(), _params(k, x), rt, tol, max_iter,
        y.data_ptr(), tau.data_ptr(), 0 if h is None else h.data_ptr(),
    )  # fmt: skip
    if declined or declined_hard:
        return None, None
    if not soft:
        return h, (None, tau, rt)
    return (y if h is None else h), (y, tau, rt)


#: straight-through calls from this many entries keep no soft mask for the backward (see :func:`_solve_kernel`).
#: Recomputing φ' costs the backward an exponential and a division per entry (about 0.6 ns on one Zen 4 core), but a
#: third buffer of the call's size, freed with the others after each step, made glibc hand the memory back to the
#: system and fault it in again on the next call: at 8 x 1.28e5 a median of 1000 page faults per call and 1.4-2.5x
#: torch.topk between benchmark runs; none and 1.4x from z. Smaller calls showed no faults and keep the cheaper
#: backward.
_FROM_Z_MIN = 1 << 19


class _KernelMask(torch.autograd.Function):
    """A normalised mask computed by the kernel (:func:`_solve_kernel`, in the forward: its result is no view of an
    input), with the implicit backward (see :func:`_implicit_backward`) by the kernel. ``k`` and ``t`` numbers or
    tensors. Where the kernel declines, the forward returns a 0-d tensor (the caller then takes the reference).
    Eager only, applied by :func:`~softtopk._eager.eager_apply`. The backward kernel reads the saved x and y (so
    that autograd checks that neither was modified in place)."""

    @staticmethod
    def forward(ctx, x, k, t, family, tol, max_iter, hard):
        out, state = _solve_kernel(family, x, k, t, tol, max_iter, hard)
        if out is None:
            return x.new_zeros(())
        ctx.family, ctx.arrays = family, state[1:]
        ctx.save_for_backward(x, state[0])  # (y None for a large straight-through call: see _solve_kernel)
        return out

    @staticmethod
    @once
    def backward(ctx, gy):
        # ∂L/∂x = (s − φ' (Σs)/(Σφ')) / t with s = g φ'(z) (the implicit function theorem on Σφ(z) = k, z = (x − τ)/t)
        x, y = ctx.saved_tensors  # (y None for a large straight-through call: see _solve_kernel)
        tau, rt = ctx.arrays
        needs_k, needs_t = ctx.needs_input_grad[1:3]
        mod = _kernel()
        (xc, rows, n), g = _dense(x), _dense(gy if gy.dtype == torch.float32 else gy.float())[0]
        gx, gkt = _output(xc), _vector(2, rows) if needs_k or needs_t else None
        code, at = mod.CODES[ctx.family], 0 if gkt is None else gkt.data_ptr()
        if y is None:
            mod.launch(mod.backward_z, rows, code, rows, n, g.data_ptr(), rt, xc.data_ptr(), tau.data_ptr(),
                       gx.data_ptr(), at, needs_t)  # fmt: skip
        else:
            mod.launch(mod.backward, rows, code, rows, n, y.data_ptr(), g.data_ptr(), rt, xc.data_ptr(),
                       tau.data_ptr(), gx.data_ptr(), at, needs_t)  # fmt: skip
        if gkt is None:
            return gx, None, None, None, None, None, None
        shape = x.shape[:-1] + (1,)
        gk_out = gkt[0].float().view(shape) if needs_k else None
        gt_out = gkt[1].float().view(shape) if needs_t else None
        return gx, gk_out, gt_out, None, None, None, None


_kernel_mask_apply = eager_apply(_KernelMask)


def _make_function(family: type[Family]) -> type[torch.autograd.Function]:
    class ThresholdMask(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x, k, t, tol, max_iter):
            return threshold_mask_solve(family, x, k, t, tol, max_iter)

        @staticmethod
        def setup_context(ctx, inputs, output):
            x, k, t, _, _ = inputs
            y, dsum, tau, centre = output
            ctx.mark_non_differentiable(dsum, tau, centre)
            ctx.save_for_backward(y, dsum, x if ctx.needs_input_grad[2] else None, t, tau, centre)

        @staticmethod
        @once_differentiable
        def backward(ctx, gy, _gdsum, _gtau, _gcentre):
            y, dsum, x, t, tau, centre = ctx.saved_tensors
            needs_k, needs_t = ctx.needs_input_grad[1:3]
            gx, gk, gt = _row_blocks(_implicit_backward, family, y, dsum, x, t, tau, centre, gy, needs_k, needs_t)
            return gx, gk, gt, None, None

    ThresholdMask.__name__ = ThresholdMask.__qualname__ = f"ThresholdMask_{family.__name__}"
    return ThresholdMask


_FUNCTIONS = {name: _make_function(fam) for name, fam in FAMILIES.items()}


def normalised_mask(
    family: str, x: Tensor, k: Tensor, t: Tensor, *, tol: float | None = None, max_iter: int = MAX_ITER
) -> Tensor:
    """Normalised threshold mask along the last dim of ``x`` (compute dtype); ``k``, ``t`` of shape (..., 1)."""
    if tol is None:
        tol = 1e-9 if x.dtype == torch.float64 else 1e-5
    if _triton(x):
        return kernels.threshold_mask(family, x, k, t, tol, max_iter)
    y = kernel_mask(family, x, k, t, tol, max_iter)
    return _FUNCTIONS[family].apply(x, k, t, tol, max_iter)[0] if y is None else y


# --------------------------------------------------------------------------------------------------------------
# SOFT (Xie et al., 2020): the converged two-anchor entropic OT mask is a sigmoid mask of rescaled scores.
# --------------------------------------------------------------------------------------------------------------
class _CostScale(torch.autograd.Function):
    """m = max(max x, 1 − min x) over the finite entries of each row, so that max C = m² (m ≥ 1/2)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        xmin, xmax, _, _ = _row_stats(x, can_read_data(x))
        m = torch.maximum(xmax, 1.0 - xmin)
        return torch.where(torch.isfinite(m), m, 1.0), xmin, xmax  # m = 1 for rows without a finite score

    @staticmethod
    def setup_context(ctx, inputs, output):
        m, xmin, xmax = output
        ctx.mark_non_differentiable(xmin, xmax)
        ctx.save_for_backward(inputs[0], xmin, xmax)

    @staticmethod
    @once_differentiable
    def backward(ctx, gm, _gmin, _gmax):
        # ∂m/∂x is +1 at the arg-max (m = max x) or −1 at the arg-min (m = 1 − min x), split evenly over ties.
        x, xmin, xmax = ctx.saved_tensors
        use_max = xmax >= 1.0 - xmin
        ext = torch.where(use_max, xmax, xmin)
        hit = torch.where(x == ext, 1.0, 0.0).to(x.dtype)
        coef = torch.where(use_max, gm, -gm) / hit.sum(-1, keepdim=True).clamp(min=1.0)
        scale = torch.where(torch.isfinite(ext), coef, 0.0)
        return hit.mul_(scale) if can_read_data(scale) else hit * scale  # vmap (jacrev) has no in-place broadcast


def soft_temperature(x: Tensor, eps: Tensor) -> Tensor:
    r"""The temperature at which the sigmoid mask of ``x`` is the converged SOFT top-k mask.

    SOFT (Xie et al., 2020) transports the uniform measure on the scores to anchors 0 and 1 with cost
    :math:`C_{ij} = (x_i - a_j)^2 / \max C` and entropic regularisation ε. At the optimum
    :math:`\Gamma_{ij} = e^{(f_i + g_j - C_{ij})/\varepsilon}`, so the share of row i on anchor 1 is
    :math:`\sigma((C_{i0} - C_{i1} - c)/\varepsilon)` with :math:`C_{i0} - C_{i1} = (2 x_i - 1)/\max C` and one
    constant c per row, fixed by the column mass :math:`\sum_i y_i = k`: a sigmoid mask of x at temperature
    :math:`\varepsilon \max C / 2`. ``max C`` is taken per row over the finite scores (the official code takes
    it over the whole batch) and is differentiated like any other function of x.
    """
    m = _CostScale.apply(x)[0]
    return eps * m * m * 0.5


# --------------------------------------------------------------------------------------------------------------
# DFTopK (Zhu et al., 2025): sigmoid((x − τ)/t), τ = midpoint of the k-th and (k+1)-th largest scores.
# --------------------------------------------------------------------------------------------------------------
def _kth_pair(x: Tensor, k: Tensor | int):
    """Values and indices of the k-th and (k+1)-th largest entries along the last dim, by selection.

    Missing order statistics are +inf (k = 0) and -inf (k = n), with index -1.
    """
    n = x.shape[-1]
    if isinstance(k, int):
        if 0 < k < n and n >= 8 * _SUBSAMPLE and x.dim() == 2 and can_read_data(x):
            if 2 * k <= n:
                pair = _kth_pair_window(x, k)
            else:  # the (n − k)-th and (n − k + 1)-th largest of −x, negated and swapped
                pair = _kth_pair_window(-x, n - k)
                pair = None if pair is None else (-pair[0].flip(-1), pair[1].flip(-1))
            if pair is not None:
                return pair
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


def _kth_pair_window(x: Tensor, k: int):
    """:func:`_kth_pair` for 2-D ``x`` by sampling: a strided sample of each row brackets x_(k) and x_(k+1) in a
    window [a, b] that holds a few percent of the row (b = +inf when k ≤ n/32); one comparison pass counts the
    entries above the window and collects those inside it, and a small top-k over the window finishes exactly.
    Returns None when the bracket misses (rare; the caller then selects with ``torch.topk``).
    """
    rows, n = x.shape
    sample = x[:, :: n // _SUBSAMPLE]
    m = sample.shape[-1]
    r = k * m / n  # expected rank of x_(k) in the sample
    half = 4.0 * math.sqrt(r + 1.0) + 2.0
    j_lo, j_hi = math.ceil(r + half), math.floor(r - half)  # sample ranks (1-based) of a and b
    if j_lo >= m:
        return None
    ranked = torch.topk(sample, j_lo).values
    a = ranked[:, j_lo - 1 :]
    inside = x >= a
    above = torch.zeros(rows, 1, dtype=torch.int32, device=x.device)
    if j_hi >= 1 and 32 * k > n:  # for small k the whole top of the row is a small window: no upper bound
        b = ranked[:, j_hi - 1 : j_hi]
        over = x > b
        above = over.sum(-1, keepdim=True, dtype=torch.int32)
        inside &= ~over
    flat = _sparse_nonzero(inside.reshape(-1))  # flat indices of the window entries, row-major
    row = flat // n
    col = flat - row * n
    count = torch.bincount(row, minlength=rows).unsqueeze(-1)
    rank = k - above  # rank of x_(k) inside the window, 1-based
    if not bool(((rank >= 1) & (rank + 1 <= count)).all()):
        return None
    start = (torch.cumsum(count, 0) - count).squeeze(-1)
    pos = torch.arange(row.numel(), device=x.device) - start.index_select(0, row)
    width = int(count.max())
    vals = x.reshape(-1).index_select(0, flat)
    # x_(k) and x_(k+1) are the (c − rank)-th and (c − rank − 1)-th smallest of a row's c window entries
    # (0-based); selecting from the bottom picks far fewer than rank when the window sits near the top.
    window = x.new_full((rows, width), math.inf).index_put_((row, pos), vals)
    window_idx = torch.full((rows, width), -1, dtype=torch.long, device=x.device).index_put_((row, pos), col)
    low = count - rank  # ≥ 1
    vals, order = torch.topk(window, int(low.max()) + 1, largest=False, sorted=True)
    pick = torch.cat([low, low - 1], -1)
    return vals.gather(-1, pick), window_idx.gather(-1, order.gather(-1, pick))


def _sparse_nonzero(mask: Tensor) -> Tensor:
    """``mask.nonzero()`` of a 1-D boolean mask that is mostly False, in increasing order: the mask is scanned
    as 64-bit words (8 entries each), and only the entries of nonzero words are looked at."""
    m = mask.numel()
    if m % 8 or m < 1 << 16:
        return mask.nonzero().squeeze(-1)
    words = mask.view(torch.int64).nonzero().squeeze(-1)
    hit = mask.view(-1, 8).index_select(0, words).nonzero()  # (word number among the nonzero ones, byte)
    return words.index_select(0, hit[:, 0]) * 8 + hit[:, 1]


class _DFTopK(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, t, kth_vals, kth_idx):
        tau = kth_vals.mean(-1, keepdim=True)  # ±inf when an order statistic is ±inf: the mask is then exact
        rt = t.reciprocal()
        if not can_read_data(x):
            y = torch.sigmoid(x * rt - tau * rt)  # σ((x − τ)/t)
        else:  # the same, chunk by chunk in the cache, into one output buffer
            y, shift = torch.empty_like(x), tau * rt
            for cols, _ in _chunks(x, scratch=False):
                torch.mul(x[..., cols], rt, out=y[..., cols]).sub_(shift).sigmoid_()
            if bool(torch.isfinite(tau).all()):
                return y, tau
        # x = τ = ±inf (+inf entries at k = #(+inf), -inf padding at k = #live): selected iff +inf
        return torch.where(y.isnan(), (tau > 0).to(y.dtype), y), tau

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
        if not can_read_data(y):
            s = y * (1.0 - y) * gy / t
        else:
            s, rt = torch.empty_like(y), t.reciprocal()
            for cols, _ in _chunks(y, scratch=False):
                yc = y[..., cols]
                torch.addcmul(yc, yc, yc, value=-1.0, out=s[..., cols]).mul_(gy[..., cols]).mul_(rt)
        gt = None
        if ctx.needs_input_grad[1]:
            z = (x - tau) / t
            gt = -torch.where(s != 0, s * z, 0.0).sum(-1, keepdim=True)
        src = torch.where(idx >= 0, (-0.5 * _rowsum(s)).expand_as(idx), 0.0)
        index = idx.clamp(min=0)
        gx = s.scatter_add_(-1, index, src) if can_read_data(s) else s.scatter_add(-1, index, src)
        return gx, gt, None, None


def _kernel_k(k: int | Tensor, x: Tensor):
    """A selection's k (an int, or a tensor broadcastable to ``x``'s rows) for a kernel: an int64 numpy vector, (1,)
    or one per row of ``x``, or None when some row's k is outside [1, n)."""
    n = x.shape[-1]
    if not isinstance(k, Tensor):
        return _number(k, "int64") if 0 < k < n else None
    kk = _params(k, x, torch.int64)
    return kk if bool(((kk > 0) & (kk < n)).all()) else None


def kernel_dftopk(x: Tensor, k: int | Tensor, t) -> Tensor | None:
    """DFTopK's mask (:func:`dftopk`) by the numba kernel, ``t`` a number or a (..., 1) tensor; None when the kernel
    does not take the call (as :func:`kernel_mask`) or leaves it to the reference (k outside [1, n), a non-finite
    entry, a tie at the k-th or (k+1)-th value). Every row is finite when it answers."""
    if not kernel_ready(x, k, t):
        return None
    kk = _kernel_k(k, x)
    if kk is None:
        return None
    if needs_graph(x, t):
        out = _dftopk_kernel_apply(x, t, kk)
        return out if out.dim() else None  # 0-d: declined
    return _solve_dftopk(x, kk, t)[0]


def _solve_dftopk(x: Tensor, kk, t):
    """(DFTopK's mask, (τ, the two indices (2, R), 1/t) for the backward) by the kernel, ``kk``
    from :func:`_kernel_k`; (None, None) where it declines a row."""
    mod, (xc, rows, n) = _kernel(), _dense(x)
    y, tau, iab, rt = _output(xc), _vector(rows), _vector(2, rows, dtype=torch.int64), _reciprocals(t, x)
    if mod.launch(mod.dftopk_forward, rows, rows, n, xc.data_ptr(), kk, rt, y.data_ptr(), tau.data_ptr(),
                  iab.data_ptr()):  # fmt: skip
        return None, None
    return y, (tau, iab, rt)


def kernel_hard_mask(x: Tensor, k: int | Tensor, *, ready: bool = False) -> Tensor | None:
    """The exact top-k mask of ``x`` (float32, CPU, eager) along the last dim by the numba kernel, or None (no
    numba, another dtype or device, a k outside (0, n), a tie at the k-th value: the caller takes ``torch.topk``).
    ``ready``: the caller has checked :func:`kernel_ready`."""
    if not (ready or kernel_ready(x, k)):
        return None
    kk = _kernel_k(k, x)
    if kk is None:
        return None
    mod, (xc, rows, n) = _kernel(), _dense(x)
    out = _output(xc)
    declined = mod.launch(mod.hard_forward, rows, rows, n, xc.data_ptr(), kk, out.data_ptr())
    return None if declined else out


class _DFTopKKernel(torch.autograd.Function):
    """DFTopK with the forward computed by the kernel (:func:`_solve_dftopk`) and the backward by the kernel; a 0-d
    result where the kernel declines (eager only, as :class:`_KernelMask`)."""

    @staticmethod
    def forward(ctx, x, t, kk):
        y, arrays = _solve_dftopk(x, kk, t)
        if y is None:
            return x.new_zeros(())
        ctx.arrays, ctx.t_shape = arrays, getattr(t, "shape", None)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    @once
    def backward(ctx, gy):
        # y = σ(z), z = (x − τ)/t, τ = (x_a + x_b)/2:  ∂L/∂x = s − (Σ s)(e_a + e_b)/2,  s = g σ'(z)/t;  ∂L/∂t = −Σ s z
        x, y = ctx.saved_tensors
        tau, iab, rt = ctx.arrays
        needs_t = ctx.needs_input_grad[1]
        mod = _kernel()
        g, rows, n = _dense(gy if gy.dtype == y.dtype else gy.to(y.dtype))
        xc, gt = (_dense(x)[0], _vector(rows)) if needs_t else (None, None)  # (None: no Σ s z)
        gx = _output(y)
        mod.launch(mod.dftopk_backward, rows, rows, n, y.data_ptr(), g.data_ptr(), rt,
                   0 if xc is None else xc.data_ptr(), tau.data_ptr(), iab.data_ptr(), gx.data_ptr(),
                   0 if gt is None else gt.data_ptr())  # fmt: skip
        gt_out = None
        if gt is not None:
            gt_out = gt.to(y.dtype).view(y.shape[:-1] + (1,)).sum_to_size(ctx.t_shape)
        return gx, gt_out, None


_dftopk_kernel_apply = eager_apply(_DFTopKKernel)


def dftopk(x: Tensor, k: int | Tensor, t: Tensor) -> Tensor:
    """DFTopK along the last dim of ``x``; ``k`` an int or a (..., 1) integer-valued tensor."""
    if _triton(x):
        return kernels.dftopk(x, k, t)
    y = kernel_dftopk(x, k, t)
    if y is not None:
        return y
    vals, idx = _kth_pair(x.detach(), k)
    y, _ = _DFTopK.apply(x, t, vals, idx)
    return y
