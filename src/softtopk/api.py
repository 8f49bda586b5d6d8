"""The public entry point: validate, move ``dim`` last, dispatch to a family, move back."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor, nn

from . import stochastic, threshold
from ._utils import (
    KArg,
    check_infinities,
    check_input,
    check_k,
    check_temperature,
    compute_dtype,
    move_back,
    move_last,
    normalize_dim,
    row_param,
)
from .baselines import hard_mask

__all__ = ["METHODS", "SoftTopK", "topk_mask"]


@dataclass(frozen=True)
class _Method:
    fn: Callable[..., Tensor]  # (x (..., n) compute dtype, k (..., 1) or int, t (..., 1), largest, **parsed)
    parse: Callable[..., dict] = lambda: {}  # validates the method's options, returns fn's keyword arguments
    options: tuple[str, ...] = ()
    normalised: bool = True  # Σ y = k holds, float k allowed and differentiable
    own_largest: bool = False  # the method reads `largest` itself instead of selecting on -x


def _solver_opts(tol=None, max_iter=threshold.MAX_ITER):
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol > 0):
        raise ValueError(f"topk_mask: `tol` must be a positive number, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"topk_mask: `max_iter` must be a positive int, got {max_iter!r}")
    return {"tol": tol, "max_iter": int(max_iter)}


def _sparse_opts(p=2, **solver):
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"topk_mask: `p` must be 2 or 4/3, got {type(p).__name__}")
    if p == 2:
        family = "sparse2"
    elif math.isclose(p, 4 / 3, rel_tol=1e-6):
        family = "sparse4/3"
    else:
        raise ValueError(f"topk_mask: `p` must be 2 or 4/3 for method='sparse', got {p}")
    return {"family": family, **_solver_opts(**solver)}


def _sigmoid(x, k, t, largest, **opts):
    return threshold.normalised_mask("sigmoid", x, k, t, **opts)


def _lapsum(x, k, t, largest, **opts):
    return threshold.normalised_mask("lapsum", x, k, t, **opts)


def _sparse(x, k, t, largest, family, **opts):
    return threshold.normalised_mask(family, x, k, t, **opts)


def _soft(x, k, t, largest, **opts):
    # The paper's convention is largest=False: anchor 0 takes the mass k/n. Mirrored, anchor 1 takes it.
    t_eff = threshold.soft_temperature(x, t)
    return threshold.normalised_mask("sigmoid", x if largest else -x, k, t_eff, **opts)


def _dftopk(x, k, t, largest):
    return threshold.dftopk(x, k, t)


def _hard(x, k, t, largest):
    return hard_mask(x, k)


def _straight_through(x, k, t, largest, **opts):
    kf = k.to(x.dtype) if isinstance(k, Tensor) else torch.full_like(t, k)
    return threshold.straight_through(x, k, kf, t, **opts)


def _perturbed(x, k, t, largest, **opts):
    return stochastic.perturbed_mask(x, k, t, **opts)


_SOLVER = ("tol", "max_iter")
METHODS: dict[str, _Method] = {
    "hard": _Method(_hard, normalised=False),
    "straight_through": _Method(_straight_through, _solver_opts, _SOLVER, normalised=False),
    "dftopk": _Method(_dftopk, normalised=False),
    "sigmoid": _Method(_sigmoid, _solver_opts, _SOLVER),
    "soft": _Method(_soft, _solver_opts, _SOLVER, own_largest=True),
    "sparse": _Method(_sparse, _sparse_opts, ("p",) + _SOLVER),
    "lapsum": _Method(_lapsum, _solver_opts, _SOLVER),
    "perturbed": _Method(
        _perturbed, stochastic.parse_perturbed_options, ("n_samples", "noise", "generator"), normalised=False
    ),
}


def _method(method: str, options: dict) -> tuple[_Method, dict]:
    """The method's spec and its parsed options; unknown methods and options raise."""
    if not isinstance(method, str):
        raise TypeError(f"topk_mask: `method` must be a string, got {type(method).__name__}")
    if method not in METHODS:
        raise ValueError(f"topk_mask: unknown `method`={method!r}; choose one of {', '.join(METHODS)}")
    spec = METHODS[method]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        allowed = ", ".join(spec.options) or "none"
        raise TypeError(f"topk_mask: method={method!r} takes no option(s) {unknown}; its options: {allowed}")
    return spec, spec.parse(**options)


def _check_largest(largest: object) -> None:
    if not isinstance(largest, bool):
        raise TypeError(f"topk_mask: `largest` must be a bool, got {type(largest).__name__}")


