"""softtopk.nn.SoftTopK: the nn.Module form of topk_mask (moved out of the package root), its construction-time
checks, and hard_in_eval (the exact top-k mask in eval(), the soft mask in train())."""

from __future__ import annotations

import importlib

import pytest
import torch

import softtopk
from conftest import METHOD_VARIANTS, run, variant_kwargs
from softtopk.nn import SoftTopK

topk_mask = softtopk.topk_mask
ALL_VARIANTS = list(METHOD_VARIANTS)


def test_module_lives_in_nn():
    assert not hasattr(softtopk, "SoftTopK")  # softtopk.SoftTopK is gone: softtopk.nn.SoftTopK
    assert issubclass(SoftTopK, torch.nn.Module)
    assert importlib.import_module("softtopk.nn").SoftTopK is SoftTopK


def test_keyword_only_after_k():
    with pytest.raises(TypeError):
        SoftTopK(2, "sigmoid")
    with pytest.raises(TypeError):
        SoftTopK(2, "sigmoid", 0.5)
    SoftTopK(2, method="sigmoid", temperature=0.5)
    SoftTopK(k=2)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_module_agrees_with_function(variant):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    kt = torch.tensor([[1, 2, 3, 0, 1]] * 4)  # one k per row of the (4, 5) batch when dim=1
    for k, dim, largest, t in (
        (2, -1, True, 0.5),
        (1, 0, False, 2.0),
        (kt, 1, True, 1.0),
        (kt.unsqueeze(1), 1, False, 1.0),
    ):
        kw = variant_kwargs(variant, temperature=t, dim=dim, largest=largest)
        mod = SoftTopK(k, **kw)
        assert isinstance(mod, torch.nn.Module)
        assert torch.equal(mod(x), topk_mask(x, k, **kw))
        assert torch.equal(mod.eval()(x), topk_mask(x, k, **kw))  # hard_in_eval=False: eval() changes nothing
        repr(mod)


@pytest.mark.parametrize("variant", ["sigmoid", "sparse", "lapsum"])
def test_module_scale_and_max_support_agree_with_function(variant):
    x = torch.randn(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(19)) * 5 + 2
    for kw in ({"scale": "std"}, {"max_support": 6}, {"scale": "std", "max_support": 4}):
        mod = SoftTopK(3, **variant_kwargs(variant, temperature=0.4, **kw))
        assert torch.equal(mod(x), run(x, 3, variant, temperature=0.4, **kw))


def test_module_temperature_parameter():
    t = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
    mod = SoftTopK(3, method="sigmoid", temperature=t)
    assert any(p is t for p in mod.parameters()) or mod.temperature is t
    x = torch.randn(2, 8, dtype=torch.float64)
    (mod(x) * torch.arange(8.0, dtype=torch.float64)).sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad != 0


