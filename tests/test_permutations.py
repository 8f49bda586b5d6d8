"""The public layer of the (k, n) operators, ``softtopk.topk_permutation`` and ``softtopk.topk_distribution``
(module :mod:`softtopk.permutations`): the method table, the dispatch of ``temperature`` / ``epsilon`` and the other
options to the families (SOFT optimal transport, ``"sinkhorn"``; the sorting networks, ``"odd_even"`` and
``"bitonic"``), the defaults, and ``topk_distribution`` as the clamped cumulative sum of Γ. The families themselves
are tested against independent references in test_sinkhorn.py and test_sorting_networks.py."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import softtopk
from conftest import spaced
from softtopk import topk_distribution, topk_permutation
from softtopk.permutations import topk_distribution as distribution_of_module
from softtopk.permutations import topk_permutation as permutation_of_module

NETWORKS = ("odd_even", "bitonic")
# each method with the keyword argument of its smoothing parameter
SMOOTHING = {"sinkhorn": "epsilon", "odd_even": "temperature", "bitonic": "temperature"}


def test_public_names():
    assert softtopk.PERMUTATION_METHODS == ("sinkhorn", "odd_even", "bitonic")
    assert topk_permutation is permutation_of_module and topk_distribution is distribution_of_module
    assert "topk_permutation" in softtopk.__all__ and "topk_distribution" in softtopk.__all__


def test_topk_distribution():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 11, generator=g, dtype=torch.float64)
    for method in softtopk.PERMUTATION_METHODS:
        kw = {SMOOTHING[method]: 0.3}
        pk = topk_distribution(x, 4, method=method, **kw)
        gam = topk_permutation(x, 4, method=method, **kw)
        torch.testing.assert_close(pk, gam.cumsum(-2).clamp(0, 1), rtol=0, atol=0)
        assert float(pk.min()) >= 0 and float(pk.max()) <= 1
        torch.testing.assert_close(
            pk.sum(-1), torch.arange(1.0, 5.0, dtype=torch.float64).expand(2, 4), atol=1e-6, rtol=0
        )
    xs = spaced(11, batch=(2,), generator=g)
    pk = topk_distribution(xs, 4, method="odd_even", temperature=1e-3, relaxation="logistic", largest=False)
    order = torch.argsort(xs, -1)
    for j in range(4):
        hard = torch.zeros_like(xs).scatter_(-1, order[:, : j + 1], 1.0)
        torch.testing.assert_close(pk[:, j], hard, rtol=0, atol=1e-9)
    xt = spaced(6, batch=(2,)).requires_grad_()
    assert gradcheck(lambda x: topk_distribution(x, 3, temperature=0.5, relaxation="cauchy"), (xt,))
    assert topk_distribution(x, 0).shape == (2, 0, 11)


def test_defaults():
    """``topk_permutation`` defaults to "sinkhorn" (ε = 0.1), ``topk_distribution`` to "bitonic"; the networks'
    ``temperature=None`` is t = 1.0."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        topk_permutation(x, 3), topk_permutation(x, 3, method="sinkhorn", epsilon=0.1), rtol=0, atol=0
    )
    ref = topk_permutation(x, 3, method="bitonic", temperature=1.0)
    torch.testing.assert_close(topk_distribution(x, 3), ref.cumsum(-2).clamp(0, 1), rtol=0, atol=0)
    for network in NETWORKS:
        torch.testing.assert_close(
            topk_distribution(x, 3, method=network, temperature=None),
            topk_distribution(x, 3, method=network, temperature=1.0),
            rtol=0,
            atol=0,
        )


def test_smoothing_parameter_of_each_method():
    """Method "sinkhorn" takes ``epsilon`` and rejects ``temperature`` (TypeError naming it); the networks take
    ``temperature`` and reject ``epsilon``; both as numbers or per-row tensors."""
    x = torch.randn(2, 6, dtype=torch.float64)
    for fn in (topk_permutation, topk_distribution):
        with pytest.raises(TypeError, match="temperature"):
            fn(x, 2, method="sinkhorn", temperature=0.5)
        with pytest.raises(TypeError, match="temperature"):
            fn(x, 2, method="sinkhorn", temperature=torch.tensor([0.5, 1.0], dtype=torch.float64))
        for network in NETWORKS:
            with pytest.raises(TypeError, match="`epsilon`"):
                fn(x, 2, method=network, epsilon=0.5)
    for method, name in SMOOTHING.items():
        per_row = topk_permutation(x, 2, method=method, **{name: torch.tensor([0.5, 2.0], dtype=torch.float64)})
        for i, v in enumerate((0.5, 2.0)):
            row = topk_permutation(x[i], 2, method=method, **{name: v})
            torch.testing.assert_close(per_row[i], row, rtol=0, atol=1e-9)


def test_bad_arguments_raise():
    x = torch.randn(2, 5)
    cases = [
        (lambda: topk_permutation(x, 2, method="soft"), ValueError, "`method`"),  # renamed "sinkhorn"
        (lambda: topk_permutation(x, 2, method="sigmoid"), ValueError, "`method`"),  # a mask method
        (lambda: topk_distribution(x, 6), ValueError, "topk_distribution: `k`"),
        (lambda: topk_distribution(x, 2, method="sinkhorn", relaxation="cauchy"), TypeError, "`relaxation`"),
        (lambda: topk_distribution(x, 2, method="heap"), ValueError, "topk_distribution: unknown `method`"),
        (lambda: topk_distribution(x, 2, method="soft"), ValueError, "topk_distribution: unknown `method`"),
        (lambda: topk_distribution(x, 2, method="bitonic", tol=1e-3), TypeError, "`tol`"),
        (lambda: topk_distribution(x, 2, largest=1), TypeError, "`largest`"),
    ]
    for call, exc, words in cases:
        with pytest.raises(exc, match=words):
            call()
