"""SOFT sorted top-k (``softtopk.topk_permutation(method="sinkhorn")``, the family :mod:`softtopk.sinkhorn`): against
a plain float64 Sinkhorn and an independent semi-dual solve, its marginals and limits, the k = 1 case of
``topk_mask(method="soft", epsilon=...)``, and the implicit backward (float64 gradcheck). Its smoothing parameter is
the option ``epsilon`` (the paper's ε, relative to max C); ``temperature`` is not taken."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import logsumexp
from torch.autograd import gradcheck

import softtopk
from conftest import spaced
from softtopk import sinkhorn, topk_permutation


def _problem(x, k, largest):
    """Anchors, anchor masses and the normalised cost (J, n) of SOFT sorted top-k, from the paper's definition."""
    n = x.size
    if largest:
        anchors = np.array([k - j for j in range(k + 1)], dtype=float)  # k, …, 1 take 1/n; 0 takes the rest
    else:
        anchors = np.arange(k + 1, dtype=float)  # 0, …, k − 1 take 1/n; k takes the rest
    nu = np.full(k + 1, 1.0 / n)
    nu[k] = (n - k) / n
    if k == n:
        anchors, nu = anchors[:k], nu[:k]
    cost = (x[None, :] - anchors[:, None]) ** 2
    return cost / cost.max(), nu


def ref_sinkhorn(x, k, eps, largest=True, iters=200_000):
    """Plain log-domain Sinkhorn in float64, run until both marginals hold to 1e-13. Returns Γ = n P[:k]."""
    n = x.size
    cost, nu = _problem(x, k, largest)
    log_mu, log_nu = np.full(n, -math.log(n)), np.log(nu)
    f, g = np.zeros(n), np.zeros(nu.size)
    for _ in range(iters):
        f = eps * log_mu - eps * logsumexp((g[:, None] - cost) / eps, axis=0)
        g = eps * log_nu - eps * logsumexp((f[None, :] - cost) / eps, axis=1)
        plan = np.exp((f[None, :] + g[:, None] - cost) / eps)
        if np.abs(plan.sum(0) * n - 1).max() < 1e-13:
            break
    else:
        raise AssertionError("reference Sinkhorn did not converge")
    return n * plan[:k]


def ref_semi_dual(x, k, eps, largest=True):
    """The same plan from the semi-dual, maximised by BFGS over the anchor potentials (an independent solver)."""
    n = x.size
    cost, nu = _problem(x, k, largest)
    c = cost / eps

    def neg_f(b):
        lse = logsumexp(b[:, None] - c, axis=0)
        p = np.exp(b[:, None] - c - lse[None, :]) / n
        return -(nu @ b - lse.mean()), -(nu - p.sum(1))

    res = minimize(neg_f, np.zeros(nu.size), jac=True, method="BFGS", options={"gtol": 1e-14, "maxiter": 10_000})
    b = res.x
    lse = logsumexp(b[:, None] - c, axis=0)
    plan = np.exp(b[:, None] - c - lse[None, :]) / n
    assert np.abs(plan.sum(1) - nu).max() * n < 1e-8
    return n * plan[:k]


@pytest.mark.parametrize("largest", [True, False])
def test_matches_plain_sinkhorn(largest):
    rng = np.random.default_rng(0)
    for n, k in ((5, 1), (8, 3), (12, 5), (6, 6)):
        x = rng.normal(size=(2, n)) * 1.5
        for eps in (0.05, 0.3, 2.0):
            g = topk_permutation(torch.tensor(x), k, epsilon=eps, largest=largest).numpy()
            assert g.shape == (2, k, n)
            for i in range(2):
                np.testing.assert_allclose(g[i], ref_sinkhorn(x[i], k, eps, largest), rtol=0, atol=1e-9)


def test_small_epsilon_matches_semi_dual():
    """Where plain Sinkhorn crawls (well-separated scores, small ε) the Newton finish still gives the plan."""
    x = np.array([0.0, 3.0, 1.0, 2.0, 5.0, -1.0])
    for eps in (0.02, 0.005):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            g = topk_permutation(torch.tensor(x), 3, epsilon=eps).numpy()
        np.testing.assert_allclose(g, ref_semi_dual(x, 3, eps), rtol=0, atol=1e-6)
        g32 = topk_permutation(torch.tensor(x, dtype=torch.float32), 3, epsilon=eps).double().numpy()
        np.testing.assert_allclose(g32, g, rtol=0, atol=1e-4)


@pytest.mark.parametrize("largest", [True, False])
def test_k1_is_the_soft_topk_mask(largest):
    """For k = 1 the anchors {1, 0} with masses (1/n, (n − 1)/n) and the per-row max-normalised cost are exactly
    those of topk_mask(method="soft", epsilon=ε): the single row of Γ is that mask, values and gradients."""
    x = spaced(9, batch=(3,)).requires_grad_()
    for eps in (0.05, 0.5, 3.0):
        g = topk_permutation(x, 1, epsilon=eps, largest=largest)[..., 0, :]
        m = softtopk.topk_mask(x, 1, method="soft", epsilon=eps, largest=largest)
        torch.testing.assert_close(g, m, rtol=0, atol=1e-8)
        up = torch.randn_like(m)
        ga = torch.autograd.grad((g * up).sum(), x)[0]
        gb = torch.autograd.grad((m * up).sum(), x)[0]
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-7)


