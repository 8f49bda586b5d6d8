"""The threshold family (sigmoid, lapsum, sparse p=2 and p=4/3), SOFT and DFTopK against independent references,
the width convention of ``temperature`` (the same T gives the same slope 1/T in every family), their convergence,
their gradients (float64 gradcheck) and their behaviour at extreme scales.

The references take each family's internal temperature: a call at ``temperature=T`` is compared with the
reference at ``internal_temperature(variant, T)`` (conftest). SOFT with its own ``epsilon`` is compared with a
Sinkhorn reference at ε = epsilon."""

from __future__ import annotations

import math
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from torch.autograd import gradcheck

import softtopk
from conftest import (
    NORMALISED_VARIANTS,
    PHI,
    SOFT_VARIANTS,
    internal_temperature,
    ref_dftopk,
    ref_threshold_mask,
    run,
    sinkhorn_soft,
    spaced,
)

TEMPERATURES = (0.01, 0.3, 1.0, 5.0)
THRESHOLD_VARIANTS = ("sigmoid", "lapsum", "sparse", "sparse43")


def _ks(n):
    return sorted({0, 1, 2, n // 2, n - 1, n}) + [2.5]


def _rows(seed, n, count=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64) * 1.5 for _ in range(count)]


# ----------------------------------------------------------------------------------------------------------
# Forward values against independent references.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", TEMPERATURES)
@pytest.mark.parametrize("variant", THRESHOLD_VARIANTS)
def test_threshold_family_matches_brentq(variant, t):
    for n in (7, 20):
        for x in _rows(n, n):
            for k in _ks(n):
                y = run(x, k, variant, temperature=t).numpy()
                ref = ref_threshold_mask(x.numpy(), k, internal_temperature(variant, t), variant)
                np.testing.assert_allclose(y, ref, rtol=0, atol=3e-9 * max(k, 1), err_msg=f"k={k}")


@pytest.mark.parametrize("variant", THRESHOLD_VARIANTS)
def test_threshold_family_float32_matches_brentq(variant):
    n = 12
    for t in TEMPERATURES:
        for x in _rows(3, n):
            for k in (1, 5, 2.5, n - 1):
                y = run(x.float(), k, variant, temperature=t)
                assert y.dtype == torch.float32
                ref = ref_threshold_mask(x.float().double().numpy(), k, internal_temperature(variant, t), variant)
                np.testing.assert_allclose(y.double().numpy(), ref, rtol=0, atol=5e-5 * max(k, 1))


def _threshold_batch_matches_rows(variant):
    """The batched solve equals the row-by-row reference (rows converge at different iterations)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 9, generator=g, dtype=torch.float64) * torch.tensor([[0.01], [1], [10], [100], [3]])
    k = torch.tensor([1.0, 4.0, 8.0, 2.5, 0.5], dtype=torch.float64)
    y = run(x, k, variant, temperature=0.7)
    for i in range(5):
        ref = ref_threshold_mask(x[i].numpy(), float(k[i]), internal_temperature(variant, 0.7), variant)
        np.testing.assert_allclose(y[i].numpy(), ref, atol=3e-9 * max(float(k[i]), 1))


@pytest.mark.parametrize("variant", THRESHOLD_VARIANTS)
def test_threshold_batch_matches_rows(variant):
    _threshold_batch_matches_rows(variant)


def _cvx_sparse(x, k, t, p):
    n = x.size
    y = cp.Variable(n)
    # objective divided by t (same argmax), better conditioned at small t
    reg = cp.sum_squares(y) / 2 if p == 2 else cp.sum(cp.power(y, 4 / 3)) / (4 / 3)
    prob = cp.Problem(cp.Maximize((x / t) @ y - reg), [y >= 0, y <= 1, cp.sum(y) == k])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cvxpy's own numpy warnings while evaluating power(y, 4/3) near 0
        # 1e-11: at the wider internal t of p=4/3 (T·1.89) the 1e-9 gaps left errors of ~1e-5 in y
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
    assert prob.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE)  # the 1e-5 comparison below is the real check
    return np.asarray(y.value)


@pytest.mark.parametrize("p", [2, 4 / 3])
@pytest.mark.parametrize("t", TEMPERATURES)
def test_sparse_matches_cvxpy(p, t):
    rng = np.random.default_rng(int(t * 100) + int(p * 10))
    n = 12
    for k in (1, 3, 2.5, n - 1):
        x = rng.normal(size=n) * 1.5
        y = softtopk.topk_mask(torch.tensor(x), k, method="sparse", p=p, temperature=t).numpy()
        ti = internal_temperature("sparse", t, p=p)
        np.testing.assert_allclose(y, _cvx_sparse(x, k, ti, p), atol=1e-5, err_msg=f"k={k}")


@pytest.mark.parametrize("p", [2, 4 / 3])
@pytest.mark.parametrize("t", TEMPERATURES)
def test_sparse_closed_form(p, t):
    """y = clip(φ((x − τ)/t), 0, 1) for one scalar τ, φ(z)=z (p=2) or max(z,0)³ (p=4/3), t the internal
    temperature; and exactly sparse."""
    T, t = t, internal_temperature("sparse", t, p=p)
    phi_inv = (lambda y: y) if p == 2 else (lambda y: np.cbrt(y))
    phi = (lambda z: np.clip(z, 0, 1)) if p == 2 else (lambda z: np.clip(np.maximum(z, 0) ** 3, 0, 1))
    for seed in range(3):
        x = np.random.default_rng(seed).normal(size=15) * 2
        for k in (1, 4, 7.5, 14):
            y = softtopk.topk_mask(torch.tensor(x), k, method="sparse", p=p, temperature=T).numpy()
            assert abs(y.sum() - k) <= 1e-9 * max(k, 1)
            inner = (y > 0) & (y < 1)
            if inner.any():
                taus = x[inner] - t * phi_inv(y[inner])
                np.testing.assert_allclose(taus, taus.mean(), atol=1e-8 * max(1, np.abs(x).max()))
                tau = taus.mean()
                np.testing.assert_allclose(y, phi((x - tau) / t), atol=1e-9)
            else:  # all at 0 or 1: some τ separates them with the right margins
                assert set(np.unique(y)) <= {0.0, 1.0}
                zero, one = x[y == 0], x[y == 1]
                if zero.size and one.size:
                    assert zero.max() <= one.min() - t + 1e-12
    # exact sparsity: with a small temperature most entries are exactly 0 or 1
    y = softtopk.topk_mask(torch.linspace(-3, 3, 31, dtype=torch.float64), 5, method="sparse", temperature=0.05)
    assert ((y == 0) | (y == 1)).sum() >= 28


@pytest.mark.parametrize("largest", [False, True])
@pytest.mark.parametrize("t", TEMPERATURES)
def test_soft_matches_sinkhorn(t, largest):
    """method="soft", epsilon=ε is SOFT top-k at ε (relative to max C)."""
    for seed, n in ((0, 8), (1, 13)):
        x = np.random.default_rng(seed).normal(size=n) * 2
        for k in (1, 3, n - 1, 2.5):
            y = softtopk.topk_mask(torch.tensor(x), k, method="soft", epsilon=t, largest=largest).numpy()
            ref = sinkhorn_soft(x, k, t, largest)
            np.testing.assert_allclose(y, ref, atol=1e-8 * max(k, 1), err_msg=f"n={n} k={k}")
        # k = 0 and k = n are the exact empty / full masks
        for k, val in ((0, 0.0), (n, 1.0)):
            y = softtopk.topk_mask(torch.tensor(x), k, method="soft", epsilon=t, largest=largest)
            assert torch.equal(y, torch.full_like(y, val))


@pytest.mark.parametrize("largest", [False, True])
def test_soft_temperature_is_sinkhorn_in_score_units(largest):
    """SOFT's converged plan is a sigmoid mask: n·Γ_i1 = σ((2x_i/M − c)/ε) with M = max C, i.e. the sigmoid mask
    with internal t = εM/2. In the width convention (t = T/4) SOFT at ε is method="soft" at temperature T = 2εM."""
    for seed, n in ((2, 9), (3, 14)):
        x = np.random.default_rng(seed).normal(size=n) * 2
        M = np.max((x[:, None] - np.array([0.0, 1.0])[None, :]) ** 2)
        for eps in (0.05, 0.3, 2.0):
            for k in (1, 4, 2.5):
                T = 2 * eps * M
                y = softtopk.topk_mask(torch.tensor(x), k, method="soft", temperature=T, largest=largest).numpy()
                np.testing.assert_allclose(y, sinkhorn_soft(x, k, eps, largest), atol=1e-8 * max(k, 1))


def test_soft_scores_not_in_unit_interval():
    """Scores outside [0, 1] on one side only (max C comes from (x−0)² or (x−1)²)."""
    for x in (np.array([3.0, 4.0, 5.5, 7.0, 3.3]), np.array([-7.0, -2.0, -5.0, -1.5]), np.array([0.2, 0.4, 0.9, 0.5])):
        for largest in (False, True):
            y = softtopk.topk_mask(torch.tensor(x), 2, method="soft", epsilon=0.3, largest=largest).numpy()
            np.testing.assert_allclose(y, sinkhorn_soft(x, 2, 0.3, largest), atol=2e-8)


@pytest.mark.parametrize("t", TEMPERATURES)
def test_soft_largest_identity(t):
    """soft(x, k, largest=True) == 1 − soft(x, n−k, largest=False): the same transport plan."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 10, generator=g, dtype=torch.float64) * 3
    for k in range(11):
        a = softtopk.topk_mask(x, k, method="soft", epsilon=t, largest=True)
        b = softtopk.topk_mask(x, 10 - k, method="soft", epsilon=t, largest=False)
        torch.testing.assert_close(a, 1 - b, atol=1e-8 * max(k, 1), rtol=0)


@pytest.mark.parametrize("t", TEMPERATURES)
def test_dftopk_matches_literal_formula(t):
    for seed, n in ((0, 6), (1, 11)):
        x = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for k in range(n + 1):
            ti = internal_temperature("dftopk", t)
            y = softtopk.topk_mask(x, k, method="dftopk", temperature=t)
            np.testing.assert_allclose(y.numpy(), ref_dftopk(x.numpy(), k, ti), rtol=1e-13, atol=1e-15)
            # smallest: the same formula on −x
            y = softtopk.topk_mask(x, k, method="dftopk", temperature=t, largest=False)
            np.testing.assert_allclose(y.numpy(), ref_dftopk(-x.numpy(), k, ti), rtol=1e-13, atol=1e-15)


def test_dftopk_per_row_k_and_not_normalised():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 9, generator=g, dtype=torch.float64)
    k = torch.tensor([0, 1, 4, 8, 9, 3])
    y = softtopk.topk_mask(x, k, method="dftopk", temperature=0.5)
    ti = internal_temperature("dftopk", 0.5)
    for i in range(6):
        np.testing.assert_allclose(y[i].numpy(), ref_dftopk(x[i].numpy(), int(k[i]), ti), rtol=1e-13, atol=1e-15)
    assert not torch.allclose(y.sum(-1), k.double())  # DFTopK is not normalised


