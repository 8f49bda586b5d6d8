"""Shared fixtures and *independent* float64 references for the softtopk test suite.

Every reference here is written from the mathematical definition of a method, not from the library's code, and
takes the family's internal temperature t (``internal_temperature`` converts the public ``temperature``):
``scipy.optimize.brentq`` on the threshold for sigmoid / lapsum / sparse, a plain log-domain Sinkhorn for SOFT,
the literal DFTopK formula through a full sort, ``torch.topk`` for the hard mask, and cvxpy for sparse.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.special import expit, logsumexp

import softtopk

# Test *variants*: a method of ``topk_mask`` with fixed options. "straight_through" is no method any more: it is
# ``method="sigmoid", straight_through=True`` (forward the hard mask, backward the sigmoid mask's gradient).
# "soft" passes ``temperature`` (then it is the sigmoid mask in score units); "soft_eps" is SOFT with its own
# ``epsilon`` (relative to max C; the old ``method="soft", temperature=eps``): ``run`` passes a ``temperature``
# given to it as ``epsilon`` (default 1.0, the old default).
ALL_METHODS = ("hard", "straight_through", "dftopk", "sigmoid", "soft", "soft_eps", "sparse", "lapsum", "perturbed")
NORMALISED = ("sigmoid", "soft", "soft_eps", "sparse", "lapsum")
INTEGER_ONLY = ("hard", "straight_through", "dftopk", "perturbed")
# variant name -> extra options; "sparse" is run with both of its regularisers wherever it matters
METHOD_VARIANTS = {
    "hard": {},
    "straight_through": {"straight_through": True},
    "dftopk": {},
    "sigmoid": {},
    "soft": {},
    "soft_eps": {},
    "sparse": {},
    "sparse43": {"p": 4 / 3},
    "lapsum": {},
}
_OTHER_VARIANTS = {"perturbed": {}}  # validation tests only (the perturbed method is tested in test_stochastic.py)
_METHOD_OF = {"straight_through": "sigmoid", "sparse43": "sparse", "soft_eps": "soft"}
SOFT_VARIANTS = [v for v in METHOD_VARIANTS if v != "hard"]
NORMALISED_VARIANTS = ["sigmoid", "soft", "soft_eps", "sparse", "sparse43", "lapsum"]
# the variants whose mask depends on x only through x − τ, with ``temperature`` in the units of x
SHIFT_INVARIANT_VARIANTS = [v for v in METHOD_VARIANTS if v not in ("hard", "soft_eps")]


def method_of(variant: str) -> str:
    return _METHOD_OF.get(variant, variant)


def variant_kwargs(variant: str, **kw) -> dict:
    """``method=`` and the options of a variant, plus ``kw``, as keyword arguments of ``topk_mask``/``SoftTopK``.

    "hard" takes no temperature: a ``temperature`` in ``kw`` is dropped (tests parametrised over the variants pass
    one). "soft_eps": a ``temperature`` in ``kw`` is passed as ``epsilon`` (default 1.0).
    """
    opts = {"method": method_of(variant), **METHOD_VARIANTS.get(variant, _OTHER_VARIANTS.get(variant, {}))}
    kw = dict(kw)
    if variant == "hard":
        kw.pop("temperature", None)
    elif variant == "soft_eps":
        kw["epsilon"] = kw.pop("temperature", 1.0)
    opts.update(kw)
    return opts


def run(x, k, variant, **kw):
    """``topk_mask`` for a method variant (see ``variant_kwargs``)."""
    return softtopk.topk_mask(x, k, **variant_kwargs(variant, **kw))


# ----------------------------------------------------------------------------------------------------------
# The width convention of ``temperature``: T is the width of the transition on the score axis, 1/T the slope
# dy_i/dx_i at y_i = 1/2 with the threshold held fixed. Each family's internal t (the t of the references below)
# is T·factor, the factor solving slope = 1/T from the definition (written here, not read from the library):
#   sigmoid σ(z/t):               σ'(0)/t = 1/(4t)                            -> t = T/4
#   Laplace CDF, scale t:         density at 0 = 1/(2t)                       -> t = T/2
#   sparse p=2, clip(z/t):        1/t                                         -> t = T
#   sparse p=4/3, (z/t)³:         y = 1/2 at z/t = 2^(-1/3), 3(z/t)²/t = 3·2^(-2/3)/t -> t = 3·2^(-2/3)·T
#   perturbed, Gaussian σ·Z:      P(x + σZ > τ), density φ(0)/σ = 1/(σ√(2π))  -> σ = T/√(2π)
#   perturbed, Gumbel σ·G:        F(g) = exp(−e^(−g)) = 1/2 at e^(−g) = log 2, f = log(2)/2 -> σ = T·log(2)/2
# ----------------------------------------------------------------------------------------------------------
TEMPERATURE_FACTOR = {
    "sigmoid": 0.25,
    "straight_through": 0.25,
    "dftopk": 0.25,
    "soft": 0.25,
    "lapsum": 0.5,
    "sparse": 1.0,
    "sparse43": 3 * 2 ** (-2 / 3),  # 1.8899...
    "perturbed": 1 / math.sqrt(2 * math.pi),  # 0.39894...
    "perturbed_gumbel": math.log(2) / 2,  # 0.34657...
}


def internal_temperature(variant: str, T, p=None):
    """The internal t of ``variant`` (or of method "sparse" with ``p``, of "perturbed" with ``p="gumbel"``) at
    temperature T: ``T * factor``. "soft_eps" has no such t (its epsilon is passed unchanged): an error."""
    if variant == "sparse" and p is not None and not p == 2:
        assert math.isclose(p, 4 / 3), p
        variant = "sparse43"
    if variant == "perturbed" and p == "gumbel":
        variant = "perturbed_gumbel"
    if variant not in TEMPERATURE_FACTOR:
        raise KeyError(f"no internal temperature for variant {variant!r}")
    return T * TEMPERATURE_FACTOR[variant]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


# ----------------------------------------------------------------------------------------------------------
# φ of each threshold family (float64 numpy), written from the definitions.
# ----------------------------------------------------------------------------------------------------------
def phi_sigmoid(z):
    return expit(z)


def phi_laplace(z):
    e = 0.5 * np.exp(-np.abs(z))
    return np.where(z < 0, e, 1.0 - e)


def phi_sparse2(z):
    return np.clip(z, 0.0, 1.0)


def phi_sparse43(z):
    return np.clip(np.maximum(z, 0.0) ** 3, 0.0, 1.0)


PHI = {
    "sigmoid": phi_sigmoid,
    "soft": phi_sigmoid,
    "lapsum": phi_laplace,
    "sparse": phi_sparse2,
    "sparse43": phi_sparse43,
}


def ref_threshold_mask(x, k, t, variant):
    """y_i = φ((x_i − τ)/t) with Σ y = k, τ by brentq in float64 (x a 1-D array of finite values).

    ``t`` is the family's *internal* temperature: for a call at ``temperature=T`` pass
    ``internal_temperature(variant, T)``.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    phi = PHI[variant]
    if k <= 0:
        return np.zeros(n)
    if k >= n:
        return np.ones(n)

    def f(tau):
        return phi((x - tau) / t).sum() - k

    lo, hi = x.min() - 80.0 * t, x.max() + 80.0 * t
    assert f(lo) > 0 > f(hi)
    tau = brentq(f, lo, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=2000)
    return phi((x - tau) / t)


