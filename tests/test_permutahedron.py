"""Isotonic regression (PAV, Dykstra), permutahedron projections, soft sort / rank and the sparse top-k operators of
``softtopk.permutahedron`` against independent references: scipy's isotonic regression, cvxpy, Blondel et al.'s
formula written out with scipy, torchsort (when installed) and the threshold engine; float64 gradcheck of every
backward."""

from __future__ import annotations

import math
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
from scipy.optimize import isotonic_regression
from torch.autograd import gradcheck

import softtopk
from conftest import ref_threshold_mask, spaced
from softtopk import (
    isotonic,
    permutahedron_projection,
    permutahedron_topk,
    soft_rank,
    soft_sort,
    topk_magnitude,
)
from softtopk import permutahedron as perm

P43 = 4 / 3
# The width convention of ``temperature`` T (shared with topk_mask(method="sparse")): 1/T is the slope dy_i/dx_i at
# y_i = 1/2 with the threshold fixed, and the operator's internal t (y = ∇R_p((x − τ)/t)) is T·factor:
#   p = 2:   y = clip(z, 0, 1), z = (x − τ)/t: slope 1/t                                          -> t = T
#   p = 4/3: y = clip(max(z, 0)³, 0, 1): y = 1/2 at z = 2^(-1/3), slope 3 z²/t = 3·2^(-2/3)/t      -> t = 3·2^(-2/3)·T
SPARSE_FACTOR = {2: 1.0, P43: 3 * 2 ** (-2 / 3)}
SPARSE_VARIANT = {2: "sparse", P43: "sparse43"}  # conftest's names of the two φ
BACKENDS = ["torch"] + (["numba"] if perm.pav_backend("cpu") == "numba" else [])


def _solve(prob):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    assert prob.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE)


# ----------------------------------------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------------------------------------
def ref_isotonic_cvx(y, w, p, increasing=False):
    """argmin_v Σ w_i R_p(v_i − y_i) over monotone v, R_2 = u²/2, R_4/3 = u⁴/4, by cvxpy."""
    v = cp.Variable(y.size)
    loss = cp.sum(cp.multiply(w, cp.square(v - y))) / 2 if p == 2 else cp.sum(cp.multiply(w, cp.power(v - y, 4))) / 4
    cons = [v[1:] >= v[:-1]] if increasing else [v[:-1] >= v[1:]]
    _solve(cp.Problem(cp.Minimize(loss), cons))
    return v.value


def _permutahedron_constraints(mu, w):
    ws = np.sort(w)[::-1]
    return [cp.sum_largest(mu, j) <= ws[:j].sum() for j in range(1, w.size)] + [cp.sum(mu) == ws.sum()]


def ref_projection_cvx(z, w, p):
    """argmax_{μ ∈ P(w)} <z, μ> − Σ|μ|^p/p, the permutahedron written as majorisation constraints."""
    mu = cp.Variable(z.size)
    reg = cp.sum_squares(mu) / 2 if p == 2 else cp.sum(cp.power(cp.abs(mu), P43)) / P43
    _solve(cp.Problem(cp.Maximize(z @ mu - reg), _permutahedron_constraints(mu, w)))
    return mu.value


def ref_kl_projection_cvx(z, w):
    """argmin_{μ ∈ P(e^w)} KL(μ, e^z) (Blondel et al. 2020's entropic projection, before the log)."""
    mu = cp.Variable(z.size)
    _solve(cp.Problem(cp.Minimize(cp.sum(cp.kl_div(mu, np.exp(z)))), _permutahedron_constraints(mu, np.exp(w))))
    return mu.value


def ref_project_l2(z, w):
    """Blondel et al. 2020, Prop. 3: P_Q(z, w) = z − v(z_σ, w)_{σ⁻¹}, v the decreasing isotonic fit of z_σ − w."""
    order = np.argsort(-z, kind="stable")
    s = z[order]
    v = isotonic_regression(s - np.sort(w)[::-1], increasing=False).x
    out = np.empty_like(z)
    out[order] = s - v
    return out


def ref_soft_rank_l2(x, eps, descending):
    rho = np.arange(x.size, 0, -1, dtype=float)
    return ref_project_l2((-x if descending else x) / eps, rho)


def ref_soft_sort_l2(x, eps, descending):
    rho = np.arange(x.size, 0, -1, dtype=float)
    sign = 1.0 if descending else -1.0
    # P_Q(ρ/ε, x) with ρ/ε already sorted: ρ/ε − isotonic_dec(ρ/ε − sorted(x))
    out = ref_project_l2(rho / eps, sign * x)
    return sign * out


