"""Losses of ``softtopk.losses`` against independent computations written here: the LML threshold by brentq
(conftest), the literal DFTopK formula (conftest), a plain float64 Sinkhorn to k + 1 anchors and a dense odd-even
network for the top-k cross-entropy, quadrature of the Gaussian order statistics for the smoothed hinge; float64
gradchecks, reductions, bad inputs, half precision, and short training runs on sklearn's digits.

The mask-based losses (LML, cascade) take ``topk_mask``'s width convention: ``temperature`` T is the width of the
transition on the score axis, and the references, written with the family's own t, are called at t = T·factor
(``MASK_FACTOR``). The top-k cross-entropy's "sinkhorn" method is smoothed by ``epsilon``; the sorting networks and
the hinge loss keep their temperature (the comparators' t, the noise σ)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import logsumexp, xlogy
from scipy.stats import norm
from torch.autograd import gradcheck

from conftest import ref_dftopk, ref_threshold_mask, spaced
from softtopk.losses import (
    DEFAULT_P_K,
    CascadeTopKLoss,
    JointCascadeLoss,
    LMLLoss,
    SmoothTopKHingeLoss,
    TopKCrossEntropyLoss,
    cascade_topk_loss,
    joint_cascade_loss,
    lml_loss,
    smooth_topk_hinge_loss,
    topk_cross_entropy,
)

NETWORKS = ("odd_even", "bitonic")
PERMUTATION_METHODS = ("sinkhorn",) + NETWORKS
# t = T·factor for the masks at temperature T, the factor solving "slope of the mask at y = 1/2 is 1/T" from the
# definitions (written here, not read from the library): σ(z/t) has slope σ'(0)/t = 1/(4t), so t = T/4; the Laplace
# CDF of scale t has density 1/(2t) at 0, so t = T/2. DFTopK is a sigmoid mask too.
MASK_FACTOR = {"sigmoid": 0.25, "dftopk": 0.25, "lapsum": 0.5}


def smoothing(method: str, value) -> dict:
    """The keyword of ``topk_permutation``'s smoothing parameter: ``epsilon`` for "sinkhorn", else ``temperature``."""
    return {"epsilon" if method == "sinkhorn" else "temperature": value}


def rows(b, n, seed=0, dtype=torch.float64):
    """(b, n) distinct scores, well separated (safe for finite differences and hard limits)."""
    g = torch.Generator().manual_seed(seed)
    return spaced(n, batch=(b,), generator=g, dtype=dtype) * 3.0