def test_dftopk_gradient_flows_through_tau():
    """The gradient equals autograd through the literal formula (τ via torch.sort: ½ to each of x_(k), x_(k+1))."""
    x = spaced(9, generator=torch.Generator().manual_seed(3))
    w = torch.randn(9, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for k in range(10):
        for t in (0.3, 2.0):
            xa = x.clone().requires_grad_()
            (softtopk.topk_mask(xa, k, method="dftopk", temperature=t) * w).sum().backward()
            xb = x.clone().requires_grad_()
            s = torch.sort(xb, descending=True).values
            inf = torch.tensor([math.inf], dtype=torch.float64)
            padded = torch.cat([inf, s, -inf])
            tau = (padded[k] + padded[k + 1]) / 2
            y = torch.sigmoid((xb - tau) / internal_temperature("dftopk", t))
            (y * w).sum().backward()
            torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-14)
    # and τ's own gradient is exactly ½ per entry: the direct term of those two entries is reduced by ½ Σ s
    k, T = 3, 1.0
    t = internal_temperature("dftopk", T)
    xa = x.clone().requires_grad_()
    softtopk.topk_mask(xa, k, method="dftopk", temperature=T).sum().backward()
    y = torch.sigmoid((x - (torch.sort(x, descending=True).values[k - 1 : k + 1].mean())) / t)
    s = y * (1 - y) / t
    expected = s.clone()
    order = torch.argsort(x, descending=True)
    expected[order[k - 1]] -= 0.5 * s.sum()
    expected[order[k]] -= 0.5 * s.sum()
    torch.testing.assert_close(xa.grad, expected, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------------------
# The width convention: the same temperature T gives the same slope 1/T at y = 1/2 in every family.
# ----------------------------------------------------------------------------------------------------------
def _gumbel_upper(z):
    """P(z + G > 0) for standard Gumbel G: 1 − F(−z), F(g) = exp(−e^(−g))."""
    return 1.0 - np.exp(-np.exp(z))


def _normal_upper(z):
    return 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


@pytest.mark.parametrize("T", [0.05, 1.0, 7.0])
def test_internal_temperature_factors_from_the_definitions(T):
    """conftest.internal_temperature against a numerical derivative of each family's φ at φ = 1/2."""
    cases = [(v, PHI[v], internal_temperature(v, T)) for v in ("sigmoid", "lapsum", "sparse", "sparse43")]
    cases += [
        ("dftopk", PHI["sigmoid"], internal_temperature("dftopk", T)),
        ("soft", PHI["sigmoid"], internal_temperature("soft", T)),
        ("sparse p=4/3", PHI["sparse43"], internal_temperature("sparse", T, p=4 / 3)),
        ("perturbed gaussian", _normal_upper, internal_temperature("perturbed", T)),
        ("perturbed gumbel", _gumbel_upper, internal_temperature("perturbed", T, p="gumbel")),
    ]
    for name, phi, t in cases:
        z0 = brentq(lambda z, phi=phi: float(phi(np.array(z))) - 0.5, -5.0, 5.0, xtol=1e-15)
        h = 1e-6 * t
        slope = (float(phi(np.array((z0 * t + h) / t))) - float(phi(np.array((z0 * t - h) / t)))) / (2 * h)
        assert math.isclose(slope, 1 / T, rel_tol=1e-6), (name, slope * T)


@pytest.mark.parametrize("T", [0.3, 1.5])
@pytest.mark.parametrize("variant", ["sigmoid", "lapsum", "sparse", "sparse43", "dftopk", "soft", "straight_through"])
def test_temperature_transfers_across_methods(variant, T):
    """dy_i/dx_i ≈ 1/T at an entry with y_i ≈ 1/2 of a long row (n = 10⁴ standard normal scores, k = n/2: the
    normalisation term φ_i'²/Σφ' is ~1e-3 of it). DFTopK's two pivot entries (the k-th and (k+1)-th largest, whose
    τ moves with them) are skipped. straight_through: the sigmoid mask's gradient, at the sigmoid's y_i ≈ 1/2."""
    n = 10_000
    k = n // 2
    x = torch.randn(n, generator=torch.Generator().manual_seed(40), dtype=torch.float64)
    y = run(x, k, "sigmoid" if variant == "straight_through" else variant, temperature=T).detach()
    dist = (y - 0.5).abs()
    order = torch.argsort(x, descending=True)
    dist[order[k - 1]] = dist[order[k]] = math.inf
    i = int(dist.argmin())
    assert dist[i] < 5e-3, float(dist[i])
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(run(xr, k, variant, temperature=T)[i], xr)
    assert math.isclose(float(g[i]) * T, 1.0, rel_tol=0.05), (variant, float(g[i]) * T)


# ----------------------------------------------------------------------------------------------------------
# Convergence of the normalised methods.
# ----------------------------------------------------------------------------------------------------------
def _sum_slack(y, k):
    """Rounding of a length-n sum in y's dtype (the library checks Σy in its compute dtype; the test sums the
    same y exactly in float64): 2·log2(n)·eps·k."""
    return 2 * math.ceil(math.log2(max(y.shape[-1], 2))) * torch.finfo(y.dtype).eps * max(k, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", NORMALISED_VARIANTS)
def test_convergence_tolerance(variant, dtype):
    bound = 1e-5 if dtype == torch.float32 else 1e-9
    g = torch.Generator().manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "did not converge" warning either
        for n in (3, 17, 300, 5000):  # 5000 > 4·1024 takes the subsampled warm start
            for scale in (1e-3, 1.0, 30.0):
                x = (torch.randn(3, n, generator=g, dtype=torch.float64) * scale).to(dtype)
                for t in TEMPERATURES:
                    t_int = t if variant == "soft_eps" else internal_temperature(variant, t)
                    if dtype == torch.float32 and scale / t_int > 50:
                        continue  # |x|/t in the hundreds: see test_float32_convergence_large_scores_over_temperature
                    for k in (1, n / 3, n - 1, 0.25):
                        y = run(x, k, variant, temperature=t)
                        err = (y.double().sum(-1) - k).abs().max().item()
                        assert err <= bound * max(k, 1) + _sum_slack(y, k), (n, scale, t, k, err)
                        assert y.min() >= 0 and y.max() <= 1


@pytest.mark.parametrize("variant", NORMALISED_VARIANTS)
def test_float32_convergence_large_scores_over_temperature(variant):
    """float32, |x|/t large (offset logits, or t small next to the scores): the documented 1e-5·max(k,1) bound
    on |Σy − k| still holds, and the mask is translation invariant (it depends on x − τ only)."""
    cases = [
        (torch.tensor([1000.0, 1000.5, 999.0]), 0.1, 1.5),
        (torch.tensor([1000.0, 1000.5, 999.0]), 0.01, 0.25),
        (torch.randn(3, generator=torch.Generator().manual_seed(1)) * 30, 0.01, 0.25),
        (torch.randn(20, generator=torch.Generator().manual_seed(2)) + 500.0, 0.05, 4.0),
    ]
    for x, t, k in cases:
        y = run(x, k, variant, temperature=t)
        err = (y.double().sum() - k).abs().item()
        assert err <= 1e-5 * max(k, 1) + _sum_slack(y, k), (x.tolist(), t, k, err)
        if variant != "soft_eps":  # SOFT's cost normalisation is not translation invariant by definition
            shifted = run(x - x.mean(), k, variant, temperature=t)
            torch.testing.assert_close(y, shifted, atol=2e-5 * max(k, 1), rtol=0)


@pytest.mark.parametrize("variant", THRESHOLD_VARIANTS)
def test_large_row_matches_reference(variant):
    """The warm start from a subsample (n > 4096) does not change the answer."""
    x = torch.randn(5000, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for k, t in ((10, 0.05), (2500, 1.0), (4990.5, 0.3)):
        y = run(x, k, variant, temperature=t).numpy()
        ref = ref_threshold_mask(x.numpy(), k, internal_temperature(variant, t), variant)
        np.testing.assert_allclose(y, ref, atol=3e-9 * k)


def test_tol_and_max_iter_options():
    x = torch.randn(4, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    loose = softtopk.topk_mask(x, 5, tol=1e-2)
    tight = softtopk.topk_mask(x, 5, tol=1e-12)
    assert (tight.sum(-1) - 5).abs().max() <= 1e-11
    assert (loose.sum(-1) - 5).abs().max() <= 5e-2
    with pytest.warns(RuntimeWarning, match="max_iter"):
        softtopk.topk_mask(x * 100, 5, max_iter=1, tol=1e-14)


# ----------------------------------------------------------------------------------------------------------
# Gradients: float64 gradcheck.
# ----------------------------------------------------------------------------------------------------------
def _kink_margin(variant, x, k, t):
    """Smallest distance of any z_i = (x_i − τ)/t to a kink of φ (sparse only); +inf for smooth families.

    Every row must also have an interior entry (0 < y < 1), else its gradient is trivially zero.
    """
    if variant not in ("sparse", "sparse43"):
        return math.inf
    y = run(x, k, variant, temperature=t, tol=1e-13)
    t = internal_temperature(variant, t)
    inner = (y > 0) & (y < 1)
    if not bool(inner.any(-1).all()):
        return 0.0
    yy = y if variant == "sparse" else y.pow(1 / 3)
    tau = torch.where(inner, x - t * yy, 0.0).sum(-1, keepdim=True) / inner.sum(-1, keepdim=True)
    z = (x - tau) / t
    kinks = [1.0] if variant == "sparse43" else [0.0, 1.0]
    return min((z - c).abs().min().item() for c in kinks)


def _smooth_input(variant, n, k, t, batch=(), seed=0):
    """Spaced (tie-free) scores whose z stay ≥ 1e-3 away from the kinks of sparse; deterministic."""
    for s in range(seed, seed + 200):
        x = spaced(n, gap=0.37, generator=torch.Generator().manual_seed(s), batch=batch)
        if _kink_margin(variant, x, k, t) > 1e-3:
            return x
    raise AssertionError("no smooth input found")


GC = dict(eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("variant", ["dftopk"] + NORMALISED_VARIANTS)  # hard, straight_through: test_baselines.py
def test_gradcheck_x(variant):
    opts = {"tol": 1e-13} if variant in NORMALISED_VARIANTS else {}
    for k, t in ((1, 0.3), (3, 1.0), (2.5, 2.0), (7, 0.7), (1, 0.9)):
        if variant.startswith("sparse") and internal_temperature(variant, t) < 0.5:
            continue  # t below the score gap: sparse is exactly hard there (zero gradient, no interior)
        if variant == "dftopk" and k != int(k):
            continue
        x = _smooth_input(variant, 8, k, t, batch=(2,)).requires_grad_()
        assert gradcheck(lambda x, k=k, t=t: run(x, k, variant, temperature=t, **opts), (x,), **GC), (k, t)


@pytest.mark.parametrize("variant", NORMALISED_VARIANTS)
def test_gradcheck_k_and_temperature(variant):
    x = _smooth_input(
        variant,
        8,
        torch.tensor([[2.5], [4.0], [1.2]], dtype=torch.float64),
        torch.tensor([[0.8], [1.5], [0.6]], dtype=torch.float64),
        batch=(3,),
    )
    k = torch.tensor([2.5, 4.0, 1.2], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.8, 1.5, 0.6], dtype=torch.float64, requires_grad=True)
    xr = x.clone().requires_grad_()

    def f(x, k, t):
        return run(x, k, variant, temperature=t, tol=1e-13)

    assert gradcheck(f, (xr, k, t), **GC)
    # scalar (0-d) k and temperature tensors broadcast over the batch; their gradient sums the rows
    k0 = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    t0 = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    x = _smooth_input(variant, 8, 3.0, 0.9, batch=(2,), seed=50).requires_grad_()
    assert gradcheck(f, (x, k0, t0), **GC)


def test_gradcheck_dftopk_temperature():
    x = spaced(8, batch=(2,)).requires_grad_()
    t = torch.tensor([0.4, 1.3], dtype=torch.float64, requires_grad=True)
    for k in (0, 1, 3, 7, 8):
        assert gradcheck(lambda x, t, k=k: softtopk.topk_mask(x, k, method="dftopk", temperature=t), (x, t), **GC)


@pytest.mark.parametrize("variant", ["dftopk", "sigmoid", "soft", "soft_eps", "sparse", "sparse43", "lapsum"])
def test_gradcheck_dim0_3d_per_row_k(variant):
    """dim=0 of a (n, 2, 3) tensor, one k per row, in both accepted k shapes."""
    n = 7
    integer = variant == "dftopk"
    kvals = torch.tensor([[1, 2, 3], [4, 6, 5]], dtype=torch.float64)
    if not integer:
        kvals = kvals + torch.tensor([[0.5, 0.0, -0.5], [0.25, 0.0, 0.5]], dtype=torch.float64)
    t = 0.9
    base = None
    for s in range(200):
        cand = spaced(n, generator=torch.Generator().manual_seed(100 + s), batch=(2, 3)).permute(2, 0, 1)
        rows = cand.permute(1, 2, 0)
        if _kink_margin(variant, rows, kvals.unsqueeze(-1), t) > 1e-3:
            base = cand.contiguous()
            break
    assert base is not None
    opts = {} if integer else {"tol": 1e-13}
    for k in (kvals, kvals.unsqueeze(0)):  # batch shape (2, 3) and keepdim shape (1, 2, 3)
        kk = k if integer else k.clone().requires_grad_()
        ins = (base.clone().requires_grad_(),) + (() if integer else (kk,))

        def f(x, *kk_, k=k):
            return run(x, kk_[0] if kk_ else k.long(), variant, temperature=t, dim=0, **opts)

        assert gradcheck(f, ins, **GC)


def test_gradient_wrt_k_sums_to_one():
    """∂(Σ_i y_i)/∂k = 1 for every row of every normalised method (k requires grad)."""
    x = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    for variant in NORMALISED_VARIANTS:
        k = torch.tensor([1.5, 3.0, 5.0, 8.25], dtype=torch.float64, requires_grad=True)
        run(x, k, variant, temperature=2.0).sum().backward()
        torch.testing.assert_close(k.grad, torch.ones_like(k), atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Extreme scales.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e30, 1e-30])
@pytest.mark.parametrize("variant", SOFT_VARIANTS + ["hard"])
def test_extreme_scales(variant, scale, dtype):
    g = torch.Generator().manual_seed(13)
    x0 = (torch.randn(3, 9, generator=g, dtype=torch.float64) * scale).to(dtype)
    for t_val in (0.01, 1.0):
        x = x0.clone().requires_grad_()
        t = torch.tensor(t_val, dtype=dtype, requires_grad=True)
        y = run(x, 4, variant, temperature=t)
        assert y.dtype == dtype
        assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
        if variant in NORMALISED_VARIANTS:
            assert (y.double().sum(-1) - 4).abs().max() <= 1e-4
        w = torch.randn(3, 9, generator=g).to(dtype)
        (y * w).sum().backward()
        assert torch.isfinite(x.grad).all(), (variant, scale, t_val)
        assert t.grad is None or torch.isfinite(t.grad).all()
        if scale == 1e30 and variant not in ("soft_eps",):
            # gaps of ~1e30 ≫ t: every method is the hard mask
            assert torch.equal(y.detach().round(), y.detach()) or variant == "dftopk"
            hard = softtopk.topk_mask(x0, 4, method="hard")
            torch.testing.assert_close(y.detach(), hard)


# ----------------------------------------------------------------------------------------------------------
# Double backward: backward is once_differentiable, so a second differentiation must fail loudly.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["linear", "quadratic"])
@pytest.mark.parametrize("variant", SOFT_VARIANTS)
def test_double_backward_raises(variant, loss):
    x = spaced(6, batch=(2,)).requires_grad_()
    y = run(x, 2, variant, temperature=0.7)
    w = torch.randn(2, 6, dtype=torch.float64)
    out = (y * w).sum() if loss == "linear" else (y * y * w).sum()
    (g,) = torch.autograd.grad(out, x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad((g * w).sum(), x)


@pytest.mark.parametrize("variant", SOFT_VARIANTS)
def test_double_backward_message(variant):
    x = spaced(6).requires_grad_()
    y = run(x, 2, variant, temperature=0.7)
    (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|once_differentiable"):
        g.sum().backward()


@pytest.mark.parametrize("ties", [False, True])
def test_kth_pair_selection_on_long_rows(ties):
    """The sampled-window selection of DFTopK (rows of n >= 16384) returns exactly the k-th and (k+1)-th largest
    values, and indices that hold them, for small, middle and large k, with and without ties."""
    from softtopk.threshold import _kth_pair

    g = torch.Generator().manual_seed(21)
    n = 20000
    x = torch.randn(4, n, generator=g)
    if ties:
        x = (x * 20).round()
    ref = x.sort(-1, descending=True).values
    for k in (1, 10, 300, n // 32 + 1, n // 3, n // 2, n - 100, n - 1):
        vals, idx = _kth_pair(x, k)
        assert torch.equal(vals, ref[:, [k - 1, k]]), k
        assert torch.equal(x.gather(-1, idx), vals), k


@pytest.mark.parametrize("variant", ["sigmoid", "sparse", "sparse43", "lapsum"])
@pytest.mark.parametrize("dtype, offset", [(torch.float32, 1e15), (torch.float32, 1e38), (torch.float64, 1e30)])
def test_ties_at_a_large_offset(variant, dtype, offset):
    """Issue 14 #4: three tied top scores at a large offset, k = 2: each must get 2/3. x/t resolves τ only to
    ulp(x/t), so the first solve stalls at Σy = 0 or 3; the re-solve is centred on the score nearest the threshold,
    with its bracket found anew (it returned all zeros or 1/2 each before)."""
    x = torch.tensor([[offset, offset, offset, -offset, 0.0]], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        y = run(x, 2, variant, temperature=0.5)
    expected = torch.tensor([[2 / 3, 2 / 3, 2 / 3, 0.0, 0.0]], dtype=dtype)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-9)


# ----------------------------------------------------------------------------------------------------------
# The numba kernel (float32, CPU, eager) against the pure-torch reference solver.
# ----------------------------------------------------------------------------------------------------------
def _kernel_available():
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


needs_numba = pytest.mark.skipif(not _kernel_available(), reason="numba is not installed (the `fast` extra)")


def _both_backends(fn):
    """``fn()`` with the numba kernel and with the torch reference: the two results."""
    from softtopk import threshold

    out = {}
    try:
        for backend in ("numba", "torch"):
            threshold.BACKEND["threshold"] = backend
            out[backend] = fn()
    finally:
        threshold.BACKEND["threshold"] = "numba"
    return out["numba"], out["torch"]


@needs_numba
def test_kernel_is_used_for_float32_cpu_only():
    from softtopk.threshold import threshold_backend

    assert threshold_backend(torch.zeros(2, 3)) == "numba"
    assert threshold_backend(torch.zeros(2, 3, dtype=torch.float64)) == "torch"
    assert threshold_backend(torch.func.vmap(lambda v: v)(torch.zeros(2, 3))) == "numba"  # unwrapped result
    seen = []
    torch.func.vmap(lambda v: seen.append(threshold_backend(v)) or v)(torch.zeros(2, 3))
    assert seen == ["torch"]


@needs_numba
@pytest.mark.parametrize("variant", ["sigmoid", "sparse", "sparse43", "lapsum", "soft"])
@pytest.mark.parametrize(
    "shape, k",
    [((64, 8), 2), ((16, 200), 20), ((4, 1000), 5), ((3, 5000), 700), ((2, 40000), 4), ((5, 1), 0.5), ((6, 7), 7)],
)
def test_kernel_matches_reference(variant, shape, k):
    """Values and gradients (x, per-row k, per-row temperature) of the kernel equal the reference's to float32
    tolerance, and Σy = k."""
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(shape, generator=g)
    gy = torch.randn(shape, generator=g)
    k0 = torch.full(shape[:-1], float(k)) * torch.linspace(0.5, 1.0, shape[0]) if k not in (0, shape[-1]) else None
    t0 = torch.linspace(0.1, 2.0, shape[0])

    def fn():
        x = x0.clone().requires_grad_()
        kk = k0.clone().requires_grad_() if k0 is not None else k
        t = t0.clone().requires_grad_()
        y = run(x, kk, variant, temperature=t)
        y.backward(gy)
        return y.detach(), x.grad, None if k0 is None else kk.grad, t.grad

    numba_out, torch_out = _both_backends(fn)
    expect_k = k0 if k0 is not None else torch.full(shape[:-1], float(k))
    torch.testing.assert_close(numba_out[0].sum(-1), expect_k, rtol=0, atol=1e-4 * max(k, 1))
    for a, b, what in zip(numba_out, torch_out, ("y", "grad x", "grad k", "grad t")):
        if b is not None:
            scale = max(float(b.abs().max()), 1.0)
            torch.testing.assert_close(a, b, rtol=0, atol=2e-3 * scale, msg=what)


def _sparse_rows(case: str) -> tuple[torch.Tensor, float, float]:
    """(float32 scores, k, temperature) that send the sparse families' kernel through each way of its windows."""
    g = torch.Generator().manual_seed(21)
    if case == "pair":  # whole k < 32: the window from the block maxima's k-th and (k+1)-th largest
        return torch.randn(6, 1000, generator=g), 10, 0.3
    if case == "pair_falls_short":  # the top k + 1 in one block: the maxima's k-th is far below the row's
        return torch.randn(3, 2000, generator=g).sort(-1, descending=True).values, 12, 0.05
    if case == "sampled":  # k >= 32 in a long row: the window from a subsample's order statistics
        return torch.randn(3, 20000, generator=g), 300, 0.3
    if case == "sampled_real_k":
        return torch.randn(3, 20000, generator=g), 250.5, 0.1
    if case == "wide":  # most of the row inside the window: the steps over the row instead
        return torch.randn(3, 2000, generator=g), 10, 30.0
    if case == "heavy_tail":  # a start far from the root: windows that miss, move and widen
        return torch.empty(3, 20000).exponential_(generator=g) ** 3 * 100.0, 153, 0.01
    raise AssertionError(case)


@needs_numba
@pytest.mark.parametrize("p", [2, 4 / 3])
@pytest.mark.parametrize("case", ["pair", "pair_falls_short", "sampled", "sampled_real_k", "wide", "heavy_tail"])
@pytest.mark.parametrize("straight_through", [False, True])
def test_sparse_kernel_windows_find_the_exact_root(p, case, straight_through):
    """The sparse families' kernel takes its Newton steps on a window of the row (the entries that can be inside
    (0, 1) for τ in a bracket from order statistics); whichever way the window goes, the mask and its gradient are
    those of the float64 reference solved to 1e-12, and Σy = k to the float32 tolerance."""
    x, k, t = _sparse_rows(case)
    if straight_through and k != int(k):
        pytest.skip("straight-through takes a whole k")
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(22))

    def solve(scores, **kw):
        xr = scores.clone().requires_grad_()
        y = softtopk.topk_mask(xr, k, method="sparse", p=p, temperature=t, straight_through=straight_through, **kw)
        y.backward(gy.to(scores.dtype))
        return y.detach().double(), xr.grad.double()

    y, grad = solve(x)
    y_ref, grad_ref = solve(x.double(), tol=1e-12)
    if straight_through:
        assert torch.equal(y, y_ref)
    else:
        torch.testing.assert_close(y.sum(-1), torch.full(x.shape[:-1], float(k), dtype=torch.float64),
                                   rtol=0, atol=1e-5 * k)  # fmt: skip
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-3)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=2e-3 * max(float(grad_ref.abs().max()), 1.0))


@needs_numba
@pytest.mark.parametrize("variant", ["sigmoid", "sparse", "lapsum"])
def test_kernel_hands_rows_with_infinities_to_reference(variant):
    """-inf padding and +inf scores: the kernel declines and the reference solves the call, identically."""
    x = torch.randn(3, 10)
    x[0, :4] = -math.inf
    x[1, 0] = math.inf
    numba_out, torch_out = _both_backends(lambda: run(x, 3, variant, temperature=0.5))
    assert torch.equal(numba_out, torch_out)


@needs_numba
@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_keep_torchs_thread_count(threads):
    # numba's OpenMP layer sets OpenMP's thread count at every launch, and torch reads its own from OpenMP: the
    # kernels must run on torch's count and leave it as it was (a user's torch.set_num_threads(1) survives them)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        x = torch.randn(512, 100, requires_grad=True)
        softtopk.topk_mask(x, 5, method="sigmoid").sum().backward()
        assert torch.get_num_threads() == threads
        softtopk.soft_rank(torch.randn(64, 100, requires_grad=True)).sum().backward()
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


@needs_numba
@pytest.mark.parametrize(
    "shape, k", [((64, 8), 2), ((16, 200), 20), ((4, 1000), 5), ((3, 5000), 700), ((2, 40000), 4), ((2, 40000), 300)]
)
@pytest.mark.parametrize("per_row", [False, True])
def test_dftopk_kernel_matches_reference(shape, k, per_row):
    """DFTopK's kernel (selection in numba, the sigmoid in torch, the backward in numba) against the torch path:
    values and gradients (x and a per-row temperature), int k and per-row k, largest=False."""
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(shape, generator=g)
    gy = torch.randn(shape, generator=g)
    kk = torch.randint(1, min(k + 10, shape[-1]), shape[:-1] + (1,), generator=g) if per_row else k
    t0 = torch.linspace(0.1, 2.0, shape[0]).unsqueeze(-1)
    for largest in (True, False):

        def fn(largest=largest):
            x, t = x0.clone().requires_grad_(), t0.clone().requires_grad_()
            y = softtopk.topk_mask(x, kk, method="dftopk", temperature=t, largest=largest)
            y.backward(gy)
            return y.detach(), x.grad, t.grad

        for a, b, what in zip(*_both_backends(fn), ("y", "grad x", "grad t")):
            # float32 sums over a row (the reference) against float64 ones (the kernel): 1e-4 of the largest entry
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * max(float(b.abs().max()), 1.0), msg=what)


@needs_numba
@pytest.mark.parametrize("shape", [(64, 8), (33, 16), (7, 2), (5, 17)])
def test_dftopk_kernel_short_rows_one_temperature(shape):
    """Rows of up to 16 entries with one temperature take DFTopK's kernel path that computes the sigmoid of many
    rows in one loop: values and gradients as the torch path's, per-row k, largest=False."""
    g = torch.Generator().manual_seed(22)
    x0 = torch.randn(shape, generator=g)
    gy = torch.randn(shape, generator=g)
    per_row = torch.randint(1, shape[-1], shape[:-1] + (1,), generator=g)
    for kk, largest in ((1, True), (shape[-1] - 1, True), (per_row, True), (per_row, False)):

        def fn(kk=kk, largest=largest):
            x = x0.clone().requires_grad_()
            y = softtopk.topk_mask(x, kk, method="dftopk", temperature=0.3, largest=largest)
            y.backward(gy)
            return y.detach(), x.grad

        for a, b in zip(*_both_backends(fn)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * max(float(b.abs().max()), 1.0))


@needs_numba
def test_dftopk_kernel_hands_ties_and_infinities_to_reference():
    x = torch.randn(4, 12)
    x[0, :3] = -math.inf  # padding
    x[1, 5] = math.inf
    x[2, :] = torch.tensor([3.0, 2.0, 2.0, 1.0] * 3)  # ties at the k-th value
    for k in (2, 5):
        numba_out, torch_out = _both_backends(lambda k=k: softtopk.topk_mask(x, k, method="dftopk", temperature=0.5))
        assert torch.equal(numba_out, torch_out)


@needs_numba
def test_dftopk_kernel_ties_and_indices_in_long_rows():
    """In rows long enough for the block selection, DFTopK's kernel reads the ties and the first indices of the
    k-th and (k+1)-th largest off the entries that selection keeps. Ties elsewhere in the row, the two values in
    one block or in the tail after the last whole block, a sorted row, a row whose bound keeps more entries than
    the scratch holds (the selection then scans the row and the sigmoid pass finds the indices): values and
    gradients as the torch path's; a tie at the k-th value leaves the call to it."""
    from softtopk import threshold

    g = torch.Generator().manual_seed(21)
    k = 5
    x0 = torch.randn(6, 1500, generator=g)
    gy = torch.randn(6, 1500, generator=g)
    top = x0[0].topk(k + 1).values
    x0[0, :2] = top[0]  # the largest value three times: a tie above the k-th
    x0[1, 700:706] = torch.arange(6.0, 0.0, -1.0) + 10  # the k + 1 largest next to each other, in one block
    x0[2] = x0[2].sort().values  # ascending: the largest at the end
    x0[3] = 0.0
    x0[3, :10] = torch.arange(10.0, 0.0, -1.0)  # ten values in one block, 1490 zeros: the bound keeps them all
    x0[4, 1490:1496] = torch.arange(6.0, 0.0, -1.0) + 10  # in the tail after the last whole block of 32
    x0[5, 1000:1003] = x0[5].max() + 1  # three equal largest values (k = 5: not at the k-th)

    def fn(x0=x0):
        x = x0.clone().requires_grad_()
        y = softtopk.topk_mask(x, k, method="dftopk", temperature=0.3)
        y.backward(gy)
        return y.detach(), x.grad

    calls = []
    original = threshold.kernel_dftopk
    try:
        threshold.kernel_dftopk = lambda *a: calls.append(original(*a)) or calls[-1]
        (y_numba, g_numba), (y_torch, g_torch) = _both_backends(fn)
    finally:
        threshold.kernel_dftopk = original
    assert calls and calls[0] is not None  # the kernel answered
    torch.testing.assert_close(y_numba, y_torch, rtol=0, atol=1e-6)
    torch.testing.assert_close(g_numba, g_torch, rtol=0, atol=1e-4 * float(g_torch.abs().max()))
    x0[1, 704] = x0[1, 703]  # a tie at the k-th value: the reference's call
    (y_numba, _), (y_torch, _) = _both_backends(fn)
    assert torch.equal(y_numba, y_torch)


@needs_numba
@pytest.mark.parametrize("variant", ["sigmoid", "lapsum"])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3, 1e5])
@pytest.mark.parametrize("temperature", [1e-3, 1.0, 100.0])
def test_kernel_exponentials_at_extreme_scales(variant, scale, temperature):
    """The kernel's exponential families solve on stored exponentials e^(u − c), clipped to e^±86 and recomputed
    when τ moves 40 away from c: at spreads |x|/t from 1e-6 to 1e8 and real k near 0 and n, Σy = k to the
    tolerance and y equals the float64 reference's to that tolerance (tight, so that float32 rounding shows)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 300, generator=g) * scale
    x[3] = x[3].sort().values  # a sorted row, a row with a far outlier, one with a cluster of equal scores
    x[4, 0] = 40 * scale
    x[5, 100:200] = x[5, 100]
    k = torch.tensor([1.0, 0.5, 150.0, 299.5, 7.0, 120.0])
    y = run(x, k, variant, temperature=temperature, tol=1e-7)
    y64 = run(x.double(), k.double(), variant, temperature=temperature)
    torch.testing.assert_close(y.double().sum(-1), k.double(), rtol=0, atol=1e-7 * 300)
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=5e-5)


@needs_numba
@pytest.mark.parametrize(
    "shape, k", [((64, 8), 2), ((16, 200), 40), ((4, 1000), 5), ((3, 5000), 700), ((2, 40000), 4), ((2, 40000), 3000)]
)
def test_hard_kernel_matches_torch_topk(shape, k):
    """The hard mask's kernel (a scan for small k, quickselect, or a sampled window in long rows) selects exactly
    torch.topk's entries; per-row k; a tie at the k-th value and k = 0 or n are left to torch."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(shape, generator=g)
    per_row = torch.randint(0, shape[-1] + 1, shape[:-1] + (1,), generator=g)
    for kk in (k, per_row, 0, shape[-1]):
        numba_out, torch_out = _both_backends(lambda kk=kk: softtopk.topk_mask(x, kk, method="hard"))
        assert torch.equal(numba_out, torch_out)
    tied = torch.tensor([[3.0, 2.0, 2.0, 1.0, -math.inf, math.inf]])
    for kk in (1, 2, 3, 4):
        numba_out, torch_out = _both_backends(lambda kk=kk: softtopk.topk_mask(tied, kk, method="hard"))
        assert torch.equal(numba_out, torch_out)


