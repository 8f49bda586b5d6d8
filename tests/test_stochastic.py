import pytest
import torch

from softtopk import gumbel_topk


def test_gumbel_topk_sums_to_k_and_bounds():
    x = torch.randn(3, 7, dtype=torch.float64)
    y = gumbel_topk(x, 3, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(y.sum(-1), torch.full((3,), 3.0, dtype=torch.float64))
    assert bool((y >= 0).all())


def test_gumbel_topk_hard_and_reproducible():
    x = torch.randn(2, 6, requires_grad=True)
    y = gumbel_topk(x, 2, hard=True, dim=-1, generator=torch.Generator().manual_seed(1))
    assert set(y.detach().unique().tolist()) <= {0.0, 1.0} and torch.all(y.sum(-1) == 2)
    (y * torch.arange(6.0)).sum().backward()
    assert x.grad.abs().sum() > 0
    y2 = gumbel_topk(x, 2, hard=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(y.detach(), y2.detach())


def test_gumbel_topk_gradcheck_and_errors():
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    f = lambda z: gumbel_topk(z, 2, temperature=0.7, generator=torch.Generator().manual_seed(3))  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    with pytest.raises(TypeError, match="`k`"):
        gumbel_topk(x, 1.5)
    with pytest.raises(ValueError, match="`k`"):
        gumbel_topk(x, 9)
    with pytest.raises(ValueError, match="`temperature`"):
        gumbel_topk(x, 1, temperature=0.0)
