"""softtopk.distributed.topk_mask / topk on 2 and 4 gloo processes spawned from pytest: every rank's shard of the
mask, and of its gradient, equals the single-process result on the concatenated tensor (float64, 1e-6)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from _spawn import spawn as _spawn

import softtopk
import softtopk.distributed as sd

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

# (method, options) of the cases; "st" is sigmoid with straight_through=True
CASES = [
    ("sigmoid", {}),
    ("soft", {}),
    ("sparse", {}),
    ("sparse", {"p": 4 / 3}),
    ("lapsum", {}),
    ("dftopk", {}),
    ("hard", {}),
    ("sigmoid", {"straight_through": True}),
]
LENGTHS = {2: [5, 11], 4: [7, 0, 13, 4]}  # uneven shards, an empty one; k = 15 exceeds every shard


def _shard(full, lengths, rank, dim=-1):
    start = sum(lengths[:rank])
    return full.narrow(dim, start, lengths[rank])


def _check_case(rank, world, method, options, k, full, grad, lengths, dim=-1, largest=True, t=0.7, k_grad=False):
    """y and ∂(Σ y·grad)/∂x, ∂/∂k, ∂/∂t of this rank's shard against the single-process computation."""
    kw = dict(method=method, largest=largest, **options)
    if method != "hard":
        kw["temperature"] = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    kt = torch.tensor(float(k), dtype=torch.float64, requires_grad=True) if k_grad else k
    x = full.clone().requires_grad_(True)
    y = softtopk.topk_mask(x, kt, dim=dim, **kw)
    (y * grad).sum().backward()
    ref = (y.detach(), x.grad, kt.grad if k_grad else None, kw.get("temperature"))
    ref_t = None if ref[3] is None else ref[3].grad.clone()

    kw2 = dict(kw)
    if method != "hard":
        kw2["temperature"] = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    kt2 = torch.tensor(float(k), dtype=torch.float64, requires_grad=True) if k_grad else k
    xs = _shard(full, lengths, rank, dim).clone().requires_grad_(True)
    ys = sd.topk_mask(xs, kt2, dim=dim, **kw2)
    (ys * _shard(grad, lengths, rank, dim)).sum().backward()
    what = f"{method} {options} rank {rank}/{world}"
    torch.testing.assert_close(ys.detach(), _shard(ref[0], lengths, rank, dim), atol=1e-6, rtol=0, msg=what)
    if xs.numel():
        torch.testing.assert_close(xs.grad, _shard(ref[1], lengths, rank, dim), atol=1e-6, rtol=1e-6, msg=what)
    if k_grad:
        torch.testing.assert_close(kt2.grad, ref[2], atol=1e-6, rtol=1e-6, msg=what)
    if ref_t is not None:
        torch.testing.assert_close(kw2["temperature"].grad, ref_t, atol=1e-6, rtol=1e-6, msg=what)


def _worker_masks(rank, world, ks=(1, 6, 15)):
    lengths = LENGTHS[world]
    n = sum(lengths)
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(3, n, dtype=torch.float64, generator=gen) * 2.0
    grad = torch.randn(3, n, dtype=torch.float64, generator=gen)
    for method, options in CASES:
        for k in ks:
            _check_case(rank, world, method, options, k, full, grad, lengths)
    for method in ("sigmoid", "sparse", "lapsum"):  # a real k, differentiated
        _check_case(rank, world, method, {}, 6.5, full, grad, lengths, k_grad=True)
    for method in ("sigmoid", "dftopk", "hard"):  # largest=False, dim 0 of a 3-D tensor
        full3 = torch.randn(n, 2, 3, dtype=torch.float64, generator=gen)
        grad3 = torch.randn(n, 2, 3, dtype=torch.float64, generator=gen)
        _check_case(rank, world, method, {}, 4, full3, grad3, lengths, dim=0, largest=False)


def _worker_padding(rank, world):
    """The last rank's shard is all −inf (padding): it gets exactly 0, the others the single-process mask."""
    lengths = LENGTHS[world]
    n = sum(lengths)
    gen = torch.Generator().manual_seed(1)
    full = torch.randn(2, n, dtype=torch.float64, generator=gen)
    full[:, n - lengths[-1] :] = -math.inf
    grad = torch.randn(2, n, dtype=torch.float64, generator=gen)
    for method in ("sigmoid", "sparse", "lapsum", "dftopk", "hard"):
        _check_case(rank, world, method, {}, 5, full, grad, lengths)
    ys = sd.topk_mask(_shard(full, lengths, rank), 5, method="sigmoid")  # every rank calls: a collective
    if rank == world - 1:
        assert bool((ys == 0).all())


