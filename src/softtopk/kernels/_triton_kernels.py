"""The Triton kernels of :mod:`softtopk.kernels.triton_threshold` (imported on the first kernel call, never by
``import softtopk``; without triton it imports but defines nothing). Every kernel reads its inputs in their own
dtype and computes in float32; the host-side logic (block sizes, the Newton loop of long rows, the custom ops) lives
in :mod:`softtopk.kernels.triton_threshold`.

Family codes: 0 sigmoid, 1 lapsum (Laplace CDF), 2 sparse p = 2 (φ(z) = z), 3 sparse p = 4/3 (φ(z) = max(z, 0)³).
Scores are mapped to order-preserving int32 keys (the float bits, negative ones with the magnitude bits flipped)
for selection by bisection on the key; every float, ±inf included, has a key, so selection is exact.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # without softtopk[gpu] this module defines nothing (pytest's doctest collection imports every
    triton = None  # module); softtopk.kernels.triton_threshold raises the install hint on the first kernel call

if triton is not None:
    INF: tl.constexpr = tl.constexpr(float("inf"))
    BIG: tl.constexpr = tl.constexpr(3.4028234663852886e38)  # float32 max
    NO_INDEX: tl.constexpr = tl.constexpr(2**31 - 1)

    # ------------------------------------------------------------------------------------------------------------
    # Elementwise maths and the scalar Newton step, shared by the one-program-per-row and the multi-block kernels.
    # ------------------------------------------------------------------------------------------------------------
    @triton.jit
    def phi(z, FAMILY: tl.constexpr):
        """(clip(φ(z), 0, 1), φ'(z)) with φ' = 0 where the mask is 0 or 1 (±inf z give exactly 0 or 1)."""
        if FAMILY == 0:
            y = 1.0 / (1.0 + tl.exp(-z))
            d = y * (1.0 - y)
        elif FAMILY == 1:
            d = 0.5 * tl.exp(-tl.abs(z))
            y = tl.where(z < 0.0, d, 1.0 - d)
        elif FAMILY == 2:
            y = tl.minimum(tl.maximum(z, 0.0), 1.0)
            d = tl.where((z > 0.0) & (z < 1.0), 1.0, 0.0)
        else:
            c = tl.minimum(tl.maximum(z, 0.0), 1.0)
            y = c * c * c
            d = tl.where(c < 1.0, 3.0 * c * c, 0.0)
        return y, d

    @triton.jit
    def dphi(y, FAMILY: tl.constexpr):
        """φ'(z) written through the mask value y = φ(z) (as the reference's ``Family.dphi``): 0 where y is 0 or 1."""
        if FAMILY == 0:
            d = y * (1.0 - y)
        elif FAMILY == 1:
            d = tl.minimum(y, 1.0 - y)
        elif FAMILY == 2:
            d = tl.where((y > 0.0) & (y < 1.0), 1.0, 0.0)
        else:  # 3 y^(2/3) on 0 < y < 1
            d = tl.where((y > 0.0) & (y < 1.0), 3.0 * tl.exp2(tl.log2(tl.maximum(y, 1e-38)) * (2.0 / 3.0)), 0.0)
        return d

    @triton.jit
    def phi_inv(p, FAMILY: tl.constexpr):
        """z with φ(z) = p, p in (0, 1)."""
        if FAMILY == 0:
            z = tl.log(p / (1.0 - p))
        elif FAMILY == 1:
            z = tl.where(p < 0.5, tl.log(2.0 * p), -tl.log(2.0 - 2.0 * p))
        elif FAMILY == 2:
            z = p
        else:
            z = tl.exp2(tl.log2(p) * (1.0 / 3.0))
        return z

    @triton.jit
    def newton_step(s, d, k, n_live, logit_k, tau, lo, hi, tol, done, FAMILY: tl.constexpr):
        """One safeguarded Newton step on S(τ) = k (S decreasing in τ, d = Σφ' = −dS/dτ), as the reference's
        ``_newton``: the bracket [lo, hi] shrinks to τ on the side of the residual's sign; the step is on
        logit(S/n) for the exponential families, on S otherwise, replaced by bisection when it leaves the bracket.
        Returns (τ, lo, hi, done, ok): ok when |S − k| ≤ tol, done also when the step no longer moves τ."""
        resid = s - k
        ok = tl.abs(resid) <= tol
        lo = tl.where(resid > 0.0, tau, lo)
        hi = tl.where(resid < 0.0, tau, hi)
        if FAMILY <= 1:
            rest = n_live - s
            valid = (s > 0.0) & (rest > 0.0) & (d > 0.0)
            s1 = tl.where(valid, s, 1.0)
            r1 = tl.where(valid, rest, 1.0)
            step = (tl.log(s1 / r1) - logit_k) * (s1 * r1) / (tl.where(valid, d, 1.0) * n_live)
        else:
            valid = d > 0.0
            step = resid / tl.where(valid, d, 1.0)
        new = tau + step
        inside = valid & (new > lo) & (new < hi)  # false for NaN and inf too
        new = tl.where(inside, new, 0.5 * lo + 0.5 * hi)
        done = done | ok | (new == tau)
        tau = tl.where(done, tau, new)
        return tau, lo, hi, done, ok

    @triton.jit
    def float_key(x):
        """Order-preserving int32 key of a float32 (−0 sorts below +0; NaN is not expected)."""
        b = x.to(tl.int32, bitcast=True)
        return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)

    @triton.jit
    def key_float(key):
        """The float32 of a key of :func:`float_key`."""
        b = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
        return b.to(tl.float32, bitcast=True)

    @triton.jit
    def select_key(key, valid, rank, lo, hi, STEPS: tl.constexpr):
        """Bisection on the key: the largest v in [lo, hi] (int64) with #{key ≥ v} ≥ rank, exact after 33 steps
        (a lower bound within 2^(32 − STEPS) keys after fewer). ``valid`` masks the entries counted."""
        for _ in range(STEPS):
            mid = lo + (hi - lo + 1) // 2
            count = tl.sum(tl.where(valid & (key >= mid), 1, 0), axis=0)
            big_enough = count >= rank
            lo = tl.where(big_enough, mid, lo)
            hi = tl.where(big_enough, hi, mid - 1)
        return lo

    # ------------------------------------------------------------------------------------------------------------
    # Normalised masks: one program per row (the whole row in registers).
    # ------------------------------------------------------------------------------------------------------------
    @triton.jit
    def threshold_row_kernel(x_ptr, k_ptr, t_ptr, y_ptr, tau_ptr, c_ptr, ok_ptr, n, stride_x, stride_y, tol, max_iter,
                             FAMILY: tl.constexpr, BLOCK: tl.constexpr, START_STEPS: tl.constexpr):  # fmt: skip
        """Row r of y = clip(φ((x − c)/t − τ), 0, 1) with Σ y = k: the start from the score c found by bisection near
        rank k (the centre: x − c is exact near the threshold), then safeguarded Newton, then (where needed) a polish
        centred at the score nearest the threshold. Writes y, τ, c and whether |Σ y − k| ≤ tol·max(k, 1) (or the row
        is an exact 0/1 mask: k − #(+inf) ≤ 0 or k ≥ #(> −inf))."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        inside = offs < n
        x = tl.load(x_ptr + row * stride_x + offs, mask=inside, other=-INF).to(tl.float32)
        k = tl.load(k_ptr + row).to(tl.float32)
        rt = 1.0 / tl.load(t_ptr + row).to(tl.float32)
        finite = tl.abs(x) < INF
        xmin = tl.min(tl.where(finite, x, INF), axis=0)
        xmax = tl.max(tl.where(finite, x, -INF), axis=0)
        n_live = tl.sum(tl.where(x > -INF, 1.0, 0.0), axis=0)
        n_pinf = tl.sum(tl.where(x == INF, 1.0, 0.0), axis=0)
        none = (k - n_pinf) <= 0.0
        full = k >= n_live
        degenerate = none | full
        # the centre: a score near the rank-k order statistic among the finite entries
        key = float_key(x)
        rank = tl.minimum(tl.maximum(tl.floor(k), n_pinf + 1.0), n_live - 1.0).to(tl.int32)
        kmin = float_key(tl.where(degenerate, 0.0, xmin)).to(tl.int64)
        kmax = float_key(tl.where(degenerate, 0.0, xmax)).to(tl.int64)
        c = key_float(select_key(key, inside, rank, kmin, kmax, START_STEPS).to(tl.int32))
        c = tl.where(degenerate, 0.0, c)
        # the bracket S(lo) ≥ k ≥ S(hi), in the frame of c and in units of t; finite even when |x − c|/t overflows
        zp = phi_inv(tl.minimum(tl.maximum((k - n_pinf) / (n_live - n_pinf), 1e-30), 1.0 - 1e-7), FAMILY)
        lo = tl.where(degenerate, 0.0, tl.maximum((xmin - c) * rt - zp, -BIG))
        hi = tl.where(degenerate, 0.0, tl.minimum((xmax - c) * rt - zp, BIG))
        tau = tl.minimum(tl.maximum(-phi_inv(tl.full([], 0.5, tl.float32), FAMILY), lo), hi)
        logit_k = tl.log(k / (n_live - k))
        tol_k = tol * tl.maximum(k, 1.0)
        far = 0.1 * tol_k / 1.1920928955078125e-07  # |τ| beyond this: u − τ is too coarse for the tolerance
        u = (x - c) * rt
        done = degenerate
        ok = degenerate
        for rnd in tl.static_range(2):
            if rnd == 1:
                # Polish, as the reference: a row that stalled short of tol, or whose |τ| is too large for float32 to
                # resolve u − τ to the tolerance, restarts centred at the score nearest its threshold (x − c exact for
                # the entries that matter), its bracket found anew in that frame.
                redo = ((ok == 0) | (tl.abs(tau) > far)) & (degenerate == 0)
                dist = tl.where(finite, tl.abs(u - tau), INF)
                nearest = tl.min(tl.where(dist == tl.min(dist, axis=0), x, INF), axis=0)
                c_new = tl.where(redo & (nearest < INF), nearest, c)
                guess = tau - (c_new - c) * rt
                c = c_new
                u = (x - c) * rt
                lo = tl.where(redo, tl.maximum((xmin - c) * rt - zp, -BIG), lo)
                hi = tl.where(redo, tl.minimum((xmax - c) * rt - zp, BIG), hi)
                guess = tl.where(tl.abs(guess) < BIG, guess, 0.0)
                tau = tl.where(redo, tl.minimum(tl.maximum(guess, lo), hi), tau)
                done = redo == 0
                ok = ok & (redo == 0)
            it = 0
            while (it < max_iter) & (done == 0):
                y, d = phi(u - tau, FAMILY)
                s = tl.sum(y, axis=0)
                dsum = tl.sum(d, axis=0)
                tau, lo, hi, done, ok = newton_step(s, dsum, k, n_live, logit_k, tau, lo, hi, tol_k, done, FAMILY)
                it += 1
            if it == max_iter:  # the last step was not checked: check it as the reference does
                y, d = phi(u - tau, FAMILY)
                ok = ok | (tl.abs(tl.sum(y, axis=0) - k) <= tol_k)
        y, d = phi(u - tau, FAMILY)
        exact = tl.where(none, tl.where(x == INF, 1.0, 0.0), tl.where(x > -INF, 1.0, 0.0))
        y = tl.where(degenerate, exact, y)
        tl.store(y_ptr + row * stride_y + offs, y, mask=inside)
        tl.store(tau_ptr + row, tau)
        tl.store(c_ptr + row, c)
        tl.store(ok_ptr + row, ok.to(tl.int8))

    @triton.jit
    def threshold_backward_row_kernel(g_ptr, y_ptr, x_ptr, t_ptr, tau_ptr, c_ptr, gx_ptr, gk_ptr, gt_ptr, n,
                                      stride_g, stride_y, stride_x, stride_gx,
                                      FAMILY: tl.constexpr, BLOCK: tl.constexpr, NEED_T: tl.constexpr):  # fmt: skip
        """The implicit backward of one row: with d = φ'(z)/t on 0 < y < 1,
        ḡ = Σ g d / Σ d (0 when Σ d = 0), gx = d (g − ḡ), gk = ḡ, gt = −Σ z gx with z = (x − c)/t − τ."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        inside = offs < n
        y = tl.load(y_ptr + row * stride_y + offs, mask=inside, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * stride_g + offs, mask=inside, other=0.0).to(tl.float32)
        rt = 1.0 / tl.load(t_ptr + row).to(tl.float32)
        p = dphi(y, FAMILY)
        num = tl.sum(g * p, axis=0)
        den = tl.sum(p, axis=0)
        gbar = tl.where(den > 0.0, num / tl.where(den > 0.0, den, 1.0), 0.0)
        gx = p * (g - gbar) * rt
        tl.store(gx_ptr + row * stride_gx + offs, gx, mask=inside)
        tl.store(gk_ptr + row, gbar)
        if NEED_T:
            x = tl.load(x_ptr + row * stride_x + offs, mask=inside, other=0.0).to(tl.float32)
            z = (x - tl.load(c_ptr + row)) * rt - tl.load(tau_ptr + row)
            tl.store(gt_ptr + row, -tl.sum(tl.where(gx != 0.0, z * gx, 0.0), axis=0))

    # ------------------------------------------------------------------------------------------------------------
    # Normalised masks: long rows, a grid of (rows, blocks) programs per pass; the Newton loop runs on the host.
    # ------------------------------------------------------------------------------------------------------------
    @triton.jit
    def row_stats_kernel(x_ptr, part_ptr, n, stride_x, n_blocks, BLOCK: tl.constexpr):
        """Per block of a row: (min and max over the finite entries, #(> −inf), #(+inf)) into part (R, 4, blocks)."""
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        x = tl.load(x_ptr + row * stride_x + offs, mask=inside, other=-INF).to(tl.float32)
        finite = tl.abs(x) < INF
        base = part_ptr + row * 4 * n_blocks + blk
        tl.store(base, tl.min(tl.where(finite, x, INF), axis=0))
        tl.store(base + n_blocks, tl.max(tl.where(finite, x, -INF), axis=0))
        tl.store(base + 2 * n_blocks, tl.sum(tl.where(x > -INF, 1.0, 0.0), axis=0))
        tl.store(base + 3 * n_blocks, tl.sum(tl.where(x == INF, 1.0, 0.0), axis=0))

    @triton.jit
    def threshold_eval_kernel(x_ptr, t_ptr, tau_ptr, c_ptr, active_ptr, part_ptr, y_ptr, n, stride_x, stride_y,
                              n_blocks, FAMILY: tl.constexpr, BLOCK: tl.constexpr, WRITE: tl.constexpr):  # fmt: skip
        """Per block of an active row: (Σ y, Σ φ') at its τ into part (R, 2, blocks); with ``WRITE`` also the mask."""
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        if tl.load(active_ptr + row) != 0:
            offs = blk * BLOCK + tl.arange(0, BLOCK)
            inside = offs < n
            x = tl.load(x_ptr + row * stride_x + offs, mask=inside, other=-INF).to(tl.float32)
            rt = 1.0 / tl.load(t_ptr + row).to(tl.float32)
            y, d = phi((x - tl.load(c_ptr + row)) * rt - tl.load(tau_ptr + row), FAMILY)
            base = part_ptr + row * 2 * n_blocks + blk
            tl.store(base, tl.sum(y, axis=0))
            tl.store(base + n_blocks, tl.sum(d, axis=0))
            if WRITE:
                tl.store(y_ptr + row * stride_y + offs, y, mask=inside)

    @triton.jit
    def threshold_update_kernel(part_ptr, k_ptr, n_live_ptr, tau_ptr, lo_ptr, hi_ptr, active_ptr, ok_ptr, tol, n_blocks,
                                FAMILY: tl.constexpr, BLOCK_P: tl.constexpr):  # fmt: skip
        """The Newton step of each active row from its blocks' partial sums (see :func:`newton_step`); a row that is
        done is marked inactive. Partial sums are added in float32 (each is a block's float32 sum)."""
        row = tl.program_id(0).to(tl.int64)
        if tl.load(active_ptr + row) != 0:
            offs = tl.arange(0, BLOCK_P)
            s = tl.zeros([BLOCK_P], dtype=tl.float32)
            d = tl.zeros([BLOCK_P], dtype=tl.float32)
            for j in range(0, n_blocks, BLOCK_P):
                m = (offs + j) < n_blocks
                s += tl.load(part_ptr + row * 2 * n_blocks + j + offs, mask=m, other=0.0)
                d += tl.load(part_ptr + row * 2 * n_blocks + n_blocks + j + offs, mask=m, other=0.0)
            s_sum = tl.sum(s, axis=0)
            d_sum = tl.sum(d, axis=0)
            k = tl.load(k_ptr + row)
            n_live = tl.load(n_live_ptr + row)
            logit_k = tl.log(k / (n_live - k))
            tau, lo, hi, done, ok = newton_step(s_sum, d_sum, k, n_live, logit_k, tl.load(tau_ptr + row),
                                                tl.load(lo_ptr + row), tl.load(hi_ptr + row), tol * tl.maximum(k, 1.0),
                                                tl.load(active_ptr + row) == 0, FAMILY)  # fmt: skip
            tl.store(tau_ptr + row, tau)
            tl.store(lo_ptr + row, lo)
            tl.store(hi_ptr + row, hi)
            tl.store(ok_ptr + row, ok.to(tl.int8))
            tl.store(active_ptr + row, (done == 0).to(tl.int8))

    @triton.jit
    def exact_mask_kernel(x_ptr, none_ptr, full_ptr, y_ptr, n, stride_x, stride_y, BLOCK: tl.constexpr):
        """The exact 0/1 masks of the degenerate rows: #(+inf) ≥ k gives (x = +inf), k ≥ #(> −inf) gives (x > −inf)."""
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        none = tl.load(none_ptr + row) != 0
        full = tl.load(full_ptr + row) != 0
        if none | full:
            offs = blk * BLOCK + tl.arange(0, BLOCK)
            inside = offs < n
            x = tl.load(x_ptr + row * stride_x + offs, mask=inside, other=0.0).to(tl.float32)
            y = tl.where(none, tl.where(x == INF, 1.0, 0.0), tl.where(x > -INF, 1.0, 0.0))
            tl.store(y_ptr + row * stride_y + offs, y, mask=inside)

    @triton.jit
    def threshold_backward_sums_kernel(g_ptr, y_ptr, part_ptr, n, stride_g, stride_y, n_blocks,
                                       FAMILY: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        """First pass of the long-row backward: per block (Σ g φ', Σ φ') into part (R, 2, blocks)."""
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        y = tl.load(y_ptr + row * stride_y + offs, mask=inside, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * stride_g + offs, mask=inside, other=0.0).to(tl.float32)
        p = dphi(y, FAMILY)
        base = part_ptr + row * 2 * n_blocks + blk
        tl.store(base, tl.sum(g * p, axis=0))
        tl.store(base + n_blocks, tl.sum(p, axis=0))

    @triton.jit
    def threshold_backward_apply_kernel(g_ptr, y_ptr, x_ptr, t_ptr, tau_ptr, c_ptr, gbar_ptr, gx_ptr, part_ptr, n,
                                        stride_g, stride_y, stride_x, stride_gx, n_blocks,
                                        FAMILY: tl.constexpr, BLOCK: tl.constexpr, NEED_T: tl.constexpr):  # fmt: skip
        """Second pass: gx = φ' (g − ḡ)/t, and per block Σ z gx into part (R, blocks) when ``NEED_T``."""
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        y = tl.load(y_ptr + row * stride_y + offs, mask=inside, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * stride_g + offs, mask=inside, other=0.0).to(tl.float32)
        rt = 1.0 / tl.load(t_ptr + row).to(tl.float32)
        gx = dphi(y, FAMILY) * (g - tl.load(gbar_ptr + row)) * rt
        tl.store(gx_ptr + row * stride_gx + offs, gx, mask=inside)
        if NEED_T:
            x = tl.load(x_ptr + row * stride_x + offs, mask=inside, other=0.0).to(tl.float32)
            z = (x - tl.load(c_ptr + row)) * rt - tl.load(tau_ptr + row)
            tl.store(part_ptr + row * n_blocks + blk, tl.sum(tl.where(gx != 0.0, z * gx, 0.0), axis=0))

    # ------------------------------------------------------------------------------------------------------------
    # DFTopK.
    # ------------------------------------------------------------------------------------------------------------
    @triton.jit
    def dftopk_row_kernel(x_ptr, k_ptr, t_ptr, y_ptr, tau_ptr, idx_ptr, n, stride_x, stride_y, BLOCK: tl.constexpr):
        """One row of DFTopK: the k-th largest by exact bisection on the keys (no sort), the (k+1)-th by one more
        reduction, their indices (a: the lowest index holding x_(k); b: the lowest index holding x_(k+1) other than a;
        −1 for a missing order statistic: k = 0 or k = n), τ their midpoint, and y = σ((x − τ)/t) (where x = τ = ±inf:
        1 iff τ > 0)."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        inside = offs < n
        x = tl.load(x_ptr + row * stride_x + offs, mask=inside, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + row).to(tl.int32)
        rt = 1.0 / tl.load(t_ptr + row).to(tl.float32)
        key = float_key(x)
        kmin = tl.min(tl.where(inside, key, 2**31 - 1), axis=0).to(tl.int64)
        kmax = tl.max(tl.where(inside, key, -(2**31)), axis=0).to(tl.int64)
        ka = select_key(key, inside, k, kmin, kmax, 33).to(tl.int32)
        # x_(k+1) is x_(k) again when more than k entries reach it (a tie), else the largest key below it
        count_ge = tl.sum(tl.where(inside & (key >= ka), 1, 0), axis=0)
        below = tl.max(tl.where(inside & (key < ka), key, -(2**31)), axis=0)
        kb = tl.where(count_ge >= k + 1, ka, below)
        va = tl.where(k >= 1, key_float(ka), INF)
        vb = tl.where(k + 1 <= n, key_float(kb), -INF)
        a = tl.min(tl.where(inside & (key == ka), offs, NO_INDEX), axis=0)
        a = tl.where(k >= 1, a, -1)
        b = tl.min(tl.where(inside & (key == kb) & (offs != a), offs, NO_INDEX), axis=0)
        b = tl.where(k + 1 <= n, b, -1)
        tau = 0.5 * va + 0.5 * vb
        y = 1.0 / (1.0 + tl.exp(-((x - tau) * rt)))
        y = tl.where(y != y, tl.where(tau > 0.0, 1.0, 0.0), y)
        tl.store(y_ptr + row * stride_y + offs, y, mask=inside)
        tl.store(tau_ptr + row, tau)
        tl.store(idx_ptr + 2 * row, a.to(tl.int64))
        tl.store(idx_ptr + 2 * row + 1, b.to(tl.int64))

    @triton.jit
    def radix_histogram_kernel(x_ptr, prefix_ptr, hist_ptr, n, stride_x, n_blocks, SHIFT: tl.constexpr,
                               BLOCK: tl.constexpr):  # fmt: skip
        """One radix pass of the long-row selection: per block, the histogram (256 bins) of the key digit at bits
        [SHIFT, SHIFT + 8) of the entries whose higher digits equal those of the row's prefix; into hist
        (R, blocks, 256). Keys are offset to [0, 2^32) as int64."""
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        x = tl.load(x_ptr + row * stride_x + offs, mask=inside, other=0.0).to(tl.float32)
        ukey = float_key(x).to(tl.int64) + 2**31
        prefix = tl.load(prefix_ptr + row)
        match = inside & ((ukey >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
        digit = ((ukey >> SHIFT) & 255).to(tl.int32)
        hist = tl.histogram(digit, 256, mask=match)
        tl.store(hist_ptr + (row * n_blocks + blk) * 256 + tl.arange(0, 256), hist)

    @triton.jit
    def locate_kernel(x_ptr, ka_ptr, skip_ptr, part_ptr, n, stride_x, n_blocks, BLOCK: tl.constexpr):
        """Per block: #(key ≥ ka), the largest key below ka, and the lowest index holding ka other than ``skip``; into
        part (R, 3, blocks) int64 (keys offset to [0, 2^32); −1 for no key below; NO_INDEX for no index)."""
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        x = tl.load(x_ptr + row * stride_x + offs, mask=inside, other=0.0).to(tl.float32)
        ukey = float_key(x).to(tl.int64) + 2**31
        ka = tl.load(ka_ptr + row)
        skip = tl.load(skip_ptr + row)
        base = part_ptr + row * 3 * n_blocks + blk
        tl.store(base, tl.sum(tl.where(inside & (ukey >= ka), 1, 0).to(tl.int64), axis=0))
        tl.store(base + n_blocks, tl.max(tl.where(inside & (ukey < ka), ukey, -1), axis=0))
        hit = inside & (ukey == ka) & (offs.to(tl.int64) != skip)
        tl.store(base + 2 * n_blocks, tl.min(tl.where(hit, offs, NO_INDEX), axis=0).to(tl.int64))

    @triton.jit
    def dftopk_mask_kernel(x_ptr, t_ptr, tau_ptr, y_ptr, n, stride_x, stride_y, BLOCK: tl.constexpr):
        """y = σ((x − τ)/t) on a (rows, blocks) grid (where x = τ = ±inf: 1 iff τ > 0)."""
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        x = tl.load(x_ptr + row * stride_x + offs, mask=inside, other=0.0).to(tl.float32)
        rt = 1.0 / tl.load(t_ptr + row).to(tl.float32)
        tau = tl.load(tau_ptr + row)
        y = 1.0 / (1.0 + tl.exp(-((x - tau) * rt)))
        y = tl.where(y != y, tl.where(tau > 0.0, 1.0, 0.0), y)
        tl.store(y_ptr + row * stride_y + offs, y, mask=inside)

    @triton.jit
    def dftopk_backward_kernel(g_ptr, y_ptr, x_ptr, t_ptr, tau_ptr, gx_ptr, part_ptr, n, stride_g, stride_y, stride_x,
                               stride_gx, n_blocks, BLOCK: tl.constexpr, NEED_T: tl.constexpr):  # fmt: skip
        """gx = s = g σ'(z)/t (the caller adds −(Σ s)/2 at the two order statistics), and per block (Σ s, Σ s z) into
        part (R, 2, blocks), z = (x − τ)/t."""
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        y = tl.load(y_ptr + row * stride_y + offs, mask=inside, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * stride_g + offs, mask=inside, other=0.0).to(tl.float32)
        rt = 1.0 / tl.load(t_ptr + row).to(tl.float32)
        s = g * y * (1.0 - y) * rt
        tl.store(gx_ptr + row * stride_gx + offs, s, mask=inside)
        base = part_ptr + row * 2 * n_blocks + blk
        tl.store(base, tl.sum(s, axis=0))
        if NEED_T:
            x = tl.load(x_ptr + row * stride_x + offs, mask=inside, other=0.0).to(tl.float32)
            z = (x - tl.load(tau_ptr + row)) * rt
            tl.store(base + n_blocks, tl.sum(tl.where(s != 0.0, s * z, 0.0), axis=0))
