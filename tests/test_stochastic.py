"""Stochastic operators: the perturbed optimizer (``topk_mask(method="perturbed")``) against closed forms and
large-sample Monte Carlo, and Gumbel top-k subset sampling against enumeration of the subset distribution.

The perturbed mask's ``temperature`` T follows the width convention of ``topk_mask``: the noise scale is
σ = T·factor (``NOISE_FACTOR``). The tests below are written with σ, the parameter of the references, and call the
library at T = σ / factor. ``gumbel_topk``'s temperature (the softmax temperature) is unchanged."""

import itertools
import math

import pytest
import torch

import softtopk
from softtopk import gumbel_topk, topk_mask

# σ = T·factor, the factor solving "slope of the mask at y = 1/2 is 1/T" for one entry against a fixed threshold τ,
# y = P(x + σZ > τ), from the definitions (written here, not read from the library):
#   Gaussian Z: slope φ(0)/σ = 1/(σ√(2π))                                      -> σ = T/√(2π)
#   Gumbel Z (CDF exp(−e^(−g))): y = 1/2 at e^(−g) = log 2, density log(2)/2   -> σ = T·log(2)/2
NOISE_FACTOR = {"gaussian": 1 / math.sqrt(2 * math.pi), "gumbel": math.log(2) / 2}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def perturbed(x, k, sigma, *, seed=0, noise="gaussian", **kw):
    """The perturbed mask with noise scale ``sigma`` (a number or a tensor): ``temperature`` = σ / factor."""
    t = sigma / NOISE_FACTOR[noise]
    return topk_mask(x, k, method="perturbed", temperature=t, generator=gen(seed), noise=noise, **kw)


# ----------------------------------------------------------------------------------------------------------
# Perturbed optimizer (Berthet et al. 2020).
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", ["gaussian", "gumbel"])
def test_perturbed_two_entries_closed_form(noise):
    """n = 2, k = 1: y_0 = P(x_0 + σZ_0 > x_1 + σZ_1) = Φ(d/(σ√2)) (Gaussian) or σ(d/σ) (Gumbel), d = x_0 − x_1,
    at σ = T·factor; the estimator's x- and T-gradients match the derivatives of these closed forms
    (dy/dT = dy/dσ · factor)."""
    factor = NOISE_FACTOR[noise]
    d, sig = 0.5, 0.7
    x = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    T = torch.tensor(sig / factor, dtype=torch.float64, requires_grad=True)
    y = topk_mask(x, 1, method="perturbed", temperature=T, n_samples=200_000, noise=noise, generator=gen(0))
    y[0].backward()
    if noise == "gaussian":
        c = sig * math.sqrt(2)
        val = 0.5 * (1 + math.erf(d / c / math.sqrt(2)))
        dens = math.exp(-((d / c) ** 2) / 2) / math.sqrt(2 * math.pi) / c  # d val / d d
    else:
        val = 1 / (1 + math.exp(-d / sig))
        dens = val * (1 - val) / sig
    assert abs(y[0].item() - val) < 4e-3
    assert torch.allclose(y.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert abs(x.grad[0].item() - dens) < 0.03 and abs(x.grad[1].item() + dens) < 0.03
    assert abs(T.grad.item() - (-dens * d / sig) * factor) < 0.03 * factor


def test_perturbed_unbiased_and_variance():
    """The mean of many small-sample gradient estimates equals the large-sample estimate (unbiasedness), and
    the estimator's variance shrinks as 1 / n_samples."""
    x = torch.tensor([0.5, -0.3, 1.2, 0.1, -1.0, 0.8], dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.2], dtype=torch.float64)

    def grad(S, seed):
        xx = x.clone().requires_grad_()
        (perturbed(xx, 2, 0.5, n_samples=S, seed=seed) * w).sum().backward()
        return xx.grad

    big = grad(400_000, 10_000)
    small = torch.stack([grad(10, s) for s in range(2000)])
    se = small.std(0) / math.sqrt(len(small))
    assert bool(((small.mean(0) - big).abs() < 4 * se + 0.02).all())
    four = torch.stack([grad(40, 5000 + s) for s in range(500)])
    ratio = small.var(0).sum() / four.var(0).sum()
    assert 2.8 < ratio < 5.5, ratio


