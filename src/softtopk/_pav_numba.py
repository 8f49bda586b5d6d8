"""Numba kernels of the pool-adjacent-violators algorithm (PAV), one pass per row, the rows in parallel: ``pav``
(isotonic regression) and ``project`` / ``project_backward`` (projections onto the permutahedron: a radix argsort,
PAV and the un-sort fused per row, and the gradient from the same blocks).

Imported lazily by :mod:`softtopk.permutahedron` (``pip install numba``); without numba the pure-torch reference
solver of that module is used instead. The kernel solves, independently for every row ``r``,

    argmin_{v_1 >= ... >= v_n}  sum_i  a_i R(v_i - y_i) + b_i v_i + c_i v_i^2 / 2      (modes Q2, Q4)
    argmin_{v_1 >= ... >= v_n}  sum_i  exp(y_i - v_i) + exp(b_i) v_i                    (mode KL)

with R(u) = u^2/2 (Q2) or u^4/4 (Q4), and returns the solution and, for every entry, the index of the first entry
of its block. All arithmetic is float64. A block keeps sufficient statistics that merge in O(1):

* Q2: (sum a, sum a y - b, sum c); the block value is (sum a y - b) / (sum a + sum c).
* Q4: weight m = sum a, weighted mean, 2nd and 3rd central moments (merged with Pebay's pairwise formulas, which
  stay accurate when the values are large against their spread), sum b, sum c. The value mean + d solves the
  depressed cubic m d^3 + (3 M2 + C) d = M3 - B - C mean, one real root since 3 M2 + C >= 0: Cardano's formula
  in a cancellation-free form, then one Newton step.
* KL: (logsumexp y, logsumexp b); the block value is their difference (Blondel et al. 2020).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ._numba_threads import lanes as lanes  # re-exported: the callers split rows with it
from ._numba_threads import torch_threads as torch_threads

Q2, Q4, KL = 0, 1, 2


@numba.njit(cache=True)
def cubic_root(p: float, q: float) -> float:
    """The real root of d^3 + p d + q = 0 for p >= 0."""
    if q == 0.0:
        return 0.0
    p3 = p / 3.0
    h = math.sqrt(0.25 * q * q + p3 * p3 * p3)
    big = (0.5 * abs(q) + h) ** (1.0 / 3.0)
    # d = u + v with u^3 + v^3 = -q, u v = -p/3: d = (u^3 + v^3) / (u^2 - u v + v^2), all terms of the same sign
    d = -q / (big * big + p3 + (p3 / big) ** 2)
    f = d * d * d + p * d + q
    fp = 3.0 * d * d + p
    if fp > 0.0:
        d -= f / fp
    return d


@numba.njit(cache=True)
def _value(mode, m, mu, m2, m3, bs, cs):
    if mode == Q2:
        return mu / (m + cs)
    if mode == Q4:
        return mu + cubic_root((3.0 * m2 + cs) / m, -(m3 - bs - cs * mu) / m)
    return mu - bs


@numba.njit(cache=True)
def _logaddexp(x, y):
    hi = max(x, y)
    if hi == -np.inf:
        return hi
    return hi + math.log(math.exp(x - hi) + math.exp(y - hi))


@numba.njit(cache=True)
def _pav_row(y, a, b, c, mode, v, start, first, stats):
    """One row of :func:`pav`; ``first`` (n,) int64 and ``stats`` (7, n) float64 are scratch space."""
    n = y.shape[0]
    m, mu, m2, m3, bs, cs, gam = stats[0], stats[1], stats[2], stats[3], stats[4], stats[5], stats[6]
    top = 0  # number of blocks on the stack
    for i in range(n):
        first[top] = i
        if mode == Q2:
            m[top] = a[i]
            mu[top] = a[i] * y[i] - b[i]
        else:
            m[top] = a[i]
            mu[top] = y[i]
        m2[top] = 0.0
        m3[top] = 0.0
        bs[top] = b[i]
        cs[top] = c[i]
        gam[top] = _value(mode, m[top], mu[top], 0.0, 0.0, bs[top], cs[top])
        top += 1
        # pool while the two last blocks violate v_prev >= v_next
        while top > 1 and gam[top - 2] < gam[top - 1]:
            lo, hi = top - 2, top - 1
            if mode == Q2:
                m[lo] += m[hi]
                mu[lo] += mu[hi]
            elif mode == Q4:
                ma, mb = m[lo], m[hi]
                mm = ma + mb
                delta = mu[hi] - mu[lo]
                m3[lo] = (
                    m3[lo]
                    + m3[hi]
                    + delta**3 * ma * mb * (ma - mb) / (mm * mm)
                    + 3.0 * delta * (ma * m2[hi] - mb * m2[lo]) / mm
                )
                m2[lo] = m2[lo] + m2[hi] + delta * delta * ma * mb / mm
                mu[lo] = mu[lo] + delta * mb / mm
                m[lo] = mm
            else:
                mu[lo] = _logaddexp(mu[lo], mu[hi])
            if mode == KL:
                bs[lo] = _logaddexp(bs[lo], bs[hi])
            else:
                bs[lo] += bs[hi]
            cs[lo] += cs[hi]
            gam[lo] = _value(mode, m[lo], mu[lo], m2[lo], m3[lo], bs[lo], cs[lo])
            top -= 1
    for blk in range(top):
        lo = first[blk]
        hi = first[blk + 1] if blk + 1 < top else n
        for i in range(lo, hi):
            v[i] = gam[blk]
            start[i] = lo


@numba.njit(cache=True)
def _scratch(n):
    return np.empty(n, np.int64), np.empty((7, n))


@numba.njit(parallel=True, cache=True)
def pav(y, a, b, c, mode, v, start, n_lanes):
    """Rows of ``y`` (R, n); ``a``, ``b``, ``c`` of shape (1, n) or (R, n) (broadcast over rows). Writes ``v``
    (R, n) and ``start`` (R, n). The rows are shared among ``n_lanes`` parallel tasks (see :func:`lanes`)."""
    rows, n = y.shape
    for lane in numba.prange(n_lanes):  # scratch space once per lane, not once per row
        first, stats = _scratch(n)
        for r in range(lane, rows, n_lanes):
            _pav_row(y[r], a[r % a.shape[0]], b[r % b.shape[0]], c[r % c.shape[0]], mode, v[r], start[r], first, stats)


# ----------------------------------------------------------------------------------------------------------------------
# Sort + PAV in one pass over the rows: the projections onto the permutahedron (soft rank, soft sort, sparse top-k)
# ----------------------------------------------------------------------------------------------------------------------
_PACKED_MAX = 512  # float32 rows up to this length are sorted as packed (key, index) words, longer ones by radix


@numba.njit(cache=True)
def _descending_keys(x, keys):
    """Unsigned keys of the floats of ``x`` whose increasing order is the decreasing order of ``x`` (-0 after +0).
    Returns their number of significant bits."""
    n = x.shape[0]
    if x.itemsize == 4:
        u32 = x.view(np.uint32)
        for i in range(n):
            b = np.uint64(u32[i])
            keys[i] = b if b >> np.uint64(31) else np.uint64(0x7FFFFFFF) - b
        return 32
    u64 = x.view(np.uint64)
    for i in range(n):
        b = u64[i]
        keys[i] = b if b >> np.uint64(63) else np.uint64(0x7FFFFFFFFFFFFFFF) - b
    return 64


@numba.njit(cache=True)
def _argsort_descending(x, perm, keys, tmp_keys, tmp_perm, count):
    """``perm`` = the indices of ``x`` (a contiguous float32/float64 row) in decreasing order of value, ties in
    increasing order of index. Short float32 rows: one sort of the words key << 32 | index. Otherwise a
    least-significant-digit radix sort, O(n) per digit (11-bit digits; 8-bit below 4096 entries), skipping the
    digits that all keys share. ``keys``, ``tmp_keys`` (n,) uint64, ``tmp_perm`` (n,) and ``count`` (2049,)
    int64 are scratch space."""
    n = x.shape[0]
    bits = _descending_keys(x, keys)
    if bits == 32 and n <= _PACKED_MAX:
        for i in range(n):
            keys[i] = (keys[i] << np.uint64(32)) | np.uint64(i)
        keys[:n].sort()
        for i in range(n):
            perm[i] = keys[i] & np.uint64(0xFFFFFFFF)
        return
    digit = 8 if n < 4096 else 11
    mask = np.uint64((1 << digit) - 1)
    src_k, dst_k, src_i, dst_i = keys, tmp_keys, perm, tmp_perm
    for i in range(n):
        perm[i] = i
    swapped = False
    for shift in range(0, bits, digit):
        sh = np.uint64(shift)
        count[: (1 << digit) + 1] = 0
        for i in range(n):
            count[np.intp((src_k[i] >> sh) & mask) + 1] += 1
        if count[: (1 << digit) + 1].max() == n:  # one bucket: this digit orders nothing
            continue
        for j in range(1 << digit):
            count[j + 1] += count[j]
        for i in range(n):
            d = np.intp((src_k[i] >> sh) & mask)
            pos = count[d]
            count[d] = pos + 1
            dst_k[pos] = src_k[i]
            dst_i[pos] = src_i[i]
        src_k, dst_k = dst_k, src_k
        src_i, dst_i = dst_i, src_i
        swapped = not swapped
    if swapped:
        perm[:] = src_i


@numba.njit(cache=True)
def _residuals(y, b, mode, start, out):
    """u = y − γ_B for every entry, written into ``out``, from quantities centred on each block (a = 1, c = 0):
    y − γ = (y − mean_B y) + mean_B b (Q2), (y − mean_B y) − d_B with d_B the cubic's root (Q4),
    (y − lse_B y) + lse_B b (KL). Subtracting γ itself cancels: a singleton block of y = 1e20 would give u = 0
    instead of b."""
    n = y.shape[0]
    lo = 0
    while lo < n:
        hi = lo + 1
        while hi < n and start[hi] == lo:
            hi += 1
        m = hi - lo
        if mode == KL:
            ly, lb = -np.inf, -np.inf
            for i in range(lo, hi):
                ly = _logaddexp(ly, y[i])
                lb = _logaddexp(lb, b[i])
            for i in range(lo, hi):
                out[i] = (y[i] - ly) + lb
        else:
            mean, bsum = 0.0, 0.0
            for i in range(lo, hi):
                mean += y[i]
                bsum += b[i]
            mean /= m
            if mode == Q2:
                for i in range(lo, hi):
                    out[i] = (y[i] - mean) + bsum / m
            else:
                m2, m3 = 0.0, 0.0
                for i in range(lo, hi):
                    e = y[i] - mean
                    m2 += e * e
                    m3 += e * e * e
                d = cubic_root(3.0 * m2 / m, -(m3 - bsum) / m)
                for i in range(lo, hi):
                    out[i] = (y[i] - mean) - d
        lo = hi


@numba.njit(cache=True)
def _project_row(y, y_scale, b, b_sign, sort_y, mode, out, perm, start, u_out, scratch):
    n = perm.shape[0]
    keys, fl, first, tmp_perm, count = scratch
    ys, bs, v, ones, zeros = fl[0], fl[1], fl[2], fl[3], fl[4]
    bad = 0
    src = y if sort_y else b
    for i in range(n):
        bad += not math.isfinite(src[i])
    _argsort_descending(src, perm, keys[0], keys[1], tmp_perm, count)
    if (y_scale if sort_y else b_sign) < 0:  # decreasing order of the scaled row: increasing order of the row
        for i in range(n // 2):
            perm[i], perm[n - 1 - i] = perm[n - 1 - i], perm[i]
    for i in range(n):
        j = perm[i]
        ys[i] = y_scale * (y[j] if sort_y else y[i])
        bs[i] = b[i] if sort_y else b_sign * b[j]
    _pav_row(ys, ones, bs, zeros, mode, v, start, first, fl[5:])
    _residuals(ys, bs, mode, start, v)  # v <- u = ys - v, from block-centred quantities
    for i in range(n):
        u = v[i]
        if u_out.shape[0]:
            u_out[i] = u
        mu = u * u * u if mode == Q4 else u
        if sort_y:
            out[perm[i]] = mu
        else:
            out[i] = b_sign * mu
    return bad


@numba.njit(cache=True)
def _project_scratch(n, perm_dtype):
    fl = np.empty((12, n))
    fl[3] = 1.0
    fl[4] = 0.0
    return np.empty((2, n), np.uint64), fl, np.empty(n, np.int64), np.empty(n, perm_dtype), np.empty(2049, np.int64)


@numba.njit(parallel=True, cache=True)
def project(y, y_scale, b, b_sign, sort_y, mode, out, perm, start, u_out, n_lanes):
    """Projection onto the permutahedron, row by row, with the sort fused in.

    With y' = y_scale · y (one scale per row) and b' = b_sign · b, the rows of y' (``sort_y``) or of b' (not
    ``sort_y``) are put in decreasing order by ``perm``, v = PAV(y', b') (the isotonic dual of the module
    docstring, a = 1, c = 0) and ``out`` = R'(y' − v): in the original order of y when ``sort_y`` (soft rank,
    top-k), else in sorted order and times ``b_sign`` (soft sort). Either side, and ``y_scale``, may have one
    row for all. ``start`` (block starts, sorted order) and, for Q4, ``u_out`` = y' − v (sorted order; shape
    (R, 0) otherwise) are kept for :func:`project_backward`. Returns the number of non-finite entries of the
    sorted side (the caller raises on them).
    """
    rows, n = out.shape
    bad = 0
    for lane in numba.prange(n_lanes):
        scratch = _project_scratch(n, perm.dtype)
        for r in range(lane, rows, n_lanes):
            bad += _project_row(
                y[r % y.shape[0]],
                y_scale[r % y_scale.shape[0]],
                b[r % b.shape[0]],
                b_sign,
                sort_y,
                mode,
                out[r],
                perm[r],
                start[r],
                u_out[r % u_out.shape[0]],
                scratch,
            )
    return bad


@numba.njit(cache=True)
def _lse_block(x, lo, hi, scale):
    """logsumexp of scale · x[lo:hi]."""
    m = -np.inf
    for i in range(lo, hi):
        m = max(m, scale * x[i])
    if m == -np.inf:
        return m
    s = 0.0
    for i in range(lo, hi):
        s += math.exp(scale * x[i] - m)
    return m + math.log(s)


@numba.njit(cache=True)
def _project_backward_row(g, y, y_scale, b, b_sign, u, perm, start, sort_y, mode, gy, need_scale, gb, scratch):
    n = perm.shape[0]
    gs, ys, bs = scratch[0], scratch[1], scratch[2]
    for i in range(n):
        j = perm[i]
        gs[i] = g[j] if sort_y else b_sign * g[i]
        if mode == KL or need_scale:
            ys[i] = y[j] if sort_y else y[i]  # unscaled
        if mode == KL:
            bs[i] = b[i] if sort_y else b_sign * b[j]
    lo = 0
    while lo < n:
        hi = lo + 1
        while hi < n and start[hi] == lo:
            hi += 1
        if mode == Q2:
            gsum = 0.0
            for i in range(lo, hi):
                gsum += gs[i]
            gbar = gsum / (hi - lo)
            for i in range(lo, hi):
                gs[i], bs[i] = gs[i] - gbar, gbar
        elif mode == Q4:
            hsum = 0.0
            ghsum = 0.0
            for i in range(lo, hi):
                h = 3.0 * u[i] * u[i]
                hsum += h
                ghsum += h * gs[i]
            gbar = ghsum / hsum if hsum > 0.0 else 0.0
            for i in range(lo, hi):
                gs[i], bs[i] = 3.0 * u[i] * u[i] * (gs[i] - gbar), gbar
        else:
            gsum = 0.0
            for i in range(lo, hi):
                gsum += gs[i]
            ly = _lse_block(ys, lo, hi, y_scale)
            lb = _lse_block(bs, lo, hi, 1.0)
            for i in range(lo, hi):
                gs[i], bs[i] = gs[i] - math.exp(y_scale * ys[i] - ly) * gsum, math.exp(bs[i] - lb) * gsum
        lo = hi
    gscale = 0.0
    if need_scale:
        for i in range(n):
            gscale += gs[i] * ys[i]
    if gy.shape[0]:
        for i in range(n):
            gy[perm[i] if sort_y else i] = y_scale * gs[i]
    if gb.shape[0]:
        for i in range(n):
            if sort_y:
                gb[i] = bs[i]
            else:
                gb[perm[i]] = b_sign * bs[i]
    return gscale


@numba.njit(parallel=True, cache=True)
def project_backward(g, y, y_scale, b, b_sign, u, perm, start, sort_y, mode, gy, gscale, gb, n_lanes):
    """Gradients of :func:`project` with respect to y, y_scale (one per row, into ``gscale`` (R,)) and b, from
    the block structure. With G_B the sum of the incoming gradient over a block B (sorted order), Q2:
    ∂y' = g − G_B/|B|, ∂b' = G_B/|B|; Q4 (h = 3u²): ∂y' = h (g − Σ_B h g / Σ_B h), ∂b' = Σ_B h g / Σ_B h; KL:
    ∂y' = g − softmax_B(y') G_B, ∂b' = softmax_B(b') G_B. ``gy`` and ``gb`` are (R, n), each in the order of
    its input (the unsorted side's gradient in sorted order); each of ``gy``, ``gscale``, ``gb`` may have
    length 0 along its last axis, and is then not computed."""
    rows, n = g.shape
    need_scale = gscale.shape[0] > 0
    for lane in numba.prange(n_lanes):
        scratch = np.empty((3, n))
        for r in range(lane, rows, n_lanes):
            gs = _project_backward_row(
                g[r],
                y[r % y.shape[0]],
                y_scale[r % y_scale.shape[0]],
                b[r % b.shape[0]],
                b_sign,
                u[r % u.shape[0]],
                perm[r],
                start[r],
                sort_y,
                mode,
                gy[r],
                need_scale,
                gb[r],
                scratch,
            )
            if need_scale:
                gscale[r] = gs