@needs_numba
def test_kernels_broadcast_k_and_t_over_leading_dims():
    """The perturbed method selects on (samples, rows, n) with k of shape (rows, 1): the kernels broadcast k (and a
    normalised mask's k and t) over the leading dimensions as the torch path does."""
    from softtopk import threshold
    from softtopk.hard import hard_topk_mask

    g = torch.Generator().manual_seed(13)
    x = torch.randn(3, 4, 10, generator=g)
    k = torch.tensor([[1], [2], [3], [9]])
    numba_out, torch_out = _both_backends(lambda: hard_topk_mask(x, k))
    assert torch.equal(numba_out, torch_out) and numba_out.sum(-1).tolist() == [[1, 2, 3, 9]] * 3
    t = torch.linspace(0.2, 1.0, 4).unsqueeze(-1)
    numba_out, torch_out = _both_backends(lambda: threshold.normalised_mask("sigmoid", x, k.float(), t))
    torch.testing.assert_close(numba_out, torch_out, rtol=0, atol=1e-5)
    generator = torch.Generator()

    def perturbed():
        generator.manual_seed(0)
        return softtopk.topk_mask(x[0], k.squeeze(-1), method="perturbed", temperature=0.5, generator=generator)

    numba_out, torch_out = _both_backends(perturbed)
    assert torch.equal(numba_out, torch_out)


