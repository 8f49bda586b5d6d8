"""Differentiable sorting networks (``topk_permutation(method="odd_even" | "bitonic")``, the family
:mod:`softtopk.sorting_networks`): against a literal relaxed network on the full N × N permutation matrix written
from the definition (comparator by comparator, float64, −1e300 sentinels for the bitonic padding), its limits and
marginals, dims and dtypes, and the hand-written backward (autograd through the literal network, float64
gradcheck). ``topk_distribution`` and the public dispatch are tested in test_permutations.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from conftest import spaced
from softtopk import sorting_networks, topk_permutation

NETWORKS = ("odd_even", "bitonic")
RELAXATIONS = ("logistic", "cauchy")
SENTINEL = -1e300  # below every score; (b − a)/t stays finite, and f gives exactly 0 or 1 against a score


def ref_layers(network, n):
    """The comparators (u, v), larger value to u, layer by layer, and the number of wires."""
    if network == "odd_even":
        return n, [[(i, i + 1) for i in range(layer % 2, n - 1, 2)] for layer in range(n)]
    wires = 1
    while wires < n:
        wires *= 2
    layers = []
    size = 2
    while size <= wires:
        dist = size // 2
        while dist >= 1:
            layer = []
            for i in range(wires):
                partner = i ^ dist
                if partner > i:
                    layer.append((i, partner) if (i // size) % 2 == 0 else (partner, i))
            layers.append(layer)
            dist //= 2
        size *= 2
    return wires, layers


def ref_f(z, relaxation):
    return torch.sigmoid(z) if relaxation == "logistic" else 0.5 + torch.atan(z) / math.pi


def ref_network(x, network, t, relaxation, largest=True):
    """The relaxed permutation P (N × N) of the network on one row x (n,), float64, applied comparator by
    comparator: α = f((b − a)/t), u ← (1 − α) a + α b, v ← α a + (1 − α) b, and the same mix of rows u, v of P."""
    n = x.numel()
    wires, layers = ref_layers(network, n)
    s = x if largest else -x
    v = torch.cat([s, s.new_full((wires - n,), SENTINEL)])
    perm = torch.eye(wires, dtype=x.dtype)
    for layer in layers:
        for u, w in layer:
            a, b = v[u], v[w]
            alpha = ref_f((b - a) / t, relaxation)
            v, old = v.clone(), v
            v[u] = (1 - alpha) * a + alpha * b
            v[w] = alpha * a + (1 - alpha) * b
            perm, prev = perm.clone(), perm
            perm[u] = (1 - alpha) * prev[u] + alpha * prev[w]
            perm[w] = alpha * prev[u] + (1 - alpha) * prev[w]
            del old
    return perm


@pytest.mark.parametrize("network", NETWORKS)
def test_reference_network_sorts(network):
    """The reference comparators themselves form a sorting network (hard comparators, many random inputs)."""
    g = torch.Generator().manual_seed(3)
    for n in range(1, 12):
        wires, layers = ref_layers(network, n)
        for _ in range(20):
            v = torch.randn(n, generator=g).tolist() + [-math.inf] * (wires - n)
            for layer in layers:
                for u, w in layer:
                    v[u], v[w] = max(v[u], v[w]), min(v[u], v[w])
            assert v[:n] == sorted(v[:n], reverse=True)
    if network == "bitonic":
        assert len(ref_layers(network, 16)[1]) == 4 * 5 // 2


@pytest.mark.parametrize("relaxation", RELAXATIONS)
@pytest.mark.parametrize("network", NETWORKS)
def test_matches_literal_network(network, relaxation):
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 5, 6, 7, 8):
        x = torch.randn(2, n, generator=g, dtype=torch.float64)
        for t in (0.1, 1.0):
            for largest in (True, False):
                refs = [ref_network(x[i], network, t, relaxation, largest) for i in range(2)]
                for p in refs:
                    assert float(p[:n, n:].abs().sum()) == 0.0  # scores never mix with sentinels
                for k in sorted({1, max(1, n // 2), n}):
                    gam = topk_permutation(x, k, method=network, temperature=t, relaxation=relaxation, largest=largest)
                    assert gam.shape == (2, k, n)
                    for i in range(2):
                        torch.testing.assert_close(gam[i], refs[i][:k, :n], rtol=0, atol=1e-12)


@pytest.mark.parametrize("relaxation", RELAXATIONS)
@pytest.mark.parametrize("network,n", [("odd_even", 6), ("odd_even", 13), ("bitonic", 8), ("bitonic", 16)])
def test_backward_matches_autograd_through_literal_network(network, n, relaxation):
    """Several checkpoint segments (13 layers: segments of 6, 6, 1): the gradient in x and in t."""
    g = torch.Generator().manual_seed(n)
    x = spaced(n, batch=(2,), generator=g).requires_grad_()
    t = torch.tensor([0.3, 0.8], dtype=torch.float64, requires_grad=True)
    k = 4
    up = torch.randn(2, k, n, generator=g, dtype=torch.float64)
    gam = topk_permutation(x, k, method=network, temperature=t, relaxation=relaxation)
    gx, gt = torch.autograd.grad((gam * up).sum(), (x, t))
    xr = x.detach().clone().requires_grad_()
    tr = t.detach().clone().requires_grad_()
    ref = torch.stack([ref_network(xr[i], network, tr[i], relaxation)[:k, :n] for i in range(2)])
    torch.testing.assert_close(gam.detach(), ref.detach(), rtol=0, atol=1e-12)
    rx, rt = torch.autograd.grad((ref * up).sum(), (xr, tr))
    torch.testing.assert_close(gx, rx, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gt, rt, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("relaxation", RELAXATIONS)
@pytest.mark.parametrize("network", NETWORKS)
def test_gradcheck(network, relaxation):
    """float64 gradcheck in x and a per-row temperature, scores along dim 1 of a (2, n, 3) tensor (padded and
    unpadded bitonic sizes; the k = n case in gradcheck's fast mode, a random projection of the Jacobian)."""
    g = torch.Generator().manual_seed(4)
    sizes = ((5, 3, True, False), (6, 6, False, True))
    if network == "bitonic":
        sizes = ((5, 3, True, False), (8, 8, False, True))
    for n, k, largest, fast in sizes:
        x = spaced(n, batch=(6,), generator=g).reshape(2, 3, n).transpose(1, 2).contiguous().requires_grad_()
        t = (0.3 + torch.rand(2, 3, generator=g, dtype=torch.float64)).requires_grad_()

        def fun(x, t, k=k, largest=largest):
            return topk_permutation(x, k, method=network, temperature=t, relaxation=relaxation, largest=largest, dim=1)

        assert fun(x, t).shape == (2, 3, k, n)
        assert gradcheck(fun, (x, t), atol=1e-7, fast_mode=fast)


@pytest.mark.parametrize("relaxation", RELAXATIONS)
@pytest.mark.parametrize("network", NETWORKS)
def test_hard_limit(network, relaxation):
    """t → 0: Γ is the one-hot rows of torch.topk (distinct values; n = 12 is padded for bitonic). The Cauchy
    relaxation approaches it like t/gap, the logistic one exponentially."""
    g = torch.Generator().manual_seed(5)
    x = spaced(12, batch=(4,), generator=g)
    t, atol = (1e-3, 1e-9) if relaxation == "logistic" else (1e-9, 1e-6)
    for largest in (True, False):
        gam = topk_permutation(x, 5, method=network, temperature=t, relaxation=relaxation, largest=largest)
        top = torch.topk(x, 5, largest=largest)
        hard = torch.zeros_like(gam).scatter_(-1, top.indices.unsqueeze(-1), 1.0)
        torch.testing.assert_close(gam, hard, rtol=0, atol=atol)
        torch.testing.assert_close((gam @ x.unsqueeze(-1)).squeeze(-1), top.values, rtol=0, atol=10 * atol)


@pytest.mark.parametrize("network", NETWORKS)
def test_marginals(network):
    """Rows sum to 1, columns to at most 1, entries in [0, 1]; k = n gives a doubly stochastic matrix; the summed
    rows are a soft top-k mask ordered like the scores."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 13, generator=g, dtype=torch.float64)
    for relaxation in RELAXATIONS:
        for t in (0.05, 1.0, 10.0):
            for k in (1, 5, 13):
                gam = topk_permutation(x, k, method=network, temperature=t, relaxation=relaxation)
                torch.testing.assert_close(gam.sum(-1), torch.ones(3, k, dtype=torch.float64), rtol=0, atol=1e-12)
                col = gam.sum(-2)
                assert float(gam.min()) >= 0 and float(col.max()) <= 1 + 1e-12
                if k == 13:
                    torch.testing.assert_close(col, torch.ones(3, 13, dtype=torch.float64), rtol=0, atol=1e-12)


def test_sizes_k0_kn_n1_and_empty_batch():
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    for network in NETWORKS:
        assert topk_permutation(x, 0, method=network, dim=1).shape == (2, 3, 0, 9)
        assert topk_permutation(x, 9, method=network, dim=1).shape == (2, 3, 9, 9)
        one = torch.tensor([[2.0], [-1.0]], requires_grad=True)
        gam = topk_permutation(one, 1, method=network)
        assert gam.tolist() == [[[1.0]], [[1.0]]]
        gam.sum().backward()
        assert one.grad.tolist() == [[0.0], [0.0]]
        assert topk_permutation(torch.randn(0, 6), 2, method=network).shape == (0, 2, 6)


@pytest.mark.parametrize("network", NETWORKS)
def test_dim_batch_and_per_row_temperature(network):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 9, 3, generator=g, dtype=torch.float64)
    gam = topk_permutation(x, 4, method=network, dim=1, relaxation="cauchy")
    assert gam.shape == (2, 3, 4, 9)
    torch.testing.assert_close(gam, topk_permutation(x.transpose(1, 2), 4, method=network, relaxation="cauchy"))
    t = torch.rand(2, 3, generator=g, dtype=torch.float64) + 0.1
    gam = topk_permutation(x, 4, method=network, dim=1, temperature=t)
    for i in range(2):
        for j in range(3):
            row = topk_permutation(x[i, :, j], 4, method=network, temperature=float(t[i, j]))
            torch.testing.assert_close(gam[i, j], row, rtol=0, atol=1e-14)
    keep = topk_permutation(x, 4, method=network, dim=1, temperature=t.unsqueeze(1))  # keepdim form
    torch.testing.assert_close(keep, gam, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("network", NETWORKS)
def test_half_precision(network, dtype, atol):
    """Computed in float32: equal to the float32 result on the rounded input up to the output rounding, and close to
    it on the exact input; the backward runs."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 20, generator=g)
    xh = x.to(dtype).requires_grad_()
    gam = topk_permutation(xh, 5, method=network, temperature=0.5)
    assert gam.dtype == dtype
    ref = topk_permutation(xh.detach().float(), 5, method=network, temperature=0.5)
    torch.testing.assert_close(gam.float(), ref, rtol=0, atol=atol)
    torch.testing.assert_close(gam.float(), topk_permutation(x, 5, method=network, temperature=0.5), rtol=0, atol=0.05)
    gam.float().pow(2).sum().backward()
    assert xh.grad.dtype == dtype and bool(torch.isfinite(xh.grad.float()).all())


def test_float32_matches_float64():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 50, generator=g, dtype=torch.float64).requires_grad_()
    x32 = x.detach().float().requires_grad_()
    for network in NETWORKS:
        for relaxation in RELAXATIONS:
            up = torch.randn(3, 6, 50, generator=g, dtype=torch.float64)
            g64 = topk_permutation(x, 6, method=network, temperature=0.2, relaxation=relaxation)
            g32 = topk_permutation(x32, 6, method=network, temperature=0.2, relaxation=relaxation)
            torch.testing.assert_close(g32.double(), g64.detach(), rtol=0, atol=1e-5)
            a = torch.autograd.grad((g64 * up).sum(), x)[0]
            b = torch.autograd.grad((g32 * up.float()).sum(), x32)[0]
            torch.testing.assert_close(b.double(), a, rtol=0, atol=1e-4 * float(a.abs().max()))