def ref_magnitude_cvx(x, k, t, p):
    """Sander et al.'s top-k in magnitude from its definition: u = argmax <u, x> − f*(u) − t Ω_p(u) with
    f*(u) = min_{y ∈ capped simplex} Σ u_i² / (2 y_i), then u + t ∇Ω_p(u)."""
    n = x.size
    u = cp.Variable(n)
    y = cp.Variable(n)
    reg = cp.sum_squares(u) / 2 if p == 2 else cp.sum(cp.power(cp.abs(u), P43)) / P43
    fstar = sum(cp.quad_over_lin(u[i], y[i]) for i in range(n)) / 2
    _solve(cp.Problem(cp.Maximize(x @ u - fstar - t * reg), [y >= 0, y <= 1, cp.sum(y) == k]))
    uu = np.where(np.abs(u.value) < 1e-8, 0.0, u.value)  # solver noise, amplified by |u|^(1/3) below
    return uu + t * np.sign(uu) * np.abs(uu) ** (p - 1)


def _rng(seed):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------------------
# Isotonic regression
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("increasing", [False, True])
def test_isotonic_l2_matches_scipy(backend, increasing, monkeypatch):
    monkeypatch.setattr(perm, "pav_backend", lambda device="cpu": backend)
    rng = _rng(1)
    for n in (1, 2, 7, 40):
        y = rng.normal(size=(5, n)) * 3
        y[0] = np.arange(n)  # one block (decreasing fit of an increasing row)
        w = rng.uniform(0.1, 3.0, size=(5, n))
        v = isotonic(torch.tensor(y), torch.tensor(w), increasing=increasing).numpy()
        ref = np.stack([isotonic_regression(y[i], weights=w[i], increasing=increasing).x for i in range(5)])
        np.testing.assert_allclose(v, ref, rtol=0, atol=1e-12)
        v1 = isotonic(torch.tensor(y), increasing=increasing).numpy()
        ref1 = np.stack([isotonic_regression(y[i], increasing=increasing).x for i in range(5)])
        np.testing.assert_allclose(v1, ref1, rtol=0, atol=1e-12)


def _kkt_decreasing_l43(v, y, w):
    """Optimality certificate of argmin Σ w (v − y)⁴/4 over v_1 ≥ … ≥ v_n: on each block [l, r] of equal values
    the multipliers λ_j = Σ_{i=l..j} w_i (v_i − y_i)³ are ≥ 0 and λ_r = 0."""
    assert np.all(v[:-1] >= v[1:] - 1e-12)
    grad = w * (v - y) ** 3
    lo = 0
    for i in range(1, v.size + 1):
        if i == v.size or v[i] < v[i - 1] - 1e-9:
            lam = np.cumsum(grad[lo:i])
            scale = np.abs(grad[lo:i]).sum() + 1e-300
            assert lam.min() >= -1e-9 * scale and abs(lam[-1]) <= 1e-9 * scale
            lo = i


@pytest.mark.parametrize("increasing", [False, True])
def test_isotonic_l43_matches_cvxpy(increasing):
    """cvxpy pins the objective; the solution is pinned by the KKT conditions (a quartic minimum is too flat for
    a conic solver to locate v itself beyond ~1e-3)."""
    rng = _rng(2)
    for n in (3, 9, 30):
        y = rng.normal(size=n) * 2
        w = rng.uniform(0.2, 2.0, size=n)
        v = isotonic(torch.tensor(y), torch.tensor(w), p=P43, increasing=increasing).numpy()
        ref = ref_isotonic_cvx(y, w, P43, increasing)

        def obj(u, w=w, y=y):
            return (w * (u - y) ** 4).sum() / 4

        assert obj(v) <= obj(ref) * (1 + 1e-8) + 1e-10
        np.testing.assert_allclose(v, ref, rtol=0, atol=1e-2)
        if increasing:
            _kkt_decreasing_l43(-v, -y, w)
        else:
            _kkt_decreasing_l43(v, y, w)


def test_isotonic_l43_large_offset_is_accurate():
    """Central moments keep the quartic pooling exact when |y| is large against its spread."""
    y = torch.tensor([1e6 + 0.0, 1e6 + 1.0, 1e6 + 3.0, 1e6 - 2.0], dtype=torch.float64)
    v = isotonic(y, p=P43)
    ref = isotonic(y - 1e6, p=P43) + 1e6
    torch.testing.assert_close(v, ref, rtol=0, atol=1e-9)
    _kkt_decreasing_l43(v.numpy() - 1e6, y.numpy() - 1e6, np.ones(4))


@pytest.mark.parametrize("mode", [perm.Q2, perm.Q4, perm.KL])
def test_pav_backends_agree(mode):
    if "numba" not in BACKENDS:
        pytest.skip("numba not installed")
    g = torch.Generator().manual_seed(3)
    for n in (1, 5, 64, 3000):
        y = torch.randn(4, n, generator=g, dtype=torch.float64) * 2
        y[1] = torch.linspace(0, 5, n, dtype=torch.float64)  # worst case: every entry pools into one block
        a = torch.rand(4, n, generator=g, dtype=torch.float64) + 0.5 if mode != perm.KL else None
        b = torch.randn(1, n, generator=g, dtype=torch.float64).sort(descending=True).values
        c = torch.rand(4, n, generator=g, dtype=torch.float64) if mode != perm.KL else None
        v1, s1 = perm._pav(y, a, b, c, mode, backend="numba")
        v2, s2 = perm._pav(y, a, b, c, mode, backend="torch")
        torch.testing.assert_close(v1, v2, rtol=0, atol=1e-10)
        assert bool((s1 == s2).all())
        assert bool((v1[:, :-1] >= v1[:, 1:] - 1e-12).all())


