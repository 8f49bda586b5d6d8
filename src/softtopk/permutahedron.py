r"""Isotonic regression and regularised projections onto the permutahedron: soft sort, soft rank, sparse top-k.

The permutahedron :math:`\mathcal{P}(w)` is the convex hull of the permutations of a vector :math:`w`. Blondel
et al. (2020, "Fast differentiable sorting and ranking") and Sander et al. (2023, "Fast, differentiable and
sparse top-k: a convex analysis perspective") define their operators as regularised linear programs over it,

.. math::
    P_\Omega(z, w) = \arg\max_{\mu \in \mathcal{P}(w)} \langle z, \mu\rangle - \Omega(\mu),

and reduce them to isotonic optimisation (Blondel et al. 2020, Prop. 3; Sander et al. 2023, Prop. 4): with
:math:`\sigma` the permutation sorting :math:`z` in decreasing order, :math:`s = z_\sigma` and :math:`w` sorted in
decreasing order,

.. math::
    P_\Omega(z, w) = \nabla\Omega^*(s - v)_{\sigma^{-1}},\qquad
    v = \arg\min_{v_1 \ge \dots \ge v_n} \sum_i \Omega^*(s_i - v_i) + w_i v_i .

The isotonic problem is solved exactly by the pool-adjacent-violators algorithm (PAV): the solution is constant on
consecutive blocks, and the value of a block B solves the one-dimensional problem of the block,
:math:`\sum_{i\in B} (\Omega^*)'(s_i - \gamma) = \sum_{i \in B} w_i`. Every backward here is read off that block
structure in closed form (implicit function theorem on the block equations), in O(n).

Solvers. PAV runs in a numba kernel (one O(n) pass per row, rows in parallel) when numba is installed and the
tensor is on the CPU; otherwise in a pure-torch reference that pools all adjacent violators of all rows at once,
round after round (exact, the same result; each round is O(n) but the number of rounds can reach the block
length). :func:`isotonic` also offers Dykstra's alternating projections (Sander et al. 2023, Sec. 5), pure torch,
iterative.

These operators run eagerly: they are not traceable by ``torch.compile`` and have no ``vmap`` rule (the PAV
kernel reads the data). Every backward is ``once_differentiable``.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from typing import Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._prepare import (
    DEFAULT_TEMPERATURE,
    KArg,
    can_read_data,
    check_finite,
    check_temperature,
    compute_dtype,
    is_transformed,
    move_back,
    move_last,
    normalize_dim,
    prepare,
    reject_unused,
    row_param,
    solver_options,
)
from .threshold import FAMILIES

__all__ = [
    "isotonic",
    "pav_backend",
    "permutahedron_projection",
    "permutahedron_topk",
    "soft_rank",
    "soft_sort",
    "topk_magnitude",
]

Number = Union[int, float]
Q2, Q4, KL = 0, 1, 2  # the loss of the isotonic problem: Ω* = u²/2, Ω* = u⁴/4, or Blondel's KL dual
_CUBIC = FAMILIES["sparse4/3"].slope_at_half  # the width factor of p = 4/3 (see topk_mask)


# --------------------------------------------------------------------------------------------------------------
# Argument helpers
# --------------------------------------------------------------------------------------------------------------
def _mode_of_p(p: object, fn: str) -> int:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{fn}: `p` must be 2 or 4/3, got {type(p).__name__}")
    if p == 2:
        return Q2
    if math.isclose(p, 4 / 3, rel_tol=1e-6):
        return Q4
    raise ValueError(f"{fn}: `p` must be 2 or 4/3, got {p}")


def _rows(xl: Tensor) -> Tensor:
    """(..., n) -> (R, n) (``xl`` itself when 2-D: no view node in the autograd graph)."""
    return xl if xl.dim() == 2 else xl.reshape(-1, xl.shape[-1])


def _unrows(out: Tensor, xl: Tensor) -> Tensor:
    """Inverse of :func:`_rows`."""
    return out if out.shape == xl.shape else out.reshape(xl.shape)


def _row_scalar(value: Union[Number, Tensor], x: Tensor, d: int, name: str, fn: str, dtype: torch.dtype) -> Tensor:
    """A per-row parameter as an (R, 1) tensor (R = number of rows of ``x`` along ``d``)."""
    return row_param(value, x, d, name=name, fn=fn, dtype=dtype).reshape(-1, 1)


def _eager(fn):
    """The public operators of this module run eagerly: their PAV kernels read the data. Under ``torch.compile``
    a call is a graph break (the operator runs as in eager mode, autograd included); under a ``torch.func``
    transform (vmap, grad) it raises a clear error instead of failing inside the kernel."""
    inner: list = []  # torch.compiler.disable(fn), made at the first call: it imports torch._dynamo (~1.5 s)

    @functools.wraps(fn)
    def public(*args, **kwargs):
        if any(isinstance(a, Tensor) and is_transformed(a) for a in (*args, *kwargs.values())):
            raise NotImplementedError(
                f"{fn.__name__}: torch.func transforms (vmap, grad, ...) are not supported: the PAV kernel reads the "
                "data. Every operator here takes any batch shape: pass the vmapped dimension as a batch dimension"
            )
        if not inner:
            inner.append(torch.compiler.disable(fn))
        return inner[0](*args, **kwargs)

    return public


# --------------------------------------------------------------------------------------------------------------
# PAV: numba kernel and pure-torch reference
# --------------------------------------------------------------------------------------------------------------
_NUMBA_MODULE: object = None


def _numba():
    """The numba kernel module, or None when numba is not installed (imported on first use)."""
    global _NUMBA_MODULE
    if _NUMBA_MODULE is None:
        try:
            from . import _pav_numba

            _NUMBA_MODULE = _pav_numba
        except ImportError:
            _NUMBA_MODULE = False
    return _NUMBA_MODULE or None


def pav_backend(device: Union[str, torch.device] = "cpu") -> str:
    """The PAV solver used for tensors on ``device``: ``"numba"`` (CPU with numba installed) or ``"torch"``."""
    return "numba" if torch.device(device).type == "cpu" and _numba() is not None else "torch"


def _pav(
    y: Tensor,
    a: Tensor | None,
    b: Tensor | None,
    c: Tensor | None,
    mode: int,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Exact solution of :math:`\arg\min_{v_1\ge\dots\ge v_n} \sum_i a_i R(v_i - y_i) + b_i v_i + c_i v_i^2/2`
    (``mode`` Q2: R = u²/2, Q4: R = u⁴/4), or of :math:`\sum_i e^{y_i - v_i} + e^{b_i} v_i` (KL), row by row.

    ``y`` (R, n); ``a`` (default 1), ``b``, ``c`` (default 0) of shape (1, n) or (R, n). Returns ``v`` (R, n) in
    ``y``'s dtype and ``start`` (R, n) int64: the index of the first entry of each entry's block.
    """
    backend = backend or pav_backend(y.device)
    with torch.no_grad():
        if backend == "numba":
            return _pav_numba_call(y, a, b, c, mode)
        if mode == Q4 and y.dtype != torch.float64:  # the cubic moments overflow float32 from a spread of ~1e13
            wide = [None if t is None else t.double() for t in (a, b, c)]
            v, start = _pav_torch(y.double(), wide[0], wide[1], wide[2], mode)
            return v.to(y.dtype), start
        return _pav_torch(y, a, b, c, mode)