def test_perturbed_properties():
    x = torch.randn(3, 4, 9, dtype=torch.float64)
    for dim in (0, 1, -1):
        n = x.shape[dim]
        y = perturbed(x, 2, 0.3, dim=dim, n_samples=50)
        assert y.shape == x.shape
        assert torch.allclose(y.sum(dim), torch.full((), 2.0, dtype=torch.float64))
        assert bool(((y >= 0) & (y <= 1)).all())
        assert n
    # reproducible with a generator; a different seed gives different samples
    assert torch.equal(perturbed(x, 3, 0.3, seed=4), perturbed(x, 3, 0.3, seed=4))
    assert not torch.equal(perturbed(x, 3, 0.3, seed=4), perturbed(x, 3, 0.3, seed=5))
    # small noise: the hard mask; largest=False selects the smallest
    hard = topk_mask(x, 3, method="hard")
    assert torch.equal(perturbed(x, 3, 1e-9, n_samples=4), hard)
    assert torch.equal(
        topk_mask(x, 3, method="perturbed", temperature=1e-9, largest=False, n_samples=4),
        topk_mask(-x, 3, method="hard"),
    )
    # per-row k
    k = torch.tensor([[1, 2, 3, 4]] * 3)
    y = perturbed(x, k, 0.5, n_samples=20)
    assert torch.allclose(y.sum(-1), k.to(y.dtype))
    # the default temperature is T = 1.0, the default noise Gaussian
    torch.testing.assert_close(
        topk_mask(x, 3, method="perturbed", n_samples=20, generator=gen(3)),
        topk_mask(x, 3, method="perturbed", temperature=1.0, noise="gaussian", n_samples=20, generator=gen(3)),
        rtol=0,
        atol=0,
    )


def test_perturbed_dtypes_padding_and_gradcheck_shape():
    x = torch.randn(2, 8)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        y = perturbed(x.to(dt), 3, 0.5, n_samples=30)
        assert y.dtype == dt and torch.allclose(y.float().sum(-1), torch.full((2,), 3.0), atol=2e-2)
    xp = torch.tensor([[1.0, -math.inf, 0.5, 2.0]], requires_grad=True)
    y = perturbed(xp, 2, 0.5, n_samples=100)
    assert y[0, 1] == 0
    (y * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert xp.grad[0, 1] == 0 and bool(torch.isfinite(xp.grad).all())
    # tensor temperature gets a gradient per row
    t = torch.tensor([0.5, 1.0], requires_grad=True)
    (perturbed(x, 3, t, n_samples=50) * torch.randn(2, 8)).sum().backward()
    assert t.grad.shape == (2,) and bool(torch.isfinite(t.grad).all())


def test_perturbed_errors():
    x = torch.randn(2, 5)
    for bad in ({"n_samples": 0}, {"n_samples": 2.5}, {"noise": "cauchy"}):
        with pytest.raises(ValueError, match="`n_samples`|`noise`"):
            topk_mask(x, 2, method="perturbed", **bad)
    with pytest.raises(TypeError, match="`generator`"):
        topk_mask(x, 2, method="perturbed", generator=0)
    with pytest.raises(TypeError, match="n_samples"):
        topk_mask(x, 2, method="sigmoid", n_samples=10)
    with pytest.raises(ValueError, match="`k`"):
        topk_mask(x, 2.5, method="perturbed")


# ----------------------------------------------------------------------------------------------------------
# Gumbel top-k subset sampling (Xie & Ermon 2019).
# ----------------------------------------------------------------------------------------------------------
def subset_probabilities(logits, k):
    """P(S) of sampling the k-subset S without replacement from softmax(logits), by enumeration of orders."""
    p = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), -1).tolist()
    out = {}
    for order in itertools.permutations(range(len(p)), k):
        prob, rest = 1.0, 1.0
        for i in order:
            prob *= p[i] / rest
            rest -= p[i]
        key = frozenset(order)
        out[key] = out.get(key, 0.0) + prob
    return out


def test_gumbel_hard_samples_follow_the_subset_distribution():
    """straight_through=True draws exact k-subsets; their frequencies match enumeration over n = 4, k = 2."""
    logits = torch.tensor([1.0, 0.0, -0.5, 0.7])
    ref = subset_probabilities(logits, 2)
    S = 20_000
    x = logits.expand(S, 4)
    y = gumbel_topk(x, 2, straight_through=True, generator=gen(0))
    counts = {}
    for row in y.bool().tolist():
        key = frozenset(i for i, b in enumerate(row) if b)
        counts[key] = counts.get(key, 0) + 1
    for key, pr in ref.items():
        assert abs(counts.get(key, 0) / S - pr) < 4 * math.sqrt(pr * (1 - pr) / S) + 1e-3


