"""topk_mask: shapes, dims, per-row parameters, dtypes, infinities, validation (unused arguments included),
scale="std", max_support, torch.compile / vmap, and hypothesis properties of every method variant.

The nn.Module is tested in test_nn.py; the hard mask and straight-through in test_hard.py."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import softtopk
from conftest import (
    ALL_METHODS,
    INTEGER_ONLY,
    METHOD_VARIANTS,
    NORMALISED_VARIANTS,
    SHIFT_INVARIANT_VARIANTS,
    SOFT_VARIANTS,
    ref_hard,
    run,
    spaced,
)

topk_mask = softtopk.topk_mask
ALL_VARIANTS = list(METHOD_VARIANTS)
INF = math.inf


def _tight(variant):
    """Options that make the threshold search converge to ~1e-13 (for comparisons of two different solves)."""
    return {"tol": 1e-13} if variant in NORMALISED_VARIANTS or variant == "straight_through" else {}


def _k_for(variant, n, frac=0.4):
    """A k valid for the variant: fractional for the normalised ones, whole otherwise."""
    k = max(1, round(frac * n))
    return k - 0.5 if variant in NORMALISED_VARIANTS and k > 1 else k


# ----------------------------------------------------------------------------------------------------------
# Shapes and dims.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_any_dim_equals_last_dim(variant):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    for dim in (-3, -2, -1, 0, 1, 2):
        n = x.shape[dim]
        k = _k_for(variant, n)
        y = run(x, k, variant, dim=dim, temperature=0.7)
        assert y.shape == x.shape and y.dtype == x.dtype
        expected = run(x.movedim(dim, -1).contiguous(), k, variant, temperature=0.7).movedim(-1, dim)
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_batch_shapes_equal_rowwise(variant):
    g = torch.Generator().manual_seed(1)
    n = 6
    k = _k_for(variant, n)
    for batch in ((), (3,), (2, 3), (2, 1, 3)):
        x = torch.randn(*batch, n, generator=g, dtype=torch.float64)
        y = run(x, k, variant, temperature=0.5)
        assert y.shape == x.shape
        rows, yrows = x.reshape(-1, n), y.reshape(-1, n)
        for r in range(rows.shape[0]):
            torch.testing.assert_close(yrows[r], run(rows[r], k, variant, temperature=0.5), rtol=0, atol=1e-12)
    # a 1-D input of length 1
    y = run(torch.tensor([0.3], dtype=torch.float64), 1, variant)
    assert torch.equal(y, torch.ones(1, dtype=torch.float64))


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_per_row_k_both_shapes_and_broadcast(variant):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    integer = variant not in NORMALISED_VARIANTS
    k = torch.tensor([[0, 1, 3], [5, 6, 7]], dtype=torch.long if integer else torch.float64)
    if not integer:
        k = k + torch.tensor([[0.25, 0.5, 0.0], [0.0, 0.5, 0.0]], dtype=torch.float64)
    ref = torch.stack(
        [
            torch.stack([run(x[i, j], float(k[i, j]) if not integer else int(k[i, j]), variant) for j in range(3)])
            for i in range(2)
        ]
    )
    for kk in (k, k.unsqueeze(-1)):  # batch shape, keepdim shape
        torch.testing.assert_close(run(x, kk, variant), ref, rtol=0, atol=1e-12)
    # along dim=1 (n = 3): k of shape (2, 7) and (2, 1, 7)
    kd = torch.randint(0, 4, (2, 7), generator=g)
    kd = kd if integer else kd.double() * 0.75
    ref = run(x.transpose(1, 2), kd, variant).transpose(1, 2)
    for kk in (kd, kd.unsqueeze(1)):
        torch.testing.assert_close(run(x, kk, variant, dim=1), ref, rtol=0, atol=1e-12)
    # broadcasting: k of shape (3,) is one k per column of the (2, 3) batch; (2, 1) one per batch row
    kb = torch.tensor([1, 4, 6]) if integer else torch.tensor([1.5, 4.0, 6.25], dtype=torch.float64)
    torch.testing.assert_close(run(x, kb, variant), run(x, kb.expand(2, 3), variant), rtol=0, atol=0)
    kc = torch.tensor([[2], [5]]) if integer else torch.tensor([[2.5], [5.0]], dtype=torch.float64)
    torch.testing.assert_close(run(x, kc, variant), run(x, kc.expand(2, 3), variant), rtol=0, atol=0)
    # integer-valued k of another dtype (int32, float) is accepted
    torch.testing.assert_close(run(x, torch.tensor(3, dtype=torch.int32), variant), run(x, 3, variant))
    torch.testing.assert_close(run(x, torch.tensor(3.0), variant), run(x, 3, variant))


@pytest.mark.parametrize("variant", SOFT_VARIANTS)
def test_temperature_tensor_shapes(variant):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([[0.1, 0.5, 1.0], [2.0, 0.3, 5.0]], dtype=torch.float64)
    k = 2
    ref = torch.stack(
        [torch.stack([run(x[i, j], k, variant, temperature=float(t[i, j])) for j in range(3)]) for i in range(2)]
    )
    for tt in (t, t.unsqueeze(-1)):
        torch.testing.assert_close(run(x, k, variant, temperature=tt), ref, rtol=0, atol=1e-12)
    # 0-d tensor == float
    torch.testing.assert_close(
        run(x, k, variant, temperature=torch.tensor(0.7, dtype=torch.float64)), run(x, k, variant, temperature=0.7)
    )
    # a float32 temperature with a float64 x (and the reverse) is accepted
    run(x, k, variant, temperature=torch.tensor(0.7))
    run(x.float(), k, variant, temperature=torch.tensor(0.7, dtype=torch.float64))


def test_bad_param_shapes():
    x = torch.randn(2, 3, 6)
    with pytest.raises(ValueError, match="`k`"):
        topk_mask(x, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match="`k`"):
        topk_mask(x, torch.ones(2, 3, 6))
    with pytest.raises(ValueError, match="`temperature`"):
        topk_mask(x, 2, temperature=torch.ones(4))


# ----------------------------------------------------------------------------------------------------------
# dtypes.
# ----------------------------------------------------------------------------------------------------------
ATOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 2e-5}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_dtypes_close_to_float64(variant, dtype):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(3, 10, generator=g) * 2).to(dtype)
    x64 = x.double()
    k = _k_for(variant, 10)
    w = torch.randn(3, 10, generator=g, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    y = run(xr, k, variant, temperature=0.6)
    assert y.dtype == dtype and y.shape == x.shape
    x64r = x64.clone().requires_grad_()
    y64 = run(x64r, k, variant, temperature=0.6)
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=ATOL[dtype])
    if dtype != torch.float32:  # half precision is computed in float32, then rounded once
        assert torch.equal(y.detach(), run(x.float(), k, variant, temperature=0.6).to(dtype))
    (y.double() * w).sum().backward()
    (y64 * w).sum().backward()
    assert xr.grad.dtype == dtype
    assert torch.isfinite(xr.grad).all()
    torch.testing.assert_close(xr.grad.double(), x64r.grad, rtol=0, atol=10 * ATOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("variant", NORMALISED_VARIANTS)
def test_k_and_temperature_tensors_requiring_grad(variant, dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 8, generator=g).to(dtype)
    k = torch.tensor([1.5, 2.0, 3.25, 6.0], dtype=torch.float32, requires_grad=True)
    t = torch.tensor([0.5, 1.0, 0.8, 2.0], dtype=torch.float64, requires_grad=True)
    y = run(x, k, variant, temperature=t)
    assert y.dtype == dtype
    w = torch.randn(4, 8, generator=g)
    (y.float() * w).sum().backward()
    assert k.grad is not None and k.grad.dtype == torch.float32 and torch.isfinite(k.grad).all()
    assert t.grad is not None and t.grad.dtype == torch.float64 and torch.isfinite(t.grad).all()
    k64 = k.detach().double().requires_grad_()
    t64 = t.detach().clone().requires_grad_()
    (run(x.double(), k64, variant, temperature=t64) * w.double()).sum().backward()
    tol = 10 * ATOL.get(dtype, 1e-7)  # k.grad itself is float32
    torch.testing.assert_close(k.grad.double(), k64.grad, rtol=0, atol=tol)
    torch.testing.assert_close(t.grad, t64.grad, rtol=0, atol=tol)


# ----------------------------------------------------------------------------------------------------------
# Infinities.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_neg_inf_padding_is_ignored(variant):
    """-inf entries get exactly 0 and a zero, finite gradient; the live entries are as if unpadded."""
    g = torch.Generator().manual_seed(6)
    live = torch.randn(7, generator=g, dtype=torch.float64)
    x = torch.cat([live[:3], torch.full((2,), -INF, dtype=torch.float64), live[3:], torch.tensor([-INF])])
    pos = torch.isfinite(x)
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    for k in (0, 1, 3, 6, 7):  # 7 = exactly as many live entries as k
        xa = x.clone().requires_grad_()
        y = run(xa, k, variant, temperature=0.8, **_tight(variant))
        assert torch.equal(y.detach()[~pos], torch.zeros(3, dtype=torch.float64)), k
        assert torch.isfinite(y).all(), k
        (y * w).sum().backward()
        assert torch.isfinite(xa.grad).all(), k
        assert torch.equal(xa.grad[~pos], torch.zeros(3, dtype=torch.float64)), k
        xb = live.clone().requires_grad_()
        yb = run(xb, k, variant, temperature=0.8, **_tight(variant))
        (yb * w[pos]).sum().backward()
        torch.testing.assert_close(y.detach()[pos], yb.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(xa.grad[pos], xb.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_neg_inf_padding_batched_per_row_k(variant):
    x = torch.tensor([[0.5, -INF, 2.0, 1.0], [-INF, -INF, 3.0, -1.0], [1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    k = torch.tensor([2, 2, 3])
    y = run(x, k if variant not in NORMALISED_VARIANTS else k.double(), variant)
    assert torch.isfinite(y).all()
    assert y[0, 1] == 0 and y[1, 0] == 0 and y[1, 1] == 0
    assert torch.equal(y[1], torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64))  # exactly k live


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_too_few_live_entries_raises(variant):
    x = torch.tensor([[1.0, -INF, -INF, 0.0], [1.0, 2.0, 3.0, 4.0]])
    with pytest.raises(ValueError):
        run(x, 3, variant)
    with pytest.raises(ValueError):
        run(x, torch.tensor([3, 1]), variant)
    run(x, torch.tensor([2, 3]), variant)  # fine: each row has enough live entries


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_pos_inf_is_selected(variant):
    """+inf entries get exactly 1 (zero gradient); the rest is the method on the other entries with k − #inf."""
    g = torch.Generator().manual_seed(7)
    rest = torch.randn(6, generator=g, dtype=torch.float64)
    x = torch.cat([rest[:2], torch.tensor([INF]), rest[2:], torch.tensor([INF])])
    pos = torch.isfinite(x)
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    for k in (2, 3, 5, 8):  # k = 2: exactly the +inf entries
        xa = x.clone().requires_grad_()
        y = run(xa, k, variant, temperature=0.9, **_tight(variant))
        assert torch.isfinite(y).all(), k
        assert torch.equal(y.detach()[~pos], torch.ones(2, dtype=torch.float64)), k
        (y * w).sum().backward()
        assert torch.isfinite(xa.grad).all() and torch.equal(xa.grad[~pos], torch.zeros(2, dtype=torch.float64))
        xb = rest.clone().requires_grad_()
        yb = run(xb, k - 2, variant, temperature=0.9, **_tight(variant))
        (yb * w[pos]).sum().backward()
        torch.testing.assert_close(y.detach()[pos], yb.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(xa.grad[pos], xb.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_infinities_with_largest_false(variant):
    """Selecting the k smallest: +inf entries are never selected (and cause no error); -inf entries are the
    smallest. Every method, SOFT included, must agree with the hard mask on which entries are decided."""
    x = torch.tensor([INF, 0.5, INF, -1.0, INF, 2.0], dtype=torch.float64)  # 3 finite, three +inf
    for k in (1, 2, 3):
        hard = topk_mask(x, k, method="hard", largest=False)
        y = run(x, k, variant, largest=False, temperature=0.5)
        assert torch.isfinite(y).all()
        assert torch.equal(y[[0, 2, 4]], torch.zeros(3, dtype=torch.float64)), k
        assert hard[[0, 2, 4]].sum() == 0
    # k = 3 = the number of finite entries: all of them selected, exactly
    assert torch.equal(run(x, 3, variant, largest=False), torch.tensor([0.0, 1, 0, 1, 0, 1], dtype=torch.float64))
    # more than k entries equal to -inf cannot be told apart: an error, as for the hard mask
    xm = torch.tensor([-INF, 0.5, -INF, -1.0, -INF, 2.0], dtype=torch.float64)
    with pytest.raises(ValueError):
        topk_mask(xm, 1, method="hard", largest=False)
    with pytest.raises(ValueError):
        run(xm, 1, variant, largest=False)


# ----------------------------------------------------------------------------------------------------------
# The plain eager call (a float32 CPU tensor, a Python int k, a float temperature): prepared in one test, with what
# the method and its options determine memoised.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_plain_call_equals_the_fully_prepared_one(variant):
    """The plain call's mask and gradient equal those of the same call prepared in full (k as a per-row tensor), bit
    for bit: on a batch shape, on non-contiguous inputs, at its first and its memoised calls, and under no_grad."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 3, 40, generator=g)
    up = torch.randn(3, 2, 40, generator=g)
    for x0 in (base, base.transpose(0, 1), base[..., ::2]):
        for _ in range(2):
            x1, x2 = (x0.detach().requires_grad_() for _ in range(2))
            y1 = run(x1, 5, variant, temperature=0.3)
            y2 = run(x2, torch.full(x0.shape[:-1], 5), variant, temperature=0.3)
            assert torch.equal(y1, y2)
            if variant != "hard":
                w = up[..., : x0.shape[-1]].reshape(x0.shape)
                y1.backward(w)
                y2.backward(w)
                assert torch.equal(x1.grad, x2.grad)
        with torch.no_grad():
            assert torch.equal(run(x0, 5, variant, temperature=0.3), run(x0, torch.tensor(5), variant, temperature=0.3))


def test_memoised_options_are_only_plain_values():
    """Option values that can change in place (a tensor) are read again at every call: a per-row epsilon made
    negative after a first call raises at the next one; plain values give the same mask from the memo as at first."""
    x = torch.randn(4, 30)
    eps = torch.full((4,), 0.5)
    topk_mask(x, 3, method="soft", epsilon=eps)
    eps[1] = -1.0
    with pytest.raises(ValueError, match="epsilon"):
        topk_mask(x, 3, method="soft", epsilon=eps)
    first = topk_mask(x, 3, method="sparse", p=4 / 3, temperature=0.5)
    for p in (2, 4 / 3):
        topk_mask(x, 3, method="sparse", p=p, temperature=0.5)
    assert torch.equal(topk_mask(x, 3, method="sparse", p=4 / 3, temperature=0.5), first)
    with pytest.raises(ValueError, match="`p`"):
        topk_mask(x, 3, method="sparse", p=3, temperature=0.5)


@pytest.mark.parametrize("at", [0, 31, 500, 999])
def test_nan_in_a_long_row_raises(at):
    """The hard mask's kernel declines a row with a NaN (in its 32-entry vectors or its tail) so that the data check
    raises, as for the other methods, with and without autograd, and for straight-through inference."""
    x = torch.randn(3, 1000)
    x[1, at] = float("nan")
    for method, kw in (("hard", {}), ("sigmoid", {"straight_through": True}), ("sigmoid", {})):
        for grad in (False, True):
            with pytest.raises(ValueError, match="NaN"):
                topk_mask(x.clone().requires_grad_(grad), 5, method=method, **kw)


# ----------------------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ALL_METHODS)
def test_nan_raises(method):
    for x in (
        torch.tensor([1.0, float("nan"), 2.0]),
        torch.tensor([[1.0, 2.0, 3.0], [INF, float("nan"), -INF]]),
        torch.tensor([1.0, float("nan"), 2.0], dtype=torch.float16),
        torch.tensor([1.0, float("nan"), 2.0], dtype=torch.float64, requires_grad=True),
    ):
        with pytest.raises(ValueError, match="`x`"):
            run(x, 1, method)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_k_out_of_range_raises(method):
    x = torch.randn(2, 5)
    for k in (
        -1,
        6,
        torch.tensor([1, 6]),
        torch.tensor([-1, 2]),
        torch.tensor(7.0),
        float("nan"),
        torch.tensor(float("nan")),
    ):
        with pytest.raises(ValueError, match="`k`"):
            run(x, k, method)
    if method in INTEGER_ONLY:
        for k in (2.5, torch.tensor([1.5, 2.0])):
            with pytest.raises(ValueError, match="`k`"):
                run(x, k, method)
    else:
        run(x, 2.5, method)
        run(x, torch.tensor([1.5, 2.0]), method)
    with pytest.raises(TypeError):
        run(x, "2", method)


def test_bad_method_raises():
    x = torch.randn(5)
    for m in ("foo", "Sigmoid", "", "straight_through"):  # straight-through is the flag straight_through=True now
        with pytest.raises(ValueError, match="`method`"):
            topk_mask(x, 2, method=m)


@pytest.mark.parametrize("method", [m for m in ALL_METHODS if m != "hard"])  # hard: test_unused_arguments_raise
def test_bad_temperature_raises(method):
    """Bad values of the temperature (of SOFT's epsilon for "soft_eps", which run() passes it as)."""
    x = torch.randn(2, 5)
    name = "`epsilon`" if method == "soft_eps" else "`temperature`"
    for t in (
        0,
        0.0,
        -1.0,
        torch.tensor(0.0),
        torch.tensor([1.0, -0.5]),
        float("nan"),
        INF,
        torch.tensor(float("nan")),
    ):
        with pytest.raises(ValueError, match=name):
            run(x, 2, method, temperature=t)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_bad_x_raises(method):
    for x in (torch.arange(5), torch.arange(5, dtype=torch.int32), torch.tensor([True, False])):
        with pytest.raises(TypeError):
            run(x, 1, method)
    for x in ([1.0, 2.0, 3.0], np.array([1.0, 2.0, 3.0]), 3.0, None):
        with pytest.raises(TypeError):
            run(x, 1, method)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_bad_dim_raises(method):
    x = torch.randn(3, 4)
    for d in (2, -3, 10):
        with pytest.raises(ValueError, match="`dim`"):
            run(x, 1, method, dim=d)


def test_options():
    x = torch.randn(2, 6)
    for method in ALL_METHODS:
        with pytest.raises(TypeError, match="foo"):
            run(x, 2, method, foo=1)
    for method in ("hard", "dftopk"):
        for opt in ("tol", "max_iter", "p"):
            with pytest.raises(TypeError, match=opt):
                topk_mask(x, 2, method=method, **{opt: 1})
    for method in ("sigmoid", "soft", "soft_eps", "lapsum", "straight_through"):
        with pytest.raises(TypeError, match=r"\bp\b"):
            run(x, 2, method, p=2)
        run(x, 2, method, tol=1e-4, max_iter=30)
    topk_mask(x, 2, method="sparse", p=2, tol=1e-4, max_iter=30)
    topk_mask(x, 2, method="sparse", p=4 / 3)
    with pytest.raises(ValueError):
        topk_mask(x, 2, method="sparse", p=3)


def test_unused_arguments_raise():
    """An argument a method does not use raises TypeError naming it, even at a harmless value."""
    x = torch.randn(2, 6)
    cases = [
        ("hard", {"temperature": 1.0}, "temperature"),
        ("hard", {"temperature": torch.tensor(0.5)}, "temperature"),
        ("hard", {"scale": "std"}, "scale"),
        ("hard", {"straight_through": True}, "straight_through"),
        # an option of another method
        ("sigmoid", {"p": 2}, r"\bp\b"),
        ("lapsum", {"p": 4 / 3}, r"\bp\b"),
        ("sparse", {"epsilon": 0.1}, "epsilon"),
        ("sigmoid", {"epsilon": 0.1}, "epsilon"),
        ("dftopk", {"epsilon": 0.1}, "epsilon"),
        ("sigmoid", {"n_samples": 10}, "n_samples"),
        ("sparse", {"noise": "gumbel"}, "noise"),
        ("perturbed", {"tol": 1e-6}, "tol"),
        ("perturbed", {"p": 2}, r"\bp\b"),
        ("dftopk", {"max_iter": 10}, "max_iter"),
        ("hard", {"generator": torch.Generator()}, "generator"),
        # max_support: only the normalised threshold methods
        ("dftopk", {"max_support": 4}, "max_support"),
        ("hard", {"max_support": 4}, "max_support"),
        ("perturbed", {"max_support": 4}, "max_support"),
    ]
    for method, kw, name in cases:
        with pytest.raises(TypeError, match=name):
            topk_mask(x, 2, method=method, **kw)
    # the defaults spelled out are no error
    topk_mask(x, 2, method="hard", temperature=None, scale=None, straight_through=False)


def test_soft_epsilon_and_temperature_together_raise():
    x = torch.randn(2, 6)
    with pytest.raises(TypeError, match="epsilon|temperature"):
        topk_mask(x, 2, method="soft", temperature=0.5, epsilon=0.1)
    with pytest.raises(TypeError, match="epsilon|temperature"):
        topk_mask(x, 2, method="soft", temperature=torch.tensor([0.5, 1.0]), epsilon=torch.tensor([0.1, 0.2]))
    topk_mask(x, 2, method="soft", temperature=0.5)
    topk_mask(x, 2, method="soft", epsilon=0.1)
    topk_mask(x, 2, method="soft", temperature=None, epsilon=0.1)  # None is "not given"


def test_bad_scale_raises():
    x = torch.randn(2, 6)
    for scale in ("var", "STD", "", 1.0, True):
        with pytest.raises((ValueError, TypeError), match="scale"):
            topk_mask(x, 2, method="sigmoid", scale=scale)
    topk_mask(x, 2, method="sigmoid", scale=None)
    topk_mask(x, 2, method="sigmoid", scale="std")


def test_bad_max_support_raises():
    x = torch.randn(2, 6)
    for method, opts in (("sigmoid", {}), ("soft", {}), ("sparse", {}), ("sparse", {"p": 4 / 3}), ("lapsum", {})):
        for k, m in ((3, 2), (2.5, 2), (1, 0), (torch.tensor([1.0, 3.0]), 2), (torch.tensor([[0.5], [2.5]]), 2)):
            with pytest.raises(ValueError, match="max_support"):
                topk_mask(x, k, method=method, max_support=m, **opts)
        with pytest.raises(ValueError, match="max_support.*equals k"):  # the hard mask with a zero gradient
            topk_mask(x, 2, method=method, max_support=2, **opts)
        topk_mask(x, 2, method=method, max_support=3, **opts)
        topk_mask(x, 2.5, method=method, max_support=3, **opts)
        topk_mask(x, torch.tensor([1.0, 2.5]), method=method, max_support=3, **opts)
        for m in (2.5, "3", -1):
            with pytest.raises((TypeError, ValueError), match="max_support"):
                topk_mask(x, 1, method=method, max_support=m, **opts)


# ----------------------------------------------------------------------------------------------------------
# Inputs are never modified in place.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_inputs_not_modified(variant):
    g = torch.Generator().manual_seed(8)
    normalised = variant in NORMALISED_VARIANTS
    cases = [
        (torch.randn(3, 7, generator=g, dtype=torch.float64), -1, True),
        (torch.randn(7, 3, generator=g).t(), -1, False),  # non-contiguous
        (torch.randn(7, 3, generator=g, dtype=torch.float64), 0, True),
        (torch.randn(3, 7, generator=g).half(), -1, False),
        (torch.tensor([[1.0, -INF, 2.0, INF, 0.0, 0.5, 3.0]] * 3, dtype=torch.float64), -1, True),
    ]
    for x, dim, largest in cases:
        batch = 3
        x = x.clone().requires_grad_() if x.is_contiguous() else x.detach().requires_grad_()
        k = torch.tensor([2.0, 3.0, 2.0], requires_grad=normalised) if normalised else torch.tensor([2, 3, 2])
        t = torch.tensor([0.5, 1.0, 2.0][:batch], dtype=torch.float64, requires_grad=True)
        x0, k0, t0 = x.detach().clone(), k.detach().clone(), t.detach().clone()
        gy = torch.randn(x.shape, generator=g).to(x.dtype)
        gy0 = gy.clone()
        y = run(x, k, variant, dim=dim, temperature=t, largest=largest)
        y.backward(gy)
        assert torch.equal(x.detach(), x0) and torch.equal(k.detach(), k0) and torch.equal(t.detach(), t0)
        assert torch.equal(gy, gy0)
        # a second consumer of y sees an unmodified upstream gradient as well
        x.grad = None
        y = run(x, k, variant, dim=dim, temperature=t, largest=largest)
        (y * 2).sum().backward(retain_graph=True)
        g1 = x.grad.clone()
        x.grad = None
        (y.sum() + y.sum()).backward()
        torch.testing.assert_close(x.grad, g1)


# ----------------------------------------------------------------------------------------------------------
# torch.compile and torch.func.vmap.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", NORMALISED_VARIANTS)
def test_vmap_over_rows(variant):
    g = torch.Generator().manual_seed(10)
    x = torch.randn(5, 9, generator=g, dtype=torch.float64)
    w = torch.randn(9, generator=g, dtype=torch.float64)
    ref = run(x, 3, variant, temperature=0.5)
    out = torch.func.vmap(lambda r: run(r, 3, variant, temperature=0.5))(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # per-row k and temperature through vmap too
    k = torch.tensor([1.0, 2.5, 3.0, 4.0, 8.0], dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 1.0, 2.0, 5.0], dtype=torch.float64)
    out = torch.func.vmap(lambda r, kk, tt: run(r, kk, variant, temperature=tt))(x, k, t)
    torch.testing.assert_close(out, run(x, k, variant, temperature=t), rtol=0, atol=1e-12)
    # per-sample gradients: vmap(grad) == rows of the eager backward
    per = torch.func.vmap(torch.func.grad(lambda r: (run(r, 3, variant, temperature=0.5) * w).sum()))(x)
    xr = x.clone().requires_grad_()
    (run(xr, 3, variant, temperature=0.5) * w).sum().backward()
    torch.testing.assert_close(per, xr.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_vmap_without_fallback_warnings(variant):
    """Every method has real batching rules under vmap (no per-sample fallback loop, which warns)."""
    x = torch.randn(4, 3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    w = torch.arange(20.0, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = torch.func.vmap(lambda r: run(r, 4, variant))(x)
        per = torch.func.vmap(torch.func.grad(lambda r: (run(r, 4, variant) * w).sum()))(x[0])
    torch.testing.assert_close(out, run(x, 4, variant), rtol=0, atol=1e-12)
    xr = x[0].clone().requires_grad_()
    (run(xr, 4, variant) * w).sum().backward()
    torch.testing.assert_close(per, xr.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ["sigmoid", "sparse"])
def test_compile_eager_backend(variant):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 10, generator=g, dtype=torch.float64)
    w = torch.randn(4, 10, generator=g, dtype=torch.float64)

    def f(x, t):
        return run(x, 3, variant, temperature=t)

    t = torch.tensor(0.5, dtype=torch.float64)
    xa, ta = x.clone().requires_grad_(), t.clone().requires_grad_()
    out = torch.compile(f, backend="eager")(xa, ta)
    (out * w).sum().backward()
    xb, tb = x.clone().requires_grad_(), t.clone().requires_grad_()
    ref = f(xb, tb)
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(ta.grad, tb.grad, rtol=0, atol=1e-12)


def test_compile_inductor():
    """Default backend. The Newton loop is unrolled under compile, so a small max_iter keeps compilation
    short (about 20 s here); p=2 Newton is exact on its final piece and converges in a few steps."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, 10, generator=g, dtype=torch.float64)
    f = torch.compile(lambda x: topk_mask(x, 3, method="sparse", temperature=0.5, max_iter=8))
    torch.testing.assert_close(f(x), topk_mask(x, 3, method="sparse", temperature=0.5), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Hypothesis properties.
# ----------------------------------------------------------------------------------------------------------
PROPS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# distinct scores on a 0.01 grid in [-5, 5] (gaps ≥ 0.01); arbitrary scores (ties allowed)
distinct_rows = st.lists(st.integers(-500, 500), min_size=1, max_size=12, unique=True).map(
    lambda v: torch.tensor(v, dtype=torch.float64) / 100
)
any_rows = st.lists(
    st.one_of(st.floats(-100, 100, allow_nan=False), st.sampled_from([0.0, 1.0, -1.0])), min_size=1, max_size=12
).map(lambda v: torch.tensor(v, dtype=torch.float64))
temps = st.one_of(st.sampled_from([0.01, 0.3, 1.0, 5.0]), st.floats(0.01, 5.0))


def _draw_k(data, n, variant):
    if variant in NORMALISED_VARIANTS and data.draw(st.booleans()):
        return data.draw(st.floats(0, n))
    return data.draw(st.integers(0, n))


@pytest.mark.parametrize("variant", NORMALISED_VARIANTS)
@PROPS
@given(x=any_rows, t=temps, data=st.data())
def test_prop_sum_is_k_and_bounds(variant, x, t, data):
    k = _draw_k(data, x.numel(), variant)
    y = run(x, k, variant, temperature=t)
    assert y.min() >= 0 and y.max() <= 1
    assert abs(y.sum().item() - k) <= 1e-9 * max(k, 1)


@pytest.mark.parametrize("variant", NORMALISED_VARIANTS)
@PROPS
@given(
    x=st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=12).map(torch.tensor),
    t=st.floats(0.3, 5.0),
    data=st.data(),
)
def test_prop_sum_is_k_float32(variant, x, t, data):
    k = _draw_k(data, x.numel(), variant)
    y = run(x, k, variant, temperature=t)
    assert y.dtype == torch.float32 and y.min() >= 0 and y.max() <= 1
    assert abs(y.double().sum().item() - k) <= 1e-5 * max(k, 1) + 8 * 1.2e-7 * max(k, 1)  # + float32 sum rounding


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@PROPS
@given(x=distinct_rows, t=temps, data=st.data())
def test_prop_bounds_and_permutation_equivariance(variant, x, t, data):
    n = x.numel()
    k = _draw_k(data, n, variant)
    perm = torch.tensor(data.draw(st.permutations(range(n))), dtype=torch.long)
    y = run(x, k, variant, temperature=t)
    assert y.min() >= 0 and y.max() <= 1
    torch.testing.assert_close(run(x[perm], k, variant, temperature=t), y[perm], rtol=0, atol=1e-9)


@pytest.mark.parametrize("variant", [v for v in ALL_VARIANTS if v != "soft_eps"])
@PROPS
@given(x=distinct_rows, t=temps, data=st.data())
def test_prop_monotone_in_own_score(variant, x, t, data):
    """Raising x_i does not lower y_i. (Not a property of SOFT at a fixed epsilon: its cost is normalised by
    max C, so raising the largest score shrinks every rescaled gap; e.g. x=[2, 0] → [10, 0] lowers y_0 for k=1.
    SOFT with ``temperature`` is the sigmoid mask in score units, which is monotone.)"""
    n = x.numel()
    k = _draw_k(data, n, variant)
    i = data.draw(st.integers(0, n - 1))
    delta = data.draw(st.floats(1e-3, 3.0))
    y = run(x, k, variant, temperature=t)
    x2 = x.clone()
    x2[i] += delta
    y2 = run(x2, k, variant, temperature=t)
    # an error δτ moves every entry the same way, so each is within the solver tolerance on Σy of exact
    assert y2[i] >= y[i] - 2e-9 * max(k, 1)


def test_soft_is_not_monotone_by_definition():
    y1 = topk_mask(torch.tensor([2.0, 0.0], dtype=torch.float64), 1, method="soft", epsilon=1.0)
    y2 = topk_mask(torch.tensor([10.0, 0.0], dtype=torch.float64), 1, method="soft", epsilon=1.0)
    assert y2[0] < y1[0]
    # with a temperature (score units) it is the sigmoid mask: monotone
    y1 = topk_mask(torch.tensor([2.0, 0.0], dtype=torch.float64), 1, method="soft", temperature=1.0)
    y2 = topk_mask(torch.tensor([10.0, 0.0], dtype=torch.float64), 1, method="soft", temperature=1.0)
    assert y2[0] > y1[0]


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("variant", ALL_VARIANTS)
@PROPS
@given(x=distinct_rows, data=st.data())
def test_prop_zero_temperature_limit_is_hard(variant, largest, x, data):
    n = x.numel()
    k = data.draw(st.integers(0, n))
    # gaps are ≥ 0.01 (the width T = 1e-4, internal t ≤ 1.9e-4); SOFT's epsilon works on 2x/max C with
    # max C ≤ 6² here, so it needs a 36x smaller ε
    t = 1e-4 if variant != "soft_eps" else 2e-6
    y = run(x, k, variant, temperature=t, largest=largest)
    torch.testing.assert_close(y, ref_hard(x, k, largest), rtol=0, atol=3e-9 * max(k, 1))


@pytest.mark.parametrize("variant", [v for v in ALL_VARIANTS if v != "soft_eps"])
@PROPS
@given(x=distinct_rows, t=temps, data=st.data())
def test_prop_largest_false_is_selection_on_neg_x(variant, x, t, data):
    k = _draw_k(data, x.numel(), variant)
    torch.testing.assert_close(
        run(x, k, variant, temperature=t, largest=False), run(-x, k, variant, temperature=t), rtol=0, atol=1e-12
    )


@PROPS
@given(x=any_rows, t=temps, data=st.data())
def test_prop_soft_largest_identity(x, t, data):
    n = x.numel()
    k = data.draw(st.floats(0, n))
    a = topk_mask(x, k, method="soft", epsilon=t, largest=True)
    b = topk_mask(x, n - k, method="soft", epsilon=t, largest=False)
    torch.testing.assert_close(a, 1 - b, rtol=0, atol=3e-9 * max(k, n - k, 1))


@pytest.mark.parametrize("method", ALL_METHODS)
def test_empty_shapes(method):
    """x of "any shape": an empty batch, and empty rows (n = 0, where k = 0 is the only valid k)."""
    y = run(torch.randn(0, 5), 2, method)
    assert y.shape == (0, 5)
    y = run(torch.randn(3, 0), 0, method)
    assert y.shape == (3, 0) and y.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------
# Names and defaults.
# ----------------------------------------------------------------------------------------------------------
def test_methods_is_a_tuple_of_names():
    assert type(softtopk.METHODS) is tuple
    assert all(type(m) is str for m in softtopk.METHODS)
    assert softtopk.METHODS == ("hard", "dftopk", "sigmoid", "soft", "sparse", "lapsum", "perturbed")
    for m in softtopk.METHODS:  # every name is accepted by topk_mask
        topk_mask(torch.randn(2, 5), 2, method=m)


@pytest.mark.parametrize("variant", [v for v in SOFT_VARIANTS if v != "soft_eps"])
def test_default_temperature_is_one(variant):
    """``temperature=None`` (the default) means 1.0."""
    x = torch.randn(3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(30))
    ref = run(x, 4, variant, temperature=1.0)
    torch.testing.assert_close(run(x, 4, variant), ref, rtol=0, atol=0)
    torch.testing.assert_close(run(x, 4, variant, temperature=None), ref, rtol=0, atol=0)
    # method="soft" with neither temperature nor epsilon: the sigmoid mask at temperature 1
    if variant == "soft":
        torch.testing.assert_close(ref, topk_mask(x, 4, method="sigmoid", temperature=1.0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("largest", [True, False])
def test_soft_with_temperature_is_the_sigmoid_mask(largest):
    """method="soft" with ``temperature`` is exactly the sigmoid mask (SOFT's converged two-anchor mask is a
    sigmoid mask; in score units the two coincide), per-row k and temperature and -inf padding included."""
    g = torch.Generator().manual_seed(31)
    x = torch.randn(4, 11, generator=g, dtype=torch.float64) * 3
    x[1, 2] = x[2, 5] = -INF if largest else INF
    k = torch.tensor([1.0, 2.5, 5.0, 10.0], dtype=torch.float64)
    for t in (0.05, 1.0, torch.tensor([0.3, 1.0, 2.0, 7.0], dtype=torch.float64)):
        for kk in (3, k):
            a = topk_mask(x, kk, method="soft", temperature=t, largest=largest, tol=1e-13)
            b = topk_mask(x, kk, method="sigmoid", temperature=t, largest=largest, tol=1e-13)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # and their gradients agree
    xa, xb = x[0].clone().requires_grad_(), x[0].clone().requires_grad_()
    w = torch.randn(11, generator=g, dtype=torch.float64)
    (topk_mask(xa, 3, method="soft", temperature=0.7, largest=largest) * w).sum().backward()
    (topk_mask(xb, 3, method="sigmoid", temperature=0.7, largest=largest) * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# scale="std": the temperature times each row's standard deviation over its finite entries.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", SHIFT_INVARIANT_VARIANTS)
def test_scale_std_is_invariant_to_affine_maps(variant):
    """mask(a·x + b) == mask(x) for a > 0 with scale="std" (the methods that depend on x − τ only), and the
    gradient follows the chain rule: a · ∇mask(a·x + b) == ∇mask(x)."""
    g = torch.Generator().manual_seed(32)
    x = spaced(12, batch=(3,), generator=g)
    k = torch.tensor([1.0, 4.0, 7.0], dtype=torch.float64)
    k = k if variant in NORMALISED_VARIANTS else k.long()
    w = torch.randn(3, 12, generator=g, dtype=torch.float64)
    for T in (0.2, 1.5):
        xr = x.clone().requires_grad_()
        ref = run(xr, k, variant, temperature=T, scale="std", **_tight(variant))
        (ref * w).sum().backward()
        for a, b in ((1e-3, 5.0), (3.0, -2.0), (250.0, 1e3)):
            xa = x.clone().requires_grad_()
            y = run(a * xa + b, k, variant, temperature=T, scale="std", **_tight(variant))
            torch.testing.assert_close(y, ref, rtol=0, atol=1e-9, msg=f"a={a} b={b} T={T}")
            (y * w).sum().backward()
            torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-6, atol=1e-9, msg=f"a={a} b={b} T={T}")
    # without scale="std" the mask does depend on the scale of x (T is in the units of the scores)
    if variant != "straight_through":
        y1 = run(x, k, variant, temperature=1.0)
        y2 = run(10 * x, k, variant, temperature=1.0)
        assert (y1 - y2).abs().max() > 1e-3


def _std_over_finite(x, correction):
    live = torch.isfinite(x)
    n = live.sum(-1, keepdim=True)
    mean = torch.where(live, x, 0.0).sum(-1, keepdim=True) / n
    return (torch.where(live, (x - mean) ** 2, 0.0).sum(-1) / (n.squeeze(-1) - correction)).sqrt()


@pytest.mark.parametrize("variant", ["sigmoid", "dftopk", "sparse43", "lapsum", "straight_through"])
def test_scale_std_is_per_row_over_finite_entries(variant):
    """The row's std is taken per row and over its finite entries: rows a·x + b of very different spreads get the
    same mask; a -inf padded (or +inf holding) row gives the unpadded row's mask; it is the mask at T·std."""
    g = torch.Generator().manual_seed(33)
    base = spaced(8, generator=g)
    offsets = torch.tensor([[3.0], [-1.0], [1e2]], dtype=torch.float64)
    live = base * torch.tensor([[0.01], [1.0], [40.0]], dtype=torch.float64) + offsets
    kf = 3.0 if variant in NORMALISED_VARIANTS else 3
    y = run(live, kf, variant, temperature=0.8, scale="std", **_tight(variant))
    ref = run(base, kf, variant, temperature=0.8, scale="std", **_tight(variant))
    torch.testing.assert_close(y, ref.expand(3, 8), rtol=0, atol=1e-9)
    # -inf padding is no entry of the std (nor of the selection)
    pad = torch.full((3, 3), -INF, dtype=torch.float64)
    xp = torch.cat([live[:, :2], pad[:, :2], live[:, 2:], pad[:, 2:]], -1)
    pos = torch.isfinite(xp[0])
    xa, xb = xp.clone().requires_grad_(), live.clone().requires_grad_()
    ya = run(xa, kf, variant, temperature=0.8, scale="std", **_tight(variant))
    yb = run(xb, kf, variant, temperature=0.8, scale="std", **_tight(variant))
    assert torch.equal(ya.detach()[:, ~pos], torch.zeros(3, 3, dtype=torch.float64))
    torch.testing.assert_close(ya[:, pos], yb, rtol=0, atol=1e-12)
    w = torch.randn(3, 8, generator=g, dtype=torch.float64)
    (ya[:, pos] * w).sum().backward()
    (yb * w).sum().backward()
    assert torch.equal(xa.grad[:, ~pos], torch.zeros(3, 3, dtype=torch.float64))
    torch.testing.assert_close(xa.grad[:, pos], xb.grad, rtol=1e-10, atol=1e-12)
    # +inf entries are selected and are no entry of the std either
    xi = torch.cat([live[:, :3], torch.full((3, 1), INF, dtype=torch.float64), live[:, 3:]], -1)
    yi = run(xi, kf + 1, variant, temperature=0.8, scale="std", **_tight(variant))
    assert torch.equal(yi[:, 3], torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(torch.cat([yi[:, :3], yi[:, 4:]], -1), yb.detach(), rtol=0, atol=1e-12)
    # T·std: the spec does not fix the std's correction; it is one of the two usual ones (the same for all rows)
    matches = []
    for corr in (0, 1):
        s = _std_over_finite(xp, corr)
        ref = run(xp, kf, variant, temperature=0.8 * s, **_tight(variant))
        matches.append(bool(torch.allclose(ya.detach(), ref, rtol=0, atol=1e-12)))
    assert any(matches), "scale='std' is not the mask at temperature T·std(finite entries)"


def test_scale_std_gradcheck_and_per_row_temperature():
    """The std is differentiable (gradcheck in float64 through it), and a per-row T multiplies each row's std."""
    x = spaced(7, batch=(2,), generator=torch.Generator().manual_seed(34)).requires_grad_()
    t = torch.tensor([0.6, 2.0], dtype=torch.float64, requires_grad=True)
    k = torch.tensor([2.5, 4.0], dtype=torch.float64, requires_grad=True)
    for method in ("sigmoid", "lapsum"):

        def f(x, k, t, method=method):
            return topk_mask(x, k, method=method, temperature=t, scale="std", tol=1e-13)

        assert torch.autograd.gradcheck(f, (x, k, t), eps=1e-6, atol=1e-6, rtol=1e-4)
        y = f(x, k, t)
        for r in range(2):
            torch.testing.assert_close(y[r], f(x[r], k[r], t[r]), rtol=0, atol=1e-12)


def test_scale_std_in_float32_and_dims():
    g = torch.Generator().manual_seed(35)
    x = torch.randn(4, 9, 3, generator=g, dtype=torch.float64) * 20 + 100
    for dim in (0, 1, -1):
        y = topk_mask(x, 2, dim=dim, temperature=0.5, scale="std")
        ref = topk_mask(x.movedim(dim, -1), 2, temperature=0.5, scale="std").movedim(-1, dim)
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
        y32 = topk_mask(x.float(), 2, dim=dim, temperature=0.5, scale="std")
        assert y32.dtype == torch.float32
        torch.testing.assert_close(y32.double(), y, rtol=0, atol=2e-4)


# ----------------------------------------------------------------------------------------------------------
# max_support: the mask on the max_support largest entries only, exactly 0 elsewhere.
# ----------------------------------------------------------------------------------------------------------
SUPPORT_VARIANTS = ["sigmoid", "soft", "soft_eps", "sparse", "sparse43", "lapsum"]


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("variant", SUPPORT_VARIANTS)
def test_max_support_is_the_mask_of_the_top_entries(variant, largest):
    """By definition: the unbounded mask of the max_support largest (smallest) entries, scattered back, 0 elsewhere.
    Its support has at most max_support entries and it sums to k."""
    g = torch.Generator().manual_seed(36)
    x = torch.randn(3, 40, generator=g, dtype=torch.float64)
    for k, m, T in ((5, 8, 3.0), (2.5, 6, 10.0), (1, 2, 1.0), (2.5, 3, 1.0), (7.25, 20, 0.5), (4, 40, 2.0)):
        y = run(x, k, variant, temperature=T, max_support=m, largest=largest, tol=1e-13)
        assert ((y > 0).sum(-1) <= m).all(), (k, m)
        torch.testing.assert_close(y.sum(-1), torch.full((3,), float(k), dtype=torch.float64), rtol=0, atol=1e-9)
        top = torch.topk(x, m, largest=largest).indices
        sub = run(x.gather(-1, top), k, variant, temperature=T, largest=largest, tol=1e-13)
        ref = torch.zeros_like(x).scatter(-1, top, sub)
        if variant == "soft_eps":  # SOFT's epsilon is relative to max C of the entries it sees: compare loosely
            assert torch.equal(y == 0, ref == 0) or m == 40
        else:
            torch.testing.assert_close(y, ref, rtol=0, atol=1e-10, msg=f"k={k} m={m}")


def test_max_support_equals_unbounded_when_it_covers_the_support():
    """sparse: when the unbounded mask has at most max_support nonzeros, max_support changes nothing."""
    g = torch.Generator().manual_seed(37)
    x = torch.randn(4, 50, generator=g, dtype=torch.float64)
    for p in (2, 4 / 3):
        for k, T in ((3, 0.3), (5.5, 1.0), (10, 0.8)):
            y = topk_mask(x, k, method="sparse", p=p, temperature=T, tol=1e-13)
            supp = int((y > 0).sum(-1).max())
            assert supp < 50
            for m in (max(supp, math.ceil(k)), supp + 3, 50):
                ym = topk_mask(x, k, method="sparse", p=p, temperature=T, max_support=m, tol=1e-13)
                torch.testing.assert_close(ym, y, rtol=0, atol=1e-12, msg=f"p={p} k={k} m={m}")
            # a max_support below the support: exactly that many nonzeros at most, still sums to k
            m = max(math.ceil(k), supp - 3)
            ym = topk_mask(x, k, method="sparse", p=p, temperature=T, max_support=m)
            assert ((ym > 0).sum(-1) <= m).all()
            torch.testing.assert_close(ym.sum(-1), torch.full((4,), float(k), dtype=torch.float64), atol=1e-9, rtol=0)


def test_max_support_per_row_k_dim_and_padding():
    g = torch.Generator().manual_seed(38)
    x = torch.randn(20, 3, generator=g, dtype=torch.float64)  # rows along dim 0
    x[[2, 5, 11], 1] = -INF
    k = torch.tensor([1.5, 4.0, 6.0], dtype=torch.float64)
    y = topk_mask(x, k, dim=0, method="sparse", temperature=5.0, max_support=8)
    assert ((y > 0).sum(0) <= 8).all()
    torch.testing.assert_close(y.sum(0), k, rtol=0, atol=1e-9)
    assert (y[[2, 5, 11], 1] == 0).all()
    for c in range(3):
        yc = topk_mask(x[:, c], float(k[c]), method="sparse", temperature=5.0, max_support=8)
        torch.testing.assert_close(y[:, c], yc, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ["sigmoid", "sparse", "sparse43", "lapsum"])
def test_max_support_gradcheck(variant):
    """float64 gradcheck in x, k and temperature with max_support (spaced scores: no tie at the support's edge)."""
    x = spaced(12, batch=(2,), generator=torch.Generator().manual_seed(39)).requires_grad_()
    k = torch.tensor([2.5, 3.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([3.0, 4.5], dtype=torch.float64, requires_grad=True)

    def f(x, k, t):
        return run(x, k, variant, temperature=t, max_support=6, tol=1e-13)

    y = f(x, k, t)
    inner = (y > 0) & (y < 1)
    assert inner.sum(-1).min() >= 2 and ((y > 0).sum(-1) <= 6).all()
    assert torch.autograd.gradcheck(f, (x, k, t), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("method", ["sigmoid", "sparse", "lapsum", "dftopk"])
def test_scale_std_gradient_is_finite_on_rows_without_spread(method):
    """scale="std" on rows whose finite entries do not vary (one live entry among -inf padding, a constant row):
    the std is taken as 1 there, and the gradient must stay finite (sqrt at 0 would make it NaN)."""
    inf = float("inf")
    for row, k in (([5.0, -inf, -inf], 1), ([2.0, 2.0, 2.0, -inf], 1), ([3.0, 3.0, 3.0], 1)):
        x = torch.tensor([row], dtype=torch.float64, requires_grad=True)
        y = topk_mask(x, k, method=method, scale="std")
        (y * torch.arange(1.0, x.shape[-1] + 1, dtype=torch.float64)).sum().backward()
        assert torch.isfinite(x.grad).all(), (method, row, x.grad)


def test_jacrev_through_soft_with_epsilon():
    """Issue 14 #8: SOFT's cost scale had an in-place backward that vmap (jacrev) cannot batch."""
    x = torch.randn(6, dtype=torch.float64)
    jac = torch.func.jacrev(lambda r: topk_mask(r, 2, method="soft", epsilon=0.1))(x)
    ref = torch.autograd.functional.jacobian(lambda r: topk_mask(r, 2, method="soft", epsilon=0.1), x)
    torch.testing.assert_close(jac, ref)