@pytest.mark.parametrize("p", [2, P43])
def test_dykstra_matches_pav(p):
    g = torch.Generator().manual_seed(4)
    n, iters, tol, atol = (21, 20_000, 1e-12, 1e-8) if p == 2 else (6, 20_000, 1e-9, 1e-6)
    y = torch.randn(3, n, generator=g, dtype=torch.float64)
    w = torch.rand(3, n, generator=g, dtype=torch.float64) + 0.5
    exact = isotonic(y, w, p=p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # must converge
        approx = isotonic(y, w, p=p, solver="dykstra", max_iter=iters, tol=tol)
    torch.testing.assert_close(approx, exact, rtol=0, atol=atol)
    if p == 2:
        ref = np.stack([isotonic_regression(y[i].numpy(), weights=w[i].numpy(), increasing=False).x for i in range(3)])
        np.testing.assert_allclose(approx.numpy(), ref, rtol=0, atol=atol)


def test_dykstra_warns_when_not_converged():
    y = torch.linspace(0, 1, 50, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="max_iter"):
        isotonic(y, solver="dykstra", max_iter=3)


def test_pav_takes_no_solver_options():
    """PAV is exact: ``tol`` / ``max_iter`` given with solver="pav" (the default) raise a TypeError naming them;
    their defaults (None) are accepted, and Dykstra takes them."""
    y = torch.randn(2, 6, dtype=torch.float64)
    for solver in ({}, {"solver": "pav"}):
        for kw in ({"tol": 1e-8}, {"max_iter": 100}, {"tol": 1e-8, "max_iter": 100}):
            with pytest.raises(TypeError, match="|".join(f"`{name}`" for name in kw)):
                isotonic(y, **solver, **kw)
        torch.testing.assert_close(isotonic(y, **solver, tol=None, max_iter=None), isotonic(y), rtol=0, atol=0)
    with pytest.raises(TypeError, match="`max_iter`"):
        isotonic(y, p=P43, max_iter=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a short Dykstra run may not converge: only the options matter here
        assert isotonic(y, solver="dykstra", tol=1e-8, max_iter=100).shape == y.shape


@pytest.mark.parametrize("p,solver", [(2, "pav"), (P43, "pav"), (2, "dykstra")])
def test_isotonic_gradcheck(p, solver):
    g = torch.Generator().manual_seed(5)
    y = (torch.randn(3, 8, generator=g, dtype=torch.float64) * 2).requires_grad_()
    w = (torch.rand(3, 8, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    kw = {"solver": solver, "max_iter": 20_000, "tol": 1e-14} if solver == "dykstra" else {}
    atol = 1e-6 if solver == "pav" else 1e-5
    assert gradcheck(lambda y, w: isotonic(y, w, p=p, **kw), (y, w), atol=atol)
    assert gradcheck(lambda y: isotonic(y, p=p, dim=0, increasing=True, **kw), (y,), atol=atol)


def test_isotonic_dim_and_batch():
    g = torch.Generator().manual_seed(6)
    y = torch.randn(3, 7, 4, generator=g, dtype=torch.float64)
    v = isotonic(y, dim=1)
    ref = isotonic(y.transpose(1, 2).reshape(-1, 7)).reshape(3, 4, 7).transpose(1, 2)
    torch.testing.assert_close(v, ref, rtol=0, atol=0)
    assert bool((v[:, :-1] >= v[:, 1:]).all())


# ----------------------------------------------------------------------------------------------------------
# Projections and top-k
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [2, P43])
def test_projection_matches_cvxpy(p):
    rng = _rng(7)
    for n in (4, 7):
        z = rng.normal(size=n) * 2
        w = rng.normal(size=n)
        out = permutahedron_projection(torch.tensor(z), torch.tensor(w), p=p).numpy()
        ref = ref_projection_cvx(z, w, p)
        np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5)
        assert abs(out.sum() - w.sum()) < 1e-10


@pytest.mark.parametrize("p", [2, P43])
def test_permutahedron_topk_matches_threshold_engine(p):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 3, 25, generator=g, dtype=torch.float64) * 2
    k = torch.tensor([1.0, 3.0, 7.5, 24.0], dtype=torch.float64).view(4, 1)
    for t in (0.05, 0.7, 5.0):
        for largest in (True, False):
            for kk in (0, 1, 5, 25, 2.5, k):
                a = permutahedron_topk(x, kk, temperature=t, p=p, largest=largest)
                b = softtopk.topk_mask(x, kk, method="sparse", temperature=t, p=p, largest=largest)
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # dim and per-row temperature
    t = torch.rand(4, 25, generator=g, dtype=torch.float64) + 0.2
    a = permutahedron_topk(x, 2, temperature=t, p=p, dim=1)
    b = softtopk.topk_mask(x, 2, method="sparse", temperature=t, p=p, dim=1)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("p", [2, P43])
def test_permutahedron_topk_matches_brentq_reference(p, largest):
    """Against the threshold mask φ((x − τ)/t), Σ y = k, τ by brentq (conftest), at the internal t = T·factor of
    the width convention: T for p = 2, 3·2^(-2/3)·T for p = 4/3."""
    g = torch.Generator().manual_seed(22)
    x = torch.randn(3, 12, generator=g, dtype=torch.float64) * 2
    for T in (0.05, 0.7, 5.0):
        for k in (1, 2.5, 6):
            y = permutahedron_topk(x, k, temperature=T, p=p, largest=largest)
            for i in range(3):
                row = (x[i] if largest else -x[i]).numpy()
                ref = ref_threshold_mask(row, k, T * SPARSE_FACTOR[p], SPARSE_VARIANT[p])
                np.testing.assert_allclose(y[i].numpy(), ref, rtol=0, atol=1e-9)
    # the default temperature is T = 1.0
    torch.testing.assert_close(permutahedron_topk(x, 3, p=p), permutahedron_topk(x, 3, temperature=1.0, p=p))


@pytest.mark.parametrize("p", [2, P43])
def test_permutahedron_topk_gradients(p):
    x = spaced(9, batch=(2,)).requires_grad_()
    t = torch.tensor([[0.8], [2.0]], dtype=torch.float64, requires_grad=True)
    k = torch.tensor([3.5, 2.0], dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x, t, k: permutahedron_topk(x, k, temperature=t, p=p), (x, t, k), atol=1e-6)
    # the same gradients as the threshold engine's implicit backward
    gy = torch.randn(2, 9, dtype=torch.float64)
    ga = torch.autograd.grad((permutahedron_topk(x, k, temperature=t, p=p) * gy).sum(), (x, t, k))
    gb = torch.autograd.grad((softtopk.topk_mask(x, k, method="sparse", temperature=t, p=p) * gy).sum(), (x, t, k))
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("p", [2, P43])
def test_projection_gradcheck(p):
    z = spaced(7, batch=(2,)).requires_grad_()
    w = torch.tensor([2.0, 1.3, 0.2, -0.4, -1.1, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda z, w: permutahedron_projection(z, w, p=p), (z, w), atol=1e-6)


@pytest.mark.parametrize("p", [2, P43])
def test_topk_magnitude_matches_definition(p):
    rng = _rng(9)
    for t in (0.3, 1.5):
        x = rng.normal(size=7) * 2
        out = topk_magnitude(torch.tensor(x), 3, temperature=t, p=p).numpy()
        ref = ref_magnitude_cvx(x, 3, t, p)
        np.testing.assert_allclose(out, ref, rtol=0, atol=5e-5)


@pytest.mark.parametrize("p", [2, P43])
def test_topk_magnitude_limits_and_sparsity(p):
    g = torch.Generator().manual_seed(10)
    x = torch.randn(5, 40, generator=g, dtype=torch.float64) * 3
    hard = x * softtopk.topk_mask(x.abs(), 6, method="hard")
    y = topk_magnitude(x, 6, temperature=1e-6, p=p)
    torch.testing.assert_close(y, hard, rtol=0, atol=1e-4)
    y = topk_magnitude(x, 6, temperature=0.5, p=p)
    assert bool(((y == 0) | (torch.sign(y) == torch.sign(x))).all())  # signs kept
    assert int((y != 0).sum(-1).max()) < 20  # exact zeros beyond the few pooled with the top-k
    assert bool((y[x.abs() >= x.abs().topk(6, -1).values[:, -1:]] != 0).all())
    # well-separated magnitudes: the top-k come out exactly (the normalisation of the reference implementation)
    x = torch.tensor([-5.0, -2.0, 3.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(
        topk_magnitude(x, 2, temperature=0.01, p=p), torch.tensor([-5.0, 0, 3.0, 0], dtype=torch.float64)
    )


@pytest.mark.parametrize("p", [2, P43])
def test_topk_magnitude_gradcheck(p):
    x = spaced(8, batch=(2,))
    x = (x * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0, -1.0, 1.0], dtype=torch.float64)).requires_grad_()
    t = torch.tensor([[0.9], [0.4]], dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x, t: topk_magnitude(x, 3, temperature=t, p=p), (x, t), atol=1e-6)
    assert gradcheck(lambda x: topk_magnitude(x, 1.5, temperature=0.3, p=p, dim=0), (x,), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Soft sort and soft rank
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("descending", [True, False])
def test_soft_sort_rank_l2_match_formula(descending):
    rng = _rng(11)
    for n in (1, 5, 30):
        x = rng.normal(size=(3, n)) * 2
        for eps in (0.01, 0.5, 3.0, 100.0):
            r = soft_rank(torch.tensor(x), temperature=eps, descending=descending).numpy()
            s = soft_sort(torch.tensor(x), temperature=eps, descending=descending).numpy()
            for i in range(3):
                np.testing.assert_allclose(r[i], ref_soft_rank_l2(x[i], eps, descending), rtol=0, atol=1e-10)
                np.testing.assert_allclose(s[i], ref_soft_sort_l2(x[i], eps, descending), rtol=0, atol=1e-10)


@pytest.mark.parametrize("descending", [True, False])
def test_soft_sort_rank_kl_match_cvxpy(descending):
    rng = _rng(12)
    n = 5
    rho = np.arange(n, 0, -1, dtype=float)
    for eps in (0.5, 2.0):
        x = rng.normal(size=n)
        z = (-x if descending else x) / eps
        r = soft_rank(torch.tensor(x), temperature=eps, regularization="kl", descending=descending).numpy()
        np.testing.assert_allclose(r, ref_kl_projection_cvx(z, np.log(rho)), rtol=0, atol=1e-5)
        sign = 1.0 if descending else -1.0
        s = soft_sort(torch.tensor(x), temperature=eps, regularization="kl", descending=descending).numpy()
        ref = sign * np.log(ref_kl_projection_cvx(rho / eps, sign * x))
        np.testing.assert_allclose(s, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("regularization", ["l2", "kl"])
def test_soft_sort_rank_match_torchsort(regularization):
    torchsort = pytest.importorskip("torchsort")
    g = torch.Generator().manual_seed(13)
    x = torch.randn(4, 50, generator=g, dtype=torch.float64)
    for eps in (0.1, 1.0, 10.0):
        ref_r = torchsort.soft_rank(x, regularization=regularization, regularization_strength=eps)
        ref_s = torchsort.soft_sort(x, regularization=regularization, regularization_strength=eps)
        r = soft_rank(x, temperature=eps, regularization=regularization, descending=False)
        s = soft_sort(x, temperature=eps, regularization=regularization, descending=False)
        torch.testing.assert_close(r, ref_r, rtol=0, atol=1e-9)
        torch.testing.assert_close(s, ref_s, rtol=0, atol=1e-9)


@pytest.mark.parametrize("regularization", ["l2", "kl"])
def test_soft_rank_properties(regularization):
    g = torch.Generator().manual_seed(14)
    x = torch.randn(6, 33, generator=g, dtype=torch.float64)
    n = 33
    for eps in (1e-3, 0.3, 30.0):
        r = soft_rank(x, temperature=eps, regularization=regularization)
        torch.testing.assert_close(r.sum(-1), torch.full((6,), n * (n + 1) / 2, dtype=torch.float64))
        assert float(r.min()) >= 1 - 1e-9 and float(r.max()) <= n + 1e-9
        s = soft_sort(x, temperature=eps, regularization=regularization)
        assert bool((s[:, :-1] >= s[:, 1:] - 1e-12).all())
        if regularization == "l2":
            torch.testing.assert_close(s.sum(-1), x.sum(-1))
    hard_desc = (torch.argsort(torch.argsort(x, -1, descending=True), -1) + 1).to(x.dtype)
    torch.testing.assert_close(
        soft_rank(x, temperature=1e-4, regularization=regularization), hard_desc, rtol=0, atol=1e-6
    )
    torch.testing.assert_close(soft_rank(x, temperature=1e-4, descending=False), n + 1 - hard_desc, rtol=0, atol=1e-6)
    torch.testing.assert_close(soft_sort(x, temperature=1e-4), x.sort(-1, descending=True).values, rtol=0, atol=1e-6)
    torch.testing.assert_close(soft_sort(x, temperature=1e-4, descending=False), x.sort(-1).values, rtol=0, atol=1e-6)


@pytest.mark.parametrize("regularization", ["l2", "kl"])
def test_soft_sort_rank_gradcheck(regularization):
    x = (spaced(6, batch=(2,), gap=0.4) * 0.5).requires_grad_()
    eps = torch.tensor([[0.3], [1.7]], dtype=torch.float64, requires_grad=True)
    for descending in (True, False):
        assert gradcheck(
            lambda x, e, d=descending: soft_rank(x, temperature=e, regularization=regularization, descending=d),
            (x, eps),
        )
        assert gradcheck(
            lambda x, e, d=descending: soft_sort(x, temperature=e, regularization=regularization, descending=d),
            (x, eps),
        )
    assert gradcheck(lambda x: soft_rank(x, temperature=0.5, regularization=regularization, dim=0), (x,))


def test_soft_sort_rank_dims_and_half_precision():
    g = torch.Generator().manual_seed(15)
    x = torch.randn(3, 5, 4, generator=g)
    r = soft_rank(x, temperature=0.5, dim=1)
    ref = soft_rank(x.transpose(1, 2), temperature=0.5).transpose(1, 2)
    torch.testing.assert_close(r, ref)
    h = soft_sort(x.half(), temperature=0.5)
    assert h.dtype == torch.float16
    torch.testing.assert_close(h.float(), soft_sort(x.half().float(), temperature=0.5), atol=2e-3, rtol=1e-3)
    assert permutahedron_topk(x.bfloat16(), 2).dtype == torch.bfloat16


def test_soft_sort_rank_default_temperature():
    """``temperature=None`` (the default) is ε = 1.0 (formerly the default ``strength=1.0``)."""
    x = torch.randn(3, 9, dtype=torch.float64)
    for op in (soft_rank, soft_sort):
        for regularization in ("l2", "kl"):
            ref = op(x, temperature=1.0, regularization=regularization)
            torch.testing.assert_close(op(x, regularization=regularization), ref, rtol=0, atol=0)
            torch.testing.assert_close(op(x, temperature=None, regularization=regularization), ref, rtol=0, atol=0)


def test_large_rows_numba_matches_torch(monkeypatch):
    if "numba" not in BACKENDS:
        pytest.skip("numba not installed")
    g = torch.Generator().manual_seed(16)
    x = torch.randn(2, 20000, generator=g, dtype=torch.float64)
    out = {}
    for backend in ("numba", "torch"):
        monkeypatch.setattr(perm, "pav_backend", lambda device="cpu", b=backend: b)
        out[backend] = soft_rank(x, temperature=0.05)
    torch.testing.assert_close(out["numba"], out["torch"], rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------
# The fused numba kernel (sort + PAV + un-sort) against the unfused path (torch.sort, then PAV)
# ----------------------------------------------------------------------------------------------------------
needs_numba = pytest.mark.skipif("numba" not in BACKENDS, reason="numba not installed")


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_argsort_is_a_stable_descending_sort(dtype):
    kernel = perm._numba()
    rng = _rng(18)
    # packed words (float32, n <= 512), 8-bit and 11-bit radix digits; ties, huge, tiny and subnormal values
    for n in (1, 2, 7, 512, 513, 3000, 4096, 9000):
        x = rng.normal(size=n) * 10.0 ** rng.integers(-40, 38, size=n)
        x[rng.integers(0, n, size=n // 3)] = 1.5  # ties
        x[: min(n, 3)] = [5e-324 if dtype == np.float64 else 1e-45, -np.finfo(dtype).max, 0.0][: min(n, 3)]
        x = x.astype(dtype)
        scratch = kernel._project_scratch(n, np.int32)
        out = np.empty(n, np.int32)
        kernel._argsort_descending(x, out, scratch[0][0], scratch[0][1], scratch[3], scratch[4])
        np.testing.assert_array_equal(out, np.argsort(-x, kind="stable"))
    x = np.array([0.0, -0.0, 1.0, -0.0, 0.0], dtype=dtype)
    kernel._argsort_descending(x, out[:5], scratch[0][0], scratch[0][1], scratch[3], scratch[4])
    np.testing.assert_array_equal(out[:5], [2, 0, 4, 1, 3])  # +0 before -0, each in index order


def _unfused(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setattr(perm, "_fused", lambda *t: False)
        return fn()


def _value_and_grads(fn, *inputs, seed=0):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*inputs)
    y.backward(torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(y.dtype))
    return [y.detach()] + [t.grad for t in inputs]


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("regularization", ["l2", "kl"])
def test_fused_sort_rank_match_unfused(dtype, regularization, monkeypatch):
    g = torch.Generator().manual_seed(19)
    for n in (3, 300, 700, 5000):
        # distinct values (ties may be broken either way, which changes subgradients)
        x = (torch.stack([torch.randperm(n, generator=g) for _ in range(6)]).to(dtype) / n * 6 - 3).reshape(2, 3, n)
        eps = torch.rand(2, 3, generator=g, dtype=dtype) + 0.2
        for op in (soft_rank, soft_sort):
            for descending in (True, False):

                def run(x, e, op=op, descending=descending):
                    return op(x, temperature=e, regularization=regularization, descending=descending)

                # the reference: the unfused path in float64 (in float32 it is the less accurate of the two)
                x64, eps64 = x.double(), eps.double()
                fused = _value_and_grads(run, x, eps) + [run(x, 0.7)]  # a number temperature: the scalar path
                ref = _unfused(monkeypatch, lambda run=run, x=x64, e=eps64: _value_and_grads(run, x, e) + [run(x, 0.7)])
                for a, b in zip(fused, ref):
                    scale = b.abs().max().clamp(min=1.0)
                    tol = 2e-6 if dtype == torch.float32 else 1e-10
                    assert (a.double() - b).abs().max() <= tol * scale, (op.__name__, n, descending)


@needs_numba
@pytest.mark.parametrize("p", [2, P43])
def test_fused_projection_and_topk_match_unfused(p, monkeypatch):
    g = torch.Generator().manual_seed(20)
    z = torch.randn(4, 700, generator=g, dtype=torch.float64)
    w = torch.randn(4, 700, generator=g, dtype=torch.float64)
    k = torch.tensor([1.0, 7.5, 350.0, 699.0], dtype=torch.float64)

    def proj(z, w):
        return permutahedron_projection(z, w, p=p)

    def topk(z, k):
        return permutahedron_topk(z, k, temperature=0.3, p=p)

    for fn, args in ((proj, (z, w)), (topk, (z, k))):
        fused = _value_and_grads(fn, *args)
        ref = _unfused(monkeypatch, lambda fn=fn, args=args: _value_and_grads(fn, *args))
        for a, b in zip(fused, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@needs_numba
def test_fused_kernel_rejects_non_finite():
    for bad in (math.nan, math.inf, -math.inf):
        for n in (5, 1000):
            x = torch.randn(2, n)
            x[1, n // 2] = bad
            for op in (soft_rank, soft_sort):
                with pytest.raises(ValueError, match="`x`"):
                    op(x)


def test_compile_runs_eagerly_and_vmap_raises_clearly():
    """The PAV kernels read the data: under torch.compile a call is a graph break that runs eagerly (same values
    and gradients); a torch.func transform gets a NotImplementedError that names the operator."""
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(21), requires_grad=True)
    for op in (lambda x: soft_rank(x, temperature=0.5), lambda x: permutahedron_topk(x, 3, p=P43)):
        compiled = torch.compile(lambda x, op=op: (op(x) * torch.arange(40.0)).sum(), backend="eager")
        value, (grad,) = compiled(x), torch.autograd.grad(compiled(x), x)
        ref = (op(x) * torch.arange(40.0)).sum()
        torch.testing.assert_close(value, ref)
        torch.testing.assert_close(grad, torch.autograd.grad(ref, x)[0])
    with pytest.raises(NotImplementedError, match="soft_sort: torch.func"):
        torch.func.vmap(lambda r: soft_sort(r))(x.detach())


# ----------------------------------------------------------------------------------------------------------
# Argument checking
# ----------------------------------------------------------------------------------------------------------
def test_bad_arguments_raise():
    x = torch.randn(2, 5)
    cases = [
        (lambda: isotonic(x, p=3), ValueError, "`p`"),
        (lambda: isotonic(x, p="2"), TypeError, "`p`"),
        (lambda: isotonic(x, solver="qp"), ValueError, "`solver`"),
        (lambda: isotonic(x, torch.zeros(5)), ValueError, "`w`"),
        (lambda: isotonic(x, torch.ones(3)), ValueError, "`w`"),
        (lambda: isotonic(x, dim=2), ValueError, "`dim`"),
        (lambda: isotonic(x, solver="dykstra", max_iter=0), ValueError, "`max_iter`"),
        (lambda: isotonic(x, solver="dykstra", tol=-1.0), ValueError, "`tol`"),
        (lambda: isotonic(torch.tensor([1.0, math.nan])), ValueError, "NaN"),
        (lambda: isotonic(torch.tensor([1.0, math.inf])), ValueError, "finite"),
        (lambda: isotonic(torch.arange(3)), TypeError, "floating"),
        (lambda: isotonic([1.0, 2.0]), TypeError, "torch.Tensor"),
        (lambda: soft_rank(x, temperature=0), ValueError, "`temperature`"),
        (lambda: soft_sort(x, temperature=-1.0), ValueError, "`temperature`"),
        (lambda: soft_rank(x, strength=0.5), TypeError, "strength"),  # renamed `temperature`
        (lambda: soft_rank(x, regularization="l1"), ValueError, "`regularization`"),
        (lambda: soft_sort(x, descending=1), TypeError, "`descending`"),
        (lambda: permutahedron_topk(x, 6), ValueError, "`k`"),
        (lambda: permutahedron_topk(x, 2, temperature=-1.0), ValueError, "`temperature`"),
        (lambda: permutahedron_topk(x, 2, p=1.5), ValueError, "`p`"),
        (lambda: topk_magnitude(x, -1), ValueError, "`k`"),
        (lambda: topk_magnitude(x, 2, dim="0"), TypeError, "`dim`"),
        (lambda: permutahedron_projection(x, torch.ones(4)), ValueError, "`w`"),
        (lambda: permutahedron_projection(x, [1.0] * 5), TypeError, "`w`"),
    ]
    for call, exc, words in cases:
        with pytest.raises(exc, match=words):
            call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    """On CUDA the pure-torch PAV runs on the device; it must agree with the CPU path (numba or torch)."""
    g = torch.Generator().manual_seed(17)
    x = torch.randn(4, 300, generator=g, dtype=torch.float64)
    calls = [
        lambda t: soft_rank(t, temperature=0.3),
        lambda t: soft_sort(t, temperature=0.3, regularization="kl"),
        lambda t: permutahedron_topk(t, 7, p=P43),
        lambda t: topk_magnitude(t, 5, temperature=0.2),
        lambda t: isotonic(t, p=P43),
        lambda t: isotonic(t, solver="dykstra", max_iter=50),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for call in calls:
            xc = x.cuda().requires_grad_()
            xh = x.clone().requires_grad_()
            yc, yh = call(xc), call(xh)
            torch.testing.assert_close(yc.cpu(), yh, rtol=0, atol=1e-9)
            up = torch.randn_like(yh)
            yc.backward(up.cuda())
            yh.backward(up)
            torch.testing.assert_close(xc.grad.cpu(), xh.grad, rtol=0, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_backward_gradcheck_on_the_torch_path(backend, monkeypatch):
    """The one block backward (``_block_gradient`` over the loss hooks) on the unfused path, with either PAV
    solver: isotonic (with weights), the projections (p = 2, 4/3), soft sort/rank (l2, kl) and top-k in magnitude,
    against float64 finite differences."""
    monkeypatch.setattr(perm, "pav_backend", lambda device="cpu": backend)
    monkeypatch.setattr(perm, "_fused", lambda *t: False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, dtype=torch.float64, generator=g).requires_grad_()
    w = (torch.rand(3, 7, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    z = torch.randn(3, 7, dtype=torch.float64, generator=g).requires_grad_()
    for p in (2, 4 / 3):
        assert gradcheck(lambda y, w, p=p: isotonic(y, w, p=p), (x, w))
        assert gradcheck(lambda z, w, p=p: permutahedron_projection(z, w, p=p), (z, w))
        assert gradcheck(lambda x, p=p: topk_magnitude(x, 3, temperature=0.7, p=p), (x,))
    for reg in ("l2", "kl"):
        assert gradcheck(lambda x, reg=reg: soft_rank(x, temperature=0.5, regularization=reg), (x,))
        assert gradcheck(lambda x, reg=reg: soft_sort(x, temperature=0.5, regularization=reg), (x,))


def test_empty_batches_and_overflow_are_handled():
    """Issue 14 #7 and #9: zero rows through Dykstra and the fused kernel; scores that overflow once divided by the
    temperature raise an error naming the public function (not NaN, not a private name)."""
    for fn in (lambda y: isotonic(y, solver="dykstra"), soft_rank, soft_sort, lambda y: permutahedron_topk(y, 2)):
        assert fn(torch.zeros(0, 5)).shape == (0, 5)
    with pytest.raises(ValueError, match="permutahedron_topk: the scaled scores overflow"):
        permutahedron_topk(torch.tensor([1e38, 1.0, 2.0, 3.0]), 2, temperature=1e-3)


def test_kl_soft_sort_preserves_the_logsumexp():
    """Issue 14 #12: the docstring's invariant per regularisation: l2 keeps the sum, kl the log-sum-exp."""
    x = torch.randn(4, 9, dtype=torch.float64)
    torch.testing.assert_close(soft_sort(x, temperature=0.7).sum(-1), x.sum(-1))
    torch.testing.assert_close(soft_sort(x, temperature=0.7, regularization="kl").logsumexp(-1), x.logsumexp(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_topk_magnitude_small_temperature_and_huge_values(dtype):
    """Issue 14 #2: |x| − v cancelled in float32 (3 came out as 2.86 at t = 1e-6, all zeros at 1e-8) and 1e38
    overflowed to -inf. The operator now computes in float64 and returns x's dtype."""
    x = torch.tensor([3.0, 1.0, 2.0, 0.0], dtype=dtype)
    for t in (1e-6, 1e-8):
        y = topk_magnitude(x, 2, temperature=t)
        assert y.dtype == dtype
        torch.testing.assert_close(y, torch.tensor([3.0, 0.0, 2.0, 0.0], dtype=dtype), rtol=1e-6, atol=1e-6)
    if dtype == torch.float32:
        big = torch.tensor([1e38, -1e38, 1.0, 2.0])
        torch.testing.assert_close(topk_magnitude(big, 2), torch.tensor([1e38, -1e38, 0.0, 0.0]))


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_projections_do_not_cancel_at_large_scale(backend, monkeypatch):
    """Issue 14 #1: μ = s − v cancelled once |x|/t was large (float32 from ~1e7, float64 from ~1e16): ranks left
    [1, n], masks summed to less than k. μ is now read off block-centred quantities, on both paths."""
    if backend == "torch":
        monkeypatch.setattr(perm, "_fused", lambda *t: False)
    elif perm.pav_backend("cpu") != "numba":
        pytest.skip("numba not installed")
    x = torch.tensor([3.0, 1.0, 2.0, 0.0])
    assert torch.equal(permutahedron_topk(x, 2, temperature=1e-7), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert torch.equal(permutahedron_topk(x, 2, temperature=1e-7, p=4 / 3), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    for reg in ("l2", "kl"):
        assert torch.equal(soft_rank(x, temperature=1e-8, regularization=reg), torch.tensor([1.0, 3.0, 2.0, 4.0]))
    big = torch.tensor([1e20, 0.0, -1e20], dtype=torch.float64)
    torch.testing.assert_close(soft_rank(big), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    r = soft_rank(torch.randn(5, 50, dtype=torch.float64) * 1e18, temperature=1e-3)
    assert bool(((r >= 1) & (r <= 50)).all())
    torch.testing.assert_close(r.sum(-1), torch.full((5,), 50 * 51 / 2, dtype=torch.float64))


def test_quartic_pav_torch_path_does_not_overflow(monkeypatch):
    """Issue 14 #6: the torch PAV's cubic moments overflowed float32 from a spread of ~1e13 (NaN); it pools in
    float64 now, as the numba kernel does."""
    monkeypatch.setattr(perm, "pav_backend", lambda device="cpu": "torch")
    for scale in (1e13, 1e25):
        y = isotonic(torch.tensor([1.0, -1.0, 3.0, 0.0]) * scale, p=4 / 3)
        torch.testing.assert_close(y, torch.tensor([1.0, 1.0, 1.0, 0.0]) * scale)