@pytest.mark.parametrize("relaxation", ["softmax", "sigmoid"])
def test_gumbel_relaxed_sums_to_k_and_tends_to_hard(relaxation):
    x = torch.randn(3, 7, dtype=torch.float64)
    y = gumbel_topk(x, 3, temperature=0.7, relaxation=relaxation, generator=gen(0))
    assert torch.allclose(y.sum(-1), torch.full((3,), 3.0, dtype=torch.float64))
    assert bool((y >= 0).all())
    if relaxation == "sigmoid":
        assert bool((y <= 1).all())
    cold = gumbel_topk(x, 3, temperature=1e-4, relaxation=relaxation, generator=gen(1))
    hard = gumbel_topk(x, 3, straight_through=True, generator=gen(1))
    assert torch.allclose(cold, hard, atol=1e-6)


def test_gumbel_softmax_relaxation_can_exceed_one():
    """Documented: the paper's successive-softmax relaxation is not bounded by 1 (n = k = 2)."""
    y = gumbel_topk(torch.tensor([0.4, 0.0]), 2, temperature=1.0, generator=gen(0))
    assert torch.allclose(y.sum(), torch.tensor(2.0)) and float(y.max()) > 1.0


def test_gumbel_straight_through_and_reproducible():
    x = torch.randn(2, 6, requires_grad=True)
    y = gumbel_topk(x, 2, straight_through=True, dim=-1, generator=gen(1))
    assert set(y.detach().unique().tolist()) <= {0.0, 1.0} and torch.all(y.sum(-1) == 2)
    (y * torch.arange(6.0)).sum().backward()
    assert x.grad.abs().sum() > 0
    assert torch.equal(y.detach(), gumbel_topk(x, 2, straight_through=True, generator=gen(1)).detach())
    # the backward is the relaxed sample's (same noise, same temperature)
    w = torch.randn(2, 6)
    (g_st,) = torch.autograd.grad((gumbel_topk(x, 2, straight_through=True, generator=gen(2)) * w).sum(), x)
    (g_soft,) = torch.autograd.grad((gumbel_topk(x, 2, generator=gen(2)) * w).sum(), x)
    torch.testing.assert_close(g_st, g_soft)
    with pytest.raises(TypeError, match="hard"):
        gumbel_topk(x, 2, hard=True)  # renamed `straight_through`


@pytest.mark.parametrize("relaxation", ["softmax", "sigmoid"])
def test_gumbel_gradcheck_dims_and_dtypes(relaxation):
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)

    def f(z):
        return gumbel_topk(z, 2, temperature=0.7, relaxation=relaxation, dim=1, generator=gen(3))

    assert torch.autograd.gradcheck(f, (x,))
    assert f(x).shape == x.shape
    ref = gumbel_topk(x.detach().float(), 2, relaxation=relaxation, dim=1, generator=gen(3))  # same noise
    for dt in (torch.float16, torch.bfloat16):
        y = gumbel_topk(x.detach().to(dt), 2, relaxation=relaxation, dim=1, generator=gen(3))
        assert y.dtype == dt and torch.allclose(y.float(), ref, atol=3e-2)


def test_gumbel_padding_and_errors():
    x = torch.tensor([[0.5, -math.inf, 1.0, 0.0]])
    y = gumbel_topk(x, 2, temperature=0.5, generator=gen(0))
    assert y[0, 1] == 0 and torch.allclose(y.sum(), torch.tensor(2.0))
    with pytest.raises(ValueError, match="-inf"):
        gumbel_topk(torch.tensor([0.0, -math.inf]), 2)
    with pytest.raises(ValueError, match=r"\+inf"):
        gumbel_topk(torch.tensor([0.0, math.inf]), 1)
    x = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises((TypeError, ValueError), match="`k`"):
        gumbel_topk(x, 1.5)
    with pytest.raises(ValueError, match="`k`"):
        gumbel_topk(x, 9)
    with pytest.raises(ValueError, match="`temperature`"):
        gumbel_topk(x, 1, temperature=0.0)
    with pytest.raises(ValueError, match="`relaxation`"):
        gumbel_topk(x, 1, relaxation="sparse")
    with pytest.raises(TypeError, match="`generator`"):
        gumbel_topk(x, 1, generator=1)
    with pytest.raises(ValueError, match="NaN"):
        gumbel_topk(torch.tensor([0.0, float("nan")]), 1)
    assert softtopk.gumbel_topk(x, 0).abs().sum() == 0


def _per_row_k_input():
    g = gen(11)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    k = torch.tensor([0, 1, 3, 6, 7])
    return x, k