def labels(b, n, seed=1):
    return torch.randint(0, n, (b,), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------------------
def ref_soft_gamma(x, k, eps, iters=20000):
    """Γ (k, n) of SOFT sorted top-k by plain float64 log-domain Sinkhorn on one row: mass 1/n on each score,
    anchors (k, k−1, …, 1, 0) with masses (1/n, …, 1/n, (n−k)/n), cost (x_i − a_j)² / max C, Γ = n P[:k]."""
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    j = k + 1 if k < n else k
    a = k - np.arange(j, dtype=np.float64)
    cost = (x[None, :] - a[:, None]) ** 2
    cost = cost / cost.max()
    nu = np.full(j, 1.0 / n)
    if j > k:
        nu[k] = (n - k) / n
    f, g = np.zeros(n), np.zeros(j)
    for _ in range(iters):
        f = -eps * math.log(n) - eps * logsumexp((g[:, None] - cost) / eps, axis=0)
        g = eps * np.log(nu) - eps * logsumexp((f[None, :] - cost) / eps, axis=1)
        plan = np.exp((f[None, :] + g[:, None] - cost) / eps)
        if np.abs(plan.sum(0) * n - 1).max() < 1e-14:
            break
    assert np.abs(plan.sum(0) * n - 1).max() < 1e-12
    return n * plan[:k]


def ref_odd_even_gamma(x, k, t):
    """Γ (k, n) of the relaxed odd-even transposition network, built densely: n layers, layer l compares wires
    (i, i+1) for i ≡ l (mod 2), swap probability α = sigmoid((b − a)/t), larger value to the upper wire."""
    x = torch.as_tensor(x, dtype=torch.float64)
    n = x.numel()
    perm, vals = torch.eye(n, dtype=torch.float64), x.clone()
    for layer in range(n):
        mix = torch.eye(n, dtype=torch.float64)
        for i in range(layer % 2, n - 1, 2):
            alpha = torch.sigmoid((vals[i + 1] - vals[i]) / t)
            mix[i, i] = mix[i + 1, i + 1] = 1 - alpha
            mix[i, i + 1] = mix[i + 1, i] = alpha
        vals, perm = mix @ vals, mix @ perm
    return perm[:k]


def ref_topk_ce(gamma, x, y, p_k, top1):
    """The loss of Petersen et al. 2022 from Γ (k, n), written with an explicit loop over k."""
    gamma = torch.as_tensor(gamma, dtype=torch.float64)
    x = torch.as_tensor(x, dtype=torch.float64)
    softmax = torch.softmax(x, 0)[y]
    parts = [float(gamma[:kk, y].sum()) for kk in range(1, len(p_k) + 1)]  # P_k[y] = Σ_{j<k} Γ_jy
    if top1 == "sort":
        return -math.log(sum(p * part for p, part in zip(p_k, parts)))
    rest = sum(p * part for p, part in zip(p_k[1:], parts[1:]))
    if top1 == "softmax":
        return -math.log(p_k[0] * float(softmax) + rest)
    return -p_k[0] * math.log(float(softmax)) - (1 - p_k[0]) * math.log(rest / (1 - p_k[0]))


def ref_smoothed_kth(s, j, sigma, points=40001):
    """E[top_j(s + σZ)] and its gradient P(i is the j-th largest), Z standard Gaussian, by quadrature: the density
    of the j-th largest at u is Σ_i φ_i(u) P(exactly j − 1 of the others exceed u) (a Poisson-binomial DP)."""
    s = np.asarray(s, dtype=np.float64)
    n = s.size
    u = np.linspace(s.min() - 12 * sigma, s.max() + 12 * sigma, points)
    pdf = norm.pdf((u[None] - s[:, None]) / sigma) / sigma
    above = norm.sf((u[None] - s[:, None]) / sigma)
    grad = np.empty(n)
    dens = np.zeros_like(u)
    for i in range(n):
        count = np.zeros((n, u.size))
        count[0] = 1.0
        for other in (o for o in range(n) if o != i):
            count[1:] = count[1:] * (1 - above[other]) + count[:-1] * above[other]
            count[0] = count[0] * (1 - above[other])
        w = pdf[i] * count[j - 1]
        grad[i] = np.trapezoid(w, u) if hasattr(np, "trapezoid") else np.trapz(w, u)
        dens += w
    value = np.trapezoid(u * dens, u) if hasattr(np, "trapezoid") else np.trapz(u * dens, u)
    return value, grad


def bce(y, r):
    """Binary cross-entropy of the soft mask y against the 0/1 relevance r, averaged over the items."""
    return -(xlogy(r, y) + xlogy(1 - r, 1 - y)).mean()


# ----------------------------------------------------------------------------------------------------------------
# LML
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,T", [(1, 4.0), (3, 2.0), (5, 8.0)])
def test_lml_matches_brentq_reference(k, T):
    """The sigmoid mask at temperature T is σ((x − τ)/t) with t = T/4."""
    x, y = rows(4, 7), labels(4, 7)
    got = lml_loss(x, y, k, temperature=T, reduction="none")
    t = T * MASK_FACTOR["sigmoid"]
    want = [-math.log(ref_threshold_mask(x[b].numpy(), k, t, "sigmoid")[y[b]]) for b in range(4)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-10)


def test_lml_per_row_temperature_and_limits():
    x, y = rows(3, 6), labels(3, 6)
    t = torch.tensor([0.3, 1.0, 3.0], dtype=torch.float64)
    got = lml_loss(x, y, 2, temperature=t, reduction="none")
    want = torch.stack([lml_loss(x[b : b + 1], y[b : b + 1], 2, temperature=float(t[b])) for b in range(3)])
    torch.testing.assert_close(got, want)
    assert float(lml_loss(x, y, 6)) == 0.0  # k = n: every class is selected
    torch.testing.assert_close(lml_loss(x, y, 2), lml_loss(x, y, 2, temperature=1.0), rtol=0, atol=0)  # default
    hard = lml_loss(x, y, 2, temperature=4e-3, reduction="none")  # t = 1e-3
    in_top = (x.topk(2, dim=1).indices == y[:, None]).any(1)
    assert bool((hard[in_top] < 1e-6).all()) and bool((hard[~in_top] > 100).all())


def test_lml_gradcheck():
    x = rows(3, 6).requires_grad_()
    t = torch.tensor([0.7, 1.5, 1.0], dtype=torch.float64, requires_grad=True)
    y = labels(3, 6)
    assert gradcheck(lambda x, t: lml_loss(x, y, 3, temperature=t, reduction="none"), (x, t))


# ----------------------------------------------------------------------------------------------------------------
# top-k cross-entropy
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", PERMUTATION_METHODS)
def test_topk_ce_with_one_weight_is_cross_entropy(method):
    x, y = rows(4, 6).requires_grad_(), labels(4, 6)
    got = topk_cross_entropy(x, y, p_k=[1.0], method=method, **smoothing(method, 0.5))
    want = F.cross_entropy(x, y)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(topk_cross_entropy(x, y, k=1), want)
    (g1,) = torch.autograd.grad(got, x)
    (g2,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("top1", ["softmax", "cross_entropy", "sort"])
def test_topk_ce_sinkhorn_matches_reference_sinkhorn(top1):
    x, y = rows(3, 6), labels(3, 6)
    p_k, eps = (0.4, 0.1, 0.5), 0.5
    got = topk_cross_entropy(x, y, p_k=p_k, epsilon=eps, top1=top1, reduction="none", tol=1e-13)
    explicit = topk_cross_entropy(x, y, p_k=p_k, method="sinkhorn", epsilon=eps, top1=top1, reduction="none", tol=1e-13)
    torch.testing.assert_close(explicit, got, rtol=0, atol=0)  # "sinkhorn" is the default method
    want = [ref_topk_ce(ref_soft_gamma(x[b].numpy(), 3, eps), x[b], int(y[b]), p_k, top1) for b in range(3)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("top1", ["softmax", "cross_entropy", "sort"])
def test_topk_ce_odd_even_matches_dense_network(top1):
    x, y = rows(3, 5), labels(3, 5)
    p_k, t = (0.25, 0.25, 0.0, 0.5), 2.0
    got = topk_cross_entropy(x, y, p_k=p_k, method="odd_even", temperature=t, top1=top1, reduction="none")
    want = [ref_topk_ce(ref_odd_even_gamma(x[b], 4, t), x[b], int(y[b]), p_k, top1) for b in range(3)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    # the networks' default temperature is t = 1.0
    got = topk_cross_entropy(x, y, p_k=p_k, method="odd_even", top1=top1, reduction="none")
    want = [ref_topk_ce(ref_odd_even_gamma(x[b], 4, 1.0), x[b], int(y[b]), p_k, top1) for b in range(3)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", NETWORKS)
def test_topk_ce_hard_limit(method):
    """t → 0: P_k is the indicator of the k largest; the loss is −log(p_1 softmax_y + Σ_{k≥2} p_k 1[rank_y ≤ k])."""
    x, y = rows(6, 8), labels(6, 8, seed=3)
    p_k = (0.5, 0.0, 0.3, 0.2)
    got = topk_cross_entropy(x, y, p_k=p_k, method=method, temperature=1e-4, reduction="none")
    rank = (x > x.gather(1, y[:, None])).sum(1) + 1  # 1 for the largest
    hit = torch.stack([(rank <= kk).double() for kk in range(1, 5)], 1)
    softmax = torch.softmax(x, 1).gather(1, y[:, None]).squeeze(1)
    want = -torch.log(p_k[0] * softmax + hit[:, 1:] @ torch.tensor(p_k[1:], dtype=torch.float64))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_topk_ce_preselection_candidates():
    """candidates = m: the target and the m − 1 largest other logits, hard-selected, then the loss on those m
    alone."""
    x, y = rows(4, 9).requires_grad_(), labels(4, 9)
    p_k = (0.5, 0.0, 0.5)
    got = topk_cross_entropy(x, y, p_k=p_k, candidates=5, epsilon=0.3, reduction="none", tol=1e-13)
    for b in range(4):
        others = [i for i in x[b].detach().argsort(descending=True).tolist() if i != int(y[b])][:4]
        sub = x[b, [int(y[b])] + others].detach()
        want = ref_topk_ce(ref_soft_gamma(sub.numpy(), 3, 0.3), sub, 0, p_k, "softmax")
        assert abs(float(got[b].detach()) - want) < 1e-9
    (grad,) = torch.autograd.grad(got.sum(), x)
    top_others = x.detach().scatter(1, y[:, None], -math.inf).topk(4).indices
    selected = torch.zeros_like(x, dtype=torch.bool).scatter_(1, y[:, None], True).scatter_(1, top_others, True)
    assert bool((grad[~selected] == 0).all()) and bool((grad[selected] != 0).all())
    torch.testing.assert_close(
        topk_cross_entropy(x, y, p_k=p_k, candidates=9, epsilon=0.3, tol=1e-13),
        topk_cross_entropy(x, y, p_k=p_k, epsilon=0.3, tol=1e-13),
    )
    module = TopKCrossEntropyLoss(p_k=p_k, candidates=5, epsilon=0.3, reduction="none", tol=1e-13)
    torch.testing.assert_close(module(x, y), got, rtol=0, atol=0)


def test_topk_ce_k_shorthand_and_default():
    x, y = rows(3, 6), labels(3, 6)
    kw = {"method": "sinkhorn", "epsilon": 0.5, "reduction": "none"}
    torch.testing.assert_close(topk_cross_entropy(x, y, k=3, **kw), topk_cross_entropy(x, y, p_k=(0.5, 0, 0.5), **kw))
    torch.testing.assert_close(topk_cross_entropy(x, y, **kw), topk_cross_entropy(x, y, p_k=DEFAULT_P_K, **kw))
    with pytest.raises(ValueError, match=r"topk_cross_entropy: `k`=2 must equal len\(p_k\)=3"):
        topk_cross_entropy(x, y, k=2, p_k=(0.5, 0, 0.5))


@pytest.mark.parametrize("method", PERMUTATION_METHODS)
def test_topk_ce_gradcheck(method):
    x, y = rows(2, 5).requires_grad_(), labels(2, 5)
    opts = {"tol": 1e-14, "epsilon": 0.4} if method == "sinkhorn" else {"temperature": 1.5}
    for top1, m in (("softmax", None), ("sort", None), ("cross_entropy", 4)):
        assert gradcheck(
            lambda x, m=m, top1=top1: topk_cross_entropy(
                x, y, p_k=(0.5, 0.2, 0.3), candidates=m, method=method, top1=top1, reduction="none", **opts
            ),
            (x,),
            atol=1e-6,
        )


def test_topk_ce_renamed_arguments():
    """Method "sinkhorn" (formerly "soft") is smoothed by ``epsilon`` and takes no ``temperature`` (TypeError
    naming it, in the function and at the module's construction); "soft" is no permutation method; ``m`` is
    ``candidates``."""
    x, y = rows(3, 6), labels(3, 6)
    for kw in ({}, {"method": "sinkhorn"}, {"epsilon": 0.5}):
        with pytest.raises(TypeError, match="temperature"):
            topk_cross_entropy(x, y, temperature=0.5, **kw)
        with pytest.raises(TypeError, match="temperature"):
            TopKCrossEntropyLoss(temperature=0.5, **kw)
    with pytest.raises(ValueError, match="topk_cross_entropy: unknown `method`='soft'"):
        topk_cross_entropy(x, y, method="soft")
    with pytest.raises(TypeError, match="`epsilon`"):
        topk_cross_entropy(x, y, method="bitonic", epsilon=0.5)
    with pytest.raises(TypeError, match="`m`|'m'"):
        topk_cross_entropy(x, y, m=4)


# ----------------------------------------------------------------------------------------------------------------
# smoothed top-K hinge
# ----------------------------------------------------------------------------------------------------------------
def test_hinge_unsmoothed_and_imbalanced_margins():
    x, y = rows(5, 6), labels(5, 6)
    kth = x.topk(3, dim=1).values[:, -1]
    xy = x.gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(smooth_topk_hinge_loss(x, y, 2, temperature=0.0, reduction="none"), F.relu(1 + kth - xy))
    counts = [50, 10, 200, 7, 7, 30]
    margins = torch.tensor([0.4 * (7 / c) ** 0.25 for c in counts], dtype=torch.float64)
    got = smooth_topk_hinge_loss(
        x, y, 2, temperature=0.0, balanced=False, class_counts=counts, margin=0.4, scale=30.0, reduction="none"
    )
    torch.testing.assert_close(got, 30.0 * F.relu(margins[y] + kth - xy))


def test_hinge_estimator_converges_to_smoothed_loss():
    """A large-sample Monte Carlo estimate and its gradient against quadrature of E[top_{K+1}(x + σZ)]."""
    x = torch.tensor([[0.3, -0.4, 1.1, 0.0, 0.6], [2.0, -1.0, 0.5, 0.4, 0.2]], dtype=torch.float64)
    y, k, sigma = torch.tensor([1, 4]), 2, 0.7
    xr = x.clone().requires_grad_()
    gen = torch.Generator().manual_seed(0)
    got = smooth_topk_hinge_loss(xr, y, k, temperature=sigma, n_samples=200_000, generator=gen, reduction="none")
    (grad,) = torch.autograd.grad(got.sum(), xr)
    for b in range(2):
        value, dvalue = ref_smoothed_kth(x[b].numpy(), k + 1, sigma)
        hinge = 1 + value - float(x[b, y[b]])
        assert hinge > 0.1  # active: the loss is the hinge itself
        want_grad = dvalue.copy()
        want_grad[y[b]] -= 1
        assert abs(float(got[b].detach()) - hinge) < 0.01
        np.testing.assert_allclose(grad[b].numpy(), want_grad, atol=0.01)
        np.testing.assert_allclose(want_grad.sum(), 0.0, atol=1e-6)  # the probabilities sum to 1


def test_hinge_backward_is_gradient_of_fixed_noise_estimate():
    """With the noise fixed by the generator, the estimate is piecewise linear; its central differences match."""
    x, y = rows(3, 6), labels(3, 6)

    def f(z):
        return smooth_topk_hinge_loss(
            z, y, 2, temperature=0.5, n_samples=64, generator=torch.Generator().manual_seed(5), reduction="sum"
        )

    xr = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(f(xr), xr)
    fd = torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros(x.numel(), dtype=x.dtype)
        e[i] = 1e-7
        e = e.view_as(x)
        fd.view(-1)[i] = (f(x + e) - f(x - e)) / 2e-7
    torch.testing.assert_close(grad, fd, atol=1e-6, rtol=0)


def test_hinge_reproducible_with_generator():
    x, y = rows(4, 6), labels(4, 6)

    def draw(seed):
        return smooth_topk_hinge_loss(
            x, y, 1, temperature=1.0, generator=torch.Generator().manual_seed(seed), reduction="none"
        )

    torch.testing.assert_close(draw(3), draw(3), rtol=0, atol=0)
    assert not torch.equal(draw(3), draw(4))
    mod1 = SmoothTopKHingeLoss(1, temperature=1.0, generator=torch.Generator().manual_seed(3))
    mod2 = SmoothTopKHingeLoss(1, temperature=1.0, generator=torch.Generator().manual_seed(3))
    first = mod1(x, y)
    assert float(first) == float(mod2(x, y)) and float(mod1(x, y)) != float(first)  # fresh noise per call


def test_hinge_defaults_and_unused_n_samples():
    """``temperature=None`` is σ = 1.0 and ``n_samples=None`` is 5 draws; at temperature 0 (unsmoothed, no
    noise) ``n_samples`` is not taken: a TypeError naming it, in the function and at the module's construction."""
    x, y = rows(4, 6), labels(4, 6)

    def draw(**kw):
        return smooth_topk_hinge_loss(x, y, 2, generator=torch.Generator().manual_seed(7), reduction="none", **kw)

    explicit = draw(temperature=1.0, n_samples=5)
    torch.testing.assert_close(draw(), explicit, rtol=0, atol=0)
    torch.testing.assert_close(draw(temperature=None, n_samples=None), explicit, rtol=0, atol=0)
    assert not torch.equal(draw(n_samples=6), explicit)
    torch.testing.assert_close(draw(temperature=0.0, n_samples=None), draw(temperature=0.0), rtol=0, atol=0)
    for n_samples in (1, 5, 100):
        with pytest.raises(TypeError, match="smooth_topk_hinge_loss: .*`n_samples`"):
            smooth_topk_hinge_loss(x, y, 2, temperature=0.0, n_samples=n_samples)
        with pytest.raises(TypeError, match="SmoothTopKHingeLoss: .*`n_samples`"):
            SmoothTopKHingeLoss(2, temperature=0.0, n_samples=n_samples)
    with pytest.raises(TypeError, match="sigma"):
        smooth_topk_hinge_loss(x, y, 2, sigma=0.5)  # renamed `temperature`


# ----------------------------------------------------------------------------------------------------------------
# cascade top-K selection
# ----------------------------------------------------------------------------------------------------------------
def test_cascade_matches_literal_dftopk_bce():
    """DFTopK at temperature T is σ((x − θ)/t) with t = T/4 (T = 2.8: t = 0.7)."""
    x = rows(4, 8)
    idx = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(b))[:3] for b in range(4)])
    rel = torch.zeros(4, 8).scatter_(1, idx, 1.0)
    T = 2.8
    t = T * MASK_FACTOR["dftopk"]
    for k in (3, 5):
        got = cascade_topk_loss(x, idx, k, temperature=T, reduction="none")
        want = [bce(ref_dftopk(x[b].numpy(), k, t), rel[b].double().numpy()) for b in range(4)]
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cascade_topk_loss(x, rel.bool(), k, temperature=T, reduction="none"), got)
        torch.testing.assert_close(cascade_topk_loss(x, rel.double(), k, temperature=T, reduction="none"), got)
        torch.testing.assert_close(cascade_topk_loss(x, idx, k=k, temperature=T, reduction="none"), got)


def test_cascade_default_k_is_each_rows_set_size():
    """k=None: each row's number of relevant items; the default temperature T = 1.0 is t = 1/4."""
    x = rows(3, 7)
    rel = torch.tensor([[1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    got = cascade_topk_loss(x, rel, reduction="none")
    t = 1.0 * MASK_FACTOR["dftopk"]
    want = [bce(ref_dftopk(x[b].numpy(), int(rel[b].sum()), t), rel[b].double().numpy()) for b in range(3)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["sigmoid", "lapsum"])
def test_cascade_with_normalised_methods(method):
    x = rows(3, 6)
    idx = torch.tensor([[0, 1], [2, 5], [4, 3]])
    rel = torch.zeros(3, 6).scatter_(1, idx, 1.0).double().numpy()
    T = 0.8
    got = cascade_topk_loss(x, idx, 3, method=method, temperature=T, reduction="none")
    want = [bce(ref_threshold_mask(x[b].numpy(), 3, T * MASK_FACTOR[method], method), rel[b]) for b in range(3)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("method", ["dftopk", "sigmoid"])
def test_cascade_gradcheck(method):
    x = rows(3, 6).requires_grad_()
    t = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 1], [2, 5], [4, 3]])
    assert gradcheck(lambda x, t: cascade_topk_loss(x, idx, 3, method=method, temperature=t, reduction="none"), (x, t))


EXACT_ZEROS = [
    {"method": "hard"},
    {"method": "sparse"},
    {"method": "sparse", "p": 4 / 3},
    {"method": "perturbed"},
    {"method": "perturbed", "noise": "gumbel"},
    {"straight_through": True},
    {"method": "sigmoid", "straight_through": True},
]


@pytest.mark.parametrize("kw", EXACT_ZEROS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_cascade_rejects_masks_with_exact_zeros(kw):
    """A mask with exact zeros (hard, sparse, perturbed, straight-through's hard forward) gives the BCE a log of 0,
    clamped: a relevant item outside the mask's support gets no gradient and is never pulled in. ValueError, in the
    function and at the module's construction."""
    x = rows(3, 6)
    idx = torch.tensor([[0, 1], [2, 5], [4, 3]])
    with pytest.raises(ValueError, match="cascade_topk_loss: .*gradient"):
        cascade_topk_loss(x, idx, 2, **kw)
    with pytest.raises(ValueError, match="CascadeTopKLoss: .*gradient"):
        CascadeTopKLoss(2, **kw)


def test_cascade_exact_zeros_have_no_gradient():
    """The reason for the rule above, from the definitions: a 0/1 mask that misses a relevant item leaves its BCE
    term log max(0, tiny) constant (zero gradient), while the sigmoid mask pulls the item up."""
    x = torch.tensor([[3.0, 2.0, 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    rel = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)  # the relevant item is ranked last
    hard = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64) + 0 * x  # exact 0/1, a (zero) path to x
    tiny = torch.finfo(torch.float64).tiny
    loss = -(rel * hard.clamp_min(tiny).log() + (1 - rel) * (1 - hard).clamp_min(tiny).log()).mean()
    (g,) = torch.autograd.grad(loss, x)
    assert float(g[0, 3]) == 0.0
    (g,) = torch.autograd.grad(cascade_topk_loss(x, rel, 1, method="sigmoid"), x)
    assert float(g[0, 3]) < 0  # descending the loss raises the relevant item's score


# ----------------------------------------------------------------------------------------------------------------
# shared behaviour: reductions, modules, bad inputs, half precision
# ----------------------------------------------------------------------------------------------------------------
def _hinge(x, y, reduction="mean"):
    return smooth_topk_hinge_loss(
        x, y, 2, temperature=0.3, generator=torch.Generator().manual_seed(0), reduction=reduction
    )


FUNCTIONALS = {
    "lml": lambda x, y, reduction="mean": lml_loss(x, y, 2, reduction=reduction),
    "topk_ce": lambda x, y, reduction="mean": topk_cross_entropy(
        x, y, p_k=(0.5, 0.5), epsilon=0.5, reduction=reduction
    ),
    "hinge": _hinge,
    "cascade": lambda x, y, reduction="mean": cascade_topk_loss(x, y[:, None], 2, reduction=reduction),
}
MODULES = {
    "lml": lambda reduction: LMLLoss(2, reduction=reduction),
    "topk_ce": lambda reduction: TopKCrossEntropyLoss(p_k=(0.5, 0.5), epsilon=0.5, reduction=reduction),
    "hinge": lambda reduction: SmoothTopKHingeLoss(
        2, temperature=0.3, generator=torch.Generator().manual_seed(0), reduction=reduction
    ),
    "cascade": lambda reduction: CascadeTopKLoss(2, reduction=reduction),
}


def _module_call(name, module, x, y):
    return module(x, y[:, None]) if name == "cascade" else module(x, y)


@pytest.mark.parametrize("name", FUNCTIONALS)
def test_reductions_and_module(name):
    x, y = rows(5, 6), labels(5, 6)
    fn = FUNCTIONALS[name]
    per_row = fn(x, y, "none")
    assert per_row.shape == (5,) and bool((per_row >= 0).all())
    torch.testing.assert_close(fn(x, y, "sum"), per_row.sum())
    torch.testing.assert_close(fn(x, y, "mean"), per_row.mean())
    torch.testing.assert_close(fn(x, y), per_row.mean())
    for reduction in ("none", "sum", "mean"):
        module = MODULES[name](reduction)
        torch.testing.assert_close(_module_call(name, module, x, y), fn(x, y, reduction))
    assert "reduction=" in repr(MODULES[name]("mean"))


ARG = {"lml": "logits", "topk_ce": "logits", "hinge": "logits", "cascade": "scores"}
FN_NAME = {
    "lml": "lml_loss",
    "topk_ce": "topk_cross_entropy",
    "hinge": "smooth_topk_hinge_loss",
    "cascade": "cascade_topk_loss",
}


def poke(x, value):
    x = x.clone()
    x[1, 2] = value
    return x


@pytest.mark.parametrize("name", FUNCTIONALS)
def test_bad_scores(name):
    fn, arg, pre = FUNCTIONALS[name], ARG[name], FN_NAME[name]
    x, y = rows(3, 5), labels(3, 5)
    cases = [
        (x.tolist(), y, TypeError, f"{pre}: `{arg}` must be a torch.Tensor"),
        (x.long(), y, TypeError, f"{pre}: `{arg}` must have a floating dtype"),
        (x[0], y[:1], ValueError, rf"{pre}: `{arg}` must have shape \(batch, classes\)"),
        (x[None], y, ValueError, rf"{pre}: `{arg}` must have shape \(batch, classes\)"),
        (poke(x, math.nan), y, ValueError, f"{pre}: `{arg}` contains NaN"),
        (poke(x, math.inf), y, ValueError, f"{pre}: `{arg}` must be finite"),
        (poke(x, -math.inf), y, ValueError, f"{pre}: `{arg}` must be finite"),
    ]
    for xx, yy, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn(xx, yy)
    with pytest.raises(ValueError, match=f"{pre}: unknown `reduction`='avg'"):
        fn(x, y, "avg")


@pytest.mark.parametrize("name", ["lml", "topk_ce", "hinge"])
def test_bad_targets(name):
    fn, pre = FUNCTIONALS[name], FN_NAME[name]
    x, y = rows(3, 5), labels(3, 5)
    with pytest.raises(TypeError, match=f"{pre}: `target` must hold integer class indices"):
        fn(x, y.double())
    with pytest.raises(TypeError, match=f"{pre}: `target` must be a torch.Tensor"):
        fn(x, y.tolist())
    with pytest.raises(ValueError, match=rf"{pre}: `target` must have shape \(batch,\)"):
        fn(x, y[:, None, None] if name == "lml" else y[:, None])  # lml_loss: (batch, K) is a set of targets
    with pytest.raises(ValueError, match=rf"{pre}: `target` must hold class indices in \[0, 4\]"):
        fn(x, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match=rf"{pre}: `target` must hold class indices"):
        fn(x, torch.tensor([0, -1, 1]))


def test_bad_k_and_options():
    x, y = rows(3, 5), labels(3, 5)
    with pytest.raises(ValueError, match=r"lml_loss: `k`=6 is out of range \[1, 5\]"):
        lml_loss(x, y, 6)
    with pytest.raises(TypeError, match="lml_loss: `k` must be an int"):
        lml_loss(x, y, 2.5)
    with pytest.raises(ValueError, match="`temperature` must be positive"):
        lml_loss(x, y, 2, temperature=0.0)
    with pytest.raises(ValueError, match=r"smooth_topk_hinge_loss: `k`=5 is out of range \[1, 4\]"):
        smooth_topk_hinge_loss(x, y, 5)
    with pytest.raises(ValueError, match="smooth_topk_hinge_loss: `temperature` must be a finite nonnegative"):
        smooth_topk_hinge_loss(x, y, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="smooth_topk_hinge_loss: `n_samples`=0 is out of range"):
        smooth_topk_hinge_loss(x, y, 2, n_samples=0)
    with pytest.raises(ValueError, match="smooth_topk_hinge_loss: the imbalanced loss .* needs `class_counts`"):
        smooth_topk_hinge_loss(x, y, 2, balanced=False)
    with pytest.raises(ValueError, match="smooth_topk_hinge_loss: `class_counts` is used only by the imbalanced"):
        smooth_topk_hinge_loss(x, y, 2, class_counts=[1] * 5)
    with pytest.raises(ValueError, match=r"smooth_topk_hinge_loss: `class_counts` must hold one count per class"):
        smooth_topk_hinge_loss(x, y, 2, balanced=False, class_counts=[1, 2])
    with pytest.raises(ValueError, match="smooth_topk_hinge_loss: `class_counts` must be positive"):
        smooth_topk_hinge_loss(x, y, 2, balanced=False, class_counts=[1, 2, 0, 1, 1])
    with pytest.raises(TypeError, match="smooth_topk_hinge_loss: `generator` must be a torch.Generator"):
        smooth_topk_hinge_loss(x, y, 2, generator=0)
    with pytest.raises(ValueError, match="topk_cross_entropy: `p_k` must sum to 1"):
        topk_cross_entropy(x, y, p_k=(0.5, 0.4))
    with pytest.raises(ValueError, match="topk_cross_entropy: `p_k` must hold finite nonnegative"):
        topk_cross_entropy(x, y, p_k=(1.5, -0.5))
    with pytest.raises(ValueError, match="topk_cross_entropy: P_K has K=6 weights"):
        topk_cross_entropy(x, y, k=6)
    with pytest.raises(ValueError, match=r"topk_cross_entropy: `candidates`=2 is out of range \[3, 5\]"):
        topk_cross_entropy(x, y, k=3, candidates=2)
    with pytest.raises(ValueError, match="topk_cross_entropy: unknown `method`='nope'"):
        topk_cross_entropy(x, y, method="nope")
    with pytest.raises(ValueError, match="topk_cross_entropy: unknown `top1`='argmax'"):
        topk_cross_entropy(x, y, top1="argmax")
    with pytest.raises(TypeError, match="topk_cross_entropy: method='sinkhorn' takes no option `max_it`"):
        topk_cross_entropy(x, y, max_it=3)
    with pytest.raises(TypeError, match="TopKCrossEntropyLoss: method='sinkhorn' takes no option `relaxation`"):
        TopKCrossEntropyLoss(relaxation="cauchy")
    with pytest.raises(TypeError, match="cascade_topk_loss: method='dftopk' takes no option `tol`"):
        cascade_topk_loss(x, y[:, None], 2, tol=1e-3)
    with pytest.raises(ValueError, match=r"cascade_topk_loss: `k`=6 is out of range \[0, 5\]"):
        cascade_topk_loss(x, y[:, None], 6)
    with pytest.raises(ValueError, match="cascade_topk_loss: unknown `method`='nope'"):
        cascade_topk_loss(x, y[:, None], 2, method="nope")
    with pytest.raises(ValueError, match="cascade_topk_loss: `relevant` has a repeated index"):
        cascade_topk_loss(x, torch.tensor([[0, 0], [1, 2], [3, 4]]), 2)
    with pytest.raises(ValueError, match="cascade_topk_loss: `relevant` has a repeated index"):
        cascade_topk_loss(x, (x > 0).long(), 2)  # a 0-1 mask as integers is read as indices
    with pytest.raises(ValueError, match=r"cascade_topk_loss: `relevant` must hold item indices in \[0, 4\]"):
        cascade_topk_loss(x, torch.tensor([[0], [7], [1]]), 2)
    with pytest.raises(ValueError, match="cascade_topk_loss: `relevant` as an indicator must hold only 0 and 1"):
        cascade_topk_loss(x, torch.full((3, 5), 0.5), 2)
    with pytest.raises(ValueError, match="cascade_topk_loss: a boolean or floating `relevant`"):
        cascade_topk_loss(x, torch.ones(3, 4, dtype=torch.bool), 2)
    with pytest.raises(TypeError, match="cascade_topk_loss: `relevant` must be a torch.Tensor"):
        cascade_topk_loss(x, [[0], [1], [2]], 2)


def test_mask_losses_name_themselves_in_temperature_errors():
    x, y = rows(3, 5), labels(3, 5)
    with pytest.raises(ValueError, match="lml_loss: `temperature` must be positive"):
        lml_loss(x, y, 2, temperature=0.0)
    with pytest.raises(ValueError, match="cascade_topk_loss: `temperature` must be positive"):
        cascade_topk_loss(x, y[:, None], 2, temperature=0.0)


def test_module_arguments_checked_at_construction():
    with pytest.raises(ValueError, match=r"LMLLoss: `k`=0 is out of range"):
        LMLLoss(0)
    with pytest.raises(ValueError, match="TopKCrossEntropyLoss: `p_k` must sum to 1"):
        TopKCrossEntropyLoss(p_k=(0.5, 0.4))
    with pytest.raises(ValueError, match="TopKCrossEntropyLoss: unknown `reduction`"):
        TopKCrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="SmoothTopKHingeLoss: the imbalanced loss"):
        SmoothTopKHingeLoss(2, balanced=False)
    with pytest.raises(ValueError, match="CascadeTopKLoss: unknown `method`='nope'"):
        CascadeTopKLoss(2, method="nope")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", FUNCTIONALS)
def test_half_precision(name, dtype):
    x, y = rows(6, 8, dtype=torch.float32), labels(6, 8)
    ref = FUNCTIONALS[name](x, y, "none")
    xh = x.to(dtype).requires_grad_()
    got = FUNCTIONALS[name](xh, y, "none")
    assert got.dtype == dtype and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.float(), ref, rtol=0.05, atol=0.05)
    got.sum().backward()
    assert xh.grad.dtype == dtype and bool(torch.isfinite(xh.grad).all())


def test_underflow_is_finite():
    """A target far below the others: probabilities underflow, the loss stays finite (log max(p, tiny))."""
    x = torch.tensor([[0.0, 50.0, 60.0, 70.0, 80.0]])
    y = torch.tensor([0])
    assert math.isfinite(float(lml_loss(x, y, 2, temperature=0.1)))
    assert math.isfinite(float(topk_cross_entropy(x, y, p_k=(0.0, 1.0), epsilon=0.1, top1="sort")))
    loss = topk_cross_entropy(x.requires_grad_(), y, p_k=(0.5, 0.5), epsilon=0.1)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and float(x.grad[0, 0]) < 0  # the softmax term keeps a gradient


# ----------------------------------------------------------------------------------------------------------------
# training on sklearn's digits
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1200], perm[1200:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


TRAINING = {
    "lml": lambda: LMLLoss(5),
    "topk_ce_sinkhorn": lambda: TopKCrossEntropyLoss(k=5, method="sinkhorn", epsilon=0.3),
    "topk_ce_odd_even": lambda: TopKCrossEntropyLoss(k=5, method="odd_even", temperature=1.0),
    "hinge": lambda: SmoothTopKHingeLoss(5, generator=torch.Generator().manual_seed(2)),
    "cascade": lambda: CascadeTopKLoss(5, temperature=4.0),  # t = 1, the old default
}


@pytest.fixture
def one_thread():
    """The problems are tiny: one intra-op thread is faster, and immune to contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", TRAINING)
def test_training_on_digits_lowers_top5_error(name, digits, one_thread):
    x_train, y_train, x_test, y_test = digits
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)

    def top5_error():
        with torch.no_grad():
            top = model(x_test).topk(5, dim=1).indices
        return float((top != y_test[:, None]).all(1).float().mean())

    loss_fn = TRAINING[name]()
    before = top5_error()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    batches = torch.Generator().manual_seed(1)
    for _ in range(60):
        idx = torch.randint(0, len(y_train), (64,), generator=batches)
        target = y_train[idx][:, None] if name == "cascade" else y_train[idx]
        loss = loss_fn(model(x_train[idx]), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = top5_error()
    print(f"{name}: top-5 error {before:.3f} -> {after:.3f}")
    assert after < 0.25 * before and after < 0.1


def test_cascade_rejects_max_support_and_warns_on_underflow():
    """max_support makes the mask exactly 0 outside the largest entries (ValueError, as the exact-zero methods);
    a smooth mask that underflows to 0 at a relevant item gives it no gradient: a RuntimeWarning says so."""
    x = torch.tensor([[10.0, 9.0, -10.0, 0.0]], requires_grad=True)
    with pytest.raises(ValueError, match="max_support"):
        cascade_topk_loss(x, torch.tensor([[0, 2]]), method="sigmoid", max_support=3)
    with pytest.warns(RuntimeWarning, match="underflows"):
        cascade_topk_loss(x, torch.tensor([[0, 2]]), method="sigmoid", temperature=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cascade_topk_loss(x, torch.tensor([[0, 2]]), method="sigmoid", temperature=4.0)


# ----------------------------------------------------------------------------------------------------------------
# LML with a set of targets
# ----------------------------------------------------------------------------------------------------------------
def _sets(b, n, size, seed=3):
    """(b, size) distinct indices per row."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:size] for _ in range(b)])


@pytest.mark.parametrize("k,T,size", [(2, 2.0, 2), (3, 1.0, 1), (4, 4.0, 3), (2, 0.5, 4)])
def test_lml_set_matches_literal_reference(k, T, size):
    """−Σ_{i∈G} log y_i with y the LML mask by brentq (float64), for indices, a bool and a float indicator."""
    x = rows(4, 7)
    idx = _sets(4, 7, size)
    t = T * MASK_FACTOR["sigmoid"]
    want = torch.tensor(
        [-np.log(ref_threshold_mask(x[b].numpy(), k, t, "sigmoid")[idx[b].numpy()]).sum() for b in range(4)],
        dtype=torch.float64,
    )
    got = lml_loss(x, idx, k, temperature=T, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)  # log of y ≈ 1e-30: the solver's tol, relative
    indicator = torch.zeros(4, 7, dtype=torch.bool).scatter_(1, idx, True)
    torch.testing.assert_close(lml_loss(x, indicator, k, temperature=T, reduction="none"), got)
    torch.testing.assert_close(lml_loss(x, indicator.double(), k, temperature=T, reduction="none"), got)
    torch.testing.assert_close(LMLLoss(k, temperature=T, reduction="sum")(x, idx), got.sum())


def test_lml_set_of_one_is_the_single_target_loss():
    x, y = rows(5, 6), labels(5, 6)
    for k in (1, 3):
        single = lml_loss(x, y, k, temperature=0.7, reduction="none")
        assert torch.equal(lml_loss(x, y[:, None], k, temperature=0.7, reduction="none"), single)
        one_hot = torch.nn.functional.one_hot(y, 6).bool()
        assert torch.equal(lml_loss(x, one_hot, k, temperature=0.7, reduction="none"), single)


def test_lml_set_limits_empty_set_and_gradcheck():
    x = rows(3, 6)
    idx = _sets(3, 6, 2)
    empty = torch.zeros(3, 6, dtype=torch.bool)
    assert float(lml_loss(x, empty, 2, reduction="sum")) == 0.0  # an empty set has likelihood 1
    assert float(lml_loss(x, idx, 6, reduction="sum")) == 0.0  # k = n: every class selected
    in_top = lml_loss(x, x.topk(2, dim=1).indices, 2, temperature=4e-3, reduction="none")
    assert bool((in_top < 1e-6).all())  # G = the top k: the loss tends to 0 as t → 0
    xr = x.clone().requires_grad_()
    t = torch.tensor([0.7, 1.5, 1.0], dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x, t: lml_loss(x, idx, 3, temperature=t, reduction="none"), (xr, t))


def test_lml_set_bad_targets_name_target():
    x = rows(3, 5)
    with pytest.raises(ValueError, match="lml_loss: `target` has a repeated index"):
        lml_loss(x, torch.tensor([[0, 0], [1, 2], [3, 4]]), 2)
    with pytest.raises(ValueError, match=r"lml_loss: `target` must hold item indices in \[0, 4\]"):
        lml_loss(x, torch.tensor([[0], [7], [1]]), 2)
    with pytest.raises(ValueError, match="lml_loss: an integer `target` holds item indices of shape"):
        lml_loss(x, torch.tensor([[0, 1]] * 4), 2)  # 4 rows for 3
    with pytest.raises(ValueError, match="lml_loss: a boolean or floating `target` is a 0-1 indicator"):
        lml_loss(x, torch.ones(3, 4, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="lml_loss: `target` as an indicator must hold only 0 and 1"):
        lml_loss(x, torch.full((3, 5), 0.5, dtype=torch.float64), 2)


# ----------------------------------------------------------------------------------------------------------------
# joint cascade loss
# ----------------------------------------------------------------------------------------------------------------
def ref_joint(xs, rel, ks, Ts, log_weights=None):
    """The objective written out literally, per row: τ the midpoint of the k-th and (k+1)-th largest, y = σ((x −
    τ)/(T/4)), L_s = BCE(y_s, r), L_joint = BCE(Π_s y_s, r), Σ_s L_s/(2 w_s²) + L_joint + Σ_s log w_s."""
    ys = []
    for x, k, T in zip(xs, ks, Ts):
        s = x.sort(dim=1, descending=True).values
        inf = torch.full((x.shape[0], 1), math.inf, dtype=x.dtype)
        padded = torch.cat([inf, s, -inf], 1)
        tau = (padded[:, k] + padded[:, k + 1]) / 2
        ys.append(torch.sigmoid((x - tau[:, None]) / (T / 4)))
    stage = [F.binary_cross_entropy(y, rel, reduction="none").mean(1) for y in ys]
    joint = F.binary_cross_entropy(torch.stack(ys).prod(0), rel, reduction="none").mean(1)
    w = torch.ones(len(xs), dtype=xs[0].dtype) if log_weights is None else log_weights.exp()
    return sum(L / (2 * w[s] ** 2) for s, L in enumerate(stage)) + joint + torch.log(w).sum()


def _stage_rows(S, b=4, n=9, seed=10):
    return [rows(b, n, seed=seed + s) for s in range(S)]


def _relevant_set(b=4, n=9, size=3):
    idx = _sets(b, n, size, seed=7)
    return idx, torch.zeros(b, n, dtype=torch.float64).scatter_(1, idx, 1.0)


@pytest.mark.parametrize("S", [1, 2, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_joint_matches_literal_formula(S, weighted):
    xs = _stage_rows(S)
    idx, rel = _relevant_set()
    ks = [5, 4, 3][:S]
    Ts = [2.0, 1.2, 0.8][:S]
    lw = torch.tensor([0.3, -0.4, 0.1][:S], dtype=torch.float64) if weighted else None
    want = ref_joint(xs, rel, ks, Ts, lw)
    got = joint_cascade_loss(xs, idx, ks, temperature=Ts, log_weights=lw, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(joint_cascade_loss(xs, idx, ks, temperature=Ts, log_weights=lw), want.mean())
    torch.testing.assert_close(
        joint_cascade_loss(xs, idx, ks, temperature=Ts, log_weights=lw, reduction="sum"), want.sum()
    )
    # the same k or temperature for every stage; one (S, batch, n) tensor; the relevance as an indicator
    one_k = joint_cascade_loss(torch.stack(xs), rel.bool(), 3, temperature=1.0, log_weights=lw, reduction="none")
    torch.testing.assert_close(one_k, ref_joint(xs, rel, [3] * S, [1.0] * S, lw), rtol=1e-12, atol=1e-12)


def test_joint_default_k_is_each_rows_set_size_and_one_stage_is_the_cascade_loss():
    xs = _stage_rows(2, b=3, n=7)
    rel = torch.tensor([[1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 1, 0, 0, 0], [0, 0, 1, 0, 1, 0, 0]], dtype=torch.bool)
    got = joint_cascade_loss(xs, rel, reduction="none")  # k = K per row, T = 1
    want = torch.stack(
        [ref_joint([x[b : b + 1] for x in xs], rel[b : b + 1].double(), [int(rel[b].sum())] * 2, [1.0] * 2)[0]
         for b in range(3)]
    )  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # S = 1, unit weights: L_1/2 + L_joint = 1.5 · the cascade loss
    one = joint_cascade_loss(xs[:1], rel, 2, temperature=0.6, reduction="none")
    torch.testing.assert_close(one, 1.5 * cascade_topk_loss(xs[0], rel, 2, temperature=0.6, reduction="none"))


@pytest.mark.parametrize("method", ["sigmoid", "lapsum", "soft"])
def test_joint_with_normalised_methods(method):
    """The stage masks from the brentq reference (soft with a temperature is the sigmoid mask)."""
    xs = _stage_rows(2, b=3, n=7)
    idx, rel = _relevant_set(3, 7, 2)
    ks, T = [4, 2], 0.9
    family = "lapsum" if method == "lapsum" else "sigmoid"
    lw = torch.tensor([0.2, -0.3], dtype=torch.float64)
    ys = [
        torch.tensor(np.stack([ref_threshold_mask(x[b].numpy(), k, T * MASK_FACTOR[family], family) for b in range(3)]))
        for x, k in zip(xs, ks)
    ]
    stage = [F.binary_cross_entropy(y, rel, reduction="none").mean(1) for y in ys]
    joint = F.binary_cross_entropy(ys[0] * ys[1], rel, reduction="none").mean(1)
    want = sum(L * torch.exp(-2 * lw[s]) / 2 for s, L in enumerate(stage)) + joint + lw.sum()
    got = joint_cascade_loss(xs, idx, ks, method=method, temperature=T, log_weights=lw, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("method", ["dftopk", "sigmoid"])
def test_joint_gradcheck(method):
    xs = [x.requires_grad_() for x in _stage_rows(3, b=3, n=6)]
    idx = _sets(3, 6, 2)
    lw = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, requires_grad=True)
    # temperatures where no mask entry is far below the solver's tolerance (log y amplifies it by 1/y)
    t = torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64, requires_grad=True)

    def f(x0, x1, x2, lw, t):
        return joint_cascade_loss([x0, x1, x2], idx, [4, 3, 2], method=method, temperature=t, log_weights=lw,
                                  reduction="none")  # fmt: skip

    assert gradcheck(f, (*xs, lw, t))
    assert gradcheck(lambda x0, x1, lw: joint_cascade_loss(torch.stack([x0, x1]), idx, log_weights=lw, scale="std",
                                                           method=method), (xs[0], xs[1], lw[:2]))  # fmt: skip


def test_joint_dftopk_is_exact_where_the_masks_saturate():
    """From the logits, the loss and its gradient stay exact where σ underflows (float32, t = 0.025): equal to the
    float64 computation, with a gradient pulling the relevant item up, and no warning."""
    x = torch.tensor([[0.0, 50.0, 60.0, 70.0, 80.0], [80.0, 70.0, 60.0, 50.0, 0.0]])
    rel = torch.tensor([[1.0, 0, 0, 0, 1], [1, 0, 0, 0, 1]])
    xs = [x.clone().requires_grad_(), x.flip(1).clone().requires_grad_()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = joint_cascade_loss(xs, rel, 2, temperature=0.1, reduction="sum")
    want = joint_cascade_loss([v.double() for v in xs], rel.double(), 2, temperature=0.1, reduction="sum")
    assert math.isfinite(float(got.detach())) and float(got.detach()) > 1000  # z = −2600 at the relevant item 0
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    got.backward()
    assert float(xs[0].grad[0, 0]) < 0 and torch.isfinite(xs[0].grad).all()
    # k = 0 and k = n: exact masks, finite losses and gradients
    for k in (0, 5):
        xr = x.clone().requires_grad_()
        loss = joint_cascade_loss([xr, xr * 0.5], rel, k)
        loss.backward()
        assert math.isfinite(float(loss.detach())) and torch.isfinite(xr.grad).all()


def test_joint_module_owns_the_weights():
    xs = _stage_rows(2)  # float64 (in float32 the masks saturate here, and cascade_topk_loss's clamped log is off)
    idx, _ = _relevant_set()
    loss_fn = JointCascadeLoss(2, [5, 3], temperature=1.5)
    (param,) = list(loss_fn.parameters())
    assert param is loss_fn.log_weights and param.shape == (2,) and torch.equal(param, torch.zeros(2))
    loss = loss_fn(xs, idx)
    torch.testing.assert_close(loss, joint_cascade_loss(xs, idx, [5, 3], temperature=1.5, log_weights=param))
    loss.backward()
    # ∂/∂ log w_s of mean_rows[L_s e^{−2 log w_s}/2 + log w_s] at log w = 0 is 1 − mean L_s
    stage_means = [cascade_topk_loss(x, idx, k, temperature=1.5) for x, k in zip(xs, [5, 3])]
    torch.testing.assert_close(param.grad, (1 - torch.stack(stage_means)).float())
    assert "n_stages=2" in repr(loss_fn) and "k=[5, 3]" in repr(loss_fn)
    with pytest.raises(ValueError, match="JointCascadeLoss: `stage_scores` has 3 stages; .*n_stages=2"):
        loss_fn(xs + xs[:1], idx)
    with pytest.raises(ValueError, match=r"JointCascadeLoss: `n_stages`=0 is out of range"):
        JointCascadeLoss(0)
    with pytest.raises(ValueError, match="JointCascadeLoss: `k` has 3 entries for 2 stages"):
        JointCascadeLoss(2, [3, 2, 1])
    with pytest.raises(ValueError, match="JointCascadeLoss: `temperature` must be positive"):
        JointCascadeLoss(2, temperature=[1.0, 0.0])
    with pytest.raises(ValueError, match="JointCascadeLoss: .*exact zeros"):
        JointCascadeLoss(2, method="sparse")
    with pytest.raises(ValueError, match="JointCascadeLoss: unknown `reduction`"):
        JointCascadeLoss(2, reduction="avg")


def test_joint_module_trains_the_weights_towards_the_stage_losses():
    """The optimum of L_s/(2w²) + log w is w² = L_s: Adam on log_weights alone gets there."""
    xs = _stage_rows(2)
    idx, _ = _relevant_set()
    loss_fn = JointCascadeLoss(2, [5, 3])
    opt = torch.optim.Adam(loss_fn.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        loss_fn(xs, idx).backward()
        opt.step()
    stage_means = torch.stack([cascade_topk_loss(x, idx, k) for x, k in zip(xs, [5, 3])])
    torch.testing.assert_close(loss_fn.log_weights.detach().double().exp() ** 2, stage_means, rtol=1e-3, atol=1e-4)


def test_joint_bad_inputs_name_the_argument():
    xs = _stage_rows(2, b=3, n=5)
    idx = _sets(3, 5, 2)
    fn = "joint_cascade_loss"
    cases = [
        (dict(stage_scores=[xs[0], xs[1][:, :4]]), ValueError, "every stage of `stage_scores`"),
        (dict(stage_scores=[xs[0], xs[1][:2]]), ValueError, "every stage of `stage_scores`"),
        (dict(stage_scores=[xs[0], xs[1].float()]), ValueError, "every stage of `stage_scores`"),
        (dict(stage_scores=[]), ValueError, "`stage_scores` must hold at least one stage"),
        (dict(stage_scores=torch.zeros(0, 3, 5, dtype=torch.float64)), ValueError, "at least one stage"),
        (dict(stage_scores=xs[0]), ValueError, r"`stage_scores` as one tensor must have shape \(stages, batch, n\)"),
        (dict(stage_scores=xs[0].tolist()), TypeError, r"`stage_scores` must be a torch.Tensor"),
        (dict(stage_scores="scores"), TypeError, "`stage_scores` must be a sequence"),
        (dict(stage_scores=[xs[0], poke(xs[1], math.nan)]), ValueError, r"`stage_scores` contains NaN \(stage 1\)"),
        (dict(stage_scores=[xs[0], xs[1].long()]), TypeError, r"`stage_scores` must have a floating dtype"),
        (dict(k=[3, 2, 1]), ValueError, "`k` has 3 entries for 2 stages"),
        (dict(k=[3]), ValueError, "`k` has 1 entries for 2 stages"),
        (dict(k=[3, 6]), ValueError, r"`k`=6 is out of range \[0, 5\]"),
        (dict(k=2.5), TypeError, "`k` must be an int"),
        (dict(temperature=[1.0, 1.0, 1.0]), ValueError, "`temperature` has 3 entries for 2 stages"),
        (dict(temperature=[1.0, -1.0]), ValueError, "`temperature` must be positive"),
        (dict(log_weights=torch.zeros(3, dtype=torch.float64)), ValueError, r"`log_weights` must hold one log-weight"),
        (dict(log_weights=torch.zeros(1, 2)), ValueError, r"`log_weights` must hold one log-weight per stage"),
        (dict(log_weights=[0.0, 0.0]), TypeError, "`log_weights` must be None or a floating tensor"),
        (dict(log_weights=torch.zeros(2, dtype=torch.long)), TypeError, "`log_weights` must be None or a floating"),
        (dict(log_weights=torch.tensor([0.0, math.inf])), ValueError, "`log_weights` must be finite"),
        (dict(relevant=torch.tensor([[0, 0], [1, 2], [3, 4]])), ValueError, "`relevant` has a repeated index"),
        (dict(relevant=torch.ones(3, 4, dtype=torch.bool)), ValueError, "a boolean or floating `relevant`"),
        (dict(method="nope"), ValueError, "unknown `method`='nope'"),
        (dict(tol=1e-3), TypeError, "method='dftopk' takes no option `tol`"),
        (dict(scale="var"), ValueError, "`scale` must be None or 'std'"),
        (dict(reduction="avg"), ValueError, "unknown `reduction`='avg'"),
    ]
    for kw, exc, msg in cases:
        args = {**dict(stage_scores=xs, relevant=idx, k=2), **kw}
        with pytest.raises(exc, match=f"{fn}: .*{msg}" if not msg.startswith("`") else f"{fn}: {msg}"):
            joint_cascade_loss(args.pop("stage_scores"), args.pop("relevant"), args.pop("k"), **args)


@pytest.mark.parametrize("kw", EXACT_ZEROS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_joint_rejects_masks_with_exact_zeros(kw):
    xs = _stage_rows(2, b=3, n=6)
    idx = _sets(3, 6, 2)
    with pytest.raises(ValueError, match="joint_cascade_loss: .*gradient"):
        joint_cascade_loss(xs, idx, 2, **kw)
    with pytest.raises(ValueError, match="JointCascadeLoss: .*gradient"):
        JointCascadeLoss(2, 2, **kw)
    with pytest.raises(ValueError, match="joint_cascade_loss: `max_support`"):
        joint_cascade_loss(xs, idx, 2, method="sigmoid", max_support=4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_joint_half_precision(dtype):
    xs = [x.float() for x in _stage_rows(2, b=6, n=8)]
    idx = _sets(6, 8, 3)
    ref = joint_cascade_loss(xs, idx, [5, 3], reduction="none")
    xh = [x.to(dtype).requires_grad_() for x in xs]
    got = joint_cascade_loss(xh, idx, [5, 3], reduction="none")
    assert got.dtype == dtype and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.float(), ref, rtol=0.05, atol=0.05)
    got.sum().backward()
    assert all(x.grad.dtype == dtype and bool(torch.isfinite(x.grad).all()) for x in xh)


def test_joint_compiles_fullgraph():
    """The forward of a built JointCascadeLoss traces into one graph, with the eager values and gradients."""
    xs = _stage_rows(2, b=3, n=7)
    idx, rel = _relevant_set(3, 7, 2)
    loss_fn = JointCascadeLoss(2, [4, 2], temperature=0.8).double()
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: loss_fn([a, b], rel), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(*xs), loss_fn(xs, rel))


@pytest.mark.parametrize("method", ["odd_even", "bitonic", "sinkhorn"])
def test_topk_cross_entropy_candidates_in_score_order(method):
    # the pre-selected candidates reach the network in decreasing order of score, the target among them at its
    # rank (after the candidates it ties with), not at a fixed column: a sorting network is not exactly
    # permutation-equivariant, and a fixed column would favour the target whatever its score
    from softtopk.losses import topk_cross_entropy

    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([5, 17, 33])
    got = topk_cross_entropy(x, t, 5, candidates=16, method=method, reduction="none")
    others = x.scatter(1, t[:, None], -math.inf).topk(15, dim=1).indices
    cand = torch.cat([others, t[:, None]], dim=1)
    sub, order = x.gather(1, cand).sort(dim=1, descending=True)
    want = topk_cross_entropy(sub, (order == 15).long().argmax(1), 5, method=method, reduction="none")
    assert torch.allclose(got, want)
    # equal logits: the target goes after its ties, the last of the 16 columns
    zeros = torch.zeros(2, 40, dtype=torch.float64)
    got = topk_cross_entropy(zeros, torch.tensor([0, 39]), 5, candidates=16, method=method, reduction="none")
    want = topk_cross_entropy(torch.zeros(1, 16, dtype=torch.float64), torch.tensor([15]), 5, method=method)
    assert torch.allclose(got, want.expand(2))
