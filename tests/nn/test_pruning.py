"""softtopk.nn.pruning: TopKMagnitudePruning (+ prune_topk_magnitude, make_pruning_permanent), TopKAST (+
topkast_regularizer) and SWATLinear, against literal formulas."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck
from torch.nn.utils import parametrize

import softtopk
from softtopk.nn import (
    SWATLinear,
    TopKAST,
    TopKMagnitudePruning,
    make_pruning_permanent,
    prune_topk_magnitude,
    topkast_regularizer,
)


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def distinct(*shape, seed=0, dtype=torch.float64):
    """Entries of distinct magnitudes j / 16, j = 1 … n, with random signs: exact in bfloat16, no ties."""
    gen = torch.Generator().manual_seed(seed)
    n = 1
    for size in shape:
        n *= size
    mags = (torch.randperm(n, generator=gen) + 1).to(dtype) / 16
    signs = torch.randint(0, 2, (n,), generator=gen).to(dtype) * 2 - 1
    return (mags * signs).reshape(shape)


def top_mask(w, k):
    """The literal hard mask: 1 at the k largest |w| of the whole tensor (argsort, no ties in random data)."""
    flat = torch.zeros(w.numel(), dtype=w.dtype)
    flat[torch.argsort(w.detach().abs().reshape(-1), descending=True)[:k]] = 1
    return flat.reshape(w.shape)


# --- TopKMagnitudePruning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_eval_is_exact_hard_pruning(dtype):
    w = distinct(12, 10, dtype=dtype)
    prune = TopKMagnitudePruning(sparsity=0.9, temperature=0.3).eval()
    out = prune(w)
    assert out.shape == w.shape and out.dtype == dtype
    assert torch.equal(out, w * top_mask(w, 12))  # k = round(0.1 · 120)
    assert int((out != 0).sum()) == 12
    soft = prune.train()(w)  # half precision: computed by topk_magnitude, returned in the weight's dtype
    assert soft.dtype == dtype and int((soft != 0).sum()) >= 12


def test_train_is_topk_magnitude_with_support_at_least_k():
    w = randn(30, 20)
    prune = TopKMagnitudePruning(k=60, temperature=0.3)
    out = prune(w)
    ref = softtopk.topk_magnitude(w.reshape(-1), 60, temperature=0.3).reshape(w.shape)
    torch.testing.assert_close(out, ref)
    support = out != 0
    assert int(support.sum()) > 60 and bool(support[top_mask(w, 60).bool()].all())
    # temperature 0, and the limit t → 0: the hard pruning in train() too
    prune.temperature = 0.0
    assert torch.equal(prune(w), w * top_mask(w, 60))
    prune.temperature = 1e-6
    torch.testing.assert_close(prune(w), w * top_mask(w, 60), atol=1e-4, rtol=0)


def test_train_gradient_reaches_the_transition_band_only():
    w = randn(200).requires_grad_()
    out = TopKMagnitudePruning(k=20, temperature=0.5)(w)
    (grad,) = torch.autograd.grad((out * randn(200, seed=1)).sum(), w)
    support = out.detach() != 0
    assert bool((grad[~support] == 0).all()) and bool((grad[support] != 0).all())
    assert int(support.sum()) > 20


def test_per_row_selection():
    w = randn(6, 9)
    prune = TopKMagnitudePruning(k=3, dim=1, temperature=0.2)
    hard = prune.eval()(w)
    assert (hard != 0).sum(1).tolist() == [3] * 6
    ref = torch.stack([row * top_mask(row, 3) for row in w])
    assert torch.equal(hard, ref)
    soft = prune.train()(w)
    torch.testing.assert_close(soft, softtopk.topk_magnitude(w, 3, dim=1, temperature=0.2))
    cols = TopKMagnitudePruning(sparsity=0.5, dim=0).eval()(w)  # 3 of the 6 entries of each column
    assert (cols != 0).sum(0).tolist() == [3] * 9


@pytest.mark.parametrize("p", [2, 4 / 3])
def test_temperature_is_scale_free(p):
    w = randn(50)
    prune = TopKMagnitudePruning(k=5, temperature=0.5, p=p)
    torch.testing.assert_close(prune(0.01 * w), 0.01 * prune(w))
    assert int((prune(w) != 0).sum()) >= 5


def test_sparsity_rounding_and_bounds():
    assert TopKMagnitudePruning(sparsity=0.9).keep(torch.ones(200)) == 20
    assert TopKMagnitudePruning(sparsity=0.95).keep(torch.ones(65536)) == 3277  # round(3276.8)
    assert TopKMagnitudePruning(sparsity=0.999).keep(torch.ones(10)) == 1  # at least one
    assert TopKMagnitudePruning(sparsity=0.0).keep(torch.ones(10)) == 10
    w = randn(10)
    assert torch.equal(TopKMagnitudePruning(sparsity=0.0)(w), w)


def test_prune_linear_train_and_make_permanent():
    torch.manual_seed(0)
    layer = torch.nn.Linear(20, 10)
    pruning = prune_topk_magnitude(layer, sparsity=0.8, temperature=0.3)
    assert isinstance(pruning, TopKMagnitudePruning) and parametrize.is_parametrized(layer, "weight")
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x, y = randn(16, 20, dtype=torch.float32), randn(16, 10, seed=1, dtype=torch.float32)
    before = layer.parametrizations.weight.original.detach().clone()
    torch.nn.functional.mse_loss(layer(x), y).backward()
    opt.step()
    assert not torch.equal(layer.parametrizations.weight.original, before)  # the dense parameter is trained
    original = layer.parametrizations.weight.original.detach().clone()
    layer.train()
    final = make_pruning_permanent(layer)  # evaluated with the hard mask although layer is in train()
    assert layer.training and not parametrize.is_parametrized(layer)
    assert isinstance(layer.weight, torch.nn.Parameter)
    assert torch.equal(layer.weight.detach(), original * top_mask(original, 40)) and torch.equal(final, layer.weight)
    assert int((layer.weight != 0).sum()) == 40


def test_pruning_repr_and_errors():
    assert "sparsity=0.9, temperature=0.1, p=2" in repr(TopKMagnitudePruning(sparsity=0.9))
    assert "k=3, dim=1" in repr(TopKMagnitudePruning(3, dim=1))
    cases = [
        (dict(sparsity=1.0), ValueError, "`sparsity` must lie in \\[0, 1\\)"),
        (dict(sparsity=-0.1), ValueError, "`sparsity`"),
        (dict(sparsity=True), TypeError, "`sparsity`"),
        (dict(), TypeError, "give exactly one of `k` and `sparsity`"),
        (dict(k=3, sparsity=0.5), TypeError, "give exactly one"),
        (dict(k=0), ValueError, "`k` must be a positive int"),
        (dict(k=2.5), TypeError, "`k` must be an int"),
        (dict(k=2, temperature=-1.0), ValueError, "`temperature`"),
        (dict(k=2, p=3), ValueError, "`p` must be 2 or 4/3"),
        (dict(k=2, dim=1.0), TypeError, "`dim`"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match="TopKMagnitudePruning: " + match):
            TopKMagnitudePruning(**kwargs)
    with pytest.raises(ValueError, match=r"TopKMagnitudePruning: `k`=201 is out of range \[1, n=200\]"):
        prune_topk_magnitude(torch.nn.Linear(20, 10), k=201)  # checked when registered
    with pytest.raises(ValueError, match="`dim`=2 is out of range"):
        TopKMagnitudePruning(2, dim=2)(randn(3, 4))
    with pytest.raises(ValueError, match="TopKMagnitudePruning: `weight` contains NaN"):
        TopKMagnitudePruning(2)(torch.tensor([1.0, float("nan"), 2.0]))
    with pytest.raises(ValueError, match="TopKMagnitudePruning: `weight` must be finite"):
        TopKMagnitudePruning(2).eval()(torch.tensor([1.0, float("inf"), 2.0]))
    with pytest.raises(ValueError, match="prune_topk_magnitude: `name`='bias2'"):
        prune_topk_magnitude(torch.nn.Linear(2, 2), "bias2", k=1)
    with pytest.raises(TypeError, match="prune_topk_magnitude: `module`"):
        prune_topk_magnitude(randn(3), k=1)
    with pytest.raises(ValueError, match="make_pruning_permanent: `weight` of Linear is not parametrized"):
        make_pruning_permanent(torch.nn.Linear(2, 2))


# --- TopKAST ---------------------------------------------------------------------------------------------------


def test_topkast_forward_on_a_backward_on_b():
    w = randn(8, 25).requires_grad_()  # 200 weights: A 20, B 50
    topkast = TopKAST(0.9, 0.75)
    out = topkast(w)
    g = randn(8, 25, seed=3)
    (grad,) = torch.autograd.grad((out * g).sum(), w)
    mask_a, mask_b = top_mask(w, 20), top_mask(w, 50)
    assert torch.equal(out.detach(), w.detach() * mask_a) and int((out != 0).sum()) == 20
    assert torch.equal(grad, g * mask_b)  # not the Jacobian of the forward: B \ A gets the gradient too
    m_a, m_b = topkast.masks(w)
    assert torch.equal(m_a, mask_a) and torch.equal(m_b, mask_b)
    # eval(): the same forward, the plain gradient g ∘ m_A
    out = topkast.eval()(w)
    (grad,) = torch.autograd.grad((out * g).sum(), w)
    assert torch.equal(out.detach(), w.detach() * mask_a) and torch.equal(grad, g * mask_a)


def test_topkast_nested_sets_with_ties_and_per_row():
    w = torch.ones(40)  # all tied: A ⊆ B still
    m_a, m_b = TopKAST(0.9, 0.5).masks(w)
    assert int(m_a.sum()) == 4 and int(m_b.sum()) == 20 and bool((m_b[m_a.bool()] == 1).all())
    w = randn(5, 20)
    m_a, m_b = TopKAST(0.8, 0.6, dim=1).masks(w)
    assert m_a.sum(1).tolist() == [4] * 5 and m_b.sum(1).tolist() == [8] * 5
    assert torch.equal(m_a, torch.stack([top_mask(row, 4) for row in w]))


def test_topkast_gradcheck_float64():
    w = randn(3, 7).requires_grad_()
    # B = A: the custom backward is then the exact Jacobian of w ∘ m_A
    assert gradcheck(TopKAST(0.6), (w,))
    # B ⊋ A: through the regulariser, which is differentiable
    assert gradcheck(TopKAST(0.6, 0.3).regularizer, (w,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topkast_dtypes(dtype):
    w = distinct(10, 10, dtype=dtype).requires_grad_()
    out = TopKAST(0.95, 0.9)(w)
    out.sum().backward()
    assert out.dtype == dtype and w.grad.dtype == dtype
    assert int((out != 0).sum()) == 5 and int((w.grad != 0).sum()) == 10


def test_topkast_regularizer():
    w = randn(100).requires_grad_()
    topkast = TopKAST(0.9, 0.7)
    mask_a, mask_b = top_mask(w, 10), top_mask(w, 30)
    expected = (w.detach() ** 2 * mask_a).sum() + (w.detach() ** 2 * (mask_b - mask_a)).sum() / 0.1
    torch.testing.assert_close(topkast.regularizer(w).detach(), expected)
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 5), torch.nn.Linear(5, 5))
    for layer in model[:2]:
        parametrize.register_parametrization(layer, "weight", TopKAST(0.9, 0.7))
    prune_topk_magnitude(model[2], k=3)  # not Top-KAST: not counted
    total = topkast_regularizer(model)
    expected = sum(m.parametrizations.weight[0].regularizer(m.parametrizations.weight.original) for m in model[:2])
    torch.testing.assert_close(total, expected)
    total.backward()
    assert model[0].parametrizations.weight.original.grad is not None
    assert float(topkast_regularizer(torch.nn.Linear(2, 2))) == 0.0


def test_topkast_errors_and_repr():
    assert repr(TopKAST(0.9, 0.8)) == "TopKAST(forward_sparsity=0.9, backward_sparsity=0.8)"
    assert TopKAST(0.9).backward_sparsity == 0.9
    with pytest.raises(ValueError, match="TopKAST: `forward_sparsity` must lie in"):
        TopKAST(1.0)
    with pytest.raises(ValueError, match="TopKAST: `backward_sparsity` must lie in"):
        TopKAST(0.9, -0.5)
    with pytest.raises(ValueError, match="TopKAST: `backward_sparsity` must not exceed `forward_sparsity`=0.8"):
        TopKAST(0.8, 0.9)
    with pytest.raises(TypeError, match="topkast_regularizer: `model`"):
        topkast_regularizer(randn(3))


# --- SWATLinear ------------------------------------------------------------------------------------------------


def swat_layer(sw=0.75, sa=0.5, bias=True, seed=0):
    torch.manual_seed(seed)
    return SWATLinear(8, 5, bias, weight_sparsity=sw, activation_sparsity=sa).double()


def test_swat_forward_and_gradients_against_the_formula():
    layer = swat_layer()
    assert layer.k_weight == 10 and layer.k_activation == 4
    x = randn(2, 3, 8, seed=1).requires_grad_()
    out = layer(x)
    w_s = layer.weight.detach() * top_mask(layer.weight, 10)
    assert torch.equal(layer.sparse_weight().detach(), w_s) and int((w_s != 0).sum()) == 10
    torch.testing.assert_close(out, x.detach() @ w_s.T + layer.bias.detach())
    assert out.shape == (2, 3, 5)
    g = randn(2, 3, 5, seed=2)
    out.backward(g)
    flat_x, flat_g = x.detach().reshape(6, 8), g.reshape(6, 5)
    x_s = torch.stack([row * top_mask(row, 4) for row in flat_x])  # each row's 4 largest |x|
    torch.testing.assert_close(x.grad, (flat_g @ w_s).reshape(2, 3, 8))  # g W_s
    torch.testing.assert_close(layer.weight.grad, flat_g.T @ x_s)  # gᵀ x_s, dense over W
    torch.testing.assert_close(layer.bias.grad, flat_g.sum(0))
    assert int((layer.weight.grad != 0).sum()) > 10  # weights outside the top-k are updated too


def test_swat_gradcheck_float64():
    layer = swat_layer()
    x = randn(4, 8, seed=1).requires_grad_()
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    assert gradcheck(layer, (x,))  # the input gradient g W_s is exact for the forward
    dense = swat_layer(sw=0.0, sa=0.0)  # no sparsity: the custom backward is nn.Linear's, for x, W and b
    assert gradcheck(lambda x, w, b: dense(x), (x, dense.weight, dense.bias))  # w, b perturbed in place


def test_swat_eval_and_dtypes():
    layer = swat_layer().eval()
    x = randn(3, 8, seed=1).requires_grad_()
    out = layer(x)
    out.sum().backward()
    w_s = layer.sparse_weight().detach()
    torch.testing.assert_close(out.detach(), x.detach() @ w_s.T + layer.bias.detach())
    torch.testing.assert_close(layer.weight.grad, torch.ones(3, 5, dtype=torch.float64).T @ x.detach() * (w_s != 0))
    for dtype in (torch.float32, torch.bfloat16):
        half = swat_layer().to(dtype)
        y = half(randn(3, 8, dtype=dtype))
        y.sum().backward()
        assert y.dtype == dtype and half.weight.grad.dtype == dtype


def test_swat_errors_and_repr():
    assert "weight_sparsity=0.75, activation_sparsity=0.5" in repr(swat_layer())
    with pytest.raises(ValueError, match="SWATLinear: `weight_sparsity` must lie in"):
        SWATLinear(4, 4, weight_sparsity=1.0)
    with pytest.raises(ValueError, match="SWATLinear: `activation_sparsity` must lie in"):
        SWATLinear(4, 4, weight_sparsity=0.5, activation_sparsity=-0.1)
    with pytest.raises(ValueError, match="SWATLinear: `in_features` must be a positive int"):
        SWATLinear(0, 4, weight_sparsity=0.5)
    with pytest.raises(ValueError, match=r"SWATLinear: `x` must have shape \(..., in_features\)"):
        swat_layer()(randn(3, 7))
