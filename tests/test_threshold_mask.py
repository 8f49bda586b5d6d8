"""threshold_mask (threshold routing) against its definition written out in float64.

``temperature`` T follows the width convention: the relaxation is σ((s − threshold)/t) with t = T/4 (slope 1/T at
y = 1/2), conftest.internal_temperature("sigmoid", T)."""

import math

import pytest
import torch

from conftest import internal_temperature
from softtopk import threshold_mask


def ref(x, threshold, T, normalize, dim):
    s = {"sigmoid": torch.sigmoid(x), "softmax": torch.softmax(x, dim), "none": x}[normalize]
    return torch.sigmoid((s - threshold) / internal_temperature("sigmoid", T)), (s > threshold).to(x.dtype)


@pytest.mark.parametrize("normalize", ["sigmoid", "softmax", "none"])
@pytest.mark.parametrize("dim", [0, -1])
def test_definition_and_variants(normalize, dim):
    x = torch.randn(4, 6, dtype=torch.float64)
    p = 0.2 if normalize == "softmax" else 0.4
    soft, hard = ref(x, p, 0.3, normalize, dim)
    torch.testing.assert_close(threshold_mask(x, p, temperature=0.3, dim=dim, normalize=normalize), soft)
    assert torch.equal(threshold_mask(x, p, dim=dim, normalize=normalize, method="hard"), hard)
    # straight-through: the hard forward, the relaxation's gradient
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn(4, 6, dtype=torch.float64)
    st = threshold_mask(xa, p, temperature=0.3, dim=dim, normalize=normalize, straight_through=True)
    assert torch.equal(st.detach(), hard)
    (st * w).sum().backward()
    (threshold_mask(xb, p, temperature=0.3, dim=dim, normalize=normalize) * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    # t -> 0: the hard mask
    assert torch.equal(threshold_mask(x, p, temperature=1e-12, dim=dim, normalize=normalize).round(), hard)


def test_threshold_keyword_and_default_temperature():
    x = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(threshold_mask(x, threshold=0.4, temperature=0.3), ref(x, 0.4, 0.3, "sigmoid", -1)[0])
    with pytest.raises(TypeError):
        threshold_mask(x, p=0.4)  # renamed `threshold`
    # temperature=None (the default) means 1.0, i.e. t = 1/4
    torch.testing.assert_close(threshold_mask(x, 0.4), ref(x, 0.4, 1.0, "sigmoid", -1)[0])
    torch.testing.assert_close(threshold_mask(x, 0.4, temperature=None), threshold_mask(x, 0.4, temperature=1.0))


def test_slope_is_one_over_temperature():
    """With normalize="none", dy/ds at s = threshold is 1/T (the width convention)."""
    s = torch.tensor([[0.25], [0.5], [0.75]], dtype=torch.float64, requires_grad=True)  # one entry per row
    for T in (0.05, 0.5, 3.0):
        y = threshold_mask(s, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), temperature=T, normalize="none")
        torch.testing.assert_close(y.detach(), torch.full((3, 1), 0.5, dtype=torch.float64))
        (g,) = torch.autograd.grad(y.sum(), s)
        torch.testing.assert_close(g * T, torch.ones(3, 1, dtype=torch.float64), rtol=1e-12, atol=0)


def test_unused_arguments_raise():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="`method`"):
        threshold_mask(x, 0.5, method="straight_through")  # now straight_through=True
    with pytest.raises(TypeError, match="straight_through"):
        threshold_mask(x, 0.5, method="hard", straight_through=True)
    with pytest.raises(TypeError, match="temperature"):
        threshold_mask(x, 0.5, method="hard", temperature=0.3)
    threshold_mask(x, 0.5, method="hard", temperature=None, straight_through=False)


def test_gradcheck_per_row_threshold_and_temperature():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    p = torch.tensor([0.3, 0.5, 0.6], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: threshold_mask(a, b, temperature=c), (x, p, t))
    h = threshold_mask(x, p, method="hard")
    h.sum().backward()
    assert x.grad.abs().sum() == 0


def test_dtypes_infinities_and_errors():
    x = torch.tensor([[2.0, -1.0, math.inf, -math.inf]])
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for kw in ({"method": "sigmoid"}, {"method": "hard"}, {"straight_through": True}):
            y = threshold_mask(x.to(dt), 0.5, **kw)
            assert y.dtype == dt and bool(torch.isfinite(y).all())
    with pytest.raises(ValueError, match="`threshold`"):
        threshold_mask(x, 1.5)
    with pytest.raises(ValueError, match="`threshold`"):
        threshold_mask(x, torch.tensor([-0.1]))
    threshold_mask(x, 3.0, normalize="none")
    with pytest.raises(TypeError, match="`threshold`"):
        threshold_mask(x, "0.5")
    with pytest.raises(ValueError, match="`normalize`"):
        threshold_mask(x, 0.5, normalize="max")
    with pytest.raises(ValueError, match="`method`"):
        threshold_mask(x, 0.5, method="sparse")
    with pytest.raises(ValueError, match="`temperature`"):
        threshold_mask(x, 0.5, temperature=0)
    with pytest.raises(ValueError, match="`dim`"):
        threshold_mask(x, 0.5, dim=2)
    with pytest.raises(ValueError, match="NaN"):
        threshold_mask(torch.tensor([float("nan")]), 0.5)
    with pytest.raises(TypeError, match="`x`"):
        threshold_mask(torch.arange(3), 0.5)


def test_softmax_normaliser_rejects_rows_without_a_softmax():
    """Issue 14 #10: softmax of a row with +inf, or of a row of only -inf, is NaN: a clear error instead."""
    inf = float("inf")
    for x in (torch.tensor([inf, 1.0, 2.0]), torch.tensor([[-inf, -inf], [1.0, 2.0]])):
        with pytest.raises(ValueError, match="threshold_mask: `x`.*softmax"):
            threshold_mask(x, 0.5, normalize="softmax")
    y = threshold_mask(torch.tensor([-inf, 1.0, 2.0]), 0.5, normalize="softmax")  # -inf alone is fine: share 0
    assert torch.isfinite(y).all()