def _worker_topk(rank, world):
    """sd.topk: the global values and indices of torch.topk, the weights and gradients of softtopk.topk."""
    lengths = LENGTHS[world]
    n = sum(lengths)
    gen = torch.Generator().manual_seed(2)
    full = torch.randn(3, n, dtype=torch.float64, generator=gen)
    gv, gw = (torch.randn(3, 4, dtype=torch.float64, generator=gen) for _ in range(2))
    for method in ("hard", "sigmoid", "sparse", "dftopk"):
        kw = {} if method == "hard" else {"temperature": 0.5}
        x = full.clone().requires_grad_(True)
        ref = softtopk.topk(x, 4, method=method, **kw)
        ((ref.values * gv).sum() + (ref.weights * gw).sum()).backward()
        xs = _shard(full, lengths, rank).clone().requires_grad_(True)
        r = sd.topk(xs, 4, method=method, **kw)
        ((r.values * gv).sum() + (r.weights * gw).sum()).backward()
        assert torch.equal(r.indices, ref.indices), (method, rank)
        torch.testing.assert_close(r.values.detach(), ref.values.detach(), atol=0, rtol=0)
        torch.testing.assert_close(r.weights.detach(), ref.weights.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(r.outside, ref.outside, atol=1e-6, rtol=0)
        if xs.numel():
            torch.testing.assert_close(xs.grad, _shard(x.grad, lengths, rank), atol=1e-6, rtol=1e-6)


def _worker_errors_and_traffic(rank, world):
    lengths = LENGTHS[world]
    xs = torch.randn(4, lengths[rank], dtype=torch.float64)
    with pytest.raises(ValueError, match="out of range"):
        sd.topk_mask(xs, sum(lengths) + 1)
    with pytest.raises(TypeError, match="max_support"):
        sd.topk_mask(xs, 2, max_support=3)
    with pytest.raises(ValueError, match="no sharded form"):
        sd.topk_mask(xs, 2, method="perturbed")
    bad = torch.randn(4 + rank, lengths[rank], dtype=torch.float64)  # batch shapes disagree
    with pytest.raises(ValueError, match="disagree in batch shape"):
        sd.topk_mask(bad, 2)
    # communication: O(rows) scalars per solver step, independent of the shard length
    big = torch.randn(4, 100_000, dtype=torch.float64).requires_grad_(True)
    with sd.traffic() as sent:
        y = sd.topk_mask(big, 1000, method="sigmoid", temperature=0.1)
        y.sum().backward()
    # once a strided sample of ~2048 scores per row over all the ranks (the warm start), then ≤ 50 steps of 2
    # float64 per row, the backward's 2, and the metadata
    assert 0 < sent.bytes < 4 * 2048 * 8 + 52 * 4 * 2 * 8 + 1000, sent
    scores_bytes = big.numel() * 8
    assert sent.bytes < scores_bytes / 50
    with sd.traffic() as sent:
        sd.topk(big, 10)
    assert sent.bytes <= 2 * 4 * 10 * 8 + 4 * 10 * 8 * 3 + 200, sent  # candidates, values, weights, outside


def _worker_long_rows(rank, world):
    """Rows longer than 8 × 2048: the sampled warm start and the band Newton, against one process."""
    lengths = [30_000, 20_011][:world] if world == 2 else [9_000, 11_000, 7_001, 13_000]
    n = sum(lengths)
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(3, n, dtype=torch.float64, generator=gen) * torch.tensor([[1.0], [30.0], [1e-3]]).double()
    grad = torch.randn(3, n, dtype=torch.float64, generator=gen)
    for method, options in (("sigmoid", {}), ("sparse", {}), ("sparse", {"p": 4 / 3}), ("lapsum", {})):
        for k in (5, 700):
            _check_case(rank, world, method, options, k, full, grad, lengths, t=0.05)


def _worker_two_ranks(rank, world):
    _worker_masks(rank, world)
    _worker_long_rows(rank, world)
    _worker_topk(rank, world)
    _worker_errors_and_traffic(rank, world)


def _worker_four_ranks(rank, world):
    _worker_masks(rank, world, ks=(15,))
    _worker_long_rows(rank, world)
    _worker_padding(rank, world)
    _worker_topk(rank, world)


def test_two_ranks():
    """Masks and gradients equal the single-process ones (every method, uneven shards, a real k, dim 0, largest=False),
    topk, the errors and the bytes sent (one spawn)."""
    _spawn(2, _worker_two_ranks)


def test_four_ranks():
    """The same with an empty shard and a shard of −inf padding."""
    _spawn(4, _worker_four_ranks)


def test_not_initialised():
    with pytest.raises(RuntimeError, match="init_process_group"):
        sd.topk_mask(torch.randn(3, 5), 2)