def _ordered_row(n: int, order: str) -> np.ndarray:
    """A float32 row of n Gaussian scores (seeded by n): random, sorted either way, three values only (heavy ties),
    or a quarter of them +inf and a quarter -inf."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    if order == "ascending":
        x.sort()
    elif order == "descending":
        x[::-1].sort()
    elif order == "few values":
        x = rng.integers(0, 3, n).astype(np.float32)
    elif order == "infinities":
        x[rng.integers(0, n, max(1, n // 4))] = np.inf
        x[rng.integers(0, n, max(1, n // 4))] = -np.inf
    elif order == "signed zeros":  # -0 and +0: equal as floats, apart as bit patterns (the keys of the selections)
        x = np.where(rng.random(n) < 0.5, np.float32(-0.0), np.float32(0.0)) - np.abs(x) * (rng.random(n) < 0.5)
    return x


@needs_numba
@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 64, 95, 1000])
def test_kernel_row_statistics(n):
    """The kernels' row statistics (32-lane vectors, then the scalar tail): the minimum and maximum as numpy has
    them, and whether every entry is finite, at scales from 1e-30 to 1e30, with ±inf, NaN and signed zeros placed
    in the vectors or the tail."""
    from softtopk import _threshold_numba as kernel

    rng = np.random.default_rng(n)
    for trial in range(60):
        x = (rng.standard_normal(n) * 10.0 ** rng.integers(-30, 31)).astype(np.float32)
        special = [np.inf, -np.inf, np.nan, -0.0, 0.0, None][trial % 6]
        if special is not None:
            x[rng.integers(n)] = special
        lo, hi, finite = kernel._stats(x)
        assert finite == bool(np.isfinite(x).all()), (trial, x)
        if finite:
            assert (lo, hi) == (float(x.min()), float(x.max())), trial
        elif not np.isnan(x).any():
            assert (lo, hi) == (float(x.min()), float(x.max())), trial


@needs_numba
@pytest.mark.parametrize("n", [2, 8, 16, 17, 31, 32, 33, 64, 65, 200, 640, 2047, 2048, 5000, 40000, 70001])
@pytest.mark.parametrize("order", ["random", "ascending", "descending", "few values", "infinities", "signed zeros"])
def test_kernel_order_statistics(n, order):
    """The kernels' k-th and (k+1)-th largest for k < 32 (registers or ranking in rows of up to 16, ranking
    survivors of a column-maxima bound in short rows, survivors of a block-maxima bound in long ones, wider blocks
    beyond 32768 entries, a scan when more entries survive than the scratch holds) equal numpy's sort, for sorted
    rows, heavy ties, ±inf entries and signed zeros, at the row lengths where the method changes; the block maxima's
    pair (the masks' start) is at most the row's; the hard mask's 32-entry writes select x >= the k-th largest."""
    from softtopk import _threshold_numba as kernel

    x = _ordered_row(n, order)
    top = np.sort(x)[::-1]
    buf = np.empty(kernel._BUF, dtype=np.float32)
    pair = kernel.numba.njit(lambda x, k, buf: kernel._top_pair(x, k, buf))
    peak_pair = kernel.numba.njit(lambda x, k, buf: kernel._peak_pair(x, k, buf))
    hard = np.empty_like(x)
    for k in range(1, min(n, kernel.SCAN_K)):
        assert pair(x, k, buf) == (top[k - 1], top[k]), k
        if n >= kernel._SHORT * (k + 1):
            a, b = peak_pair(x, k, buf)
            assert a <= top[k - 1] and b <= top[k], k
        assert kernel._hard_row(x, top[k - 1], hard) == int((x >= top[k - 1]).sum()), k
        np.testing.assert_array_equal(hard, (x >= top[k - 1]).astype(np.float32))


@needs_numba
@pytest.mark.parametrize("n", [7, 32, 33, 100])
def test_kernel_hard_row_counts_a_nan_past_any_row(n):
    """The hard mask's write adds ``_NAN_COUNT`` for a NaN (in a 32-entry vector or in the scalar tail), so that its
    count never equals k on a row holding one and the kernels decline that row; without one it counts x >= a."""
    from softtopk import _threshold_numba as kernel

    out = np.empty(n, dtype=np.float32)
    for at in sorted({0, n // 2, n - 1}):
        x = np.arange(n, dtype=np.float32)
        assert kernel._hard_row(x, np.float32(n // 2), out) == n - n // 2
        x[at] = np.nan
        assert kernel._hard_row(x, np.float32(n // 2), out) >= kernel._NAN_COUNT, at


@needs_numba
@pytest.mark.parametrize("n", [512, 513, 1000, 4096, 8192, 8193, 40000])
@pytest.mark.parametrize("order", ["random", "ascending", "descending", "few values", "infinities", "sample-blind"])
def test_kernel_window_selection(n, order):
    """The kernels' k-th and (k+1)-th largest for k >= 32 (quickselect on a copy of short rows, a window bracketed
    by a strided sample in longer ones, the whole row when the bracket misses) equal numpy's sort, for sorted rows,
    heavy ties, ±inf entries and a row whose sampled entries are its smallest (the bracket misses)."""
    from softtopk import _threshold_numba as kernel

    x = _ordered_row(n, "random" if order == "sample-blind" else order)
    if order == "sample-blind":
        x[:: max(kernel._WINDOW_STRIDE, n // kernel._WINDOW_SAMPLE)] -= 100.0
    top = np.sort(x)[::-1]
    buf = np.empty(kernel._BUF, dtype=np.float32)
    sample = np.empty(2 * kernel._WINDOW_SAMPLE + 2, dtype=np.float32)
    pair = kernel.numba.njit(lambda x, k, buf, sample: kernel._pair(x, k, buf, sample))
    for k in sorted({kernel.SCAN_K, 33, n // 100, n // 10, n // 2, n - 1} - set(range(kernel.SCAN_K))):
        assert pair(x.copy(), k, buf, sample) == (top[k - 1], top[k]), k


@needs_numba
@pytest.mark.parametrize("method, options", [("sigmoid", {}), ("sparse", {}), ("sparse", {"p": 4 / 3}), ("lapsum", {})])
@pytest.mark.parametrize("shape, k", [((64, 8), 2), ((16, 200), 20), ((4, 1000), 5), ((3, 5000), 700), ((6, 7), 0)])
@pytest.mark.parametrize("from_z", [False, True])
def test_fused_straight_through_matches_the_combination(monkeypatch, method, options, shape, k, from_z):
    """straight_through=True takes the hard mask and the soft mask from one kernel call (the solve starting at the
    k-th and (k+1)-th largest the selection found): the same values and gradients as the torch path, which
    combines the two masks; per-row k, k = 0 and n; a tie at a row's k-th value leaves the call to the
    combination. ``from_z``: the call keeps no soft mask, as large calls do (see
    :func:`test_straight_through_backward_from_z_matches_the_kept_mask`)."""
    from softtopk import threshold

    if from_z:
        monkeypatch.setattr(threshold, "_FROM_Z_MIN", 0)
    g = torch.Generator().manual_seed(14)
    x0 = torch.randn(shape, generator=g)
    gy = torch.randn(shape, generator=g)
    x0[0, :3] = 0.5  # a tie at the k-th value in row 0 for some k
    per_row = torch.randint(0, shape[-1] + 1, shape[:-1], generator=g)
    for kk in (k, per_row, shape[-1]):

        def fn(kk=kk):
            x = x0.clone().requires_grad_()
            y = softtopk.topk_mask(x, kk, method=method, temperature=0.3, straight_through=True, **options)
            y.backward(gy)
            return y.detach(), x.grad

        (y_numba, g_numba), (y_torch, g_torch) = _both_backends(fn)
        assert torch.equal(y_numba, y_torch)
        torch.testing.assert_close(g_numba, g_torch, rtol=0, atol=2e-3 * max(float(g_torch.abs().max()), 1.0))
    calls = []
    original = threshold.kernel_mask
    try:
        threshold.kernel_mask = lambda *a, **kw: calls.append((kw["hard"], original(*a, **kw))) or calls[-1][1]
        x = torch.randn(shape, generator=g).requires_grad_()  # (a call nothing differentiates: the hard mask alone)
        softtopk.topk_mask(x, min(k, 1), method=method, straight_through=True)
    finally:
        threshold.kernel_mask = original
    assert len(calls) == 1 and calls[0][0] and calls[0][1] is not None  # the fused path was taken


@needs_numba
@pytest.mark.parametrize("method, options", [("sigmoid", {}), ("sparse", {}), ("sparse", {"p": 4 / 3}), ("lapsum", {})])
@pytest.mark.parametrize("shape", [(64, 8), (16, 200), (4, 3000), (3, 40000)])
def test_straight_through_backward_from_z_matches_the_kept_mask(monkeypatch, method, options, shape):
    """A large straight-through call keeps no soft mask: its backward takes φ' from z = x/t − τ (x and τ kept)
    rather than from the mask. Both give the same gradients with respect to x and to a per-row temperature (to
    float32 rounding), rows with k = 0 and n included (gradient 0), and a second backward (retain_graph) the
    same again."""
    from softtopk import threshold

    g = torch.Generator().manual_seed(15)
    x0 = torch.randn(shape, generator=g) * 2.0
    gy = torch.randn(shape, generator=g)
    k = torch.randint(1, shape[-1], shape[:-1], generator=g)
    k[0], k[-1] = 0, shape[-1]
    t0 = torch.rand(shape[:-1] + (1,), generator=g) + 0.1
    grads = []
    for keep in (1 << 62, 0):  # every call keeps the mask, then none does
        monkeypatch.setattr(threshold, "_FROM_Z_MIN", keep)
        x, t = x0.clone().requires_grad_(), t0.clone().requires_grad_()
        y = softtopk.topk_mask(x, k, method=method, temperature=t, straight_through=True, **options)
        assert y.grad_fn is not None and "KernelMask" in type(y.grad_fn).__name__  # the kernel's node
        y.backward(gy, retain_graph=True)
        first = (x.grad.clone(), t.grad.clone())
        y.backward(gy)
        torch.testing.assert_close((x.grad, t.grad), (2 * first[0], 2 * first[1]))
        grads.append(first)
    (gx_kept, gt_kept), (gx_z, gt_z) = grads
    assert not gx_z[0].any() and not gx_z[-1].any() and gt_z[0] == 0 and gt_z[-1] == 0
    torch.testing.assert_close(gx_z, gx_kept, rtol=1e-4, atol=1e-5 * float(gx_kept.abs().max()))
    # (−Σ z gx cancels: a row's value can be 1e-3 of the largest, its float32 rounding then a few percent of it)
    torch.testing.assert_close(gt_z, gt_kept, rtol=1e-4, atol=1e-4 * float(gt_kept.abs().max()))


@needs_numba
@pytest.mark.parametrize("variant", ["sigmoid", "lapsum"])
def test_kernel_exponentials_do_not_overflow_on_peaked_rows(variant):
    """Log-probability rows (a few entries far above the rest) at small temperatures: the Newton step moves τ below
    the centre of the stored exponentials, and e^(u − c) · e^(c − τ) of the top entries leaves float32's range (the
    sweeps compute in float32); the mask must stay 1 there, not inf · 0 = NaN. Where every entry is saturated, Σφ' is
    tiny and the residual is float32 rounding: the final Newton step must not throw τ away (it took Σy from 3 to
    14). Σy = k and the torch path agree."""
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        n = int(torch.randint(5, 400, (1,), generator=g))
        x = torch.log_softmax(torch.randn(8, n, generator=g) * float(torch.rand(1, generator=g)) * 60, -1)
        k = int(torch.randint(1, min(n, 40), (1,), generator=g))
        temperature = float(10 ** (torch.rand(1, generator=g) * 3 - 2))
        for straight_through in (False, True):

            def fn(x=x, k=k, temperature=temperature, st=straight_through):
                return softtopk.topk_mask(x, k, method=variant, temperature=temperature, straight_through=st)

            y_numba, y_torch = _both_backends(fn)
            assert torch.isfinite(y_numba).all(), (n, k, temperature, straight_through)
            torch.testing.assert_close(y_numba.sum(-1), torch.full((8,), float(k)), rtol=0, atol=1e-4 * k)
            # both within tol = 1e-5 k of Σy = k: the masks move together with τ, so they differ by 2 tol at most
            torch.testing.assert_close(y_numba, y_torch, rtol=0, atol=2e-5 * k + 1e-6)


@needs_numba
@pytest.mark.parametrize("variant", ["sigmoid", "lapsum", "sparse", "sparse43"])
@pytest.mark.parametrize("k", [1, 5, 17, 31])
@pytest.mark.parametrize("layout", ["random", "top in one block", "top in the last block", "equal block maxima"])
def test_kernel_start_from_block_maxima(variant, k, layout):
    """Long rows with k < 32 start the threshold search at the k-th and (k+1)-th largest block maxima, which fall
    below the row's own when its top entries share a block (all of them in one, here): the solve still converges to
    the reference's mask and gradient, with Σy = k."""
    g = torch.Generator().manual_seed(k)
    n = 1100
    x0 = torch.randn(4, n, generator=g)
    if layout == "top in one block":
        x0[:, 64 : 64 + k + 1] = 5.0 + torch.rand(4, k + 1, generator=g)
    elif layout == "top in the last block":
        x0[:, n - 40 :] += 6.0  # the tail after the last whole block as well
    elif layout == "equal block maxima":
        x0[:, ::32] = 4.0
    gy = torch.randn(4, n, generator=g)

    def fn():
        x = x0.clone().requires_grad_()
        y = run(x, k, variant, temperature=0.3)
        y.backward(gy)
        return y.detach(), x.grad

    (y, gx), (y_ref, gx_ref) = _both_backends(fn)
    torch.testing.assert_close(y.sum(-1), torch.full((4,), float(k)), rtol=0, atol=1e-4 * k)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=2e-5 * k + 1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=2e-3 * max(float(gx_ref.abs().max()), 1.0))


@needs_numba
@pytest.mark.parametrize("offset", [0.0, 1e3, 3e5])
def test_kernel_cubic_backward_far_from_zero(offset):
    """p = 4/3's backward computes z = x/t − τ in float32 from float32 splits of 1/t and τ where |τ| <= 2^20, in
    float64 beyond: the gradient equals the float64 reference's on either side (|τ| up to 4e6 here)."""
    g = torch.Generator().manual_seed(3)
    x64 = (torch.randn(3, 500, generator=g) + offset).double()  # float32 values: both computations see the same x
    gy = torch.randn(3, 500, generator=g, dtype=torch.float64)
    grads = []
    for dtype in (torch.float32, torch.float64):
        x = x64.to(dtype).requires_grad_()
        run(x, 7, "sparse43", temperature=0.1).backward(gy.to(dtype))
        grads.append(x.grad.double())
    scale = float(grads[1].abs().max())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-4 * scale)


@needs_numba
@pytest.mark.parametrize("method, options", [("sigmoid", {}), ("sparse", {"p": 4 / 3}), ("dftopk", {}),
                                             ("sigmoid", {"straight_through": True})])  # fmt: skip
def test_kernel_double_backward_raises(method, options):
    """The kernels' backward is once differentiable: a second differentiation through it raises (float32 on the
    CPU, the kernel path; the float64 tests above take the reference)."""
    x = torch.randn(3, 50).requires_grad_()
    y = softtopk.topk_mask(x, 4, method=method, temperature=0.5, **options)
    (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|once_differentiable"):
        g.sum().backward()


@needs_numba
@pytest.mark.parametrize("n", [1000, 5000, 40000])
@pytest.mark.parametrize("order", ["random", "few values", "infinities"])
def test_kernel_kept_entries_and_their_indices(n, order):
    """DFTopK's selection in long rows keeps the entries at or above a block-maxima bound, reading a block whose
    maximum alone reaches it off that maximum (its index found afterwards, when it is the k-th or (k+1)-th): the two
    values, their tie count and their first indices equal numpy's."""
    from softtopk import _threshold_numba as kernel

    x = _ordered_row(n, order)
    top = np.sort(x)[::-1]
    buf = np.empty(kernel._BUF, dtype=np.float32)
    sample = np.empty(2 * kernel._WINDOW_SAMPLE + 2, dtype=np.float32)
    at = np.empty(kernel._KEPT, dtype=np.int32)
    pair = kernel.numba.njit(lambda x, k, buf, sample, at: kernel._dftopk_pair(x, k, buf, sample, at))
    for k in (1, 2, 4, 10, 20, 31):
        va, vb, ties, ia, ib, found = pair(x, k, buf, sample, at)
        assert (va, vb) == (top[k - 1], top[k]), k
        if found:
            assert ties == int((x == va).sum() + (x == vb).sum()), k
            assert ia == int(np.flatnonzero(x == va)[0]) and ib == int(np.flatnonzero(x == vb)[0]), k
