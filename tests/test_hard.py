"""The hard top-k mask (softtopk.hard, method="hard") and the straight-through estimator
(method="sigmoid", straight_through=True: the hard forward, the sigmoid mask's gradient at the same temperature)."""

from __future__ import annotations

import math

import pytest
import torch

import softtopk
from conftest import ref_hard, spaced

topk_mask = softtopk.topk_mask


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hard_matches_torch_topk(dtype, largest):
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 33):
        x = torch.randn(4, n, generator=g).to(dtype)
        for k in range(n + 1):
            y = topk_mask(x, k, method="hard", largest=largest)
            assert y.dtype == dtype
            for i in range(4):
                assert torch.equal(y[i], ref_hard(x[i], k, largest).to(dtype)), (n, k, i)


def test_hard_ties_as_torch_topk():
    x = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    for k in range(7):
        y = topk_mask(x, k, method="hard")
        expected = torch.zeros_like(x).scatter_(-1, torch.topk(x, k).indices, 1.0)
        assert torch.equal(y, expected)
        assert torch.equal(y.sum(-1), torch.full((2,), float(k)))


def test_hard_per_row_k_and_dim():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, 4, generator=g, dtype=torch.float64)  # select along dim 0 (n = 6)
    k = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 2]])
    for kk in (k, k.unsqueeze(0), k.double()):
        y = topk_mask(x, kk, method="hard", dim=0)
        for a in range(2):
            for b in range(4):
                assert torch.equal(y[:, a, b], ref_hard(x[:, a, b], int(k[a, b])))


def test_hard_zero_gradient_in_graph():
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    y = topk_mask(x, 3, method="hard")
    assert y.requires_grad and y.grad_fn is not None
    (y * torch.randn(3, 8, dtype=torch.float64)).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    # the hard mask has no temperature: passing one is an error, not a silently unused argument
    t = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match="temperature"):
        topk_mask(x, 3, method="hard", temperature=t)
    with pytest.raises(TypeError, match="straight_through"):
        topk_mask(x, 3, method="hard", straight_through=True)
    # and gradcheck agrees (the function is piecewise constant)
    xs = spaced(8, batch=(2,)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: topk_mask(x, 3, method="hard"), (xs,))


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("t", [0.01, 0.3, 1.0, 5.0])
def test_straight_through_forward_is_hard(t, largest):
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = torch.randn(5, 9, generator=g).to(dtype)
        for k in (0, 1, 4, 8, 9):
            y = topk_mask(x, k, method="sigmoid", straight_through=True, temperature=t, largest=largest)
            assert y.dtype == dtype
            assert torch.equal(y, topk_mask(x, k, method="hard", largest=largest))


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("t", [0.01, 0.3, 1.0, 5.0])
def test_straight_through_backward_is_sigmoid(t, largest):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 10, generator=g, dtype=torch.float64)
    for k in (0, 1, 3, 9, 10):
        grads = []
        for st in (True, False):
            x = (
                torch.randn(4, 10, generator=torch.Generator().manual_seed(k), dtype=torch.float64) * 2
            ).requires_grad_()
            tt = torch.tensor([t, 2 * t, 0.5 * t, t], dtype=torch.float64, requires_grad=True)
            (topk_mask(x, k, temperature=tt, largest=largest, straight_through=st) * w).sum().backward()
            grads.append((x.grad, tt.grad))
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-14)


def test_straight_through_per_row_k_dim_and_options():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 2, 3, generator=g, dtype=torch.float64)
    k = torch.tensor([[1, 2, 3], [0, 7, 4]])
    xa = x.clone().requires_grad_()
    ya = topk_mask(xa, k, method="sigmoid", straight_through=True, dim=0, temperature=0.4, tol=1e-12, max_iter=80)
    assert torch.equal(ya, topk_mask(x, k, method="hard", dim=0))
    ya.pow(2).mul(torch.arange(42.0, dtype=torch.float64).reshape(7, 2, 3)).sum().backward()
    xb = x.clone().requires_grad_()
    yb = topk_mask(xb, k.double(), method="sigmoid", dim=0, temperature=0.4, tol=1e-12, max_iter=80)
    # chain rule through y²: the straight-through upstream gradient is 2·hard·w, the sigmoid one 2·soft·w
    (yb * 2 * ya.detach() * torch.arange(42.0, dtype=torch.float64).reshape(7, 2, 3)).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-14)
    with pytest.raises(TypeError, match=r"\bp\b"):
        topk_mask(x, 2, method="sigmoid", straight_through=True, p=2)
    with pytest.raises(ValueError, match="`k`"):  # the forward is the hard mask: a whole k
        topk_mask(x, 2.5, method="sigmoid", straight_through=True)
    with pytest.raises(ValueError, match="`method`"):  # the old spelling is gone
        topk_mask(x, 2, method="straight_through")


def test_straight_through_without_graph_is_the_hard_mask_alone(monkeypatch):
    """A straight-through call that nothing differentiates (no_grad, no input requiring grad) computes the hard mask
    only: no soft solve; NaN still raises. A temperature that requires grad keeps the soft mask's gradient."""
    from softtopk import threshold

    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 300, generator=g)
    expect = topk_mask(x, 7, method="hard")

    def no_solve(*args, **kwargs):
        raise AssertionError("the soft mask was solved")

    with monkeypatch.context() as m:
        m.setattr(threshold, "kernel_mask", no_solve)
        m.setattr(threshold, "normalised_mask", no_solve)
        assert torch.equal(topk_mask(x, 7, straight_through=True, temperature=0.3), expect)
        with torch.no_grad():
            y = topk_mask(x.clone().requires_grad_(), 7, straight_through=True, temperature=0.3, largest=False)
        assert torch.equal(y, topk_mask(x, 7, method="hard", largest=False)) and not y.requires_grad
        with pytest.raises(ValueError, match="NaN"):
            topk_mask(torch.full((2, 5), math.nan), 2, straight_through=True)
    t = torch.tensor(0.3, requires_grad=True)
    y = topk_mask(x, 7, straight_through=True, temperature=t)
    assert torch.equal(y, expect)
    (y * torch.randn(x.shape, generator=g)).sum().backward()
    assert t.grad is not None and t.grad != 0


def test_straight_through_with_scale_std():
    """Forward: the hard mask; backward: the sigmoid mask's gradient with scale="std" (through the row's std)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 9, generator=g, dtype=torch.float64) * torch.tensor([[0.1], [1.0], [30.0]], dtype=torch.float64)
    w = torch.randn(3, 9, generator=g, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = topk_mask(xa, 4, temperature=0.7, scale="std", straight_through=True)
    assert torch.equal(ya, topk_mask(x, 4, method="hard"))
    (ya * w).sum().backward()
    (topk_mask(xb, 4, temperature=0.7, scale="std") * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-14)


def test_hard_module():
    """softtopk.hard (was softtopk.baselines): hard_topk_mask is the exact mask; hard_mask keeps a zero gradient."""
    from softtopk.hard import hard_mask, hard_topk_mask

    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64)
    for k in (0, 1, 3, 7):
        ref = torch.stack([ref_hard(x[i], k) for i in range(4)])
        assert torch.equal(hard_topk_mask(x, k), ref)
        assert torch.equal(hard_topk_mask(x, torch.full((4, 1), k)), ref)
        xr = x.clone().requires_grad_()
        y = hard_mask(xr, k)
        assert torch.equal(y.detach(), ref)
        y.sum().backward()
        assert torch.equal(xr.grad, torch.zeros_like(x))