def _one_row(t: Tensor) -> Tensor:
    """``t[:1]`` when the (R, ·) tensor ``t`` repeats one row (stride 0, as made by ``expand``): the kernels
    broadcast a single row, and autograd sums its gradient back over the rows."""
    return t[:1] if t.dim() == 2 and t.shape[0] > 1 and t.stride(0) == 0 else t


def _np_rows(t: Tensor | None, fill: float, n: int):
    if t is None:
        t = torch.full((1, n), fill, dtype=torch.float64)
    return _one_row(t).detach().to(device="cpu", dtype=torch.float64).contiguous().numpy()


def _pav_numba_call(y, a, b, c, mode):
    kernel = _numba()
    rows, n = y.shape
    y64 = y.detach().to(device="cpu", dtype=torch.float64).contiguous()
    v = torch.empty((rows, n), dtype=torch.float64)
    start = torch.empty((rows, n), dtype=torch.int64)
    if rows and n:
        with kernel.torch_threads() as threads:
            kernel.pav(
                y64.numpy(), _np_rows(a, 1.0, n), _np_rows(b, 0.0, n), _np_rows(c, 0.0, n), mode, v.numpy(),
                start.numpy(), kernel.lanes(rows, threads),
            )  # fmt: skip
    return v.to(device=y.device, dtype=y.dtype), start.to(y.device)


def _cubic_root(p: Tensor, q: Tensor) -> Tensor:
    """Elementwise real root of d³ + p d + q = 0 for p ≥ 0 (cancellation-free Cardano, then one Newton step)."""
    p3 = p / 3.0
    h = torch.sqrt(0.25 * q * q + p3 * p3 * p3)
    big = (0.5 * q.abs() + h).pow(1.0 / 3.0)
    d = -q / (big * big + p3 + (p3 / big) ** 2)
    d = torch.where(q == 0, torch.zeros_like(d), d)
    f = d * d * d + p * d + q
    fp = 3.0 * d * d + p
    return torch.where(fp > 0, d - f / torch.where(fp > 0, fp, torch.ones_like(fp)), d)


def _gid(start: Tensor) -> Tensor:
    """Flat block ids (row * n + first index of the block) of a (R, n) ``start`` array."""
    rows, n = start.shape
    return (start + torch.arange(rows, device=start.device).unsqueeze(1) * n).reshape(-1)


class _Blocks:
    """Sums and log-sum-exps over the blocks of a partition of each row, broadcast back to the entries: the blocks
    of a PAV solution (``start``), or, with ``start=None``, the whole last dim (Dykstra's pairs)."""

    def __init__(self, start: Tensor | None = None):
        self.gid = None if start is None else _gid(start)

    def sum(self, val: Tensor) -> Tensor:
        if self.gid is None:
            return val.sum(-1, keepdim=True)
        flat = val.reshape(-1)
        return flat.new_zeros(flat.shape).index_add_(0, self.gid, flat)[self.gid].view(val.shape)

    def lse(self, val: Tensor) -> Tensor:
        if self.gid is None:
            return torch.logsumexp(val, -1, keepdim=True)
        flat = val.reshape(-1)
        mx = flat.new_full(flat.shape, -math.inf).scatter_reduce_(0, self.gid, flat, "amax")[self.gid]
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        tot = flat.new_zeros(flat.shape).index_add_(0, self.gid, torch.exp(flat - mx))[self.gid]
        return (torch.log(tot) + mx).view(val.shape)

    def ratio(self, num: Tensor, den: Tensor) -> Tensor:
        """Σ_B num / Σ_B den per entry; 0 on blocks with Σ_B den = 0."""
        dsum = self.sum(den)
        return torch.where(dsum > 0, self.sum(num) / torch.where(dsum > 0, dsum, torch.ones_like(dsum)), 0.0)


