"""Numba kernel of the pool-adjacent-violators algorithm (PAV): one pass per row, the rows in parallel.

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
def _pav_row(y, a, b, c, mode, v, start):
    n = y.shape[0]
    first = np.empty(n, np.int64)
    m = np.empty(n)
    mu = np.empty(n)
    m2 = np.zeros(n)
    m3 = np.zeros(n)
    bs = np.empty(n)
    cs = np.empty(n)
    gam = np.empty(n)
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


@numba.njit(parallel=True, cache=True)
def pav(y, a, b, c, mode, v, start):
    """Rows of ``y`` (R, n); ``a``, ``b``, ``c`` of shape (1, n) or (R, n) (broadcast over rows). Writes ``v``
    (R, n) and ``start`` (R, n)."""
    rows = y.shape[0]
    for r in numba.prange(rows):
        _pav_row(y[r], a[r % a.shape[0]], b[r % b.shape[0]], c[r % c.shape[0]], mode, v[r], start[r])