def test_backward_keeps_only_the_differences():
    """No per-layer autograd graph; the backward node holds the C comparator differences a row (and t)."""
    x = torch.randn(2, 10, dtype=torch.float64, requires_grad=True)
    for network, comparators in (("odd_even", 10 * 9 // 2), ("bitonic", 16 * 4 * 5 // 4)):
        gam = topk_permutation(x, 3, method=network)
        names, nodes, stack = set(), [], [gam.grad_fn]
        while stack:
            nd = stack.pop()
            if nd is None or nd.name() in names:
                continue
            names.add(nd.name())
            nodes.append(nd)
            stack.extend(f for f, _ in nd.next_functions)
        assert not any(("Sigmoid" in s or "Atan" in s or "Mul" in s) for s in names)
        (node,) = [nd for nd in nodes if "NetworkTopK" in nd.name()]
        diffs, t = node.saved_tensors
        assert diffs.shape == (2, comparators) and t.numel() == 2


def test_family_constants_and_low_level_entry():
    """The family's tables, and ``network_permutation`` (rows (R, n), per-row t (R, 1), no validation) is what
    ``topk_permutation`` computes."""
    assert sorting_networks.NETWORKS == NETWORKS and sorting_networks.RELAXATIONS == RELAXATIONS
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 7, generator=g, dtype=torch.float64)
    t = torch.tensor([[0.3], [1.0], [2.0]], dtype=torch.float64)
    for network in NETWORKS:
        for relaxation in RELAXATIONS:
            low = sorting_networks.network_permutation(x, 4, t, network=network, relaxation=relaxation)
            ref = topk_permutation(x, 4, method=network, temperature=t, relaxation=relaxation)
            torch.testing.assert_close(low, ref, rtol=0, atol=0)


@pytest.mark.parametrize("network", NETWORKS)
def test_default_temperature_is_one(network):
    """``temperature=None`` (the default) is t = 1.0 (it was 0.1 before the rename), logistic relaxation."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 9, generator=g, dtype=torch.float64)
    ref = topk_permutation(x, 3, method=network, temperature=1.0, relaxation="logistic")
    torch.testing.assert_close(topk_permutation(x, 3, method=network), ref, rtol=0, atol=0)
    torch.testing.assert_close(topk_permutation(x, 3, method=network, temperature=None), ref, rtol=0, atol=0)
    lit = torch.stack([ref_network(x[i], network, 1.0, "logistic")[:3, :9] for i in range(2)])
    torch.testing.assert_close(ref, lit, rtol=0, atol=1e-12)


def test_bad_arguments_raise():
    x = torch.randn(2, 5)
    cases = [
        (lambda: topk_permutation(x, 2, method="merge"), ValueError, "`method`"),
        (lambda: topk_permutation(x, 2, method="bitonic", relaxation="gauss"), ValueError, "`relaxation`"),
        (lambda: topk_permutation(x, 2, method="odd_even", relaxation=1), TypeError, "`relaxation`"),
        (lambda: topk_permutation(x, 2, relaxation="cauchy"), TypeError, "`relaxation`"),
        (lambda: topk_permutation(x, 2, method="sinkhorn", relaxation="logistic"), TypeError, "`relaxation`"),
        (lambda: topk_permutation(x, 2, method="bitonic", max_iter=10), TypeError, "`max_iter`"),
        (lambda: topk_permutation(x, 2, method="odd_even", tol=1e-3), TypeError, "`tol`"),
        (lambda: topk_permutation(x, 2, method="odd_even", steepness=3), TypeError, "`steepness`"),
        (lambda: topk_permutation(x, 2, method="bitonic", epsilon=0.1), TypeError, "`epsilon`"),
        (lambda: topk_permutation(x, 6, method="bitonic"), ValueError, "`k`"),
        (lambda: topk_permutation(x, -1, method="odd_even"), ValueError, "`k`"),
        (lambda: topk_permutation(x, 2.0, method="odd_even"), TypeError, "`k`"),
        (lambda: topk_permutation(x, 2, method="bitonic", temperature=0.0), ValueError, "`temperature`"),
        (lambda: topk_permutation(x, 2, method="odd_even", temperature=-1.0), ValueError, "`temperature`"),
        (lambda: topk_permutation(x, 2, method="bitonic", dim=2), ValueError, "`dim`"),
        (lambda: topk_permutation(torch.tensor([1.0, math.nan]), 1, method="bitonic"), ValueError, "NaN"),
        (lambda: topk_permutation(torch.tensor([1.0, math.inf]), 1, method="odd_even"), ValueError, "finite"),
    ]
    for call, exc, words in cases:
        with pytest.raises(exc, match=words):
            call()


@pytest.mark.parametrize("method", ["odd_even", "bitonic"])
def test_one_huge_score_does_not_corrupt_the_order_of_the_rest(method):
    """Issue 14 #3: a comparator's outputs were a + α(b − a), which rounds the smaller value away next to a large one
    (1e8 − 9 = 99999992 in float32): the values network then ordered the rest wrongly. Now (1 − α)a + αb."""
    xo = torch.tensor([9.0, 1e8, 2.0, 1.0, 7.0, 6.0, 4.0, 8.0])
    out = topk_permutation(xo, 4, method=method, temperature=0.01) @ xo
    torch.testing.assert_close(out, torch.tensor([1e8, 9.0, 8.0, 7.0]))
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        x = torch.randperm(16, generator=g).float()  # gaps of at least 1 = 100 temperatures: the hard order
        x[int(torch.randint(16, (1,), generator=g))] = 1e8
        torch.testing.assert_close(topk_permutation(x, 5, method=method, temperature=0.01) @ x, x.topk(5).values)