# --------------------------------------------------------------------------------------------------------------
# The loss of the isotonic problem, as small hooks (the pattern of the threshold family): PAV, Dykstra and every
# backward below are written once over them.
#     v = argmin_{v_1 ≥ … ≥ v_n} Σ_i a_i R(v_i − y_i) + b_i v_i + c_i v_i²/2
# A block B of the solution has the value γ solving Σ_B a_i R'(γ − y_i) + b_i + c_i γ = 0; the implicit function
# theorem on that equation gives every backward, with the curvature R'' as the weight of each entry.
# --------------------------------------------------------------------------------------------------------------
class IsotonicLoss:
    """R and what PAV, Dykstra and the backward need of it; ``mode`` is its code in the numba kernel."""

    mode = -1

    @staticmethod
    def grad(u: Tensor) -> Tensor:
        """R'(u)."""
        raise NotImplementedError

    @staticmethod
    def curvature(u: Tensor) -> Tensor:
        """R''(u)."""
        raise NotImplementedError

    @staticmethod
    def pool(y: Tensor, a: Tensor, b: Tensor, c: Tensor, blocks: _Blocks) -> Tensor:
        """The value γ of every entry's block."""
        raise NotImplementedError

    @staticmethod
    def unconstrained(y: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        """argmin_v a R(v − y) + b v + c v²/2, elementwise."""
        raise NotImplementedError

    @staticmethod
    def residual(y: Tensor, b: Tensor, blocks: _Blocks) -> Tensor:
        """y − γ_B for a = 1, c = 0 (the projections), from quantities centred on each block: subtracting γ itself
        cancels when |y| is large (a singleton block of y = 1e20 would give 0 instead of b)."""
        raise NotImplementedError


class Quadratic(IsotonicLoss):
    """R(u) = u²/2: least squares (p = 2)."""

    mode = Q2

    @staticmethod
    def grad(u):
        return u

    @staticmethod
    def curvature(u):
        return torch.ones_like(u)

    @staticmethod
    def pool(y, a, b, c, blocks):
        return blocks.sum(a * y - b) / blocks.sum(a + c)

    @staticmethod
    def unconstrained(y, a, b, c):
        return (a * y - b) / (a + c)

    @staticmethod
    def residual(y, b, blocks):
        m = blocks.sum(torch.ones_like(y))
        return (y - blocks.sum(y) / m) + blocks.sum(b) / m


class Quartic(IsotonicLoss):
    """R(u) = u⁴/4 (p = 4/3): a block's value is the root of a depressed cubic, solved in closed form from the
    block's weighted central moments."""

    mode = Q4

    @staticmethod
    def grad(u):
        return u * u * u

    @staticmethod
    def curvature(u):
        return 3.0 * u * u

    @staticmethod
    def pool(y, a, b, c, blocks):
        m = blocks.sum(a)
        mean = blocks.sum(a * y) / m
        mean = mean + blocks.sum(a * (y - mean)) / m  # second pass: exact mean even when |y| >> spread
        e = y - mean
        ae2 = a * e * e
        m2, m3, bs, cs = blocks.sum(ae2), blocks.sum(ae2 * e), blocks.sum(b), blocks.sum(c)
        return mean + _cubic_root((3.0 * m2 + cs) / m, -(m3 - bs - cs * mean) / m)

    @staticmethod
    def unconstrained(y, a, b, c):
        return y + _cubic_root(c / a, (b + c * y) / a)

    @staticmethod
    def residual(y, b, blocks):
        m = blocks.sum(torch.ones_like(y))
        e = y - blocks.sum(y) / m
        return e - _cubic_root(3.0 * blocks.sum(e * e) / m, -(blocks.sum(e * e * e) - blocks.sum(b)) / m)


class Entropic(IsotonicLoss):
    """Blondel et al.'s KL dual, Σ_i e^{y_i − v_i} + e^{b_i} v_i (a and c unused): γ = lse_B(y) − lse_B(b)."""

    mode = KL

    @staticmethod
    def pool(y, a, b, c, blocks):
        return blocks.lse(y) - blocks.lse(b)

    @staticmethod
    def residual(y, b, blocks):
        return (y - blocks.lse(y)) + blocks.lse(b)


LOSSES: dict[int, type[IsotonicLoss]] = {loss.mode: loss for loss in (Quadratic, Quartic, Entropic)}


def _block_gradient(num: Tensor, den: Tensor, blocks: _Blocks, flat_den: Tensor | None = None):
    """The implicit-function step that every backward of this module shares: ḡ_B = Σ_B num / Σ_B den per entry.

    ``den`` holds each entry's weight in the derivative of its block equation (a R''). A *flat* block, with
    Σ_B den = 0 (every entry at the block value, where R'' of p = 4/3 vanishes), takes ``flat_den`` instead (the
    limit of a singleton), or ḡ = 0 when it is None. Returns (ḡ, the weights used, the flat entries or None).
    """
    dsum = blocks.sum(den)
    flat = dsum <= 0
    if not bool(flat.any()):
        return blocks.sum(num) / dsum, den, None
    if flat_den is None:
        return torch.where(flat, 0.0, blocks.sum(num) / torch.where(flat, 1.0, dsum)), den, flat
    den = torch.where(flat, flat_den, den)
    return blocks.sum(num) / blocks.sum(den), den, flat


def _coefficients(y: Tensor, a, b, c) -> tuple[Tensor, Tensor, Tensor]:
    """a (default 1), b, c (default 0) at y's shape and dtype."""
    rows, n = y.shape
    a = torch.ones_like(y) if a is None else a.to(y.dtype).expand(rows, n)
    b = torch.zeros_like(y) if b is None else b.to(y.dtype).expand(rows, n)
    c = torch.zeros_like(y) if c is None else c.to(y.dtype).expand(rows, n)
    return a, b, c


def _pav_torch(y, a, b, c, mode):
    """Pure-torch PAV: pool every adjacent violating pair of blocks of every row at once, until none is left.

    Pooling a run of consecutive violators is what sequential PAV would do too, so the result is the same exact
    solution; a round costs O(R n) and the number of rounds is at most the length of the longest block.
    """
    rows, n = y.shape
    a, b, c = _coefficients(y, a, b, c)
    loss = LOSSES[mode]
    ar = torch.arange(n, device=y.device).expand(rows, n)
    start = ar.clone()
    while True:
        v = loss.pool(y, a, b, c, _Blocks(start))
        is_start = start == ar
        viol = torch.zeros_like(is_start)
        viol[:, 1:] = is_start[:, 1:] & (v[:, :-1] < v[:, 1:])
        if rows == 0 or not bool(viol.any()):
            return v, start
        start = torch.where(is_start & ~viol, ar, 0).cummax(-1).values


# --------------------------------------------------------------------------------------------------------------
# Dykstra (pure torch): dual block-coordinate ascent over the odd and the even pair constraints
# --------------------------------------------------------------------------------------------------------------
def _solve_pairs(y, a, b, c, mode, offset):
    """argmin of Σ a R(v − y) + b v + c v²/2 subject to v_i ≥ v_{i+1} for the pairs (i, i+1), i = offset, offset+2, …"""
    loss = LOSSES[mode]
    z = loss.unconstrained(y, a, b, c)
    rows, n = y.shape
    pairs = (n - offset) // 2
    if pairs == 0:
        return z
    sl = slice(offset, offset + 2 * pairs)

    def cut(t):
        return t[:, sl].reshape(rows, pairs, 2)

    zz = cut(z)
    pooled = loss.pool(cut(y), cut(a), cut(b), cut(c), _Blocks())
    viol = zz[..., :1] < zz[..., 1:]
    z = z.clone()
    z[:, sl] = torch.where(viol, pooled, zz).reshape(rows, 2 * pairs)
    return z


def _dykstra(y, a, b, c, mode, tol, max_iter):
    r"""Dykstra's alternating projections for the isotonic problem of :func:`_pav` (modes Q2 and Q4).

    The monotone cone is the intersection of :math:`C_1 = \{v_{2j} \ge v_{2j+1}\}` and
    :math:`C_2 = \{v_{2j+1} \ge v_{2j+2}\}`, each a product of independent pair constraints whose projection is
    closed-form (keep the pair, or pool it). For the squared loss this is Dykstra's algorithm; for the quartic loss
    it is its Bregman form, block-coordinate ascent on the dual, with the multipliers of each set (g1, g2) folded
    into the linear term of the other step. Stops when the iterate moves less than ``tol`` and violates the
    constraints of :math:`C_1` by less than ``tol`` (relative to the range of ``y``); warns otherwise. Returns the
    iterate and the number of iterations it took (0 when it did not converge).

    Convergence: linear for the squared loss, but a block of length L needs of the order of L² iterations (the
    pooling spreads one position per iteration); for the quartic loss, whose curvature vanishes at the minimum,
    it is much slower still. PAV is the solver of choice on CPU; Dykstra is the batched, branch-free alternative.
    """
    rows, n = y.shape
    a, b, c = _coefficients(y, a, b, c)
    loss = LOSSES[mode]

    def grad(v):  # the objective's gradient without multipliers
        return a * loss.grad(v - y) + b + c * v

    scale = 1.0 + float((y.amax() - y.amin()).abs()) if y.numel() else 1.0
    g2 = torch.zeros_like(y)
    prev = loss.unconstrained(y, a, b, c)
    worst = math.inf
    for it in range(max_iter):
        v1 = _solve_pairs(y, a, b - g2, c, mode, 0)
        g1 = grad(v1) - g2
        v = _solve_pairs(y, a, b - g1, c, mode, 1)
        g2 = grad(v) - g1
        pairs = n // 2
        viol = (v[:, 1 : 2 * pairs : 2] - v[:, 0 : 2 * pairs : 2]).clamp(min=0)
        worst = max(float(viol.amax()) if viol.numel() else 0.0, float((v - prev).abs().amax()))
        prev = v
        if worst <= tol * scale:
            return v, it + 1
    warnings.warn(
        f"isotonic(solver='dykstra'): no convergence after max_iter={max_iter} iterations (last step and "
        f"constraint violation {worst:.3g}, tol·scale {tol * scale:.3g}); raise max_iter or use solver='pav'",
        RuntimeWarning,
        stacklevel=4,
    )
    return prev, 0


def _blocks_of(v: Tensor, tol: float) -> Tensor:
    """Block starts read off an approximate solution: consecutive entries within ``tol`` share a block."""
    rows, n = v.shape
    ar = torch.arange(n, device=v.device).expand(rows, n)
    new = torch.ones_like(v, dtype=torch.bool)
    new[:, 1:] = (v[:, :-1] - v[:, 1:]).abs() > tol
    return torch.where(new, ar, 0).cummax(-1).values


# --------------------------------------------------------------------------------------------------------------
# Isotonic regression
# --------------------------------------------------------------------------------------------------------------
class _Isotonic(torch.autograd.Function):
    @staticmethod
    def forward(y, w, mode, solver, tol, max_iter):
        if solver == "pav":
            return _pav(y, w, None, None, mode)
        if y.numel() == 0:
            return y.clone(), torch.zeros_like(y, dtype=torch.int64)
        with torch.no_grad():
            v, _ = _dykstra(y, w, None, None, mode, tol, max_iter)
            scale = 1.0 + float((y.amax() - y.amin()).abs()) if y.numel() else 1.0
            return v, _blocks_of(v, 10.0 * tol * scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        y, w, mode = inputs[:3]
        v, start = output
        ctx.mark_non_differentiable(start)
        ctx.mode = mode
        ctx.save_for_backward(y, w, v, start)

    @staticmethod
    @once_differentiable
    def backward(ctx, gv, _gstart):
        # Block B with value γ: Σ_B a_i R'(γ − y_i) = 0. Implicit function theorem, with d_i = a_i R''(γ − y_i):
        #   ∂γ/∂y_j = d_j / Σ_B d,   ∂γ/∂a_j = −R'(γ − y_j) / Σ_B d.
        # p = 2: d = a, the a-weighted mean of the incoming gradient over the block. p = 4/3: d = 3 a (γ − y)²;
        # a block with Σ d = 0 (every y_i = γ) falls back to the a-weighted mean (its limit for a singleton).
        y, w, v, start = ctx.saved_tensors
        loss = LOSSES[ctx.mode]
        a = torch.ones_like(y) if w is None else w.expand_as(y)
        u = v - y
        gbar, d, _ = _block_gradient(gv, a * loss.curvature(u), _Blocks(start), flat_den=a)
        gy = d * gbar
        gw = None
        if w is not None and ctx.needs_input_grad[1]:
            gw = -loss.grad(u) * gbar
            if w.shape != gw.shape:
                gw = gw.sum(0, keepdim=True)
        return gy, gw, None, None, None, None


@_eager
def isotonic(
    y: Tensor,
    w: Tensor | None = None,
    *,
    dim: int = -1,
    p: Number = 2,
    solver: str = "pav",
    increasing: bool = False,
    tol: float | None = None,
    max_iter: int | None = None,
) -> Tensor:
    r"""Weighted isotonic regression along ``dim``, batched over all other dimensions.

    Solves, for every row,

    .. math::
        v = \arg\min_{v_1 \ge v_2 \ge \dots \ge v_n} \sum_i w_i\, R_p(v_i - y_i),\qquad
        R_p(u) = \frac{|u|^q}{q},\ \ \frac1p + \frac1q = 1,

    i.e. :math:`R_2(u) = u^2/2` (least squares) and :math:`R_{4/3}(u) = u^4/4`. :math:`R_p = \Omega_p^*` is the
    convex conjugate of the p-norm regulariser :math:`\Omega_p(\mu) = |\mu|^p/p` of Sander et al. (2023), whose
    sparse top-k reduces to :math:`\arg\min_{v_1\ge\dots\ge v_n} \sum_i t R_p((s_i - v_i)/t) + w_i v_i` (their
    Prop. 4; :func:`permutahedron_topk` solves that form with the same kernel). ``increasing=True`` asks for
    :math:`v_1 \le \dots \le v_n` instead (Blondel et al. 2020 use the decreasing form, the default here).

    The PAV solution is exact. A block's value is the weighted mean for p = 2 and, for p = 4/3, the root of
    :math:`\sum_{i\in B} w_i (\gamma - y_i)^3 = 0`, a depressed cubic in :math:`\gamma - \bar y_B` solved in closed
    form from the block's weighted central moments. The backward is closed-form (implicit function theorem on the
    block equation), O(n): for p = 2 the incoming gradient is averaged over each block with weights w.

    Args:
        y: data, floating, any shape.
        w: positive weights, broadcastable to ``y``'s shape (default 1). Differentiable.
        p: 2 or 4/3.
        solver: ``"pav"`` (exact; numba kernel on CPU when installed, else a pure-torch reference) or
            ``"dykstra"`` (pure torch, iterative, approximate; its backward uses the blocks read off the solution).
        dim: the dimension along which ``v`` is monotone.
        increasing: solve for a non-decreasing ``v``.
        tol: Dykstra's stopping rule: largest step and constraint violation below ``tol`` times (1 + range of y);
            default 1e-6 (float32) or 1e-10 (float64). PAV is exact and takes no ``tol`` (``TypeError``).
        max_iter: Dykstra's iterations at most (default 1000); a ``RuntimeWarning`` is issued if it is reached
            before ``tol``. PAV takes none (``TypeError``).

    Returns:
        ``v`` of ``y``'s shape and dtype (half precision is computed in float32).

    Example:
        >>> import torch, softtopk
        >>> softtopk.isotonic(torch.tensor([1.0, 3.0, 2.0, 0.0]))
        tensor([2., 2., 2., 0.])
    """
    fn = "isotonic"
    check_finite(y, "y", fn=fn)
    d = normalize_dim(y, dim, fn=fn)
    mode = _mode_of_p(p, fn)
    if solver not in ("pav", "dykstra"):
        raise ValueError(f"{fn}: `solver` must be 'pav' or 'dykstra', got {solver!r}")
    if not isinstance(increasing, bool):
        raise TypeError(f"{fn}: `increasing` must be a bool, got {type(increasing).__name__}")
    if solver == "pav":
        reject_unused(fn, "solver='pav' (exact)", tol=tol, max_iter=max_iter)
    cdtype = compute_dtype(y)
    tol, max_iter = solver_options("dykstra", cdtype, tol, max_iter, fn=fn)
    yl = move_last(y, d).to(cdtype)
    wl = None
    if w is not None:
        if not isinstance(w, Tensor):
            raise TypeError(f"{fn}: `w` must be a torch.Tensor or None, got {type(w).__name__}")
        if not w.dtype.is_floating_point:
            raise TypeError(f"{fn}: `w` must have a floating dtype, got {w.dtype}")
        try:
            wb = w.broadcast_to(y.shape)
        except RuntimeError:
            raise ValueError(
                f"{fn}: `w` of shape {tuple(w.shape)} does not broadcast to y's shape {tuple(y.shape)}"
            ) from None
        if can_read_data(w) and w.numel() and not bool(((w > 0) & torch.isfinite(w)).all()):
            raise ValueError(f"{fn}: `w` must be positive and finite")
        wl = _rows(move_last(wb, d).to(device=y.device, dtype=cdtype))
    shape = yl.shape
    y2 = _rows(yl)
    if increasing:
        y2 = -y2
    v, _ = _Isotonic.apply(y2, wl, mode, solver, float(tol), int(max_iter))
    if increasing:
        v = -v
    return move_back(v.reshape(shape).to(y.dtype), d)


# --------------------------------------------------------------------------------------------------------------
# Projections onto the permutahedron
# --------------------------------------------------------------------------------------------------------------
class _ProjectSorted(torch.autograd.Function):
    """μ = ∇Ω*(s − v) with v the isotonic dual solution, for s (R, n) and w (R or 1, n) sorted decreasingly."""

    @staticmethod
    def forward(s, w, mode):
        _, start = _pav(s, None, w, None, mode)
        u = LOSSES[mode].residual(s, w.expand_as(s), _Blocks(start))  # s − v, without cancellation
        return (u * u * u if mode == Q4 else u.clone()), u, start  # μ must not be u itself: u is not differentiable

    @staticmethod
    def setup_context(ctx, inputs, output):
        s, w, mode = inputs
        _, u, start = output
        ctx.mark_non_differentiable(u, start)
        ctx.mode = mode
        ctx.save_for_backward(s, w, u, start)

    @staticmethod
    @once_differentiable
    def backward(ctx, g, _gv, _gstart):
        # μ_i = R'(u_i), u_i = s_i − γ_B, with the block equation Σ_B R'(s_i − γ) = Σ_B w_i (Q2, Q4) or
        # γ = logsumexp_B(s) − logsumexp_B(w) (KL). With h_i = R''(u_i) and G_B = Σ_B h g:
        #   Q2 (h = 1):      ∂L/∂s = g − G_B/|B|,          ∂L/∂w = G_B/|B|
        #   Q4 (h = 3u²):    ∂L/∂s = h (g − G_B/Σ_B h),    ∂L/∂w = G_B/Σ_B h   (0 on blocks with Σ_B h = 0)
        #   KL (h = 1):      ∂L/∂s = g − softmax_B(s) G_B, ∂L/∂w = softmax_B(w) G_B
        s, w, u, start = ctx.saved_tensors
        blocks = _Blocks(start)
        if ctx.mode == KL:
            gsum, ws = blocks.sum(g), w.expand_as(s)
            gs = g - torch.exp(s - blocks.lse(s)) * gsum
            gw = torch.exp(ws - blocks.lse(ws)) * gsum
        else:
            h = LOSSES[ctx.mode].curvature(u)
            gbar, _, _ = _block_gradient(h * g, h, blocks)
            gs, gw = h * (g - gbar), gbar
        if gw.shape != w.shape:
            gw = gw.sum(0, keepdim=True)
        return gs, gw, None


def _project_sorted(s: Tensor, w: Tensor, mode: int) -> Tensor:
    return _ProjectSorted.apply(s, _one_row(w), mode)[0]


class _SortProject(torch.autograd.Function):
    """The numba path of :func:`_project`, :func:`soft_sort` and :func:`soft_rank`: scale, sort, PAV and un-sort
    fused in one kernel per row (``_pav_numba.project``), with the closed-form backward of
    ``_pav_numba.project_backward``.

    ``y`` and ``b`` (R or 1, n) of one float dtype; ``y_scale`` a number or an (R or 1, 1) tensor, ``b_sign``
    ±1. The rows of ``y_scale · y`` (``sort_y``) or of ``b_sign · b`` are sorted by the kernel (a radix sort),
    the other side is taken as sorted. Old-style (``ctx`` in ``forward``): the kernel reads the data, so there
    is no vmap rule to generate, and ``apply`` skips the signature binding (a tenth of the time at n = 100).
    """

    @staticmethod
    def forward(ctx, y, y_scale, b, b_sign, sort_y, mode, fn):
        import numpy as np  # there whenever numba is; not a dependency of softtopk

        kernel = _numba()
        rows, n = (0 if 0 in (y.shape[0], b.shape[0]) else max(y.shape[0], b.shape[0])), y.shape[-1]
        is_tensor = isinstance(y_scale, Tensor)
        if is_tensor:
            scale = y_scale.detach().reshape(-1).to(torch.float64).contiguous().numpy()
        else:
            scale = np.full(1, float(y_scale))
        yc, bc = y.detach().contiguous(), b.detach().contiguous()
        out = yc.new_empty((rows, n))
        blocks = np.empty((2, rows, n), np.int32)  # perm, start
        u = np.empty((rows, n) if mode == Q4 else (rows, 0))
        if rows and n:
            with kernel.torch_threads() as threads:
                bad = kernel.project(
                    yc.numpy(), scale, bc.numpy(), float(b_sign), sort_y, mode, out.numpy(), blocks[0], blocks[1], u,
                    kernel.lanes(rows, threads),
                )  # fmt: skip
            if bad:
                raise ValueError(f"{fn}: `x` must be finite (it contains NaN or ±inf)")
        # the kernel's own arrays stay numpy (no conversions in the backward); the inputs go through autograd's
        # saved-tensor checks (an in-place change after the forward raises instead of giving a wrong gradient)
        ctx.args = (scale, u, blocks, float(b_sign), sort_y, mode, y_scale.shape if is_tensor else None)
        ctx.save_for_backward(yc, bc)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        y, b = ctx.saved_tensors
        scale, u, blocks, b_sign, sort_y, mode, scale_shape = ctx.args
        need_y, need_scale, need_b = ctx.needs_input_grad[:3]
        g = g.to(y.dtype).contiguous()
        rows, n = g.shape
        gy = torch.empty((rows, n if need_y else 0), dtype=g.dtype)
        gb = torch.empty((rows, n if need_b else 0), dtype=g.dtype)
        gscale = torch.zeros(rows if need_scale else 0, dtype=torch.float64).numpy()
        if g.numel():
            kernel = _numba()
            with kernel.torch_threads() as threads:
                kernel.project_backward(
                    g.numpy(), y.numpy(), scale, b.numpy(), b_sign, u, blocks[0], blocks[1], sort_y, mode, gy.numpy(),
                    gscale, gb.numpy(), kernel.lanes(rows, threads),
                )  # fmt: skip
        gy = (gy.sum(0, keepdim=True) if y.shape[0] != rows else gy) if need_y else None
        gb = (gb.sum(0, keepdim=True) if b.shape[0] != rows else gb) if need_b else None
        gs = None
        if need_scale:
            gs = torch.from_numpy(gscale.sum(0, keepdims=True) if scale.shape[0] != rows else gscale)
            gs = gs.to(y.dtype).reshape(scale_shape)
        return gy, gs, gb, None, None, None, None


def _fused(*tensors: Tensor) -> bool:
    """Whether the fused numba kernels apply: CPU tensors with numba installed, outside vmap / torch.compile."""
    return all(t.device.type == "cpu" and can_read_data(t) for t in tensors) and pav_backend("cpu") == "numba"


def _project(z: Tensor, w_sorted: Tensor, mode: int, fn: str) -> Tensor:
    """P_Ω(z, w) for z (R, n) in any order and w (R or 1, n) sorted decreasingly; ``fn`` names the caller in
    errors. Finite scores that overflow once scaled (x / temperature) raise instead of giving NaN."""
    if z.numel() and can_read_data(z) and not bool(torch.isfinite(z).all()):
        raise ValueError(
            f"{fn}: the scaled scores overflow {z.dtype} (|x| / temperature reaches ±inf): raise the temperature "
            f"or compute in float64"
        )
    if _fused(z, w_sorted):
        return _SortProject.apply(z, 1.0, _one_row(w_sorted).to(z.dtype), 1.0, True, mode, fn)
    s, perm = torch.sort(z, dim=-1, descending=True)
    mu = _project_sorted(s, w_sorted, mode)
    return torch.zeros_like(mu).scatter(-1, perm, mu)


@_eager
def permutahedron_projection(z: Tensor, w: Tensor, *, dim: int = -1, p: Number = 2) -> Tensor:
    r"""The p-norm regularised projection onto the permutahedron of ``w`` (Sander et al. 2023, Blondel et al. 2020).

    .. math::
        P_p(z, w) = \arg\max_{\mu \in \mathcal{P}(w)} \langle z, \mu\rangle - \frac1p \sum_i |\mu_i|^p,

    where :math:`\mathcal{P}(w)` is the convex hull of the permutations of ``w``. For p = 2 it is the Euclidean
    projection of ``z`` onto :math:`\mathcal{P}(w)`; p = 4/3 gives a smooth (C¹) operator that is still sparse.
    Computed by sorting ``z`` and solving the dual isotonic problem of the module docstring with PAV (exact);
    the backward is closed-form, O(n). As ``z`` is scaled up (``z / t``, t → 0) the result tends to the vertex
    :math:`w_{\text{rank}(z)}` (``w`` sorted like ``z``), the hard LP solution.

    Args:
        z: scores, any shape.
        w: the generating vector: a tensor broadcastable to ``z``'s shape (so a 1-D tensor of size n when
            ``dim = -1``); its order does not matter. Differentiable.
        p: 2 or 4/3.
        dim: the dimension of the vectors.

    Returns:
        :math:`P_p(z, w)` of ``z``'s shape and dtype.

    Example:
        >>> import torch, softtopk
        >>> softtopk.permutahedron_projection(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0, 0.0, 0.0]))
        tensor([1., 0., 0.])
    """
    fn = "permutahedron_projection"
    check_finite(z, "z", fn=fn)
    d = normalize_dim(z, dim, fn=fn)
    mode = _mode_of_p(p, fn)
    if not isinstance(w, Tensor):
        raise TypeError(f"{fn}: `w` must be a torch.Tensor, got {type(w).__name__}")
    check_finite(w, "w", fn=fn)
    try:
        wb = w.broadcast_to(z.shape)
    except RuntimeError:
        raise ValueError(
            f"{fn}: `w` of shape {tuple(w.shape)} does not broadcast to z's shape {tuple(z.shape)}"
        ) from None
    cdtype = compute_dtype(z)
    zl = move_last(z, d).to(cdtype)
    ws = torch.sort(_rows(move_last(wb, d).to(device=z.device, dtype=cdtype)), dim=-1, descending=True).values
    mu = _project(_rows(zl), ws, mode, fn)
    return move_back(mu.reshape(zl.shape).to(z.dtype), d)


def _topk_weights(k: Tensor, n: int) -> Tensor:
    """w = (1, …, 1, k − ⌊k⌋, 0, …, 0) with ⌊k⌋ ones, for k of shape (R, 1): P(w) is the capped simplex
    {0 ≤ y ≤ 1, Σ y = k}. Differentiable in k through the fractional entry (the right derivative at integers)."""
    fl = k.detach().floor()
    idx = torch.arange(n, device=k.device, dtype=k.dtype)
    return (idx < fl).to(k.dtype) + (idx == fl).to(k.dtype) * (k - fl)


@_eager
def permutahedron_topk(
    x: Tensor,
    k: KArg,
    *,
    dim: int = -1,
    temperature: Union[float, Tensor, None] = None,
    p: Number = 2,
    largest: bool = True,
) -> Tensor:
    r"""Sparse soft top-k mask as a projection onto the permutahedron of :math:`w = (1,\dots,1,0,\dots,0)`.

    Sander et al. (2023): with ``k`` ones in ``w``, :math:`\mathcal{P}(w)` is the capped simplex
    :math:`\{0 \le y \le 1, \sum_i y_i = k\}` and

    .. math::
        y = \arg\max_{y \in \mathcal{P}(w)} \langle x, y\rangle - t\,\frac1p \sum_i |y_i|^p
          = P_p(x / t, w),\qquad t = T \cdot \mathrm{factor},

    solved by PAV on the isotonic dual :math:`\arg\min_{v_1\ge\dots\ge v_n}\sum_i t R_p((s_i - v_i)/t) + w_i v_i`
    (``s`` = x sorted decreasingly), with :math:`y = \nabla R_p((s - v)/t)` unsorted. It is the same operator as
    ``topk_mask(x, k, method="sparse", temperature=T, p=p)`` (which finds the threshold by root finding instead),
    T = ``temperature`` in the same width convention (factor 1 for p = 2, 3·2^(-2/3) for p = 4/3);
    the two agree to 1e-6 in float64. A fractional ``k`` uses :math:`w = (1,\dots,1,k-\lfloor k\rfloor,0,\dots)`,
    whose permutahedron is again the capped simplex. As t → 0 the mask tends to the hard top-k mask.

    Args:
        x: scores, any shape (finite).
        k: an int or float in [0, n], or a per-row tensor broadcastable to the batch shape. Differentiable.
        temperature: T > 0, a number or a per-row tensor (None: 1.0). Differentiable.
        p: 2 (piecewise linear) or 4/3 (C¹).
        largest: select the k largest (default) or the k smallest entries.
        dim: the dimension to select along.

    Returns:
        A mask of ``x``'s shape and dtype with entries in [0, 1] summing to k along ``dim``; exactly 0 outside the
        k largest entries and often exactly 1 inside.

    Example:
        >>> import torch, softtopk
        >>> softtopk.permutahedron_topk(torch.tensor([3.0, 1.0, 2.0, 0.0]), 2, temperature=2.0)
        tensor([1.0000, 0.2500, 0.7500, 0.0000])
    """
    fn = "permutahedron_topk"
    rows = prepare(fn, x, k, dim=dim, temperature=temperature, largest=largest, finite=True)
    mode = _mode_of_p(p, fn)
    t = rows.t.reshape(-1, 1) * (1.0 if mode == Q2 else _CUBIC)  # the width convention of topk_mask
    y = _project(_rows(rows.signed) / t, _topk_weights(rows.k.reshape(-1, 1), rows.n), mode, fn)
    return rows.restore(y.reshape(rows.x.shape))


# --------------------------------------------------------------------------------------------------------------
# Top-k in magnitude (Sander et al. 2023)
# --------------------------------------------------------------------------------------------------------------
class _MagnitudeSorted(torch.autograd.Function):
    """|y| in sorted order: m = ∇R_p(e/t) + e, e = s − v, v = argmin_{v dec} Σ R_p(s_i − v_i) + c_i v_i²/2."""

    @staticmethod
    def forward(s, c, t, mode):
        v, start = _pav(s, None, None, c, mode)
        e = s - v
        u = e / t
        return (u * u * u if mode == Q4 else u) + e, v, start

    @staticmethod
    def setup_context(ctx, inputs, output):
        s, c, t, mode = inputs
        _, v, start = output
        ctx.mark_non_differentiable(v, start)
        ctx.mode = mode
        ctx.save_for_backward(s, c, t, v, start)

    @staticmethod
    @once_differentiable
    def backward(ctx, g, _gv, _gstart):
        # Block equation Σ_B R'(γ − s_i) + c_i γ = 0, h_i = R''(e_i) (1 for p = 2, 3e² for p = 4/3), e = s − γ:
        #   dγ = (Σ_B h ds − γ Σ_B dc) / (Σ_B h + Σ_B c).
        # m_i = R'(e_i/t) + e_i, so ∂m_i/∂e_i = κ_i = h_i / t^(q−1) + 1 and ∂m_i/∂t = −(q−1) e_i^(q−1) / t^q.
        # With gE = g κ and Ḡ_B = Σ_B gE / (Σ_B h + Σ_B c):
        #   ∂L/∂s = gE − h Ḡ,   ∂L/∂c = γ Ḡ,   ∂L/∂t = Σ_i g_i ∂m_i/∂t.
        # A block with Σ h + Σ c = 0 (all its entries equal to γ, outside the top-k) uses h = 1, and ∂L/∂c = 0.
        s, c, t, v, start = ctx.saved_tensors
        loss = LOSSES[ctx.mode]
        e = s - v
        h, rh = loss.curvature(e), loss.curvature(e / t)  # R''(e) = t^(q−2) R''(e/t)
        dm_dt = -e / (t * t) * rh  # ∂/∂t of R'(e/t)
        ge = g * (rh / t + 1.0)  # κ = ∂m/∂e
        gbar, den, flat = _block_gradient(ge, h + c, _Blocks(start), flat_den=torch.ones_like(h))
        gs = ge - (den - c) * gbar  # h, or 1 on a flat block (where c = 0)
        gc = v * gbar if flat is None else torch.where(flat, 0.0, v * gbar)
        gt = (g * dm_dt).sum(-1, keepdim=True)
        if gt.shape != t.shape:
            gt = gt.sum_to_size(t.shape)
        return gs, gc, gt, None


@_eager
def topk_magnitude(
    x: Tensor,
    k: KArg,
    *,
    dim: int = -1,
    temperature: Union[float, Tensor, None] = None,
    p: Number = 2,
) -> Tensor:
    r"""Sparse soft top-k in magnitude (Sander et al. 2023): keeps the k entries of largest ``|x|``, with their sign.

    The hard operator is :math:`x \circ \mathrm{topkmask}(|x|) = \nabla f(x)` with
    :math:`f(x) = \tfrac12 \max_{y \in \mathcal{P}(w)} \langle y, x \circ x\rangle`, the permutahedron of
    :math:`w = (1,\dots,1,0,\dots,0)` (k ones) applied to the squared magnitudes. Sander et al. smooth f by adding
    the p-norm regulariser to its conjugate, :math:`f_t = (f^* + t\Omega_p)^*`, whose gradient

    .. math::
        u = \nabla f_t(x) = \arg\max_u \langle u, x\rangle - f^*(u) - \frac tp \sum_i |u_i|^p,\qquad
        f^*(u) = \min_{y \in \mathcal{P}(w)} \sum_i \frac{u_i^2}{2 y_i},

    reduces to isotonic optimisation on :math:`s = |x|` sorted decreasingly:
    :math:`v = \arg\min_{v_1\ge\dots\ge v_n} \sum_i t R_p((s_i - v_i)/t) + \tfrac12 w_i v_i^2` and
    :math:`|u| = \nabla R_p((s - v)/t)`, with ``sign(x)`` restored. The operator returned is
    :math:`\mathrm{sign}(x)\,(|u| + t\,\nabla\Omega_p(|u|))`, as in the authors' reference implementation
    (google-research ``sparse_soft_topk``): the factor makes an entry that is clearly inside the top-k come out
    exactly as ``x_i`` (for such an entry :math:`x_i = u_i + t\nabla\Omega_p(u_i)`). For p = 2 it is
    :math:`(1 + t)\,u`; in general it is :math:`u + (|x|_\sigma - v)` in sorted order.

    Entries outside the top-k are exactly 0; as t → 0 the result tends to :math:`x \circ \mathrm{topkmask}(|x|)`.
    The backward is closed-form from the PAV blocks, O(n).

    Args:
        x: values, any shape (finite).
        k: an int or float in [0, n], or a per-row tensor broadcastable to the batch shape.
        temperature: t > 0, a number or a per-row tensor (None: 1.0). Differentiable.
        p: 2 or 4/3.
        dim: the dimension to select along.

    Returns:
        A tensor of ``x``'s shape and dtype.

    Example:
        >>> import torch, softtopk
        >>> softtopk.topk_magnitude(torch.tensor([-5.0, -2.0, 3.0, 1.0]), 2, temperature=0.5)
        tensor([-5., -0.,  3.,  0.])
        >>> softtopk.topk_magnitude(torch.tensor([-5.0, -2.0, 3.0, 2.9]), 2, temperature=0.5)
        tensor([-5.0000, -0.0000,  1.9200,  1.6200])
    """
    fn = "topk_magnitude"
    rows = prepare(fn, x, k, dim=dim, temperature=temperature, finite=True)
    mode = _mode_of_p(p, fn)
    # in float64: the result is e/t + e with e = |x| − v, and v agrees with |x| to about t·|x|, so float32 would
    # cancel e away at small t (3 came out as 2.86 at t = 1e-6) and overflow at |x| near its range
    xl, t, n = _rows(rows.x).double(), rows.t.reshape(-1, 1).double(), rows.n
    w = _topk_weights(rows.k.reshape(-1, 1).double(), n)
    s, perm = torch.sort(xl.abs(), dim=-1, descending=True)
    c = w * (t if mode == Q2 else t * t * t)  # t^(q−1) w: the isotonic problem scaled by t^(q−1)
    m_sorted = _MagnitudeSorted.apply(s, c, t, mode)[0]
    m = torch.zeros_like(m_sorted).scatter(-1, perm, m_sorted)
    return rows.restore((torch.sign(xl) * m).reshape(rows.x.shape))


# --------------------------------------------------------------------------------------------------------------
# Soft sort and soft rank (Blondel et al. 2020)
# --------------------------------------------------------------------------------------------------------------
def _sort_rank_args(x, temperature, regularization, descending, dim, fn):
    """Checks; returns (fused, d, xl, inverse temperature, mode). With ``fused`` (the numba kernel
    applies) the NaN/inf test is left to the kernel, which reads every entry anyway, and a number ``temperature``
    stays a number."""
    fused = isinstance(x, Tensor) and _fused(x)
    check_finite(x, "x", fn=fn, data=not fused)
    d = normalize_dim(x, dim, fn=fn)
    temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    check_temperature(temperature, fn=fn)
    if regularization not in ("l2", "kl"):
        raise ValueError(f"{fn}: `regularization` must be 'l2' or 'kl', got {regularization!r}")
    if not isinstance(descending, bool):
        raise TypeError(f"{fn}: `descending` must be a bool, got {type(descending).__name__}")
    mode = Q2 if regularization == "l2" else KL
    cdtype = compute_dtype(x)
    xl = move_last(x, d).to(cdtype)
    if fused and not isinstance(temperature, Tensor):
        inv = 1.0 / float(temperature)
    else:
        inv = _row_scalar(temperature, x, d, "temperature", fn, cdtype)
        inv = (_one_row(inv) if fused else inv).reciprocal()  # one temperature for all rows: one row
    return fused, d, xl, inv, mode


def _rho(n: int, x: Tensor, log: bool = False) -> Tensor:
    """ρ = (n, n − 1, …, 1), or log ρ, as a (1, n) tensor of x's dtype and device."""
    if x.device.type == "cpu":
        return _rho_cpu(n, x.dtype, log)
    rho = torch.arange(n, 0, -1, device=x.device, dtype=x.dtype).unsqueeze(0)
    return torch.log(rho) if log else rho


@functools.lru_cache(maxsize=16)
def _rho_cpu(n: int, dtype: torch.dtype, log: bool) -> Tensor:
    rho = torch.arange(n, 0, -1, dtype=dtype).unsqueeze(0)  # cached: only ever read
    return torch.log(rho) if log else rho


@_eager
def soft_sort(
    x: Tensor,
    *,
    dim: int = -1,
    temperature: Union[float, Tensor, None] = None,
    regularization: str = "l2",
    descending: bool = True,
) -> Tensor:
    r"""Soft sort (Blondel et al. 2020): the sorted values, relaxed by a projection onto the permutahedron of x.

    With :math:`\rho = (n, n-1, \dots, 1)` and ε = ``temperature`` (the regularisation strength, in the
    units of the scores: entries closer than about ε share their ranks), the descending soft sort is

    .. math::
        s_\varepsilon(x) = P_\Psi(\rho/\varepsilon,\ x)
        = \arg\max_{\mu\in\mathcal{P}(x)} \langle \rho/\varepsilon, \mu\rangle - \Psi(\mu),

    with :math:`\Psi = \tfrac12\|\cdot\|^2` (``"l2"``, the Euclidean projection of :math:`\rho/\varepsilon` onto
    the permutahedron of x) or the entropic :math:`P_E(z, x) = \log \arg\min_{\mu\in\mathcal P(e^x)}
    \mathrm{KL}(\mu, e^z)` (``"kl"``). Computed as :math:`\rho/\varepsilon - v`, v the isotonic dual solution
    (PAV). These are the values of fast-soft-sort's ``soft_sort`` and ``torchsort.soft_sort(x,
    regularization_strength=ε)``; torchsort sorts in ascending order, which is ``descending=False`` here
    (:math:`-s_\varepsilon(-x)`). As ε → 0 the result tends to the hard sort. With ``"l2"`` the entries always sum
    to ``x.sum()``; with ``"kl"`` their log-sum-exp is ``x``'s (the permutahedron is that of :math:`e^x`).

    Args:
        x: values, any shape (finite).
        temperature: ε > 0, a number or a per-row tensor (differentiable); None means 1.0.
        regularization: ``"l2"`` or ``"kl"``.
        dim: the dimension to sort along.
        descending: largest first (default) or smallest first.

    Returns:
        A tensor of ``x``'s shape and dtype; along ``dim`` it is monotone in the requested order.

    Example:
        >>> import torch, softtopk
        >>> softtopk.soft_sort(torch.tensor([1.0, 3.0, 2.0]), temperature=0.1)
        tensor([3., 2., 1.])
    """
    fused, d, xl, inv, mode = _sort_rank_args(x, temperature, regularization, descending, dim, "soft_sort")
    x2 = _rows(xl)
    rho = _rho(x2.shape[-1], x2)
    sign = 1.0 if descending else -1.0
    if fused:
        out = _SortProject.apply(rho, inv, x2, sign, False, mode, "soft_sort")
    else:
        z = (rho * inv).expand(x2.shape)
        w = torch.sort(sign * x2, dim=-1, descending=True).values
        out = sign * _project_sorted(z, w, mode)
    return move_back(_unrows(out, xl).to(x.dtype), d)


@_eager
def soft_rank(
    x: Tensor,
    *,
    dim: int = -1,
    temperature: Union[float, Tensor, None] = None,
    regularization: str = "l2",
    descending: bool = True,
) -> Tensor:
    r"""Soft ranks (Blondel et al. 2020): a projection of the scores onto the permutahedron of (n, …, 1).

    With :math:`\rho = (n, n-1, \dots, 1)` and ε = ``temperature`` (the regularisation strength, in the
    units of the scores: entries closer than about ε share their ranks),

    * ``"l2"``: :math:`r_\varepsilon(x) = P_Q(\mp x/\varepsilon, \rho) = \arg\min_{\mu\in\mathcal{P}(\rho)}
      \tfrac12\|\mu \pm x/\varepsilon\|^2`;
    * ``"kl"``: :math:`r_\varepsilon(x) = \exp P_E(\mp x/\varepsilon, \log\rho)`, i.e.
      :math:`\arg\min_{\mu\in\mathcal{P}(\rho)} \mathrm{KL}(\mu, e^{\mp x/\varepsilon})`,

    with the minus sign for ``descending=True`` (rank 1 = the largest entry, Blondel et al.'s convention) and the
    plus sign for ``descending=False`` (rank 1 = the smallest entry): the latter is exactly
    ``torchsort.soft_rank(x, regularization_strength=ε)`` and fast-soft-sort's ascending ``soft_rank``. As ε → 0
    the result tends to the hard ranks; the ranks of a row always sum to n(n + 1)/2.

    Args:
        x: scores, any shape (finite).
        temperature: ε > 0, a number or a per-row tensor (differentiable); None means 1.0.
        regularization: ``"l2"`` or ``"kl"``.
        dim: the dimension to rank along.
        descending: rank 1 for the largest entry (default) or for the smallest.

    Returns:
        A tensor of ``x``'s shape and dtype with values in [1, n].

    Example:
        >>> import torch, softtopk
        >>> softtopk.soft_rank(torch.tensor([1.0, 3.0, 2.0]), temperature=0.1)
        tensor([3., 1., 2.])
    """
    fused, d, xl, inv, mode = _sort_rank_args(x, temperature, regularization, descending, dim, "soft_rank")
    x2 = _rows(xl)
    w = _rho(x2.shape[-1], x2, log=mode == KL)
    sign = -1.0 if descending else 1.0
    if fused:
        out = _SortProject.apply(x2, sign * inv, w, 1.0, True, mode, "soft_rank")
    else:
        out = _project(sign * x2 * inv, w, mode, "soft_rank")
    if mode == KL:
        out = torch.exp(out)
    return move_back(_unrows(out, xl).to(x.dtype), d)