def test_marginals_and_mask():
    """Rows sum to 1, columns to at most 1; for k ≥ 2 the anchors (k, …, 0) differ from SOFT's (1, 0), so the
    summed rows are a different soft top-k mask: it sums to k, lies in [0, 1] and orders like the scores."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 30, generator=g, dtype=torch.float64)
    for k in (2, 5, 29, 30):
        for eps in (0.01, 0.1, 1.0):
            gam = topk_permutation(x, k, epsilon=eps)
            torch.testing.assert_close(gam.sum(-1), torch.ones(4, k, dtype=torch.float64), rtol=0, atol=1e-9)
            col = gam.sum(-2)
            assert float(col.max()) <= 1 + 1e-9 and float(gam.min()) >= 0
            torch.testing.assert_close(col.sum(-1), torch.full((4,), float(k), dtype=torch.float64))
            order = torch.argsort(x, -1)
            assert bool((col.gather(-1, order).diff(dim=-1) >= -1e-9).all())  # larger score, larger mask


def test_hard_limit_and_sorted_values():
    x = torch.tensor([[0.3, 2.0, -1.0, 1.1, 5.0, 4.2], [1.0, 0.0, 3.0, 2.0, -2.0, 0.5]], dtype=torch.float64)
    gam = topk_permutation(x, 3, epsilon=1e-4)
    top = torch.topk(x, 3)
    hard = torch.zeros_like(gam).scatter_(-1, top.indices.unsqueeze(-1), 1.0)
    torch.testing.assert_close(gam, hard, rtol=0, atol=1e-6)
    torch.testing.assert_close(gam @ x.unsqueeze(-1), top.values.unsqueeze(-1), rtol=0, atol=1e-5)
    low = topk_permutation(x, 2, epsilon=1e-4, largest=False) @ x.unsqueeze(-1)
    torch.testing.assert_close(low.squeeze(-1), torch.topk(x, 2, largest=False).values, rtol=0, atol=1e-5)


def test_full_permutation_is_doubly_stochastic():
    x = torch.randn(3, 7, dtype=torch.float64)
    gam = topk_permutation(x, 7, epsilon=0.2)
    torch.testing.assert_close(gam.sum(-1), torch.ones(3, 7, dtype=torch.float64))
    torch.testing.assert_close(gam.sum(-2), torch.ones(3, 7, dtype=torch.float64))


def test_gradcheck():
    x = spaced(6, batch=(2,)).requires_grad_()
    eps = torch.tensor([0.3, 1.2], dtype=torch.float64, requires_grad=True)
    for k, largest in ((2, True), (3, False), (6, True)):
        assert gradcheck(
            lambda x, e, k=k, largest=largest: topk_permutation(x, k, epsilon=e, largest=largest, tol=1e-14),
            (x, eps),
            atol=1e-6,
        )
    xt = x.detach().T.contiguous().requires_grad_()  # (6, 2): scores along dim 0
    assert gradcheck(lambda x: topk_permutation(x, 2, epsilon=0.2, dim=0, tol=1e-14), (xt,), atol=1e-6)


def test_gradcheck_small_epsilon_newton_path():
    x = torch.tensor([0.0, 3.0, 1.0, 2.0, 5.0, -1.0], dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x: topk_permutation(x, 3, epsilon=0.02, tol=1e-13), (x,), atol=1e-5)


def test_dim_and_shapes():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, 3, generator=g, dtype=torch.float64)
    gam = topk_permutation(x, 4, dim=1)
    assert gam.shape == (2, 3, 4, 9)
    ref = topk_permutation(x.transpose(1, 2), 4)
    torch.testing.assert_close(gam, ref, rtol=0, atol=0)
    assert topk_permutation(x, 0).shape == (2, 9, 0, 3)
    assert topk_permutation(x.half(), 2).dtype == torch.float16


def test_backward_keeps_no_iterations():
    """The graph holds the plan only: backward memory does not grow with the number of Sinkhorn iterations."""
    x = torch.randn(2, 50, dtype=torch.float64, requires_grad=True)
    gam = topk_permutation(x, 3, epsilon=0.1)
    node = gam.grad_fn
    names = set()
    stack = [node]
    while stack:
        nd = stack.pop()
        if nd is None or nd.name() in names:
            continue
        names.add(nd.name())
        stack.extend(f for f, _ in nd.next_functions)
    assert any("SinkhornPlan" in s for s in names)
    assert not any("Logsumexp" in s for s in names)


def test_warns_on_non_convergence():
    x = torch.arange(8, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="max_iter"):
        topk_permutation(x, 3, epsilon=1e-3, max_iter=2)


def test_bad_arguments_raise():
    x = torch.randn(2, 5)
    cases = [
        (lambda: topk_permutation(x, 6), ValueError, "`k`"),
        (lambda: topk_permutation(x, 2.0), TypeError, "`k`"),
        (lambda: topk_permutation(x, torch.tensor(2)), TypeError, "`k`"),
        (lambda: topk_permutation(x, 2, method="sparse"), ValueError, "`method`"),
        (lambda: topk_permutation(x, 2, method="soft"), ValueError, "`method`"),  # the old name of "sinkhorn"
        (lambda: topk_permutation(x, 2, epsilon=0.0), ValueError, "`epsilon`"),
        (lambda: topk_permutation(x, 2, epsilon=-1.0), ValueError, "`epsilon`"),
        (lambda: topk_permutation(x, 2, epsilon=torch.tensor([0.1, 0.0])), ValueError, "`epsilon`"),
        (lambda: topk_permutation(x, 2, largest="yes"), TypeError, "`largest`"),
        (lambda: topk_permutation(x, 2, dim=3), ValueError, "`dim`"),
        (lambda: topk_permutation(x, 2, max_iter=0), ValueError, "`max_iter`"),
        (lambda: topk_permutation(x, 2, tol=-1.0), ValueError, "`tol`"),
        (lambda: topk_permutation(torch.tensor([1.0, math.inf]), 1), ValueError, "finite"),
        (lambda: topk_permutation(torch.tensor([1.0, math.nan]), 1), ValueError, "NaN"),
        (lambda: topk_permutation(torch.arange(4), 1), TypeError, "floating"),
    ]
    for call, exc, words in cases:
        with pytest.raises(exc, match=words):
            call()


def test_temperature_is_not_taken():
    """The smoothing parameter of "sinkhorn" is the option ``epsilon`` (relative to max C, so not in score units):
    ``temperature`` raises a TypeError naming it, alone, with ``epsilon``, as a number or a tensor."""
    x = torch.randn(2, 5)
    for kw in ({"temperature": 0.1}, {"temperature": 0.1, "epsilon": 0.1}, {"temperature": torch.ones(2)}):
        for method in (None, "sinkhorn"):
            extra = {} if method is None else {"method": method}
            with pytest.raises(TypeError, match="temperature"):
                topk_permutation(x, 2, **extra, **kw)
    with pytest.raises(TypeError, match="temperature"):
        softtopk.topk_distribution(x, 2, method="sinkhorn", temperature=0.1)


def test_default_epsilon_and_sinkhorn_is_the_default_method():
    x = torch.randn(3, 8, dtype=torch.float64)
    ref = topk_permutation(x, 3, method="sinkhorn", epsilon=0.1)
    torch.testing.assert_close(topk_permutation(x, 3), ref, rtol=0, atol=0)
    torch.testing.assert_close(topk_permutation(x, 3, method="sinkhorn"), ref, rtol=0, atol=0)
    assert softtopk.PERMUTATION_METHODS[0] == "sinkhorn"


def test_internal_plan_marginals():
    """The low-level plan meets both marginals to the tolerance (anchors exactly)."""
    ce = torch.rand(3, 4, 20, dtype=torch.float64) * 5
    nu = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    plan = sinkhorn.sinkhorn_plan(ce, nu.log().view(1, 4, 1), tol=1e-12)
    torch.testing.assert_close(plan.sum(-1), nu.expand(3, 4), rtol=0, atol=1e-14)
    torch.testing.assert_close(plan.sum(-2) * 20, torch.ones(3, 20, dtype=torch.float64), rtol=0, atol=1e-11)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    x = torch.randn(3, 200, dtype=torch.float64)
    for eps in (0.1, 0.003):
        xc = x.cuda().requires_grad_()
        xh = x.clone().requires_grad_()
        gc, gh = topk_permutation(xc, 5, epsilon=eps), topk_permutation(xh, 5, epsilon=eps)
        torch.testing.assert_close(gc.cpu(), gh, rtol=0, atol=1e-9)
        up = torch.randn_like(gh)
        gc.backward(up.cuda())
        gh.backward(up)
        torch.testing.assert_close(xc.grad.cpu(), xh.grad, rtol=0, atol=1e-7)


def test_huge_scores_do_not_overflow_the_cost():
    """Issue 14 #11: (x - a)² overflowed float32 at |x| = 1e20 (all NaN). The cost is scaled before squaring; the
    plan is then SOFT's own answer at that scale, which for k = 1 is the two-anchor mask of topk_mask(soft, epsilon)."""
    x = torch.tensor([1e20, 0.0, 1.0])
    gamma = topk_permutation(x, 1, epsilon=0.1)
    assert torch.isfinite(gamma).all()
    torch.testing.assert_close(gamma[0], softtopk.topk_mask(x, 1, method="soft", epsilon=0.1), atol=1e-5, rtol=0)
    y = torch.tensor([3e19, -2e19, 1e19, 0.0])
    assert torch.isfinite(topk_permutation(y, 2, epsilon=1e-3)).all()