def ref_dftopk(x, k, t):
    """Literal DFTopK: σ((x − τ)/t), τ = mean of the k-th and (k+1)-th largest (x_(0)=+∞, x_(n+1)=−∞).

    ``t`` is the internal temperature: ``internal_temperature("dftopk", T) = T/4`` for a call at ``temperature=T``.
    """
    xt = torch.as_tensor(x, dtype=torch.float64)
    s = torch.sort(xt, descending=True).values
    padded = torch.cat(
        [torch.tensor([math.inf], dtype=torch.float64), s, torch.tensor([-math.inf], dtype=torch.float64)]
    )
    tau = (padded[k] + padded[k + 1]) / 2
    return torch.sigmoid((xt - tau) / t).numpy()


def ref_hard(x, k, largest=True):
    xt = torch.as_tensor(x)
    out = torch.zeros_like(xt)
    if k:
        out[torch.topk(xt, k, largest=largest).indices] = 1.0
    return out


def sinkhorn_soft(x, k, eps, largest, warm_iters=500):
    """SOFT top-k by a float64 log-domain Sinkhorn on one row (Xie et al. 2020).

    Uniform mass 1/n on the scores, anchors a = (0, 1), cost (x_i − a_j)² / max C. The anchor that collects
    the k selected units of mass gets k/n: anchor 0 for ``largest=False`` (the k smallest), anchor 1 for
    ``largest=True``. Returns n·Γ[:, selected anchor].

    Plain alternating Sinkhorn updates are run first. At small ε they contract very slowly (millions of
    iterations), so the fixed point of the Sinkhorn map is then polished by brentq on its one free
    coordinate h = g_1 − g_0: the residual G(h) − h = ε[log(ν_1/ν_0) − log(M_1(h)/M_0(h))] of one f-then-g
    update is strictly decreasing in h. Both marginals are checked to 1e-12 at the end.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    a = np.array([0.0, 1.0])
    C = (x[:, None] - a[None, :]) ** 2
    C = C / C.max()
    sel = 1 if largest else 0
    nu = np.empty(2)
    nu[sel], nu[1 - sel] = k / n, (n - k) / n
    mu = np.full(n, 1.0 / n)

    def f_update(g):
        return eps * np.log(mu) - eps * logsumexp((g[None, :] - C) / eps, axis=1)

    def g_update(f):
        return eps * np.log(nu) - eps * logsumexp((f[:, None] - C) / eps, axis=0)

    def plan(f, g):
        return np.exp((f[:, None] + g[None, :] - C) / eps)

    def err(P):
        return max(np.abs(P.sum(1) - mu).max(), np.abs(P.sum(0) - nu).max()) * n

    g = np.zeros(2)
    for _ in range(warm_iters):
        f = f_update(g)
        g = g_update(f)
        if err(plan(f, g)) < 1e-13:
            break
    else:

        def resid(h):
            g_new = g_update(f_update(np.array([0.0, h])))
            return (g_new[1] - g_new[0]) - h

        h0 = g[1] - g[0]
        step = eps
        lo, hi = h0 - step, h0 + step
        while resid(lo) < 0:
            lo -= step
            step *= 2
        step = eps
        while resid(hi) > 0:
            hi += step
            step *= 2
        h = brentq(resid, lo, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=1000)
        f = f_update(np.array([0.0, h]))
        g = g_update(f)
        f = f_update(g)
        g = g_update(f)
    P = plan(f, g)
    assert err(P) < 1e-11, f"reference Sinkhorn did not converge: {err(P):.3g}"
    return n * P[:, sel]


def spaced(n, *, gap=0.37, dtype=torch.float64, generator=None, batch=()):
    """Distinct scores at least ``gap``·0.9 apart in random order (no near-ties: safe finite differences)."""
    g = generator
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(int(np.prod(batch)) if batch else 1)])
    x = perm.to(dtype) * gap + 0.05 * gap * torch.rand(perm.shape, generator=g, dtype=dtype)
    x = x - x.mean(-1, keepdim=True)
    return x.reshape(*batch, n) if batch else x[0]


# --------------------------------------------------------------------------------------------------------------
# The examples' tests: `examples` importable, torch's and numba's thread counts restored.
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture
def example_env(monkeypatch):
    """``examples`` importable from the repository root whatever the working directory; the examples set torch's
    (and numba's) thread count to 1: restore it for the rest of the suite. Example tests use it with
    ``pytestmark = pytest.mark.usefixtures("example_env")``."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    before = torch.get_num_threads()
    numba = _numba()
    numba_before = numba.get_num_threads() if numba else None
    yield
    torch.set_num_threads(before)
    if numba:
        numba.set_num_threads(numba_before)


def _numba():
    try:
        import numba
    except ImportError:
        return None
    return numba
