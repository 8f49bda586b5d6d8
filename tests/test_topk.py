"""``softtopk.topk``: the selection (values, indices) of ``torch.topk`` plus the differentiable weights of
``topk_mask`` at those indices, and ``.outside``, the mask mass the selection leaves out.

Expected values come from ``torch.topk`` / ``torch.sort`` and from conftest's float64 references (written with
the INTERNAL temperature t = T * factor of each family, the spec's factor table), never from the library.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

import softtopk
from conftest import ref_dftopk, ref_threshold_mask, sinkhorn_soft, spaced

topk, topk_mask = softtopk.topk, softtopk.topk_mask

# variant id -> (method, fixed options). Every name of softtopk.METHODS, plus sparse p=4/3 and sigmoid's
# straight-through.
VARIANTS = {m: (m, {}) for m in softtopk.METHODS}
VARIANTS["sparse43"] = ("sparse", {"p": 4 / 3})
VARIANTS["sigmoid_st"] = ("sigmoid", {"straight_through": True})
NORMALISED = ("sigmoid", "soft", "sparse", "sparse43", "lapsum")  # Σ y = k, float k allowed
SOLVED = NORMALISED  # the variants that take `tol` (threshold search)
SMOOTH = ("sigmoid", "soft", "sparse", "sparse43", "lapsum", "dftopk")  # deterministic and differentiable
# internal temperature = T * factor (the spec's table); the conftest family each variant is
FACTOR = {"sigmoid": 0.25, "soft": 0.25, "dftopk": 0.25, "lapsum": 0.5, "sparse": 1.0, "sparse43": 3 * 2 ** (-2 / 3)}
FAMILY = {"sigmoid": "sigmoid", "soft": "sigmoid", "lapsum": "lapsum", "sparse": "sparse", "sparse43": "sparse43"}
T = 0.7


def opts(variant, *, temperature=T, tight=False, **kw):
    """Keyword arguments of ``topk``/``topk_mask`` for a variant (a fresh seeded generator for perturbed)."""
    method, fixed = VARIANTS[variant]
    out = {"method": method, **fixed}
    if method != "hard":
        out["temperature"] = temperature
    if method == "perturbed":
        out["generator"] = torch.Generator().manual_seed(1234)
        out["n_samples"] = 32
    if tight and variant in SOLVED:
        out["tol"] = 1e-13
    out.update(kw)
    return out


def distinct(*shape, dim=-1, dtype=torch.float64, seed=0):
    """Scores of ``shape``, distinct along ``dim`` (a random permutation of a grid with gap 0.37 per row)."""
    g = torch.Generator().manual_seed(seed)
    d = dim % len(shape)
    batch = shape[:d] + shape[d + 1 :]
    x = spaced(shape[d], generator=g, batch=batch, dtype=torch.float64).to(dtype)
    return x.movedim(-1, d)


def ref_mask(x, k, variant, *, temperature=T, largest=True):
    """float64 reference mask along the last dim of a float64 tensor (k an int/float or a per-row sequence)."""
    n = x.shape[-1]
    rows = x.detach().double().reshape(-1, n)
    ks = np.broadcast_to(np.asarray(k, dtype=np.float64), rows.shape[:1])
    out = []
    for row, kk in zip(rows, ks):
        s = (row if largest else -row).numpy()
        if variant in ("hard", "sigmoid_st"):
            y = np.zeros(n)
            y[np.argsort(-s, kind="stable")[: int(kk)]] = 1.0
        elif variant == "dftopk":
            y = ref_dftopk(s, int(kk), temperature * FACTOR[variant])
        else:
            y = ref_threshold_mask(s, float(kk), temperature * FACTOR[variant], FAMILY[variant])
        out.append(torch.as_tensor(y))
    return torch.stack(out).reshape(x.shape)


def mass_outside(mask, indices, dim):
    """Σ of ``mask`` over the entries of each row that are not in ``indices`` (float64)."""
    return mask.detach().double().scatter(dim, indices, 0.0).sum(dim)


def check_against_torch(r, x, width, dim, largest, sorted):
    ref = torch.topk(x, width, dim=dim, largest=largest, sorted=sorted)
    assert r.values.dtype == x.dtype and r.indices.dtype == torch.long
    assert r.values.shape == r.indices.shape == r.weights.shape == ref.values.shape
    if sorted:
        assert torch.equal(r.values, ref.values)
        assert torch.equal(r.indices, ref.indices)
    else:  # the same set per row (scores distinct); values are x at the indices
        assert torch.equal(r.indices.sort(dim).values, ref.indices.sort(dim).values)
        assert torch.equal(r.values, x.gather(dim, r.indices))


# ----------------------------------------------------------------------------------------------------------
# Values and indices are torch.topk; weights are topk_mask at the indices; outside is the rest of the mask.
# ----------------------------------------------------------------------------------------------------------
SHAPES_DIMS = [((7,), -1), ((7,), 0), ((3, 7), -1), ((6, 3), 0), ((5, 4, 6), -1), ((5, 4, 6), 0), ((5, 4, 6), 1)]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_matches_torch_topk_and_topk_mask(variant, dtype):
    atol = 1e-12 if dtype == torch.float64 else 2e-6
    for shape, dim in SHAPES_DIMS:
        x = distinct(*shape, dim=dim, dtype=dtype, seed=shape[dim])
        assert x.shape == shape
        d = dim % x.dim()
        k = 2
        for largest in (True, False):
            for sorted_ in (True, False):
                r = topk(x, k, dim=dim, largest=largest, sorted=sorted_, **opts(variant))
                check_against_torch(r, x, k, dim, largest, sorted_)
                mask = topk_mask(x, k, dim=dim, largest=largest, **opts(variant))
                assert r.weights.dtype == x.dtype
                torch.testing.assert_close(r.weights, mask.gather(dim, r.indices), rtol=0, atol=atol)
                assert r.outside.shape == x.shape[:d] + x.shape[d + 1 :] and not r.outside.requires_grad
                torch.testing.assert_close(
                    r.outside.double(), mass_outside(mask, r.indices, dim), rtol=0, atol=10 * atol
                )


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_precision(variant, dtype):
    for dim in (-1, 0):
        x = distinct(3, 9, dim=dim, dtype=dtype, seed=3)
        r = topk(x, 3 if dim == -1 else 2, dim=dim, **opts(variant))
        check_against_torch(r, x, 3 if dim == -1 else 2, dim, True, True)
        assert r.weights.dtype == dtype
        mask = topk_mask(x, 3 if dim == -1 else 2, dim=dim, **opts(variant))
        torch.testing.assert_close(r.weights, mask.gather(dim, r.indices), rtol=0, atol=1e-2)
        assert torch.isfinite(r.outside).all()


def test_named_tuple():
    x = distinct(2, 5)
    r = topk(x, 2)
    assert isinstance(r, tuple) and r._fields == ("values", "indices", "weights") and len(r) == 3
    values, indices, weights = r
    assert values is r.values and indices is r.indices and weights is r.weights
    assert r[0] is r.values and r[2] is r.weights
    # the defaults: method "sigmoid", temperature None == 1.0, dim -1, largest, sorted
    torch.testing.assert_close(r.weights, topk(x, 2, method="sigmoid", temperature=1.0).weights, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# The weights against the float64 references (the spec's temperature factors).
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(SMOOTH) + ["hard", "sigmoid_st"])
@pytest.mark.parametrize("largest", [True, False])
def test_weights_equal_reference(variant, largest):
    x = distinct(4, 9, seed=5)
    for temperature, k, width in ((0.3, 3, 3), (1.0, 3, 5), (2.5, 4, 9)):
        r = topk(x, k, width=width, largest=largest, **opts(variant, temperature=temperature, tight=True))
        ref = ref_mask(x, k, variant, temperature=temperature, largest=largest)
        torch.testing.assert_close(r.weights, ref.gather(-1, r.indices), rtol=0, atol=1e-9)
        torch.testing.assert_close(r.outside, mass_outside(ref, r.indices, -1), rtol=0, atol=1e-8)


def test_soft_with_epsilon_is_sinkhorn():
    x = distinct(2, 7, seed=6)
    eps = 0.5
    for largest in (True, False):
        r = topk(x, 3, method="soft", epsilon=eps, largest=largest, tol=1e-13)
        ref = torch.stack([torch.as_tensor(sinkhorn_soft(row.numpy(), 3, eps, largest)) for row in x])
        torch.testing.assert_close(r.weights, ref.gather(-1, r.indices), rtol=0, atol=1e-8)
        check_against_torch(r, x, 3, -1, largest, True)


def test_soft_with_temperature_is_sigmoid():
    x = distinct(3, 8, seed=7)
    a = topk(x, 3, method="soft", temperature=0.8, tol=1e-13)
    b = topk(x, 3, method="sigmoid", temperature=0.8, tol=1e-13)
    torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=1e-10)
    assert torch.equal(a.indices, b.indices)


def test_hard_weights_are_exactly_one():
    for dim, largest in ((-1, True), (1, False), (0, True)):
        x = distinct(3, 4, 8, dim=dim, seed=8)
        r = topk(x, 2, dim=dim, largest=largest, method="hard")
        assert torch.equal(r.weights, torch.ones_like(r.values))
        assert torch.equal(r.outside, torch.zeros_like(r.outside))
    x = distinct(3, 8, seed=8)
    r = topk(x, 3, method="hard", temperature=None)  # explicit None is the default
    assert torch.equal(r.weights, torch.ones_like(r.values))


def test_straight_through_forward_is_hard_backward_is_sigmoid():
    x = distinct(3, 8, seed=9)
    c = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ra = topk(xa, 3, method="sigmoid", temperature=0.6, straight_through=True, tol=1e-13)
    rb = topk(xb, 3, method="sigmoid", temperature=0.6, tol=1e-13)
    assert torch.equal(ra.weights.detach(), torch.ones(3, 3, dtype=torch.float64))
    assert torch.equal(ra.outside, torch.zeros(3, dtype=ra.outside.dtype))
    assert torch.equal(ra.indices, rb.indices)
    (ra.weights * c).sum().backward()
    (rb.weights * c).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-12)
    # width > k: the extra entries get weight exactly 0, nothing outside
    r = topk(x, 3, width=5, method="sigmoid", straight_through=True)
    torch.testing.assert_close(r.weights, torch.tensor([[1.0] * 3 + [0.0] * 2] * 3, dtype=torch.float64))
    assert torch.equal(r.outside, torch.zeros(3, dtype=r.outside.dtype))


# ----------------------------------------------------------------------------------------------------------
# width.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_width_default_and_larger(variant):
    x = distinct(3, 8, seed=10)
    assert topk(x, 3, **opts(variant)).indices.shape == (3, 3)
    for width in (4, 8):
        r = topk(x, 3, width=width, **opts(variant))
        check_against_torch(r, x, width, -1, True, True)
        mask = topk_mask(x, 3, **opts(variant))
        torch.testing.assert_close(r.weights, mask.gather(-1, r.indices), rtol=0, atol=1e-12)
    # width = n: nothing is left outside
    torch.testing.assert_close(r.outside, torch.zeros(3, dtype=r.outside.dtype), rtol=0, atol=1e-12)
    for bad in (-1, 9):
        with pytest.raises(ValueError):
            topk(x, 3, width=bad, **opts(variant))


@pytest.mark.parametrize("method", ["hard", "sigmoid"])
def test_width_zero_is_empty_like_torch_topk(method):
    # width is allowed in [0, n], as torch.topk's k: the default width of k = 0 is 0
    x = distinct(3, 8)
    r = topk(x, 3, method=method, width=0)
    assert r.indices.shape == r.values.shape == r.weights.shape == (3, 0)
    torch.testing.assert_close(r.outside, torch.full((3,), 3.0, dtype=x.dtype))


@pytest.mark.parametrize("variant", NORMALISED)
def test_width_of_float_k_is_ceil(variant):
    x = distinct(2, 7, seed=11)
    for k, w in ((2.5, 3), (2.0, 2), (0.3, 1), (6.01, 7)):
        r = topk(x, k, **opts(variant, tight=True))
        check_against_torch(r, x, w, -1, True, True)
        ref = ref_mask(x, k, variant)
        torch.testing.assert_close(r.weights, ref.gather(-1, r.indices), rtol=0, atol=1e-9)
        # normalised: Σ over the selection + outside = k
        torch.testing.assert_close(r.weights.sum(-1) + r.outside, torch.full((2,), float(k), dtype=torch.float64))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_per_row_k_tensor(variant):
    x = distinct(3, 7, seed=12)
    if variant in NORMALISED:
        k, width = torch.tensor([1.5, 3.25, 2.0], dtype=torch.float64), 4
    else:
        k, width = torch.tensor([1, 3, 2]), 3
    r = topk(x, k, **opts(variant, tight=True))
    check_against_torch(r, x, width, -1, True, True)
    mask = topk_mask(x, k, **opts(variant, tight=True))
    torch.testing.assert_close(r.weights, mask.gather(-1, r.indices), rtol=0, atol=1e-12)
    torch.testing.assert_close(r.outside, mass_outside(mask, r.indices, -1), rtol=0, atol=1e-12)
    if variant in ("hard", "sigmoid_st"):
        expected = (torch.arange(width)[None, :] < k[:, None]).double()
        assert torch.equal(r.weights.detach(), expected)
        assert torch.equal(r.outside, torch.zeros(3, dtype=r.outside.dtype))
    elif variant in SMOOTH:
        ref = ref_mask(x, k.tolist(), variant)
        torch.testing.assert_close(r.weights, ref.gather(-1, r.indices), rtol=0, atol=1e-9)
    # keepdim shape (3, 1) is the same k
    r2 = topk(x, k.unsqueeze(-1), **opts(variant, tight=True))
    assert torch.equal(r2.indices, r.indices)
    torch.testing.assert_close(r2.weights, r.weights, rtol=0, atol=0)


def test_per_row_k_along_dim0():
    x = distinct(6, 2, dim=0, seed=13)  # rows along dim 0
    k = torch.tensor([1.0, 2.5], dtype=torch.float64)
    r = topk(x, k, dim=0, method="lapsum", temperature=0.9, tol=1e-13)
    check_against_torch(r, x, 3, 0, True, True)
    ref = ref_mask(x.T, k.tolist(), "lapsum", temperature=0.9).T
    torch.testing.assert_close(r.weights, ref.gather(0, r.indices), rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------
# outside.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [2, 4 / 3], ids=["p2", "p43"])
def test_sparse_outside_is_zero_when_width_covers_support(p):
    x = distinct(4, 10, seed=14)
    variant = "sparse" if p == 2 else "sparse43"
    for temperature in (0.2, 1.0, 1.7):
        ref = ref_mask(x, 3, variant, temperature=temperature)
        width = int((ref > 0).sum(-1).max())
        r = topk(x, 3, width=width, method="sparse", p=p, temperature=temperature)
        assert torch.equal(r.outside, torch.zeros_like(r.outside)), (temperature, r.outside)
        torch.testing.assert_close(r.weights.sum(-1), torch.full((4,), 3.0, dtype=torch.float64))
        if width < 10:  # and one fewer leaves the smallest positive entry outside
            r = topk(x, 3, width=width - 1, method="sparse", p=p, temperature=temperature, tol=1e-13)
            assert (r.outside >= 0).all() and r.outside.max() > 0


@pytest.mark.parametrize("variant", ["sigmoid", "soft", "lapsum", "dftopk"])
def test_full_support_methods_leave_mass_outside(variant):
    x = distinct(3, 8, seed=15)
    r = topk(x, 3, **opts(variant, temperature=1.0))
    assert (r.outside > 0).all()
    if variant in NORMALISED:
        torch.testing.assert_close(r.weights.sum(-1) + r.outside, torch.full((3,), 3.0, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------------
# max_support.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["sparse", "sparse43", "sigmoid", "soft", "lapsum"])
def test_max_support_equal_width(variant):
    x = distinct(3, 12, seed=16)
    k, m = 3, 5
    r = topk(x, k, width=m, max_support=m, **opts(variant, temperature=4.0, tight=True))
    check_against_torch(r, x, m, -1, True, True)
    assert torch.equal(r.outside, torch.zeros_like(r.outside)), r.outside
    torch.testing.assert_close(r.weights.sum(-1), torch.full((3,), float(k), dtype=torch.float64))
    # the mask of the m largest entries alone
    ref = ref_mask(r.values, k, variant, temperature=4.0)
    torch.testing.assert_close(r.weights, ref, rtol=0, atol=1e-9)
    # the full mask at that temperature does leave mass beyond the m largest
    assert (topk(x, k, width=m, **opts(variant, temperature=4.0)).outside > 1e-3).all()


# ----------------------------------------------------------------------------------------------------------
# -inf padding.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padding_rows(variant):
    x = distinct(3, 8, seed=17)
    x[0, [1, 5]] = -math.inf
    x[2, [0, 2, 3, 7]] = -math.inf  # 4 finite entries
    k = 3
    r = topk(x, k, **opts(variant, tight=True))
    check_against_torch(r, x, k, -1, True, True)
    assert torch.isfinite(r.values).all() and torch.isfinite(r.weights).all()
    mask = topk_mask(x, k, **opts(variant, tight=True))
    torch.testing.assert_close(r.weights, mask.gather(-1, r.indices), rtol=0, atol=1e-12)
    torch.testing.assert_close(r.outside, mass_outside(mask, r.indices, -1), rtol=0, atol=1e-12)
    if variant in SMOOTH:
        for row in range(3):
            fin = torch.isfinite(x[row])
            ref = ref_mask(x[row][fin], k, variant)
            idx = r.indices[row]
            pos = torch.cumsum(fin.long(), 0)[idx] - 1  # positions among the finite entries
            torch.testing.assert_close(r.weights[row], ref[pos], rtol=0, atol=1e-7)
    # width = n takes the padding too: weight exactly 0 there, and nothing outside
    r = topk(x, k, width=8, **opts(variant))
    pad = torch.isinf(r.values)
    assert pad.sum() == 6 and (r.weights[pad] == 0).all()
    torch.testing.assert_close(r.outside, torch.zeros(3, dtype=r.outside.dtype), rtol=0, atol=1e-12)


def test_padding_gradient_is_finite_and_zero_on_padding():
    x = distinct(2, 7, seed=18)
    x[1, [0, 4]] = -math.inf
    x.requires_grad_()
    r = topk(x, 2, width=7, method="sigmoid", temperature=0.5)
    (r.weights * torch.arange(14.0, dtype=torch.float64).reshape(2, 7)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[1, [0, 4]] == 0).all()


# ----------------------------------------------------------------------------------------------------------
# Gradients.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", SMOOTH)
def test_gradcheck_weights_and_values(variant):
    o = opts(variant, temperature=1.0, tight=True)
    for dim, largest, width in ((-1, True, 2), (-1, False, 4), (0, True, 1)):
        k = 2 if dim == -1 else 1
        x = distinct(2, 6, dim=dim, seed=19).requires_grad_()

        def weights(x, dim=dim, largest=largest, width=width, k=k):
            return topk(x, k, dim=dim, largest=largest, width=width, **o).weights

        def values(x, dim=dim, largest=largest, width=width, k=k):
            return topk(x, k, dim=dim, largest=largest, width=width, **o).values

        assert gradcheck(weights, (x,), eps=1e-6, atol=1e-6)
        assert gradcheck(values, (x,), eps=1e-6, atol=1e-6)


def test_gradcheck_temperature_sigmoid():
    x = distinct(3, 6, seed=20)
    t = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    ts = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda t: topk(x, 2, width=3, temperature=t, tol=1e-13).weights, (t,), eps=1e-6, atol=1e-6)
    assert gradcheck(lambda t: topk(x, 2, temperature=t, tol=1e-13).weights, (ts,), eps=1e-6, atol=1e-6)
    assert gradcheck(
        lambda x, t: topk(x, 2.5, temperature=t, tol=1e-13).weights,
        (x.clone().requires_grad_(), t),
        eps=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("variant", ["sigmoid", "soft", "lapsum", "dftopk", "sparse"])
def test_gradient_reaches_entries_outside_the_indices(variant):
    x = distinct(2, 8, seed=21).requires_grad_()
    r = topk(x, 2, **opts(variant, temperature=1.5))
    c = torch.tensor([[1.0, -0.7], [0.4, 1.3]], dtype=torch.float64)
    (r.weights * c).sum().backward()
    out = torch.ones_like(x, dtype=torch.bool).scatter(-1, r.indices, False)
    if variant == "sparse":  # exactly sparse: only within the support
        supp = ref_mask(x, 2, "sparse", temperature=1.5) > 0
        assert (supp & out).any()
        assert (x.grad[supp & out] != 0).all(), x.grad
        assert (x.grad[~supp] == 0).all(), x.grad
    elif variant == "dftopk":  # τ is the midpoint of the k-th and (k+1)-th: only the (k+1)-th outside
        third = torch.zeros_like(out).scatter(-1, torch.topk(x.detach(), 3).indices[:, 2:], True)
        assert (x.grad[third] != 0).all(), x.grad
        assert (x.grad[out & ~third] == 0).all(), x.grad
    else:  # full support: the threshold depends on every entry
        assert (x.grad[out] != 0).all(), x.grad


def test_perturbed_is_reproducible_and_differentiable():
    x = distinct(2, 8, seed=22).requires_grad_()
    a = topk(x, 3, **opts("perturbed"))
    b = topk(x, 3, **opts("perturbed"))
    assert torch.equal(a.weights, b.weights)
    assert ((a.weights >= 0) & (a.weights <= 1)).all()
    (a.weights.sum()).backward()
    assert torch.isfinite(x.grad).all() and (x.grad != 0).any()


def test_scale_std_is_invariant_to_rescaling():
    x = distinct(3, 8, seed=23)
    a = topk(x, 3, scale="std", temperature=0.5, tol=1e-13)
    b = topk(7.5 * x + 2.0, 3, scale="std", temperature=0.5, tol=1e-13)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=1e-9)
    torch.testing.assert_close(a.outside, b.outside, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------------------------
def test_errors():
    x = distinct(2, 6)
    with pytest.raises(TypeError):
        topk([0.1, 0.2, 0.3], 1)
    with pytest.raises(TypeError):
        topk(x.numpy(), 1)
    with pytest.raises(ValueError):
        topk(x, 2, dim=2)
    with pytest.raises(ValueError):
        topk(x, 2, dim=-3)
    with pytest.raises(TypeError):
        topk(x, 2, dim=1.0)
    with pytest.raises(ValueError):
        topk(x, 2, method="nope")
    with pytest.raises(ValueError):  # the old spelling is gone
        topk(x, 2, method="straight_through")
    with pytest.raises(ValueError):
        topk(x, 7)  # k > n
    with pytest.raises(ValueError):
        topk(x, 2.5, method="hard")


@pytest.mark.parametrize(
    "method, option",
    [
        ("sigmoid", {"p": 2}),
        ("sigmoid", {"epsilon": 0.1}),
        ("hard", {"tol": 1e-6}),
        ("hard", {"max_support": 4}),
        ("dftopk", {"max_iter": 10}),
        ("dftopk", {"max_support": 4}),
        ("lapsum", {"n_samples": 10}),
        ("perturbed", {"tol": 1e-6}),
        ("perturbed", {"max_support": 4}),
        ("sparse", {"noise": "gumbel"}),
        ("sparse", {"bogus_option": 1}),
    ],
)
def test_option_the_method_does_not_take(method, option):
    x = distinct(2, 6)
    (name,) = option
    with pytest.raises(TypeError, match=name):
        topk(x, 2, method=method, **option)


def test_arguments_hard_does_not_take():
    x = distinct(2, 6)
    with pytest.raises(TypeError, match="temperature"):
        topk(x, 2, method="hard", temperature=0.5)
    with pytest.raises(TypeError, match="straight_through"):
        topk(x, 2, method="hard", straight_through=True)
    with pytest.raises(TypeError):  # soft: temperature and epsilon together
        topk(x, 2, method="soft", temperature=0.5, epsilon=0.1)
