"""softtopk.nn.TopKRouter: the mixture-of-experts router."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

import softtopk
from conftest import variant_kwargs
from softtopk.nn import Routing, TopKRouter

ROUTER_VARIANTS = ["hard", "straight_through", "dftopk", "sigmoid", "soft", "sparse", "sparse43", "lapsum"]


def make_router(d=6, e=5, k=2, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return TopKRouter(d, e, k, **kw).to(dtype)


def tokens_of(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def gate_logits(router, tokens):
    w = router.gate.weight.detach().to(tokens.dtype)
    return tokens.reshape(-1, w.shape[1]) @ w.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 6), (2, 3, 6)])
def test_router_shapes_and_dtypes(dtype, shape):
    torch.manual_seed(0)
    router = TopKRouter(6, 5, 2, temperature=0.5, capacity_factor=1.5)  # a float32 gate, fed float64 too
    r = router(tokens_of(*shape, dtype=dtype))
    t = math.prod(shape[:-1])
    assert isinstance(r, Routing) and isinstance(r, tuple)
    assert r.indices.shape == (t, 2) and r.indices.dtype == torch.long
    assert r.weights.shape == (t, 2) and r.weights.dtype == dtype
    assert r.dense.shape == (t, 5) and r.dense.dtype == dtype
    assert r.routing_map.shape == (t, 5) and r.routing_map.dtype == torch.bool
    assert r.load.shape == (5,) and r.load.dtype == dtype
    assert r.aux_loss.shape == () and r.aux_loss.dtype == dtype
    assert r.dropped.shape == () and r.dropped.dtype == dtype
    assert r.outside.shape == (t,) and r.outside.dtype == dtype
    torch.testing.assert_close(r.load.sum(), torch.tensor(1.0, dtype=dtype))


@pytest.mark.parametrize("variant", ROUTER_VARIANTS)
@pytest.mark.parametrize("score", ["softmax", "sigmoid", None])
def test_router_indices_weights_dense_and_map(variant, score):
    router = make_router(**variant_kwargs(variant, temperature=0.7), score=score)
    tokens = tokens_of(4, 3, 6)
    r = router(tokens)
    logits = gate_logits(router, tokens)
    assert torch.equal(r.indices, torch.topk(logits, 2).indices)
    assert torch.equal(r.indices, softtopk.topk(logits, 2, method="hard").indices)
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(12, dtype=torch.float64))
    assert (r.weights >= 0).all()
    assert torch.equal(r.dense.gather(-1, r.indices), r.weights)
    assert torch.equal(r.dense.scatter(-1, r.indices, 0.0), torch.zeros_like(r.dense))
    assert torch.equal(r.routing_map, torch.zeros_like(r.routing_map).scatter(-1, r.indices, True))
    assert (r.routing_map.sum(-1) == 2).all() and r.dropped == 0


@pytest.mark.parametrize("variant", ["sigmoid", "sparse", "lapsum", "dftopk"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid", None])
def test_router_train_weights_are_the_soft_mask_times_the_scores(variant, score):
    kw = variant_kwargs(variant, temperature=0.8)
    router = make_router(**kw, score=score, normalize=False)
    tokens = tokens_of(9, 6)
    r = router(tokens)
    logits = gate_logits(router, tokens)
    opts = {"max_support": 3} if variant == "sparse" else {}
    ref = softtopk.topk(logits, 2, **kw, **opts)
    scores = {"softmax": torch.softmax(logits, -1), "sigmoid": torch.sigmoid(logits), None: torch.ones_like(logits)}
    torch.testing.assert_close(r.weights, ref.weights * scores[score].gather(-1, ref.indices))
    torch.testing.assert_close(r.outside, ref.outside)


@pytest.mark.parametrize("variant", ["sigmoid", "sparse", "lapsum", "soft"])
def test_router_eval_is_exact_topk_of_the_scores(variant):
    router = make_router(**variant_kwargs(variant, temperature=2.0), jitter=0.3)
    tokens = tokens_of(11, 6)
    logits = gate_logits(router, tokens)
    top = logits.topk(2)
    exact = torch.softmax(top.values, -1)  # the normalised softmax at the top k
    r = router.eval()(tokens)
    assert torch.equal(r.indices, top.indices)
    torch.testing.assert_close(r.weights, exact)
    assert torch.equal(r.outside, torch.zeros(11, dtype=torch.float64))
    assert not torch.allclose(router.train()(tokens).weights, exact, atol=1e-3)  # soft (and jittered) in train
    soft = make_router(**variant_kwargs(variant, temperature=2.0), hard_in_eval=False).eval()
    torch.testing.assert_close(soft(tokens).weights, soft.train()(tokens).weights)  # no jitter: the same


def test_router_hard_softmax_is_the_standard_topk_gate():
    torch.manual_seed(3)
    router = TopKRouter(8, 6, 2, method="hard", load_balance=None)
    tokens = tokens_of(5, 4, 8, dtype=torch.float32)
    r = router(tokens)
    logits = tokens.reshape(-1, 8) @ router.gate.weight.T
    vals, idx = torch.topk(logits, 2, dim=-1)
    gate = torch.softmax(vals, dim=-1)  # Mixtral: softmax over the top-k logits
    assert torch.equal(r.indices, idx)
    torch.testing.assert_close(r.weights, gate)
    assert r.aux_loss == 0
    r.weights.sum().backward()  # the gradient reaches the gate through the scores (sum is constant: zero here)
    assert router.gate.weight.grad is not None


@pytest.mark.parametrize("variant", ["sigmoid", "sparse", "lapsum", "dftopk", "straight_through"])
@pytest.mark.parametrize("score", ["softmax", None])
def test_router_gradients_reach_the_gate(variant, score):
    router = make_router(**variant_kwargs(variant, temperature=1.0), score=score)
    tokens = tokens_of(10, 6)
    r = router(tokens)
    target = torch.randn(r.weights.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (r.weights * target).sum().backward()
    grad = router.gate.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_router_aux_loss_is_the_switch_formula():
    router = make_router(e=4, k=2, temperature=0.5)
    tokens = tokens_of(13, 6)
    r = router(tokens)
    logits = gate_logits(router, tokens)
    t, e, k = 13, 4, 2
    probs = torch.softmax(logits, -1)
    f = [sum(int(e_ in logits[i].topk(k).indices.tolist()) for i in range(t)) / (t * k) for e_ in range(e)]
    p = [float(probs[:, e_].mean()) for e_ in range(e)]
    expected = e * sum(f_e * p_e for f_e, p_e in zip(f, p))
    assert r.aux_loss.item() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(r.load, torch.tensor(f, dtype=torch.float64))
    r.aux_loss.backward()
    assert router.gate.weight.grad.abs().sum() > 0  # through P
    assert make_router(load_balance=None)(tokens).aux_loss == 0
    assert make_router(load_balance="bias")(tokens).aux_loss == 0


def test_router_bias_balancing_pushes_overloaded_experts_down():
    router = TopKRouter(2, 3, 1, method="hard", score="sigmoid", load_balance="bias", bias_update_rate=0.1)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
    assert "expert_bias" in dict(router.named_buffers()) and not any("bias" in n for n, _ in router.named_parameters())
    tokens = torch.tensor([[3.0, 0.5], [2.0, 0.1], [4.0, -0.2], [1.0, 0.3]])  # all to expert 0
    r = router(tokens)
    assert (r.indices == 0).all()
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1]))
    router.eval()(tokens)
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1]))  # no update in eval
    assert TopKRouter(2, 3, 1, load_balance="aux").expert_bias is None


def test_router_bias_changes_the_selection_not_the_weights():
    router = make_router(e=5, k=2, method="hard", score="sigmoid", load_balance="bias", bias_update_rate=0.0)
    tokens = tokens_of(20, 6)
    logits = gate_logits(router, tokens)
    before = router(tokens)
    router.expert_bias.copy_(torch.tensor([0.4, -0.3, 0.2, 0.0, -0.1], dtype=torch.float64))
    after = router(tokens)
    assert torch.equal(after.indices, (logits + router.expert_bias).topk(2).indices)
    assert not torch.equal(after.indices, before.indices)  # the bias moved some selections
    s = torch.sigmoid(logits).gather(-1, after.indices)
    torch.testing.assert_close(after.weights, s / s.sum(-1, keepdim=True))  # the scores carry no bias
    same = (after.indices == before.indices).all(-1)
    assert same.any()
    assert torch.equal(after.weights[same], before.weights[same])


def test_router_capacity_drops_the_lowest_weights():
    router = TopKRouter(2, 2, 1, method="hard", normalize=False, capacity_factor=1.0, load_balance=None)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    tokens = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [4.0, 0.0]])  # all to expert 0, C = ⌈4/2⌉ = 2
    r = router(tokens)
    assert (r.indices == 0).all()
    assert r.routing_map[:, 0].tolist() == [False, True, False, True]  # the two largest weights are kept
    assert r.weights[[0, 2]].eq(0).all() and (r.weights[[1, 3]] > 0.5).all()
    assert r.dropped.item() == 0.5
    torch.testing.assert_close(r.load, torch.tensor([1.0, 0.0]))  # the selection, before the drop


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_router_capacity_bound_and_dropped_fraction(capacity_factor):
    router = make_router(e=4, k=2, temperature=0.5, capacity_factor=capacity_factor)
    tokens = tokens_of(30, 6) + torch.tensor([2.0, 0, 0, 0, 0, 0], dtype=torch.float64)  # unbalanced
    r = router(tokens)
    free = make_router(e=4, k=2, temperature=0.5)(tokens)
    c = math.ceil(capacity_factor * 30 * 2 / 4)
    assert (r.routing_map.sum(0) <= c).all()
    kept = r.routing_map.sum().item()
    assert r.dropped.item() == pytest.approx(1 - kept / 60)
    assert r.dropped > 0
    for e in range(4):  # each expert keeps its c largest weights (or all)
        w = free.dense[:, e][free.routing_map[:, e]]
        kept_w = free.dense[:, e][r.routing_map[:, e]]
        torch.testing.assert_close(kept_w.sort().values, w.sort().values[len(w) - len(kept_w) :])
    keep = r.routing_map.gather(-1, r.indices)
    assert torch.equal(r.weights, torch.where(keep, free.weights, 0.0))  # dropped, not rerouted or renormalised
    assert torch.equal(r.indices, free.indices)


def test_router_sparse_support_stays_within_the_selection():
    tokens = tokens_of(40, 6)
    router = make_router(e=8, k=2, method="sparse", temperature=20.0, normalize=False, score=None)
    logits = gate_logits(router, tokens)
    unbounded = softtopk.topk_mask(logits, 2, method="sparse", temperature=20.0)
    assert ((unbounded > 0).sum(-1) > 3).any()  # without the bound the support exceeds k + 1
    r = router(tokens)
    ref = softtopk.topk(logits, 2, method="sparse", temperature=20.0, max_support=3)
    assert ((r.dense > 0).sum(-1) <= 2).all()
    torch.testing.assert_close(r.weights, ref.weights)
    torch.testing.assert_close(r.outside, ref.outside)
    torch.testing.assert_close(r.weights.sum(-1) + r.outside, torch.full((40,), 2.0, dtype=torch.float64))
    assert (r.outside > 0).any()
    given = make_router(e=8, k=2, method="sparse", temperature=20.0, max_support=5, normalize=False, score=None)
    torch.testing.assert_close(given(tokens).weights, softtopk.topk(logits, 2, method="sparse", temperature=20.0,
                                                                    max_support=5).weights)  # fmt: skip


def test_router_jitter_only_in_train():
    router = make_router(jitter=0.2)
    tokens = tokens_of(6, 6)
    assert not torch.equal(router(tokens).weights, router(tokens).weights)
    router.eval()
    assert torch.equal(router(tokens).weights, router(tokens).weights)
    plain = make_router()
    assert torch.equal(plain(tokens).weights, plain(tokens).weights)


@pytest.mark.parametrize("method", ["sigmoid", "lapsum", "sparse"])
def test_router_gradcheck(method):
    router = make_router(d=3, e=4, k=2, method=method, temperature=1.5, capacity_factor=2.0)
    tokens = tokens_of(5, 3).requires_grad_()
    weight = router.gate.weight.detach().clone().requires_grad_()

    def f(w, x):
        r = torch.func.functional_call(router, {"gate.weight": w}, (x,))
        return r.weights, r.dense, r.aux_loss

    assert gradcheck(f, (weight, tokens), atol=1e-6, rtol=1e-5)


def test_router_extra_repr_and_module():
    router = TopKRouter(16, 8, 2, method="sparse", temperature=0.5, capacity_factor=1.25, load_balance="bias")
    text = repr(router)
    for part in ("d_model=16", "n_experts=8", "k=2", "method='sparse'", "temperature=0.5", "capacity_factor=1.25",
                 "load_balance='bias'", "hard_in_eval=True", "(gate): Linear"):  # fmt: skip
        assert part in text, text
    assert isinstance(router, torch.nn.Module)
    assert [n for n, _ in router.named_parameters()] == ["gate.weight"]
    with pytest.raises(ValueError, match="`tokens`"):
        router(torch.randn(3, 15))
    with pytest.raises(ValueError, match="`tokens`"):
        router(torch.full((2, 16), math.nan))


@pytest.mark.parametrize(
    "args, kwargs, exc, name",
    [
        ((0, 4, 2), {}, ValueError, "d_model"),
        ((8.0, 4, 2), {}, TypeError, "d_model"),
        ((8, 0, 1), {}, ValueError, "n_experts"),
        ((8, True, 1), {}, TypeError, "n_experts"),
        ((8, 4, 0), {}, ValueError, "k"),
        ((8, 4, 5), {}, ValueError, "k"),
        ((8, 4, 1.5), {}, TypeError, "k"),
        ((8, 4, 2), {"method": "nope"}, ValueError, "method"),
        ((8, 4, 2), {"method": "hard", "temperature": 0.5}, TypeError, "temperature"),
        ((8, 4, 2), {"temperature": 0.0}, ValueError, "temperature"),
        ((8, 4, 2), {"method": "sigmoid", "p": 2}, TypeError, "p"),
        ((8, 4, 2), {"method": "sparse", "max_support": 2}, ValueError, "max_support"),
        ((8, 4, 2), {"score": "tanh"}, ValueError, "score"),
        ((8, 4, 2), {"load_balance": "loss"}, ValueError, "load_balance"),
        ((8, 4, 2), {"capacity_factor": 0.0}, ValueError, "capacity_factor"),
        ((8, 4, 2), {"capacity_factor": "1"}, TypeError, "capacity_factor"),
        ((8, 4, 2), {"jitter": 1.0}, ValueError, "jitter"),
        ((8, 4, 2), {"jitter": -0.1}, ValueError, "jitter"),
        ((8, 4, 2), {"bias_update_rate": -1.0}, ValueError, "bias_update_rate"),
        ((8, 4, 2), {"normalize": 1}, TypeError, "normalize"),
        ((8, 4, 2), {"hard_in_eval": "yes"}, TypeError, "hard_in_eval"),
    ],
)
def test_router_bad_arguments_name_them(args, kwargs, exc, name):
    with pytest.raises(exc, match=f"TopKRouter: .*`{name}`"):
        TopKRouter(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# The router's contract, for every method of softtopk.METHODS and straight-through.
# ----------------------------------------------------------------------------------------------------------
CONTRACT_VARIANTS = [*softtopk.METHODS, "straight_through"]
SOFT_CONTRACT_VARIANTS = [v for v in CONTRACT_VARIANTS if v != "hard"]
SUM_K = ("hard", "straight_through", "sigmoid", "soft", "sparse", "lapsum", "perturbed")  # Σ mask = k over all E


def contract_router(variant, seed=0, dtype=torch.float64, **kw):
    return make_router(d=6, e=8, k=2, seed=seed, dtype=dtype, **variant_kwargs(variant, temperature=1.0), **kw)


@pytest.mark.parametrize("variant", CONTRACT_VARIANTS)
def test_contract_weights_sum(variant):
    tokens = tokens_of(15, 6)
    r = contract_router(variant)(tokens)
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(15, dtype=torch.float64))
    torch.testing.assert_close(r.dense.sum(-1), torch.ones(15, dtype=torch.float64))
    raw = contract_router(variant, score=None, normalize=False)
    torch.manual_seed(4)  # the perturbed method draws its noise: the same draw in both calls
    r = raw(tokens)
    logits = gate_logits(raw, tokens)
    if variant in SUM_K:  # the mask at the k experts: k minus the mass outside them
        torch.testing.assert_close(r.weights.sum(-1) + r.outside, torch.full((15,), 2.0, dtype=torch.float64))
    opts = {"max_support": 3} if variant == "sparse" else {}
    torch.manual_seed(4)
    ref = softtopk.topk(logits, 2, **variant_kwargs(variant, temperature=1.0), **opts)
    torch.testing.assert_close(r.weights, ref.weights)  # normalize=False, score=None: topk's weights (dftopk too)


@pytest.mark.parametrize("variant", CONTRACT_VARIANTS)
def test_contract_support_bound(variant):
    router = contract_router(variant, score=None, normalize=False)
    tokens = tokens_of(25, 6)
    r = router(tokens)
    assert r.indices.shape == (25, 2) and (r.routing_map.sum(-1) == 2).all() and ((r.dense != 0).sum(-1) <= 2).all()
    g = torch.randn(25, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (grad,) = torch.autograd.grad((r.surrogate * g).sum(), r.logits, allow_unused=True)  # the mask's Jacobian
    reached = (torch.zeros_like(g) if grad is None else grad != 0).sum(-1)  # the experts the mask's gradient reaches
    if variant == "hard":
        assert (reached == 0).all()
    elif variant == "sparse":  # bounded: the mask reaches at most max_support = k + 1 experts
        assert (reached <= 3).all() and (reached == 3).any()
        wide = contract_router(variant, score=None, normalize=False, max_support=5)(tokens)
        (grad5,) = torch.autograd.grad((wide.surrogate * g).sum(), wide.logits)
        assert ((grad5 != 0).sum(-1) <= 5).all() and ((grad5 != 0).sum(-1) > 3).any()
    elif variant != "perturbed":
        assert (reached == 8).any()  # a dense soft mask reaches every expert


@pytest.mark.parametrize("variant", CONTRACT_VARIANTS)
@pytest.mark.parametrize("capacity_factor", [0.5])
def test_contract_capacity(variant, capacity_factor):
    tokens = tokens_of(24, 6) + torch.tensor([1.5, -1.0, 0, 0, 0, 0], dtype=torch.float64)  # skewed
    torch.manual_seed(4)
    r = contract_router(variant, capacity_factor=capacity_factor)(tokens)
    torch.manual_seed(4)
    free = contract_router(variant)(tokens)
    c = math.ceil(capacity_factor * 24 * 2 / 8)
    per_expert = r.routing_map.sum(0)
    assert (per_expert <= c).all() and r.dropped > 0
    assert r.dropped.item() == pytest.approx(1 - r.routing_map.sum().item() / 48)
    assert torch.equal(per_expert, free.routing_map.sum(0).clamp_max(c))  # an expert keeps min(C, its slots)
    for e in range(8):  # the C largest weights, ties by token order (a stable sort)
        cand = free.routing_map[:, e].nonzero().squeeze(1)
        order = torch.sort(free.dense[cand, e], descending=True, stable=True).indices
        kept = torch.zeros(24, dtype=torch.bool)
        kept[cand[order[:c]]] = True
        assert torch.equal(r.routing_map[:, e], kept)
    assert torch.equal(r.weights, torch.where(r.routing_map.gather(-1, r.indices), free.weights, 0.0))
    torch.testing.assert_close(r.load, free.load)  # load: the selection before the drop


@pytest.mark.parametrize("variant", CONTRACT_VARIANTS)
@pytest.mark.parametrize(
    "shape, dtype",
    [((7, 6), torch.float32), ((1, 6), torch.float64), ((2, 3, 6), torch.bfloat16), ((0, 6), torch.float32)],
)
def test_contract_shapes_and_dtypes(variant, shape, dtype):
    router = contract_router(variant, dtype=torch.float32, capacity_factor=1.0)
    r = router(tokens_of(*shape, dtype=dtype) * 0.3)
    t = math.prod(shape[:-1])
    for name, size, dt in [
        ("indices", (t, 2), torch.long), ("weights", (t, 2), dtype), ("dense", (t, 8), dtype),
        ("routing_map", (t, 8), torch.bool), ("load", (8,), dtype), ("aux_loss", (), dtype), ("dropped", (), dtype),
        ("outside", (t,), dtype), ("surrogate", (t, 8), dtype), ("logits", (t, 8), dtype),
    ]:  # fmt: skip
        value = getattr(r, name)
        assert value.shape == size and value.dtype == dt, (name, value.shape, value.dtype)
        assert not value.is_floating_point() or torch.isfinite(value).all(), name
    if t:
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        kept = r.routing_map.sum(-1) == 2  # the tokens that lost no slot to the capacity
        assert ((r.weights.float().sum(-1) - 1).abs() <= tol)[kept].all()
        torch.testing.assert_close(r.surrogate, r.dense, rtol=0, atol=0)


@pytest.mark.parametrize("variant", SOFT_CONTRACT_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contract_gradient_reaches_the_gate(variant, dtype):
    router = contract_router(variant, dtype=dtype, load_balance=None)
    tokens = tokens_of(12, 6, dtype=dtype)
    r = router(tokens)
    target = torch.randn(r.weights.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    (r.weights * target).sum().backward()
    grad = router.gate.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    router.gate.weight.grad = None
    (router(tokens).surrogate * torch.randn(12, 8, dtype=dtype)).sum().backward()
    assert torch.isfinite(router.gate.weight.grad).all() and router.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", CONTRACT_VARIANTS)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_contract_eval_is_torch_topk_gate(variant, score):
    router = contract_router(variant, score=score, jitter=0.2, capacity_factor=None).eval()
    tokens = tokens_of(3, 5, 6)
    r = router(tokens)
    logits = gate_logits(router, tokens)
    top = torch.topk(logits, 2)
    s = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    gate = s.gather(-1, top.indices)
    assert torch.equal(r.indices, top.indices)
    torch.testing.assert_close(r.weights, gate / gate.sum(-1, keepdim=True), rtol=1e-15, atol=1e-15)
    if score == "softmax":  # the softmax gate: softmax over the top-k logits (Mixtral)
        torch.testing.assert_close(r.weights, torch.softmax(top.values, -1), rtol=1e-15, atol=1e-15)
    assert torch.equal(r.outside, torch.zeros(15, dtype=torch.float64))
    assert torch.equal(router(tokens).weights, r.weights)  # deterministic (no jitter, no noise)


@pytest.mark.parametrize("method", ["sigmoid"])  # "hard": test_router_bias_balancing_pushes_overloaded_experts_down
def test_contract_bias_balancing_moves_load_to_uniform(method):
    kw = {} if method == "hard" else {"temperature": 1.0}
    torch.manual_seed(0)
    router = TopKRouter(6, 8, 2, method=method, score="sigmoid", load_balance="bias", bias_update_rate=0.05, **kw)
    with torch.no_grad():
        router.gate.weight.mul_(0.3)
        router.gate.weight[0] += 1.0  # expert 0 favoured by every token of positive mean ...
        router.gate.weight[1] += 0.8
    tokens = tokens_of(100, 6, dtype=torch.float32).abs()  # ... and these are positive
    imbalance = [router(tokens).load.max().item() * 8]  # max / mean
    for _ in range(80):
        imbalance.append(router(tokens).load.max().item() * 8)
    late = sum(imbalance[-20:]) / 20  # the sign updates oscillate around balance
    assert imbalance[0] > 3.0 and late < 2.0 and late < imbalance[0] / 2
    assert router.expert_bias[0] < 0 and router.expert_bias[1] < 0
