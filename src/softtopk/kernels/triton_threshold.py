r"""Fused Triton kernels of the threshold masks (:mod:`softtopk.threshold`), registered as ``torch.library`` custom ops.

What is computed, row by row of ``x`` (R, n), in float32 whatever the input dtype (float16, bfloat16 or float32;
sums accumulated in float32), with ``k`` and ``t`` one value per row:

* the normalised masks ``"sigmoid"``, ``"lapsum"``, ``"sparse2"`` (φ(z) = z), ``"sparse4/3"`` (φ(z) = max(z, 0)³):
  :math:`y = \mathrm{clip}(\varphi((x - c)/t - \tau), 0, 1)` with :math:`\sum_i y_i = k` to
  ``tol · max(k, 1)``, τ by the reference's safeguarded Newton iteration (on logit(S/n) for the exponential families,
  on S for the polynomial ones; a bracket with bisection fallback). c is a per-row *centre*, a score near the
  threshold found by bisection on the float keys: x − c is exact near the threshold (Sterbenz), so τ is small and
  float32 resolves it even for offset scores. A row that stalls short of the tolerance, or whose |τ| is still too
  large for float32 to resolve u − τ (tiny t), is polished as in the reference: re-centred at the score nearest its
  threshold and solved again from there. Rows with k − #(+inf) ≤ 0 or k ≥ #(x > −inf) are the exact 0/1 masks
  (x = +inf) and (x > −inf); −inf entries get exactly 0, +inf entries exactly 1 (they count towards k). Scores of
  any finite magnitude are handled in the kernel (x − c may overflow to ±inf for |x| near 3e38, which φ maps to
  exactly 0 or 1; the bracket is clamped to finite values); nothing is routed back to the torch path.
  Backward (implicit function theorem on Σ y = k), with :math:`d = \varphi'(z)/t` on 0 < y < 1:
  :math:`\bar g = \sum g d / \sum d`, :math:`g_x = d (g - \bar g)`, :math:`g_k = \bar g`,
  :math:`g_t = -\sum z\, g_x`.
* DFTopK: τ the midpoint of the k-th and (k+1)-th largest scores, found by selection on the float keys (bisection
  on the key for one-program rows, four 8-bit radix histogram passes for long rows; no sort),
  :math:`y = \sigma((x - \tau)/t)`. Backward: :math:`s = g \sigma'(z)/t`,
  :math:`g_x = s - (\sum s)(e_a + e_b)/2`, :math:`g_t = -\sum s z`. Ties: a is the lowest index holding x_(k), b
  the lowest index holding x_(k+1) other than a (torch's reference takes ``torch.topk``'s choice, so under ties at
  those two values the gradients agree in every sum over the tied entries, not entry by entry).

Two launch layouts, by row length:

* ``n ≤ MAX_BLOCK``: one program per row; the row stays in registers for the whole solve (start, every Newton step,
  the mask) and the forward costs one read of x and one write of y; the backward one read of y, g (and x for gt)
  and one write.
* longer rows: a (rows, ⌈n / CHUNK⌉) grid per pass and the Newton loop on the host: one pass for the row stats, a
  warm start from the one-program kernel run on a strided subsample (about ``SUBSAMPLE`` entries, times the family's
  ``sample_factor``) with k scaled (its centre becomes the row's), then per Newton step one pass writing per-block
  partial sums (S, Σφ') and a one-program-per-row update kernel (partials summed in float32, the Newton step, the
  bracket, the convergence flags); the host stops when every row is done (one device→host read of the flags per
  step from the third on). Rows that need the polish get it by torch ops (the nearest score: one pass) and more
  Newton steps. A last pass writes the mask. Backward: two passes (Σ g φ' and Σ φ' per block; then gx and Σ z gx
  per block). DFTopK: four radix passes, two locate passes (the (k+1)-th value and the two indices), one mask pass.

Why the host loop for long rows (and not one program per row looping over its blocks): a few long rows (2 × 1e6)
would then occupy 2 of the GPU's ~130 SMs; a grid over blocks reads the row at full bandwidth, and the per-step
cost is two launches and one flag read (tens of µs), against a pass over 8 MB (a few µs at 3 TB/s). Whether a
cooperative single-launch scheme would pay off is a question for the GPU benchmark.

Dispatch (wired in :mod:`softtopk.threshold`): :func:`available` says whether a tensor may take these kernels:
CUDA tensors when triton imports and ``SOFTTOPK_DISABLE_TRITON`` is not ``"1"``; CPU tensors only as a testing
switch, when both ``TRITON_INTERPRET=1`` (Triton's interpreter, which runs kernels on CPU tensors with numpy; it is
read when the kernels are defined, i.e. on the first kernel call of the process) and ``SOFTTOPK_TRITON_ON_CPU=1``
are set. float64 never takes them (the kernels compute in float32).

The ops (namespace ``softtopk``): ``threshold_forward``, ``threshold_backward``, ``dftopk_forward``,
``dftopk_backward``, with autograd and fake (meta) implementations, so that they compose with ``torch.compile``
(traced as opaque calls) and pass ``torch.library.opcheck``. Gradients are once-differentiable.
"""