def test_module_validates_method_options_temperature_at_construction():
    with pytest.raises(ValueError, match="`method`"):
        SoftTopK(2, method="nope")
    with pytest.raises(ValueError, match="`method`"):
        SoftTopK(2, method="straight_through")  # now SoftTopK(2, method="sigmoid", straight_through=True)
    with pytest.raises(TypeError):
        SoftTopK(2, method="sigmoid", p=2)
    with pytest.raises(TypeError):
        SoftTopK(2, method="hard", tol=1e-3)
    for t in (0.0, -1.0, torch.tensor([1.0, 0.0])):
        with pytest.raises(ValueError, match="`temperature`"):
            SoftTopK(2, temperature=t)


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        (dict(k=-1), ValueError),
        (dict(k="3"), TypeError),
        (dict(k=2.5, method="hard"), ValueError),
        (dict(k=2.5, method="sigmoid", straight_through=True), ValueError),
        (dict(k=2, largest="yes"), TypeError),
        (dict(k=2, dim=1.5), TypeError),
        (dict(k=2, method="sparse", p=3), ValueError),
        (dict(k=2, tol=-1.0), ValueError),
        (dict(k=2, max_iter=0), ValueError),
        (dict(k=2, method="hard", temperature=0.5), TypeError),
        (dict(k=2, method="hard", scale="std"), TypeError),
        (dict(k=2, method="hard", straight_through=True), TypeError),
        (dict(k=2, method="sparse", epsilon=0.1), TypeError),
        (dict(k=2, method="soft", epsilon=0.1, temperature=0.5), TypeError),
        (dict(k=2, scale="var"), (ValueError, TypeError)),
        (dict(k=3, method="sparse", max_support=2), ValueError),
        (dict(k=2, method="dftopk", max_support=4), TypeError),
    ],
    ids=[
        "k<0",
        "k-str",
        "k-frac-hard",
        "k-frac-straight-through",
        "largest-str",
        "dim-float",
        "p=3",
        "tol<0",
        "max_iter=0",
        "hard-temperature",
        "hard-scale",
        "hard-straight-through",
        "sparse-epsilon",
        "soft-epsilon-and-temperature",
        "scale-var",
        "max_support<k",
        "dftopk-max_support",
    ],
)
def test_module_validates_other_arguments_at_construction(kwargs, exc):
    """SoftTopK's docstring: "The arguments are checked when the module is built". Everything that can be
    checked without x (k's type and sign, whole k for hard methods, largest, dim's type, unused arguments,
    option values, max_support ≥ k)."""
    with pytest.raises(exc):
        SoftTopK(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# hard_in_eval.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "variant", ["sigmoid", "straight_through", "dftopk", "soft_eps", "sparse", "sparse43", "lapsum"]
)
def test_hard_in_eval(variant):
    """eval(): exactly topk_mask(method="hard") (same k, dim, largest); train(): the soft mask, with gradients."""
    g = torch.Generator().manual_seed(20)
    x = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
    kt = torch.tensor([[0, 1, 2, 3, 3, 1]] * 4)  # one k per row of the (4, 6) batch when dim=1 (n = 3)
    w = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
    for k, dim, largest in ((2, -1, True), (1, 0, False), (kt, 1, True), (kt.unsqueeze(1), 1, False)):
        kw = variant_kwargs(variant, temperature=0.6, dim=dim, largest=largest)
        mod = SoftTopK(k, hard_in_eval=True, **kw)
        assert mod.training
        xr = x.clone().requires_grad_()
        y = mod(xr)
        assert torch.equal(y, topk_mask(x, k, **kw))
        (y * w).sum().backward()
        assert torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0
        mod.eval()
        hard = topk_mask(x, k, method="hard", dim=dim, largest=largest)
        out = mod(x)
        assert torch.equal(out, hard) and out.dtype == x.dtype
        assert set(out.unique().tolist()) <= {0.0, 1.0}
        mod.train()
        assert torch.equal(mod(x), topk_mask(x, k, **kw))
        mod.train(False)
        assert torch.equal(mod(x), hard)


def test_hard_in_eval_dtypes_and_infinities():
    x = torch.tensor([[0.5, -float("inf"), 2.0, 1.0, float("inf")], [3.0, 2.0, 1.0, 0.0, -1.0]])
    mod = SoftTopK(2, method="sparse", temperature=5.0, hard_in_eval=True)
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        xd = x.to(dt)
        assert not torch.equal(mod.train()(xd), topk_mask(xd, 2, method="hard"))
        out = mod.eval()(xd)
        assert out.dtype == dt and torch.equal(out, topk_mask(xd, 2, method="hard"))
    # with scale and straight-through options too: eval() ignores them
    mod = SoftTopK(2, temperature=0.3, scale="std", straight_through=True, hard_in_eval=True).eval()
    assert torch.equal(mod(x), topk_mask(x, 2, method="hard"))


def test_extra_repr_shows_hard_in_eval():
    mod = SoftTopK(3, method="sparse", temperature=0.5, hard_in_eval=True)
    r = repr(mod)
    assert "hard_in_eval=True" in r and "k=3" in r and "sparse" in r
    assert "hard_in_eval=True" in mod.extra_repr()
    assert "hard_in_eval=True" not in repr(SoftTopK(3))
