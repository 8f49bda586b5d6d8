"""Numba kernels of the normalised threshold masks (:mod:`softtopk.threshold`): the whole threshold search of a row
(start, safeguarded Newton, the mask) in one call, and the implicit backward in another, the rows in parallel.

Imported lazily by :mod:`softtopk.threshold` (``pip install numba``) for float32 CPU tensors in eager mode; the
pure-torch solver there is the reference (and the path under ``torch.compile``, ``torch.func`` and on CUDA). For
every row r, with u = x · rt (rt = 1/t) in float64:

    y_i = clip(φ(u_i − τ), 0, 1),   Σ_i y_i = k,

found by the same safeguarded Newton iteration as the reference (on logit(S/n) for the exponential families, on
S otherwise), from a start at the order statistics of the row around rank k (small k: the exact k-th and (k+1)-th
largest by one scan; else the threshold of the same problem on a strided subsample of the row). A row the kernel
does not handle (a non-finite score, |x|/t beyond 1e12, no convergence within ``max_iter``) is reported by its
status, and the caller solves the whole call with the reference instead.

The exponential is a vectorisable one (Cody–Waite reduction, a degree-8 polynomial and a table of powers of two,
relative error below 1e-9 on |z| ≤ 100), so that LLVM vectorises every pass over a row: numba's ``math.exp`` is a
scalar libm call, 4–5x slower. The passes use the float flags ``reassoc, contract, arcp, nsz`` only (reductions
vectorise; no finite-math assumption) and ``error_model="numpy"`` (no zero-division branch in the loop).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ._numba_threads import lanes as lanes  # re-exported: the callers split rows with it
from ._numba_threads import torch_threads as torch_threads

SIGMOID, LAPLACE, EUCLIDEAN, CUBIC = 0, 1, 2, 3
#: the family names of :data:`softtopk.threshold.FAMILIES`, by kernel code
CODES = {"sigmoid": SIGMOID, "lapsum": LAPLACE, "sparse2": EUCLIDEAN, "sparse4/3": CUBIC}

_FAST = {"reassoc", "contract", "arcp", "nsz"}
_POW2 = 2.0 ** np.arange(-160, 161).astype(np.float64)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_SCAN_K = 32  # rows with k < this get their start from an exact top-(k+1) scan
_SAMPLE = 256  # otherwise from a strided subsample of about this many entries (rows longer than 2x this)
_BIG = 1e12  # |x|/t beyond this: the reference, which re-centres
SCAN_K = _SCAN_K
SELECT_MAX_N = 1 << 15  # DFTopK: rows up to this long select by quickselect when k >= SCAN_K


@numba.njit(inline="always", fastmath=_FAST, error_model="numpy")
def _exp(z):
    """e^z for |z| <= 100 (2^n from a table; f in [-ln2/2, ln2/2], Taylor to degree 8)."""
    y = z * _LOG2E
    n = np.int32(y + 160.5) - np.int32(160)  # round(y): the sum is positive
    f = (y - n) * _LN2
    q = 1 / 120 + f * (1 / 720 + f * (1 / 5040 + f / 40320))
    p = 1.0 + f * (1.0 + f * (0.5 + f * (1 / 6 + f * (1 / 24 + f * q))))
    return p * _POW2[n + 160]


@numba.njit(inline="always", fastmath=_FAST, error_model="numpy")
def _phi(fam, z):
    """(clip(φ(z), 0, 1), φ'(z)), with φ' = 0 where the mask is 0 or 1."""
    if fam == SIGMOID:
        y = 1.0 / (1.0 + _exp(-min(max(z, -100.0), 100.0)))
        return y, y * (1.0 - y)
    if fam == LAPLACE:
        e = 0.5 * _exp(-min(abs(z), 100.0))
        return (e if z < 0.0 else 1.0 - e), e
    c = min(max(z, 0.0), 1.0)
    if fam == EUCLIDEAN:
        return c, (1.0 if (z > 0.0 and z < 1.0) else 0.0)
    return c * c * c, (3.0 * c * c if z < 1.0 else 0.0)


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _sweep(fam, x, rt, tau, y, write):
    """(S, Σφ') at τ over the row x (u = x rt), with the mask written into y when ``write``."""
    s = 0.0
    d = 0.0
    if write:
        for i in range(x.shape[0]):
            v, dv = _phi(fam, x[i] * rt - tau)
            y[i] = v
            s += v
            d += dv
    else:
        for i in range(x.shape[0]):
            v, dv = _phi(fam, x[i] * rt - tau)
            s += v
            d += dv
    return s, d


@numba.njit(cache=True)
def _phi_inv(fam, p):
    if fam == SIGMOID:
        return math.log(p / (1.0 - p))
    if fam == LAPLACE:
        return math.log(2.0 * p) if p < 0.5 else -math.log(2.0 - 2.0 * p)
    if fam == EUCLIDEAN:
        return p
    return p ** (1.0 / 3.0)


@numba.njit(cache=True)
def _stats(x):
    """(min, max, all finite) of a row (no fast-math: the finiteness test must see inf and NaN)."""
    lo = np.inf
    hi = -np.inf
    bad = 0.0
    for i in range(x.shape[0]):
        v = x[i]
        lo = min(lo, v)
        hi = max(hi, v)
        bad += v - v  # NaN for ±inf and NaN, 0 otherwise
    return lo, hi, bad == 0.0 and math.isfinite(lo) and math.isfinite(hi)


@numba.njit(cache=True)
def _top_pair(x, k, buf):
    """The k-th and (k+1)-th largest of x (1 <= k < n), by one scan keeping the k + 1 largest in ``buf``,
    in decreasing order."""
    m = k + 1
    for j in range(m):
        buf[j] = -np.inf
    for i in range(x.shape[0]):
        v = x[i]
        if v > buf[m - 1]:
            j = m - 1
            while j > 0 and buf[j - 1] < v:
                buf[j] = buf[j - 1]
                j -= 1
            buf[j] = v
    return buf[k - 1], buf[k]


@numba.njit(cache=True)
def _select_pair(a, r):
    """The r-th and (r+1)-th largest of a (1 <= r < len(a)), by quickselect in place (Hoare's partition):
    cheap to compile, unlike ``np.partition``."""
    lo, hi = 0, a.shape[0] - 1
    while lo < hi:  # afterwards a[:r] >= a[r] >= a[r + 1:]
        pivot = a[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while a[i] > pivot:
                i += 1
            while a[j] < pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if r <= j:
            hi = j
        elif r >= i:
            lo = i
        else:
            break
    return a[:r].min(), a[r]


@numba.njit(cache=True)
def _newton(fam, x, k, rt, tau, lo, hi, tol, max_iter, y, write):
    """Safeguarded Newton on S(τ) = k from τ in the bracket [lo, hi] (S(lo) >= k >= S(hi)), as the reference.

    Returns (τ, Σφ', ok); y holds the mask at τ when ``write``."""
    n = x.shape[0]
    logit_k = math.log(k / (n - k))
    for it in range(max_iter + 1):
        s, d = _sweep(fam, x, rt, tau, y, write)
        resid = s - k
        if abs(resid) <= tol:
            return tau, d, True
        if it == max_iter:
            break
        if resid > 0:
            lo = tau
        else:
            hi = tau
        if fam == SIGMOID or fam == LAPLACE:
            rest = n - s
            step = (math.log(s / rest) - logit_k) * (s * rest) / (d * n) if s > 0 and rest > 0 and d > 0 else np.nan
        else:
            step = resid / d if d > 0 else np.nan
        new = tau + step
        if not (new > lo and new < hi):
            new = 0.5 * lo + 0.5 * hi
        if new == tau:
            break
        tau = new
    return tau, d, False


@numba.njit(cache=True)
def _start(fam, x, k, rt, lo, hi, buf, sample):
    """A first τ: the midpoint of the order statistics around rank k (exact for small k, else those of a
    strided subsample, whose own threshold is then solved loosely)."""
    n = x.shape[0]
    kk = int(k)
    half = _phi_inv(fam, 0.5)
    if n < 2:
        tau = 0.5 * lo + 0.5 * hi
    elif kk == k and 1 <= kk < _SCAN_K:
        a, b = _top_pair(x, kk, buf)
        tau = 0.5 * (a + b) * rt - half
    else:
        stride = max(1, n // _SAMPLE)
        m = (n + stride - 1) // stride
        sub = sample[:m]
        for j in range(m):
            sub[j] = x[j * stride]
        ks = min(max(k * m / n, 1e-3), m - 1e-3)
        rank = min(max(int(ks), 1), m - 1)
        a, b = _select_pair(sub[:m].copy(), rank)
        tau = 0.5 * (a + b) * rt - half
        if stride > 1 and lo < tau < hi:
            tau = _newton(fam, sub, ks, rt, tau, lo, hi, 1e-3 * max(ks, 1.0), 30, sub, False)[0]
    return min(max(tau, lo), hi)


@numba.njit(cache=True)
def _solve_row(fam, x, k, rt, tol, max_iter, y, buf, sample):
    """(τ, Σφ', status) of one row, its mask in y; status 0 done, 1 for the reference."""
    n = x.shape[0]
    xmin, xmax, finite = _stats(x)
    if not finite or max(abs(xmin), abs(xmax)) * rt > _BIG:
        return 0.0, 0.0, 1
    if k <= 0.0 or k >= n:
        fill = 0.0 if k <= 0.0 else 1.0
        for i in range(n):
            y[i] = fill
        return 0.0, 0.0, 0
    zp = _phi_inv(fam, min(max(k / n, 1e-30), 1.0 - 1e-7))
    lo = xmin * rt - zp
    hi = xmax * rt - zp
    tau = _start(fam, x, k, rt, lo, hi, buf, sample)
    tau, d, ok = _newton(fam, x, k, rt, tau, lo, hi, tol * max(k, 1.0), max_iter, y, True)
    return tau, d, 0 if ok else 1


@numba.njit(parallel=True, cache=True)
def forward(fam, x, k, rt, tol, max_iter, y, tau, dsum, status, n_lanes):
    """Rows of x (R, n) float32: the mask into y (R, n), τ (in units of t), Σφ' and the status of each row
    (0 done, 1 for the reference) into tau, dsum, status (R,). k and rt (R,) float64."""
    rows = x.shape[0]
    for lane in numba.prange(n_lanes):
        buf = np.empty(_SCAN_K + 1)
        sample = np.empty(2 * _SAMPLE + 2, dtype=x.dtype)
        for r in range(lane, rows, n_lanes):
            tau[r], dsum[r], status[r] = _solve_row(fam, x[r], k[r], rt[r], tol, max_iter, y[r], buf, sample)


@numba.njit(inline="always", fastmath=_FAST, error_model="numpy")
def _dphi(fam, v):
    """φ' written through the mask value v = φ(z) (0 where v is 0 or 1)."""
    if fam == SIGMOID:
        return v * (1.0 - v)
    if fam == LAPLACE:
        return min(v, 1.0 - v)
    if fam == EUCLIDEAN:
        return 1.0 if (v > 0.0 and v < 1.0) else 0.0
    return 3.0 * v ** (2.0 / 3.0) if v < 1.0 else 0.0


@numba.njit(inline="always", fastmath=_FAST, error_model="numpy")
def _dphi_z(fam, y, u, tau):
    """φ' at z = u − τ: from the mask value y (see :func:`_dphi`), except for p = 4/3, whose φ' = 3 clip(z, 0, 1)²
    is cheaper from z than from y (y^(2/3) is a scalar pow)."""
    if fam == CUBIC:  # 0 where the mask is 0 or 1 (also in the rows with k = 0 or n, whose τ is not solved)
        c = min(max(u - tau, 0.0), 1.0)
        return 3.0 * c * c if (y > 0.0 and y < 1.0) else 0.0
    return _dphi(fam, y)


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _backward_row(fam, y, g, rt, x, tau, gx, need_t):
    """One row of :func:`backward`; returns (ḡ, Σ z gx) (the latter 0 unless ``need_t``)."""
    n = y.shape[0]
    num = 0.0
    den = 0.0
    for i in range(n):
        p = _dphi_z(fam, np.float64(y[i]), x[i] * rt, tau)
        num += g[i] * p
        den += p
    gbar = num / den if den > 0.0 else 0.0
    for i in range(n):
        gx[i] = _dphi_z(fam, np.float64(y[i]), x[i] * rt, tau) * (g[i] - gbar) * rt
    zg = 0.0
    if need_t:
        for i in range(n):
            zg += (x[i] * rt - tau) * gx[i]
    return gbar, zg


@numba.njit(parallel=True, cache=True)
def backward(fam, y, g, rt, x, tau, gx, gk, gt, need_t, n_lanes):
    """The implicit backward of :func:`forward`, row by row: with d = φ'(z) rt on 0 < y < 1,
    gx = d (g − ḡ), ḡ = Σ g d / Σ d (= gk), and gt = −Σ z gx when ``need_t``. x (R, n) the scores."""
    rows = y.shape[0]
    for lane in numba.prange(n_lanes):
        for r in range(lane, rows, n_lanes):
            gk[r], zg = _backward_row(fam, y[r], g[r], rt[r], x[r], tau[r], gx[r], need_t)
            gt[r] = -zg


# ----------------------------------------------------------------------------------------------------------------
# DFTopK: y = σ((x − τ)/t), τ the midpoint of the k-th and (k+1)-th largest entries of the row.
# ----------------------------------------------------------------------------------------------------------------
@numba.njit(cache=True)
def _scan_pair(x, k, vals, idx):
    """Indices of the k-th and (k+1)-th largest of x (1 <= k < n) by one scan keeping the k + 1 largest (values and
    indices in ``vals``, ``idx``, decreasing); and whether the row is finite."""
    m = k + 1
    for j in range(m):
        vals[j] = -np.inf
        idx[j] = -1
    bad = 0.0
    for i in range(x.shape[0]):
        v = x[i]
        bad += v - v  # NaN for ±inf and NaN
        if v > vals[m - 1]:
            j = m - 1
            while j > 0 and vals[j - 1] < v:
                vals[j] = vals[j - 1]
                idx[j] = idx[j - 1]
                j -= 1
            vals[j] = v
            idx[j] = i
    return idx[k - 1], idx[k], bad == 0.0


@numba.njit(cache=True)
def _select_indices(x, k, scratch):
    """Indices of the k-th and (k+1)-th largest of x (1 <= k < n) by quickselect on a copy; and finiteness."""
    n = x.shape[0]
    bad = 0.0
    for i in range(n):
        scratch[i] = x[i]
        bad += x[i] - x[i]
    if bad != 0.0:
        return -1, -1, False
    va, vb = _select_pair(scratch[:n], k)
    a = -1
    b = -1
    for i in range(n):
        if x[i] == va and a < 0:
            a = i
        elif x[i] == vb and b < 0:
            b = i
    return a, b, a >= 0 and b >= 0


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _ties(x, va, vb):
    """How many entries equal x_(k) or x_(k+1): 2 when there is no tie."""
    ties = 0
    for i in range(x.shape[0]):
        ties += (x[i] == va) + (x[i] == vb)
    return ties


@numba.njit(parallel=True, cache=True)
def dftopk_forward(x, k, tau, ia, ib, status, n_lanes):
    """Rows of x (R, n) float32, k (R,) int64 in [1, n): τ and the indices of the k-th and (k+1)-th largest
    into tau, ia, ib (the mask σ((x − τ)/t) is one vectorised torch pass after); status 1 for a row the reference
    must do (a non-finite entry, or a tie at the k-th or (k+1)-th value, where the choice of index is torch's)."""
    rows, n = x.shape
    for lane in numba.prange(n_lanes):
        vals = np.empty(_SCAN_K + 1, dtype=x.dtype)
        idx = np.empty(_SCAN_K + 1, dtype=np.int64)
        scratch = np.empty(n, dtype=x.dtype)
        for r in range(lane, rows, n_lanes):
            kk = k[r]
            if kk < _SCAN_K:
                a, b, ok = _scan_pair(x[r], kk, vals, idx)
            else:
                a, b, ok = _select_indices(x[r], kk, scratch)
            status[r] = 0 if ok else 1
            if ok:
                va, vb = x[r, a], x[r, b]
                tau[r] = 0.5 * (np.float64(va) + np.float64(vb))
                ia[r], ib[r] = a, b
                if _ties(x[r], va, vb) != 2:
                    status[r] = 1


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _dftopk_backward_row(y, g, rt, x, tau, gx):
    """gx = s with s = g y (1 − y) rt; returns (Σ s, Σ s z) with z = (x − τ) rt (0 when x is empty)."""
    n = y.shape[0]
    total = 0.0
    for i in range(n):
        v = np.float64(y[i])
        s = g[i] * v * (1.0 - v) * rt
        gx[i] = s
        total += s
    sz = 0.0
    if x.shape[0] == n:
        for i in range(n):
            sz += gx[i] * ((x[i] - tau) * rt)
    return total, sz


@numba.njit(parallel=True, cache=True)
def dftopk_backward(y, g, rt, x, tau, ia, ib, gx, gt, n_lanes):
    """The backward of :func:`dftopk_forward`: gx = s − (Σ s)(e_a + e_b)/2, s = g σ'(z) rt; gt = −Σ s z when x
    (R, n) is given (shape (R, 0) otherwise)."""
    rows = y.shape[0]
    for lane in numba.prange(n_lanes):
        for r in range(lane, rows, n_lanes):
            total, sz = _dftopk_backward_row(y[r], g[r], rt[r], x[r], tau[r], gx[r])
            gx[r, ia[r]] -= 0.5 * total
            gx[r, ib[r]] -= 0.5 * total
            gt[r] = -sz