from __future__ import annotations

import math
import os
import warnings
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

__all__ = ["CHUNK", "MAX_BLOCK", "SUBSAMPLE", "available", "dftopk", "threshold_mask"]

#: rows up to this many entries run one program per row (the row in registers); longer rows take the grid path.
#: 8192 with 16 warps (16 entries a thread) compiles for sm_90 to 128 registers without spills; 16384 spills.
MAX_BLOCK = 8192
#: entries per program of the long-row passes
CHUNK = 4096
#: the long-row warm start solves the problem on a strided subsample of about this many entries (× sample_factor)
SUBSAMPLE = 2048
#: bisection steps on the float keys for the centre of a row (a score within 2^(32 − steps) keys of rank k)
START_STEPS = 16
#: the warm start's own tolerance (relative to its k) and iteration cap, as the reference's
_START_TOL, _START_ITER = 1e-3, 30

_CODES = {"sigmoid": 0, "lapsum": 1, "sparse2": 2, "sparse4/3": 3}
#: as the reference's ``Family.sample_factor``: compact support needs a larger sample for the warm start
_SAMPLE_FACTOR = {"sigmoid": 1, "lapsum": 1, "sparse2": 4, "sparse4/3": 4}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KERNELS: ModuleType | None = None
_TRITON_OK: bool | None = None


def _triton_importable() -> bool:
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401

            _TRITON_OK = True
        except ImportError:
            _TRITON_OK = False
    return _TRITON_OK


def available(x: Tensor) -> bool:
    """Whether ``x`` may take the Triton kernels: a CUDA tensor (float16, bfloat16 or float32) when triton imports
    and ``SOFTTOPK_DISABLE_TRITON`` is not ``"1"``; a CPU tensor only when ``TRITON_INTERPRET=1`` and
    ``SOFTTOPK_TRITON_ON_CPU=1`` are both set as well (Triton's interpreter: a testing switch, slow)."""
    device = x.device.type
    if device == "cpu":  # first: the common case, one environment read
        if os.environ.get("SOFTTOPK_TRITON_ON_CPU") != "1" or os.environ.get("TRITON_INTERPRET") != "1":
            return False
    elif device != "cuda":
        return False
    if os.environ.get("SOFTTOPK_DISABLE_TRITON") == "1" or x.dtype not in _DTYPES:
        return False
    return _triton_importable()


def _kernels() -> ModuleType:
    """The kernel module, imported on first use (``TRITON_INTERPRET`` is read then, when the kernels are defined)."""
    global _KERNELS
    if _KERNELS is None:
        from . import _triton_kernels

        if _triton_kernels.triton is None:  # the module imports without triton, but defines no kernel
            raise ImportError("softtopk's GPU kernels need Triton, which is not installed: pip install 'softtopk[gpu]'")
        _KERNELS = _triton_kernels
    return _KERNELS


def _phi_inv(family: str, p: Tensor) -> Tensor:
    """z with φ(z) = p for p in (0, 1) (as the reference's ``Family.phi_inv``; here so that this module does not
    import :mod:`softtopk.threshold`, which dispatches to it)."""
    if family == "sigmoid":
        return torch.logit(p)
    if family == "lapsum":
        return torch.where(p < 0.5, torch.log(2.0 * p), -torch.log(2.0 - 2.0 * p))
    return p if family == "sparse2" else p.pow(1.0 / 3.0)


