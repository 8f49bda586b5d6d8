"""softtopk.nn.MixtureOfExperts: dispatch, the two straight-through options (selected experts only, dense_backward),
and the literal formulas their outputs and gradients must equal."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

import softtopk
from softtopk.nn import MixtureOfExperts, Routing, TopKRouter

D, E, K, D_OUT = 5, 4, 2, 3


def expert(seed: int, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(100 + seed)
    return nn.Sequential(nn.Linear(D, 7), nn.Tanh(), nn.Linear(7, D_OUT)).to(dtype)


def make_moe(dense_backward=False, dtype=torch.float64, seed=0, **router_kw):
    torch.manual_seed(seed)
    router = TopKRouter(D, E, K, **router_kw).to(dtype)
    return MixtureOfExperts(router, [expert(e, dtype) for e in range(E)], dense_backward=dense_backward)


def tokens_of(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def twin(moe: MixtureOfExperts) -> MixtureOfExperts:
    """The same router and experts (shared parameters), with the other ``dense_backward``."""
    return MixtureOfExperts(moe.router, moe.experts, dense_backward=not moe.dense_backward)


ST = {"method": "sigmoid", "straight_through": True, "temperature": 0.8}
GATES = {
    "straight_through": ST,
    "hard": {"method": "hard"},
    "sigmoid": {"method": "sigmoid", "temperature": 0.8},
    "sparse": {"method": "sparse", "temperature": 2.0},
    "dftopk": {"method": "dftopk", "temperature": 0.8},
}


def all_outputs(moe, x2d):
    return torch.stack([f(x2d) for f in moe.experts])  # (E, T, d_out)


def grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


class RowWise(nn.Module):
    """An expert whose output row depends bitwise only on its input row (no GEMM, whose rounding may depend on the
    batch size): tanh(Σ_i x_i W_ij + b_j)."""

    def __init__(self, seed, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(200 + seed)
        self.weight = nn.Parameter(torch.randn(D, D_OUT, generator=g, dtype=dtype))
        self.bias = nn.Parameter(torch.randn(D_OUT, generator=g, dtype=dtype))

    def forward(self, x):
        return torch.tanh((x.unsqueeze(-1) * self.weight).sum(-2) + self.bias)


@pytest.mark.parametrize("gate", ["straight_through", "hard", "sparse"])
@pytest.mark.parametrize("shape, dtype", [((9, D), torch.float32), ((2, 3, D), torch.float64), ((1, D), torch.float64)])
def test_dense_backward_forward_equals_dispatch_exactly(gate, shape, dtype):
    capacity = None if shape[0] == 1 else 1.0
    moe = make_moe(dtype=dtype, **GATES[gate], capacity_factor=capacity)
    x = tokens_of(*shape, dtype=dtype)
    out = moe(x)
    assert out.shape == (*shape[:-1], D_OUT) and out.dtype == dtype
    eps = torch.finfo(dtype).eps  # MLP experts: a GEMM may round a row differently at another batch size
    torch.testing.assert_close(twin(moe)(x), out, rtol=4 * eps, atol=4 * eps)
    rows = MixtureOfExperts(moe.router, [RowWise(e, dtype) for e in range(E)])
    assert torch.equal(twin(rows)(x), rows(x))  # row-wise experts: exactly the same values


@pytest.mark.parametrize("gate", list(GATES))
def test_dispatch_is_the_selected_experts_formula(gate):
    moe = make_moe(**GATES[gate])
    x = tokens_of(6, 2, D)
    out, r = moe(x, return_routing=True)
    assert isinstance(r, Routing) and moe.routing is r
    x2 = x.reshape(-1, D)
    ys = all_outputs(moe, x2)
    ref = torch.stack([sum(r.weights[t, j] * ys[r.indices[t, j], t] for j in range(K)) for t in range(12)])
    torch.testing.assert_close(out.reshape(12, D_OUT), ref)


def st_literals(moe, x2, temperature):
    """The literal dense straight-through formula and the selected-only one, from the gate weight W."""
    w = moe.router.gate.weight
    logits = x2 @ w.T
    m = softtopk.topk_mask(logits, K, method="sigmoid", temperature=temperature, straight_through=True)
    s = torch.softmax(logits, -1)
    ys = all_outputs(moe, x2)
    dense_w = m * s / (m * s).sum(-1, keepdim=True)  # every expert, the surrogate's gradient at each
    dense = torch.einsum("te,etd->td", dense_w, ys)
    idx = torch.topk(logits, K).indices
    sel_w = m.gather(-1, idx) * s.gather(-1, idx)
    sel_w = sel_w / sel_w.sum(-1, keepdim=True)  # the k selected experts only
    picked = ys[idx, torch.arange(x2.shape[0]).unsqueeze(1)]  # (T, k, d_out)
    selected = (sel_w.unsqueeze(-1) * picked).sum(1)
    return dense, selected


@pytest.mark.parametrize("shape", [(8, D), (3, 4, D)])
def test_straight_through_gradients_dense_and_selected_only(shape):
    moe = make_moe(**ST, load_balance=None)
    x = tokens_of(*shape)
    target = tokens_of(*shape[:-1], D_OUT, seed=7)
    params = [moe.router.gate.weight, *moe.experts.parameters()]
    g_sparse = grads((moe(x) * target).sum(), params)
    g_dense = grads((twin(moe)(x) * target).sum(), params)
    lit_dense, lit_selected = st_literals(moe, x.reshape(-1, D), ST["temperature"])
    t2 = target.reshape(-1, D_OUT)
    torch.testing.assert_close(lit_dense, lit_selected)  # the same forward
    g_lit_dense = grads((lit_dense * t2).sum(), params)
    g_lit_selected = grads((lit_selected * t2).sum(), params)
    for a, b in zip(g_dense, g_lit_dense):
        torch.testing.assert_close(a, b)
    for a, b in zip(g_sparse, g_lit_selected):
        torch.testing.assert_close(a, b)
    gate_sparse, gate_dense = g_sparse[0].flatten(), g_dense[0].flatten()
    cos = torch.nn.functional.cosine_similarity(gate_sparse, gate_dense, dim=0)
    assert cos < 0.999  # the selected-only gradient is a different (truncated) one
    for a, b in zip(g_sparse[1:], g_dense[1:]):  # the experts get the same gradient (0 off the selection)
        torch.testing.assert_close(a, b)


def test_dense_backward_with_a_soft_method_is_the_full_soft_mask_gradient():
    kw = GATES["sigmoid"]
    moe = make_moe(dense_backward=True, **kw, score=None, load_balance=None)
    x = tokens_of(7, D)
    target = tokens_of(7, D_OUT, seed=3)
    g = grads((moe(x) * target).sum(), [moe.router.gate.weight])[0]
    w = moe.router.gate.weight
    m = softtopk.topk_mask(x @ w.T, K, **kw)
    full = torch.einsum("te,etd->td", m / m.sum(-1, keepdim=True), all_outputs(moe, x))
    torch.testing.assert_close(g, grads((full * target).sum(), [w])[0])
    hard = make_moe(dense_backward=True, method="hard", load_balance=None)  # "hard": the selected-only gradient
    gh = [grads((f(x) * target).sum(), [hard.router.gate.weight])[0] for f in (hard, twin(hard))]
    torch.testing.assert_close(gh[0], gh[1])


@pytest.mark.parametrize("dense_backward", [False, True])
def test_capacity_drops_tokens_and_dense_agrees(dense_backward):
    moe = make_moe(dense_backward, **ST, capacity_factor=0.5)
    x = tokens_of(20, D) + 1.5  # skewed
    out, r = moe(x, return_routing=True)
    assert r.dropped > 0
    c = math.ceil(0.5 * 20 * K / E)
    assert (r.routing_map.sum(0) <= c).all()
    gone = ~r.routing_map.any(-1)  # tokens dropped by all their experts get 0
    assert torch.equal(out[gone], torch.zeros_like(out[gone]))
    ys = all_outputs(moe, x)
    torch.testing.assert_close(out, torch.einsum("te,etd->td", r.dense, ys))


def test_no_grad_and_eval_dispatch_only_the_selected_experts():
    moe = make_moe(True, **ST)
    calls = []
    for e, f in enumerate(moe.experts):
        f.register_forward_hook(lambda mod, inp, out, e=e: calls.append((e, inp[0].shape[0])))
    x = tokens_of(10, D)
    moe(x)
    assert sorted(n for _, n in calls) == [10] * E  # every expert on every token
    calls.clear()
    with torch.no_grad():
        out = moe(x)
    assert sum(n for _, n in calls) == 10 * K  # the dispatch: k slots per token
    torch.testing.assert_close(out, twin(moe)(x).detach(), rtol=0, atol=0)
    moe.eval()
    r = moe.router(x)
    logits = x @ moe.router.gate.weight.T
    torch.testing.assert_close(r.weights, torch.softmax(logits.topk(K).values, -1))  # the exact top-k gate


def test_aux_loss_reaches_the_gate_and_empty_input():
    moe = make_moe(**ST)
    x = tokens_of(6, D)
    out = moe(x)
    (out.square().mean() + 1e-2 * moe.routing.aux_loss).backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in moe.experts.parameters())
    empty = moe(torch.zeros(0, D, dtype=torch.float64))
    assert empty.shape == (0, D_OUT)
    assert twin(moe)(torch.zeros(2, 0, D, dtype=torch.float64)).shape == (2, 0, D_OUT)


def test_bfloat16():
    moe = make_moe(dtype=torch.bfloat16, **ST)
    x = tokens_of(2, 5, D, dtype=torch.bfloat16)
    out = moe(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(twin(moe)(x), out)
    out.float().sum().backward()
    assert torch.isfinite(moe.router.gate.weight.grad).all()


@pytest.mark.parametrize("method", ["sparse"])
def test_gradcheck_dispatch(method):
    moe = make_moe(method=method, temperature=1.5, load_balance=None)
    x = tokens_of(3, D)
    weight = moe.router.gate.weight.detach().clone().requires_grad_()

    def f(w):
        return torch.func.functional_call(moe, {"router.gate.weight": w}, (x,))

    assert gradcheck(f, (weight,), atol=1e-6, rtol=1e-5)


def test_repr_and_errors():
    moe = make_moe(True)
    text = repr(moe)
    assert "n_experts=4, k=2, dense_backward=True" in text and "(router): TopKRouter" in text
    assert [n for n, _ in moe.named_parameters()][0] == "router.gate.weight"
    router = TopKRouter(D, E, K)
    experts = [expert(e) for e in range(E)]
    assert MixtureOfExperts(router, nn.ModuleList(experts)).routing is None
    for args, kw, exc, name in [
        ((nn.Linear(D, E), experts), {}, TypeError, "router"),
        ((router, experts[:3]), {}, ValueError, "experts"),
        ((router, experts[0]), {}, TypeError, "experts"),
        ((router, [*experts[:3], "f"]), {}, TypeError, "experts"),
        ((router, 3), {}, TypeError, "experts"),
        ((router, experts), {"dense_backward": 1}, TypeError, "dense_backward"),
    ]:
        with pytest.raises(exc, match=f"MixtureOfExperts: .*`{name}`"):
            MixtureOfExperts(*args, **kw)
    with pytest.raises(ValueError, match="`tokens`"):
        MixtureOfExperts(router, experts)(torch.randn(3, D + 1))