@pytest.mark.parametrize("relaxation", ["softmax", "sigmoid"])
def test_gumbel_per_row_k_sums(relaxation):
    """A per-row k (shape (batch,), or the keepdim form (batch, 1), integer or whole floats): row i sums to k_i, for
    both relaxations and the straight-through sample (exactly k_i ones); with the scores along dim 1 too."""
    x, k = _per_row_k_input()
    for kk in (k, k[:, None], k.double()):
        y = gumbel_topk(x, kk, temperature=0.7, relaxation=relaxation, generator=gen(0))
        torch.testing.assert_close(y.sum(-1), k.double(), rtol=0, atol=1e-9)
        assert bool((y >= 0).all())
        if relaxation == "sigmoid":
            assert bool((y <= 1 + 1e-12).all())
        hard = gumbel_topk(x, kk, temperature=0.7, relaxation=relaxation, straight_through=True, generator=gen(0))
        assert set(hard.unique().tolist()) <= {0.0, 1.0} and torch.equal(hard.sum(-1), k.double())
    y = gumbel_topk(x.T.contiguous(), k, temperature=0.7, relaxation=relaxation, dim=0, generator=gen(0))
    torch.testing.assert_close(y.sum(0), k.double(), rtol=0, atol=1e-9)
    # padding: row i with fewer finite logits than k_i raises, k_i ≤ its finite count is fine
    xp = x.clone()
    xp[0, :6] = -math.inf  # row 0: one finite logit, k_0 = 0
    xp[1, 1:] = -math.inf  # row 1: one finite logit, k_1 = 1
    y = gumbel_topk(xp, k, temperature=0.7, relaxation=relaxation, generator=gen(0))
    torch.testing.assert_close(y.sum(-1), k.double(), rtol=0, atol=1e-9)
    assert bool((y[xp == -math.inf] == 0).all())
    xp[2, 2:] = -math.inf  # row 2: two finite logits, k_2 = 3
    with pytest.raises(ValueError, match="-inf"):
        gumbel_topk(xp, k, relaxation=relaxation, generator=gen(0))


@pytest.mark.parametrize("relaxation", ["softmax", "sigmoid"])
def test_gumbel_per_row_k_matches_int_k(relaxation):
    """With the same generator seed the noise is the same: row i of the per-row-k sample is row i of the int-k
    sample at k = k_i (every row has n finite logits, so every int k in [0, n] is well defined), relaxed,
    straight-through and their gradients."""
    x, k = _per_row_k_input()
    x = x.requires_grad_()
    w = torch.randn(5, 7, generator=gen(12), dtype=torch.float64)
    for straight_through in (False, True):
        kw = {"temperature": 0.7, "relaxation": relaxation, "straight_through": straight_through}
        y = gumbel_topk(x, k, generator=gen(4), **kw)
        (gy,) = torch.autograd.grad((y * w).sum(), x)
        for i, ki in enumerate(k.tolist()):
            yi = gumbel_topk(x, ki, generator=gen(4), **kw)
            torch.testing.assert_close(y[i], yi[i], rtol=0, atol=1e-12)
            if yi.requires_grad:
                (gi,) = torch.autograd.grad((yi[i] * w[i]).sum(), x)
            else:  # k = 0: a constant zero sample
                assert ki == 0 and not yi.any()
                gi = torch.zeros_like(x)
            torch.testing.assert_close(gy[i], gi[i], rtol=0, atol=1e-10)


def test_stochastic_operators_run_under_torch_compile():
    """The random draws break the graph but the operators still run (and match eager) under torch.compile."""
    x = torch.randn(4, 20)

    def f(z):
        a = topk_mask(z, 3, method="perturbed", n_samples=10, generator=gen(0))
        return a + gumbel_topk(z, 3, generator=gen(1))

    torch.testing.assert_close(torch.compile(f, backend="eager")(x), f(x))


def test_gumbel_softmax_relaxation_never_takes_an_item_twice():
    """Issue 14 #5: with logit gaps beyond -log(tiny)·t, p rounds to 1 and log(1 - p) must remove the item (a clamp at
    log(tiny) let it win the next draw again). Here the hard sample is items 0 and 1."""
    x = torch.tensor([100.0, 0.0, -100.0])
    y = gumbel_topk(x, 2, temperature=1e-3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, torch.tensor([1.0, 1.0, 0.0])), y
    x = torch.tensor([100.0, 0.0, -100.0], requires_grad=True)
    y = gumbel_topk(x, 2, temperature=1e-3, generator=torch.Generator().manual_seed(0))
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.isfinite(x.grad).all()