def _block(n: int) -> int:
    return max(16, 1 << max(n - 1, 0).bit_length())


def _warps(block: int) -> int:
    """Warps of a one-program-per-row kernel: 16 entries a thread at most (no register spills), one warp for
    short rows (no cross-warp reductions), up to 16."""
    return max(1, min(16, block // 512))


def _row_vec(a: Tensor, rows: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """A per-row parameter ((R, 1), maybe expanded) as a contiguous (R,) vector of ``dtype``."""
    return a.detach().to(dtype).expand(rows, 1).reshape(rows).contiguous()


def _rows(x: Tensor) -> Tensor:
    """x (R, n) with unit stride along n (the kernels take a row stride only)."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Normalised masks: host side.
# ----------------------------------------------------------------------------------------------------------------
def _forward(family: str, x: Tensor, k: Tensor, t: Tensor, tol: float, max_iter: int):
    """(y (R, n) float32, τ (R,), c (R,), ok (R,) bool) of the normalised mask of x (R, n)."""
    rows, n = x.shape
    x = _rows(x)
    kv, tv = _row_vec(k, rows), _row_vec(t, rows)
    y = torch.empty((rows, n), dtype=torch.float32, device=x.device)
    tau = torch.zeros(rows, dtype=torch.float32, device=x.device)
    centre = torch.zeros_like(tau)
    ok = torch.ones(rows, dtype=torch.int8, device=x.device)
    if rows == 0 or n == 0:
        return y, tau, centre, ok.bool()
    if n <= MAX_BLOCK:
        _solve_rows(family, x, kv, tv, tol, max_iter, y, tau, centre, ok)
    else:
        _solve_long(family, x, kv, tv, tol, max_iter, y, tau, centre, ok)
    return y, tau, centre, ok.bool()


def _solve_rows(family, x, kv, tv, tol, max_iter, y, tau, centre, ok) -> None:
    rows, n = x.shape
    block = _block(n)
    _kernels().threshold_row_kernel[(rows,)](
        x, kv, tv, y, tau, centre, ok, n, x.stride(0), y.stride(0), float(tol), int(max_iter),
        FAMILY=_CODES[family], BLOCK=block, START_STEPS=START_STEPS, num_warps=_warps(block),
    )  # fmt: skip


def _solve_long(family, x, kv, tv, tol, max_iter, y, tau, centre, ok) -> None:
    """The grid path (see the module docstring): stats, warm start on a subsample, Newton steps, the mask."""
    K, code, (rows, n) = _kernels(), _CODES[family], x.shape
    nb = -(-n // CHUNK)
    grid = (rows, nb)
    part = torch.empty((rows, 4, nb), dtype=torch.float32, device=x.device)
    K.row_stats_kernel[grid](x, part, n, x.stride(0), nb, BLOCK=CHUNK)
    xmin, xmax = part[:, 0].amin(1), part[:, 1].amax(1)
    n_live = part[:, 2].sum(1, dtype=torch.float64).float()
    n_pinf = part[:, 3].sum(1, dtype=torch.float64).float()
    none, full = (kv - n_pinf) <= 0, kv >= n_live
    degenerate = none | full
    # warm start: the same problem on a strided subsample, solved loosely by the one-program kernel
    stride = -(-n // min(SUBSAMPLE * _SAMPLE_FACTOR[family], MAX_BLOCK))
    sub = x[:, ::stride].contiguous()
    m = sub.shape[1]
    k_sub = (kv * (m / n)).clamp(1e-3, m - 1e-3)
    tau_s, c_s = torch.zeros_like(tau), torch.zeros_like(tau)
    _solve_rows(family, sub, k_sub, tv, _START_TOL, _START_ITER, torch.empty_like(sub, dtype=torch.float32),
                tau_s, c_s, torch.empty_like(ok))  # fmt: skip
    # the bracket S(lo) ≥ k ≥ S(hi) in the frame of the sample's centre, in units of t
    c = torch.where(degenerate, 0.0, c_s)
    rt = tv.reciprocal()
    zp = _phi_inv(family, ((kv - n_pinf) / (n_live - n_pinf)).clamp(1e-30, 1.0 - 1e-7))
    big = torch.finfo(torch.float32).max
    lo = torch.where(degenerate, 0.0, ((xmin - c) * rt - zp).clamp(min=-big))
    hi = torch.where(degenerate, 0.0, ((xmax - c) * rt - zp).clamp(max=big))
    tau.copy_(torch.minimum(torch.maximum(tau_s, lo), hi).nan_to_num(0.0))
    centre.copy_(c)
    sums = torch.zeros((rows, 2, nb), dtype=torch.float32, device=x.device)
    state = (x, kv, tv, n_live, tau, centre, lo, hi, ok, sums, y)
    _newton_long(family, state, (~degenerate).to(torch.int8), tol, max_iter)
    # Polish, as the reference: rows that stalled short of tol, or whose |τ| is too large for float32 to resolve
    # u − τ to the tolerance, restart centred at the score nearest their threshold, the bracket found anew.
    far = 0.1 * tol * kv.clamp(min=1.0) / torch.finfo(torch.float32).eps
    redo = ((ok == 0) | (tau.abs() > far)) & ~degenerate
    if bool(redo.any()):
        xf = x.float()
        dist = ((xf - centre[:, None]) * rt[:, None] - tau[:, None]).abs()
        dist = torch.where(torch.isfinite(xf), dist.nan_to_num(math.inf), math.inf)
        nearest = xf.gather(1, dist.argmin(1, keepdim=True)).squeeze(1)
        c_new = torch.where(redo & torch.isfinite(nearest), nearest, centre)
        guess = (tau - (c_new - centre) * rt).nan_to_num(0.0, 0.0, 0.0)
        centre.copy_(c_new)
        lo.copy_(torch.where(redo, ((xmin - centre) * rt - zp).clamp(min=-big), lo))
        hi.copy_(torch.where(redo, ((xmax - centre) * rt - zp).clamp(max=big), hi))
        tau.copy_(torch.where(redo, torch.minimum(torch.maximum(guess, lo), hi), tau))
        _newton_long(family, state, redo.to(torch.int8), tol, max_iter)
    active = (~degenerate).to(torch.int8)
    K.threshold_eval_kernel[grid](x, tv, tau, centre, active, sums, y, n, x.stride(0), y.stride(0), nb,
                                  FAMILY=code, BLOCK=CHUNK, WRITE=True)  # fmt: skip
    resid = (sums[:, 0].sum(1) - kv).abs()
    ok.copy_((degenerate | (resid <= tol * kv.clamp(min=1.0))).to(torch.int8))
    K.exact_mask_kernel[grid](x, none.to(torch.int8), full.to(torch.int8), y, n, x.stride(0), y.stride(0),
                              BLOCK=CHUNK)  # fmt: skip


def _newton_long(family: str, state: tuple, active: Tensor, tol: float, max_iter: int) -> None:
    """Newton steps of the long rows marked ``active`` (int8 (R,), consumed): per step one (rows, blocks) pass of
    partial sums and one update kernel per row, until every row is done (τ, lo, hi, ok of ``state`` updated)."""
    K, code = _kernels(), _CODES[family]
    x, kv, tv, n_live, tau, centre, lo, hi, ok, sums, y = state
    rows, n = x.shape
    nb = sums.shape[2]
    block_p = min(_block(nb), 1024)
    for it in range(max_iter):
        if it >= 2 and not bool(active.any()):  # one device→host read per step, from the third on
            break
        K.threshold_eval_kernel[(rows, nb)](x, tv, tau, centre, active, sums, y, n, x.stride(0), y.stride(0), nb,
                                            FAMILY=code, BLOCK=CHUNK, WRITE=False)  # fmt: skip
        K.threshold_update_kernel[(rows,)](sums, kv, n_live, tau, lo, hi, active, ok, float(tol), nb,
                                           FAMILY=code, BLOCK_P=block_p)  # fmt: skip


def _backward(family: str, gy: Tensor, y: Tensor, x: Tensor, t: Tensor, tau: Tensor, c: Tensor, need_t: bool):
    """(gx (R, n), gk (R,), gt (R,)) float32 of the implicit backward (formula: see :func:`_threshold_backward`)."""
    K, code, (rows, n) = _kernels(), _CODES[family], y.shape
    gy, x, tv = _rows(gy.to(torch.float32)), _rows(x), _row_vec(t, rows)
    gx = torch.empty((rows, n), dtype=torch.float32, device=y.device)
    gk = torch.zeros(rows, dtype=torch.float32, device=y.device)
    gt = torch.zeros_like(gk)
    if rows == 0 or n == 0:
        return gx, gk, gt
    if n <= MAX_BLOCK:
        block = _block(n)
        K.threshold_backward_row_kernel[(rows,)](gy, y, x, tv, tau, c, gx, gk, gt, n, gy.stride(0), y.stride(0),
                                                 x.stride(0), gx.stride(0), FAMILY=code, BLOCK=block,
                                                 NEED_T=bool(need_t), num_warps=_warps(block))  # fmt: skip
        return gx, gk, gt
    nb = -(-n // CHUNK)
    part = torch.empty((rows, 2, nb), dtype=torch.float32, device=y.device)
    K.threshold_backward_sums_kernel[(rows, nb)](gy, y, part, n, gy.stride(0), y.stride(0), nb, FAMILY=code,
                                                 BLOCK=CHUNK)  # fmt: skip
    num, den = part[:, 0].sum(1), part[:, 1].sum(1)
    gk = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)
    zsum = torch.zeros((rows, nb), dtype=torch.float32, device=y.device)
    K.threshold_backward_apply_kernel[(rows, nb)](gy, y, x, tv, tau, c, gk, gx, zsum, n, gy.stride(0), y.stride(0),
                                                  x.stride(0), gx.stride(0), nb, FAMILY=code, BLOCK=CHUNK,
                                                  NEED_T=bool(need_t))  # fmt: skip
    return gx, gk, -zsum.sum(1)


# ----------------------------------------------------------------------------------------------------------------
# DFTopK: host side.
# ----------------------------------------------------------------------------------------------------------------
def _key_float(ukey: Tensor) -> Tensor:
    """The float32 values of keys offset to [0, 2^32) (int64), as in the kernels' ``float_key``."""
    key = ukey - 2**31
    bits = torch.where(key >= 0, key, key ^ 0x7FFFFFFF).to(torch.int32)
    return bits.view(torch.float32)


def _radix_select(x: Tensor, rank: Tensor, nb: int) -> Tensor:
    """Offset key (int64, (R,)) of the rank-th largest entry of each row (1 ≤ rank ≤ n): four 8-bit radix passes,
    each a per-block histogram of the next digit among the entries matching the prefix so far."""
    K, (rows, n) = _kernels(), x.shape
    prefix = torch.zeros(rows, dtype=torch.int64, device=x.device)
    rem = rank.clone()
    hist = torch.empty((rows, nb, 256), dtype=torch.int32, device=x.device)
    for shift in (24, 16, 8, 0):
        K.radix_histogram_kernel[(rows, nb)](x, prefix, hist, n, x.stride(0), nb, SHIFT=shift, BLOCK=CHUNK)
        ge = hist.sum(1, dtype=torch.int64).flip(-1).cumsum(-1).flip(-1)  # ge[d] = #(digit ≥ d)
        digit = (ge >= rem[:, None]).sum(-1) - 1  # the largest d with ge[d] ≥ rem
        above = torch.cat([ge[:, 1:], torch.zeros_like(ge[:, :1])], -1).gather(1, digit[:, None]).squeeze(1)
        rem -= above
        prefix |= digit << shift
    return prefix


def _dftopk_select_long(x: Tensor, kv: Tensor, tau: Tensor, idx: Tensor) -> None:
    """τ and the indices (R, 2) of the k-th and (k+1)-th largest of long rows (see :func:`_radix_select`)."""
    K, (rows, n) = _kernels(), x.shape
    nb = -(-n // CHUNK)
    ka = _radix_select(x, kv.clamp(1, n), nb)
    part = torch.empty((rows, 3, nb), dtype=torch.int64, device=x.device)
    no_skip = torch.full_like(ka, -1)
    K.locate_kernel[(rows, nb)](x, ka, no_skip, part, n, x.stride(0), nb, BLOCK=CHUNK)
    count_ge, below, a = part[:, 0].sum(1), part[:, 1].amax(1), part[:, 2].amin(1)
    has_a, has_b = kv >= 1, kv + 1 <= n
    kb = torch.where(count_ge >= kv + 1, ka, below)
    K.locate_kernel[(rows, nb)](x, kb, torch.where(has_a, a, -1), part, n, x.stride(0), nb, BLOCK=CHUNK)
    b = part[:, 2].amin(1)
    va = torch.where(has_a, _key_float(ka), math.inf)
    vb = torch.where(has_b, _key_float(kb.clamp(min=0)), -math.inf)
    tau.copy_(0.5 * va + 0.5 * vb)
    idx.copy_(torch.stack([torch.where(has_a, a, -1), torch.where(has_b, b, -1)], 1))


def _dftopk_forward(x: Tensor, k: Tensor, t: Tensor):
    """(y (R, n) float32, τ (R,), indices (R, 2) int64) of DFTopK on x (R, n)."""
    K, (rows, n) = _kernels(), x.shape
    x = _rows(x)
    kv, tv = _row_vec(k, rows, torch.int64), _row_vec(t, rows)
    y = torch.empty((rows, n), dtype=torch.float32, device=x.device)
    tau = torch.zeros(rows, dtype=torch.float32, device=x.device)
    idx = torch.full((rows, 2), -1, dtype=torch.int64, device=x.device)
    if rows == 0 or n == 0:
        return y, tau, idx
    if n <= MAX_BLOCK:
        block = _block(n)
        K.dftopk_row_kernel[(rows,)](x, kv, tv, y, tau, idx, n, x.stride(0), y.stride(0), BLOCK=block,
                                     num_warps=_warps(block))  # fmt: skip
        return y, tau, idx
    _dftopk_select_long(x, kv, tau, idx)
    K.dftopk_mask_kernel[(rows, -(-n // CHUNK))](x, tv, tau, y, n, x.stride(0), y.stride(0), BLOCK=CHUNK)
    return y, tau, idx


def _dftopk_backward(gy: Tensor, y: Tensor, x: Tensor, t: Tensor, tau: Tensor, idx: Tensor, need_t: bool):
    """(gx (R, n), gt (R,)) float32: gx = s − (Σ s)(e_a + e_b)/2, s = g σ'(z)/t; gt = −Σ s z."""
    K, (rows, n) = _kernels(), y.shape
    gy, x, tv = _rows(gy.to(torch.float32)), _rows(x), _row_vec(t, rows)
    gx = torch.empty((rows, n), dtype=torch.float32, device=y.device)
    if rows == 0 or n == 0:
        return gx, torch.zeros(rows, dtype=torch.float32, device=y.device)
    block = _block(n) if n <= MAX_BLOCK else CHUNK
    nb = -(-n // block)
    part = torch.zeros((rows, 2, nb), dtype=torch.float32, device=y.device)
    K.dftopk_backward_kernel[(rows, nb)](gy, y, x, tv, tau, gx, part, n, gy.stride(0), y.stride(0), x.stride(0),
                                         gx.stride(0), nb, BLOCK=block, NEED_T=bool(need_t))  # fmt: skip
    total = part[:, 0].sum(1, keepdim=True)
    src = torch.where(idx >= 0, -0.5 * total, 0.0)
    gx.scatter_add_(1, idx.clamp(min=0), src)
    return gx, -part[:, 1].sum(1)


# ----------------------------------------------------------------------------------------------------------------
# The custom ops (namespace softtopk): eager implementations, fake implementations, autograd.
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op(
    "softtopk::threshold_forward", mutates_args=(),
    schema="(Tensor x, Tensor k, Tensor t, str family, float tol, int max_iter) -> (Tensor, Tensor, Tensor)",
)  # fmt: skip
def _threshold_forward(x: Tensor, k: Tensor, t: Tensor, family: str, tol: float, max_iter: int):
    """(y (R, n) float32, τ (R, 1), c (R, 1)): the normalised mask of x (R, n), y = clip(φ((x − c)/t − τ), 0, 1)."""
    y, tau, centre, ok = _forward(family, x, k, t, tol, max_iter)
    if not bool(ok.all()):
        worst = float((y.sum(-1) - _row_vec(k, x.shape[0])).abs().max())
        warnings.warn(f"softtopk triton kernel ({family}): threshold search stopped after max_iter={max_iter} "
                      f"iterations with |sum(y) - k| = {worst:.3g}; raise max_iter or tol", RuntimeWarning,
                      stacklevel=2)  # fmt: skip
    return y, tau.unsqueeze(1), centre.unsqueeze(1)


@_threshold_forward.register_fake
def _(x, k, t, family, tol, max_iter):
    rows = x.shape[0]
    return x.new_empty(x.shape, dtype=torch.float32), x.new_empty((rows, 1), dtype=torch.float32), \
        x.new_empty((rows, 1), dtype=torch.float32)  # fmt: skip


@torch.library.custom_op(
    "softtopk::threshold_backward", mutates_args=(),
    schema="(Tensor gy, Tensor y, Tensor x, Tensor t, Tensor tau, Tensor centre, str family, bool need_t) "
           "-> (Tensor, Tensor, Tensor)",
)  # fmt: skip
def _threshold_backward(gy, y, x, t, tau, centre, family, need_t):
    """(gx (R, n), gk (R, 1), gt (R, 1)) float32; formula: see :func:`_threshold_autograd_backward`."""
    gx, gk, gt = _backward(family, gy, y, x, t, tau.reshape(-1), centre.reshape(-1), need_t)
    return gx, gk.unsqueeze(1), gt.unsqueeze(1)


@_threshold_backward.register_fake
def _(gy, y, x, t, tau, centre, family, need_t):
    return y.new_empty(y.shape), y.new_empty((y.shape[0], 1)), y.new_empty((y.shape[0], 1))


def _threshold_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, k, t, family, _, _ = inputs
    y, tau, centre = output
    ctx.mark_non_differentiable(tau, centre)
    ctx.family, ctx.dtypes = family, (x.dtype, k.dtype, t.dtype)
    ctx.save_for_backward(y, x, t, tau, centre)


def _threshold_autograd_backward(ctx: Any, gy: Tensor, _gtau: Any, _gc: Any):
    # ∂y/∂x = diag(d) − d dᵀ/Σd, ∂y/∂k = d/Σd, ∂y/∂t = −(∂y/∂x) z, with d = φ'(z)/t on 0 < y < 1:
    #   gx = d (g − ḡ),  ḡ = Σ g d / Σ d,  gk = ḡ,  gt = −Σ z gx.
    y, x, t, tau, centre = ctx.saved_tensors
    need_x, need_k, need_t = ctx.needs_input_grad[:3]
    gx, gk, gt = torch.ops.softtopk.threshold_backward(gy, y, x, t, tau, centre, ctx.family, bool(need_t))
    dx, dk, dt = ctx.dtypes
    return (gx.to(dx) if need_x else None, gk.to(dk) if need_k else None, gt.to(dt) if need_t else None,
            None, None, None)  # fmt: skip


_threshold_forward.register_autograd(_threshold_autograd_backward, setup_context=_threshold_setup)


@torch.library.custom_op(
    "softtopk::dftopk_forward", mutates_args=(), schema="(Tensor x, Tensor k, Tensor t) -> (Tensor, Tensor, Tensor)"
)
def _dftopk_forward_op(x: Tensor, k: Tensor, t: Tensor):
    """(y (R, n) float32, τ (R, 1), indices (R, 2) int64 of the k-th and (k+1)-th largest, −1 where missing)."""
    y, tau, idx = _dftopk_forward(x, k, t)
    return y, tau.unsqueeze(1), idx


@_dftopk_forward_op.register_fake
def _(x, k, t):
    rows = x.shape[0]
    return x.new_empty(x.shape, dtype=torch.float32), x.new_empty((rows, 1), dtype=torch.float32), \
        x.new_empty((rows, 2), dtype=torch.int64)  # fmt: skip


@torch.library.custom_op(
    "softtopk::dftopk_backward", mutates_args=(),
    schema="(Tensor gy, Tensor y, Tensor x, Tensor t, Tensor tau, Tensor idx, bool need_t) -> (Tensor, Tensor)",
)  # fmt: skip
def _dftopk_backward_op(gy, y, x, t, tau, idx, need_t):
    """(gx (R, n), gt (R, 1)) float32; formula: see :func:`_dftopk_autograd_backward`."""
    gx, gt = _dftopk_backward(gy, y, x, t, tau.reshape(-1), idx, need_t)
    return gx, gt.unsqueeze(1)


@_dftopk_backward_op.register_fake
def _(gy, y, x, t, tau, idx, need_t):
    return y.new_empty(y.shape), y.new_empty((y.shape[0], 1))


def _dftopk_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, _, t = inputs
    y, tau, idx = output
    ctx.mark_non_differentiable(tau, idx)
    ctx.dtypes = (x.dtype, t.dtype)
    ctx.save_for_backward(y, x, t, tau, idx)


def _dftopk_autograd_backward(ctx: Any, gy: Tensor, _gtau: Any, _gidx: Any):
    # y = σ(z), z = (x − τ)/t, τ = (x_a + x_b)/2:
    #   gx = s − (Σ s)(e_a + e_b)/2,  s = g σ'(z)/t;   gt = −Σ s z.   (k is an integer: no gradient)
    y, x, t, tau, idx = ctx.saved_tensors
    need_x, _, need_t = ctx.needs_input_grad[:3]
    gx, gt = torch.ops.softtopk.dftopk_backward(gy, y, x, t, tau, idx, bool(need_t))
    return gx.to(ctx.dtypes[0]) if need_x else None, None, gt.to(ctx.dtypes[1]) if need_t else None


_dftopk_forward_op.register_autograd(_dftopk_autograd_backward, setup_context=_dftopk_setup)


# ----------------------------------------------------------------------------------------------------------------
# Entry points for softtopk.threshold's dispatch.
# ----------------------------------------------------------------------------------------------------------------
def _flat(x: Tensor, a: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A per-row parameter of shape (..., 1) (broadcastable) as a (R, 1) tensor, R the rows of x."""
    a = a if dtype is None else a.to(dtype)
    return a.expand(x.shape[:-1] + (1,)).reshape(-1, 1)


def threshold_mask(family: str, x: Tensor, k: Tensor, t: Tensor, tol: float, max_iter: int) -> Tensor:
    """Normalised threshold mask along the last dim of ``x`` by the Triton kernels: as
    :func:`softtopk.threshold.normalised_mask` (same values and gradients w.r.t. x, k, t to float tolerance).

    Args:
        family: ``"sigmoid"``, ``"lapsum"``, ``"sparse2"`` or ``"sparse4/3"``.
        x: scores (..., n), float16, bfloat16 or float32 (computed in float32).
        k: (..., 1) real k per row (broadcastable), t: (..., 1) temperature per row (the family's own t).
        tol: |Σ y − k| ≤ tol · max(k, 1) per row; max_iter: Newton steps at most.

    Returns:
        y (..., n) float32, differentiable (once) w.r.t. x, k and t.
    """
    if family not in _CODES:
        raise ValueError(f"threshold_mask: family must be one of {sorted(_CODES)}, got {family!r}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"threshold_mask: the Triton kernels take float16, bfloat16 or float32, got {x.dtype}")
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    y, _, _ = torch.ops.softtopk.threshold_forward(x2, _flat(x, k), _flat(x, t), family, float(tol), int(max_iter))
    return y.reshape(x.shape)


def dftopk(x: Tensor, k: int | Tensor, t: Tensor) -> Tensor:
    """DFTopK along the last dim of ``x`` by the Triton kernels: as :func:`softtopk.threshold.dftopk`.

    y = σ((x − τ)/t), τ the midpoint of the k-th and (k+1)-th largest entries of each row (found by selection);
    ``k`` an int or an integer-valued (..., 1) tensor in [0, n]; ``t`` (..., 1). Returns y (..., n) float32,
    differentiable (once) w.r.t. x and t.
    """
    if x.dtype not in _DTYPES:
        raise TypeError(f"dftopk: the Triton kernels take float16, bfloat16 or float32, got {x.dtype}")
    n = x.shape[-1]
    kt = torch.full(x.shape[:-1] + (1,), k, device=x.device) if isinstance(k, int) else k.detach()
    y, _, _ = torch.ops.softtopk.dftopk_forward(x.reshape(-1, n), _flat(x, kt, torch.int64), _flat(x, t))
    return y.reshape(x.shape)
