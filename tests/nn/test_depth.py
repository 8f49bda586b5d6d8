"""softtopk.nn.DepthRouter: the mixture-of-depths router (top-k and threshold-p, causal predictors)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

import softtopk
from conftest import variant_kwargs
from softtopk.nn import DepthRouter, DepthRouting

SOFT_VARIANTS = ["straight_through", "dftopk", "sigmoid", "soft", "sparse", "lapsum"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one torch thread is faster (and does not stall on a busy machine); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_router(d=4, capacity=0.5, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return DepthRouter(d, capacity, **kw).to(dtype)


def tokens_of(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def scores_of(router, tokens):
    w, b = router.router.weight.detach(), router.router.bias.detach()
    return (tokens @ w.to(tokens.dtype).T + b.to(tokens.dtype)).squeeze(-1)


def topk_indices(scores, k):
    return torch.topk(scores, k, dim=-1).indices.sort(-1).values


class Recorder(nn.Module):
    """A linear block that records the shapes it is run on."""

    def __init__(self, d, dtype=torch.float64):
        super().__init__()
        self.lin = nn.Linear(d, d).to(dtype)
        self.shapes = []

    def forward(self, h, valid=None):
        self.shapes.append(tuple(h.shape))
        return torch.tanh(self.lin(h))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_shapes_and_dtypes(dtype, mode):
    torch.manual_seed(0)
    router = DepthRouter(4, 0.25, mode=mode, temperature=0.3)  # a float32 router, fed other dtypes too
    r = router(tokens_of(3, 10, 4, dtype=dtype))
    assert isinstance(r, DepthRouting) and isinstance(r, tuple)
    k = r.indices.shape[1]
    if mode == "topk":
        assert k == 3
    assert r.indices.shape == (3, k) and r.indices.dtype == torch.long
    assert r.weights.shape == (3, k) and r.weights.dtype == dtype
    assert r.valid.shape == (3, k) and r.valid.dtype == torch.bool
    assert r.mask.shape == (3, 10) and r.mask.dtype == torch.bool
    for scalar in (r.fraction, r.aux_loss, r.budget_loss):
        assert scalar.shape == () and scalar.dtype == dtype
    assert not r.fraction.requires_grad
    out = router.route(Recorder(4, dtype), tokens_of(3, 10, 4, dtype=dtype))
    assert out.shape == (3, 10, 4) and out.dtype == dtype


@pytest.mark.parametrize(("capacity", "seq_len", "k"), [(0.3, 10, 3), (0.25, 7, 2), (0.5, 9, 5), (1, 5, 5),
                                                       (0.01, 5, 1), (0.7, 10, 7), (0.125, 64, 8)])  # fmt: skip
def test_k_is_ceil_capacity_times_seq_len(capacity, seq_len, k):
    router = make_router(capacity=capacity)
    assert router.capacity_k(seq_len) == k == math.ceil(round(capacity * seq_len, 9))
    r = router(tokens_of(2, seq_len, 4))
    assert r.indices.shape == (2, k) and bool(r.valid.all())
    assert torch.equal(r.mask.sum(-1), torch.full((2,), k))
    torch.testing.assert_close(r.fraction, torch.tensor(k / seq_len, dtype=torch.float64))


@pytest.mark.parametrize("variant", [*SOFT_VARIANTS, "hard"])
def test_topk_selection_is_torch_topk_in_train_and_eval(variant):
    kw = variant_kwargs(variant, temperature=0.5)
    router = make_router(**kw, score="sigmoid" if variant == "hard" else None)
    tokens = tokens_of(3, 12, 4)
    s = scores_of(router, tokens)
    expected = topk_indices(s, 6)
    for train in (True, False):
        r = router.train(train)(tokens)
        assert torch.equal(r.indices, expected)  # in sequence order
        assert torch.equal(r.mask, torch.zeros(3, 12, dtype=torch.bool).scatter(1, expected, True))
    score = torch.sigmoid(s.gather(1, expected)) if variant == "hard" else torch.ones(3, 6, dtype=torch.float64)
    torch.testing.assert_close(r.weights, score)  # eval: the exact 0/1 mask times the score


@pytest.mark.parametrize("variant", ["sigmoid", "sparse", "lapsum"])
def test_train_weights_are_the_soft_mask_times_the_score(variant):
    kw = variant_kwargs(variant, temperature=0.7)
    router = make_router(**kw, score="logit")
    tokens = tokens_of(2, 9, 4)
    s = scores_of(router, tokens)
    r = router(tokens)
    mask = softtopk.topk_mask(s, 5, **kw)
    torch.testing.assert_close(r.weights, (mask * s).gather(1, r.indices))
    r_soft_eval = make_router(**kw, score="logit", hard_in_eval=False).eval()(tokens)
    torch.testing.assert_close(r_soft_eval.weights, r.weights)


def test_route_runs_the_block_on_the_selected_tokens_only():
    router = make_router(capacity=0.25, temperature=0.5)
    tokens = tokens_of(2, 8, 4)
    block = Recorder(4)
    out = router.route(block, tokens)
    assert block.shapes == [(2, 2, 4)]
    r = router(tokens)
    expected = tokens.clone()
    for b in range(2):
        for j, i in enumerate(r.indices[b]):
            expected[b, i] = tokens[b, i] + r.weights[b, j] * block(tokens[b, i][None, None])[0, 0]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out[~r.mask], tokens[~r.mask])  # the others skip the block


@pytest.mark.parametrize("kw", [
    {"method": "sigmoid"}, {"method": "sparse"}, {"method": "hard", "score": "logit"},
    {"method": "sigmoid", "straight_through": True}, {"mode": "threshold", "temperature": 0.2},
])  # fmt: skip
def test_gradient_reaches_the_router(kw):
    router = make_router(**kw)
    out = router.route(Recorder(4), tokens_of(2, 8, 4))
    out.square().sum().backward()
    grad = router.router.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def _routed(router, block, tokens):
    def f(weight, bias):
        del router.router.weight, router.router.bias
        router.router.weight, router.router.bias = weight, bias
        return router.route(block, tokens)

    return f


@pytest.mark.parametrize("kw", [
    {"method": "sigmoid", "temperature": 0.7}, {"method": "sparse", "temperature": 2.0},
    {"method": "lapsum", "temperature": 0.7}, {"mode": "threshold", "temperature": 0.3},
    {"method": "sigmoid", "temperature": 0.7, "score": "sigmoid"},
])  # fmt: skip
def test_gradcheck_routed_output_wrt_router_weight(kw):
    router = make_router(**kw)
    block = Recorder(4)
    tokens = tokens_of(2, 6, 4)
    weight = router.router.weight.detach().clone().requires_grad_()
    bias = router.router.bias.detach().clone().requires_grad_()
    assert gradcheck(_routed(router, block, tokens), (weight, bias), atol=1e-6)


def test_threshold_mode_selects_sigmoid_above_p_and_pads():
    router = make_router(mode="threshold", threshold=0.4, temperature=0.2, capacity=0.3)
    tokens = tokens_of(4, 9, 4, seed=3)
    s = scores_of(router, tokens)
    r = router(tokens)
    selected = torch.sigmoid(s) > 0.4
    assert torch.equal(r.mask, selected)
    counts = selected.sum(-1)
    assert r.indices.shape == (4, int(counts.max())) and len(set(counts.tolist())) > 1  # the count adapts
    assert torch.equal(r.valid.sum(-1), counts)
    assert torch.equal(r.mask.gather(1, r.indices), r.valid)
    assert bool((r.indices.diff(dim=-1) > 0).all())  # sequence order, distinct
    assert bool((r.weights[~r.valid] == 0).all())
    for b in range(4):  # the padding: the row's unselected tokens of largest score
        pad = int(counts.max() - counts[b])
        best = torch.topk(s[b].masked_fill(selected[b], -math.inf), pad).indices if pad else torch.empty(0)
        assert set(r.indices[b][~r.valid[b]].tolist()) == set(best.tolist())
    soft = softtopk.threshold_mask(s, 0.4, temperature=0.2)
    torch.testing.assert_close(r.weights, soft.gather(1, r.indices) * r.valid)
    torch.testing.assert_close(r.budget_loss, (soft.mean() - 0.3) ** 2)
    assert r.aux_loss == 0
    r_eval = router.eval()(tokens)
    assert torch.equal(r_eval.mask, selected)
    torch.testing.assert_close(r_eval.weights, r.valid.double())
    seen = []
    router.route(lambda h, valid: seen.append(valid) or h, tokens, pass_valid=True)
    assert torch.equal(seen[0], r.valid)


def test_causal_router_aux_loss_and_selection():
    router = make_router(causal="router", temperature=0.5)
    tokens = tokens_of(2, 10, 4)
    s = scores_of(router, tokens)
    r = router(tokens)
    target = torch.zeros(2, 10, dtype=torch.float64).scatter(1, topk_indices(s, 5), 1.0)
    torch.testing.assert_close(r.aux_loss, nn.functional.binary_cross_entropy_with_logits(s, target))
    rc = router.eval()(tokens, causal=True)
    assert torch.equal(rc.mask, s > 0)  # σ(r_i) > 1/2
    torch.testing.assert_close(rc.weights, rc.valid.double())


def test_causal_selection_does_not_look_ahead():
    router = make_router(causal="predictor").eval()
    tokens = tokens_of(3, 12, 4)
    full = router(tokens, causal=True).mask
    for t in (1, 5, 11):
        assert torch.equal(router(tokens[:, :t], causal=True).mask, full[:, :t])
    noncausal = router(tokens).mask
    assert not all(torch.equal(router(tokens[:, :t]).mask, noncausal[:, :t]) for t in (5, 9))  # top-k looks ahead


def test_causal_predictor_learns_the_topk_selection():
    kw = {"method": "hard", "score": "sigmoid", "predictor_hidden": 16}  # the hard top-k: a cheap target
    router = make_router(d=4, capacity=0.25, causal="predictor", dtype=torch.float32, **kw)
    router.router.requires_grad_(False)
    opt = torch.optim.Adam(router.predictor.parameters(), lr=2e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        loss = router(torch.randn(16, 32, 4, generator=gen)).aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert router.router.weight.grad is None  # the predictor's loss does not reach the router
    tokens = torch.randn(64, 32, 4, generator=gen)
    router.eval()
    agreement = (router(tokens, causal=True).mask == router(tokens).mask).float().mean()
    assert agreement > 0.9, f"the predictor matches the top-k selection on {agreement:.3f} of the tokens only"


@pytest.mark.parametrize(("kw", "error", "match"), [
    ({"capacity": 1.5}, ValueError, r"DepthRouter: `capacity` must lie in \(0, 1\], got 1.5"),
    ({"capacity": 0}, ValueError, "`capacity`"),
    ({"capacity": True}, TypeError, "`capacity`"),
    ({"capacity": "half"}, TypeError, "`capacity`"),
    ({"d_model": 0}, ValueError, "`d_model`"),
    ({"mode": "top"}, ValueError, "`mode`"),
    ({"score": "softmax"}, ValueError, "`score`"),
    ({"causal": "mlp"}, ValueError, "`causal`"),
    ({"threshold": 1.0}, ValueError, "`threshold`"),
    ({"mode": "threshold", "causal": "router"}, ValueError, "causal already"),
    ({"mode": "threshold", "method": "sparse"}, ValueError, "`method`"),
    ({"mode": "threshold", "max_iter": 3}, TypeError, "no option"),
    ({"method": "hard"}, ValueError, "no gradient"),
    ({"method": "nope"}, ValueError, "`method`"),
    ({"method": "sigmoid", "p": 2}, TypeError, "option"),
    ({"temperature": -1.0}, ValueError, "temperature"),
    ({"hard_in_eval": 1}, TypeError, "hard_in_eval"),
    ({"predictor_hidden": 0}, ValueError, "predictor_hidden"),
])  # fmt: skip
def test_argument_errors(kw, error, match):
    kw = {"d_model": 4, **kw}
    with pytest.raises(error, match=match):
        DepthRouter(**kw)


def test_call_errors():
    router = make_router()
    with pytest.raises(ValueError, match=r"DepthRouter: `tokens` must have shape \(batch, seq_len, d_model\)"):
        router(tokens_of(10, 4))
    with pytest.raises(ValueError, match="`tokens`"):
        router(tokens_of(2, 10, 5))
    with pytest.raises(ValueError, match="causal='router' or 'predictor'"):
        router(tokens_of(2, 10, 4), causal=True)
    with pytest.raises(ValueError, match="NaN"):
        router(torch.full((1, 3, 4), math.nan, dtype=torch.float64))


def test_extra_repr():
    text = repr(DepthRouter(8, 0.25, mode="threshold", temperature=0.2, threshold=0.6))
    for part in ("d_model=8", "capacity=0.25", "mode='threshold'", "temperature=0.2", "threshold=0.6"):
        assert part in text
    assert "predictor" in repr(DepthRouter(8, causal="predictor"))