def topk_mask(
    x: Tensor,
    k: KArg,
    *,
    dim: int = -1,
    method: str = "sigmoid",
    temperature: Union[float, Tensor] = 1.0,
    largest: bool = True,
    **options,
) -> Tensor:
    r"""Soft indicator of the ``k`` largest entries of ``x`` along ``dim``.

    Most methods solve :math:`\max_y \langle x, y\rangle - t\,\Omega(y)` over the capped simplex
    :math:`\{0 \le y \le 1,\ \sum_i y_i = k\}`, whose solution is the threshold mask
    :math:`y_i = \mathrm{clip}(\varphi((x_i - \tau)/t), 0, 1)` with :math:`\sum_i y_i = k`. As
    ``temperature`` → 0 every method tends to the hard top-k mask.

    ====================  ==================================================================================
    ``method``            definition
    ====================  ==================================================================================
    ``"hard"``            exact 0/1 mask, ties as ``torch.topk``; zero gradient
    ``"straight_through"`` forward ``"hard"``; backward the gradient of ``"sigmoid"`` at the same temperature
    ``"dftopk"``          :math:`\sigma((x-\tau)/t)`, τ the midpoint of the k-th and (k+1)-th largest
                          entries (Zhu et al. 2025); not normalised; O(n) selection
    ``"sigmoid"``         LML layer (Amos et al. 2019): φ = sigmoid, binary-entropy regulariser
    ``"soft"``            SOFT top-k (Xie et al. 2020), entropic OT to anchors 0 and 1 with ε = temperature,
                          solved in closed form at convergence (a sigmoid mask of :math:`2x/\max C`)
    ``"sparse"``          Sander et al. 2023: ``p=2`` (default) φ(z) = z, the Euclidean projection of x/t;
                          ``p=4/3`` φ(z) = max(z, 0)³. Exactly sparse
    ``"lapsum"``          LapSum (Struski et al. 2025): φ = Laplace CDF with scale t
    ``"perturbed"``       perturbed optimizer (Berthet et al. 2020): :math:`E[\mathrm{hard}(x + tZ)]` by Monte
                          Carlo, Z Gaussian or Gumbel; Σ y = k; stochastic (``n_samples``, ``generator``)
    ====================  ==================================================================================

    Args:
        x: scores of any floating dtype and any shape; ``-inf`` entries (padding) get exactly 0.
        k: an int in [0, n], or a tensor broadcastable to the batch shape (``x.shape`` without ``dim``) with
            one k per row. Normalised methods accept a float k and are differentiable with respect to it.
        dim: the dimension to select along.
        method: one of the table above.
        temperature: positive number or per-row tensor (differentiable for the normalised methods).
        largest: select the k largest (default) or the k smallest entries.
        **options: method options: ``tol`` and ``max_iter`` of the threshold search (normalised methods and
            ``straight_through``), ``p`` for ``"sparse"``; ``n_samples`` (default 100), ``noise``
            (``"gaussian"`` default, or ``"gumbel"``) and ``generator`` for ``"perturbed"``, whose backward is
            the estimator :math:`E[\langle g, \mathrm{hard}(x+tZ)\rangle \nabla\nu(Z)]/t` on the forward's noise
            (regenerated from a seed: O(batch · n) memory; not usable under ``vmap``). Unknown options raise
            ``TypeError``.

    Returns:
        A tensor of ``x``'s shape and dtype with entries in [0, 1]; the normalised methods sum to k along
        ``dim``. Half-precision inputs are computed in float32.

    Example:
        >>> import torch, softtopk
        >>> x = torch.tensor([3.0, 1.0, 2.0, 0.0])
        >>> softtopk.topk_mask(x, 2, method="sparse", temperature=2.0)
        tensor([1.0000, 0.2500, 0.7500, 0.0000])
        >>> softtopk.topk_mask(x, 2, method="hard")
        tensor([1., 0., 1., 0.])
    """
    finite = check_input(x)
    d = normalize_dim(x, dim)
    spec, opts = _method(method, options)
    _check_largest(largest)
    n = x.shape[d]
    check_k(k, n, integer=not spec.normalised)
    check_temperature(temperature)
    if x.numel() == 0 or n == 0:  # nothing to select (k = 0 on empty rows)
        return x * 0.0

    cdtype = compute_dtype(x)
    xl = move_last(x, d).to(cdtype)
    if isinstance(k, Tensor):
        kt = row_param(k, x, d, name="k", dtype=cdtype if spec.normalised else torch.long)
    else:
        kt = row_param(k, x, d, name="k", dtype=cdtype) if spec.normalised else int(k)
    signed = xl if largest else -xl  # the problem is always "k largest of signed"
    if not finite:
        check_infinities(signed, kt)
    t = row_param(temperature, x, d, name="temperature", dtype=cdtype)
    y = spec.fn(xl if spec.own_largest else signed, kt, t, largest, **opts)
    return move_back(y.to(x.dtype), d)


class SoftTopK(nn.Module):
    """``nn.Module`` form of :func:`topk_mask`: ``SoftTopK(k, method=..., temperature=...)(x)``.

    The arguments are checked when the module is built; ``temperature`` may be an ``nn.Parameter``.
    """

    def __init__(
        self,
        k: KArg,
        method: str = "sigmoid",
        temperature: Union[float, Tensor] = 1.0,
        dim: int = -1,
        largest: bool = True,
        **options,
    ):
        super().__init__()
        spec, _ = _method(method, options)
        check_k(k, math.inf, integer=not spec.normalised, fn="SoftTopK")
        check_temperature(temperature, fn="SoftTopK")
        _check_largest(largest)
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise TypeError(f"SoftTopK: `dim` must be an int, got {type(dim).__name__}")
        self.k, self.method, self.temperature = k, method, temperature
        self.dim, self.largest, self.options = dim, largest, options

    def forward(self, x: Tensor) -> Tensor:
        return topk_mask(
            x,
            self.k,
            dim=self.dim,
            method=self.method,
            temperature=self.temperature,
            largest=self.largest,
            **self.options,
        )

    def extra_repr(self) -> str:
        opts = "".join(f", {key}={val!r}" for key, val in self.options.items())
        return f"k={self.k}, method={self.method!r}, temperature={self.temperature}, dim={self.dim}{opts}"
