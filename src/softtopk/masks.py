r"""The public mask operators: ``topk_mask`` (a soft indicator of the top k), ``topk`` (the top k as
``torch.topk`` returns them, with soft weights), ``threshold_mask`` (threshold-p routing) and ``gumbel_topk``.

Each is three steps: :func:`~softtopk._prepare.prepare` (validation, ``dim`` last, dtype, per-row ``k`` and
temperature), the method from the registry, and the result moved back.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Union

import torch
from torch import Tensor

from . import threshold
from ._prepare import Rows, can_read_data, check_bool, check_choice, plain_rows, prepare, reject_unused, row_param
from ._registry import MASK_METHODS, Method, lookup, memo_key, memo_store, run_mask, uses_temperature
from .hard import hard_topk_mask, with_soft_gradient
from .stochastic import gumbel_noise, relaxed_subset

__all__ = ["METHODS", "TopK", "gumbel_topk", "threshold_mask", "topk", "topk_mask"]

#: The methods of :func:`topk_mask` and :func:`topk`, by name.
METHODS: tuple[str, ...] = tuple(MASK_METHODS)


#: memo_key(method, straight_through) -> (record, k_kind, uses_temperature), once a call with them has passed the
#: checks: what :func:`_prepare_mask` derives from the method and its options alone
_PLANS: dict[tuple, tuple[Method, str, bool]] = {}


def _prepare_mask(fn, x, k, dim, method, temperature, largest, scale, straight_through, options):
    """The shared step of the mask operators: the method's record and the prepared rows (the common eager call of
    a method met before in one test: :func:`~softtopk._prepare.plain_rows`)."""
    key = memo_key(method, straight_through, options=options) if type(method) is str else None
    plan = None if key is None else _PLANS.get(key)
    if plan is not None:
        rows = plain_rows(fn, x, k, dim, temperature, largest, scale, k_kind=plan[1], uses_temperature=plan[2])
        if rows is not None:
            return plan[0], rows
    spec = lookup("mask", method, options, fn=fn)
    check_bool(straight_through, "straight_through", fn=fn)
    if straight_through and spec.factor is None:
        raise TypeError(f"{fn}: method={method!r} takes no `straight_through` (it has no soft gradient)")
    k_kind = "float" if spec.float_k and not straight_through else "int"
    uses_t = uses_temperature(spec, options, temperature, fn=fn)
    if not uses_t and spec.alias is not None:  # the paper's own parameter replaces the temperature and its scale
        reject_unused(fn, f"method={method!r} with `{spec.alias}`", scale=scale)
    rows = prepare(fn, x, k, dim=dim, temperature=temperature, largest=largest, k_kind=k_kind,
                   uses_temperature=uses_t, scale=scale, method=method,
                   defer_data=spec.kernel is not None)  # fmt: skip
    if key is not None:
        memo_store(_PLANS, key, (spec, k_kind, uses_t))
    return spec, rows


def topk_mask(
    x: Tensor,
    k: Union[int, float, Tensor],
    *,
    dim: int = -1,
    method: str = "sigmoid",
    temperature: Union[float, Tensor, None] = None,
    largest: bool = True,
    scale: Union[str, None] = None,
    straight_through: bool = False,
    **options,
) -> Tensor:
    r"""Soft indicator of the ``k`` largest entries of ``x`` along ``dim``.

    The normalised methods solve :math:`\max_y \langle x, y\rangle - t\,\Omega(y)` over the capped simplex
    :math:`\{0 \le y \le 1,\ \sum_i y_i = k\}`, whose solution is the threshold mask
    :math:`y_i = \mathrm{clip}(\varphi((x_i - \tau)/t), 0, 1)` with :math:`\sum_i y_i = k`. As
    ``temperature`` → 0 every method tends to the hard top-k mask.

    ``temperature`` T is the same quantity for every method: the **width of the transition on the score axis**,
    1/T being the slope of the mask where it crosses 1/2 (for one entry, the threshold held fixed). Each family's
    own parameter is t = T · factor, the factor in the table. So one value gives comparable softness across methods;
    ``scale="std"`` makes T relative to each row's standard deviation, so that it also transfers across score scales.

    =================  ==================================================================  ========  =========
    ``method``         definition                                                          Σ y = k   factor
    =================  ==================================================================  ========  =========
    ``"hard"``         exact 0/1 mask, ties as ``torch.topk``; zero gradient; takes no       yes       —
                       temperature
    ``"dftopk"``       :math:`\sigma((x-\tau)/t)`, τ the midpoint of the k-th and (k+1)-th    **no**   1/4
                       largest entries (Zhu et al. 2025); O(n) selection
    ``"sigmoid"``      LML (Amos et al. 2019): φ = sigmoid, binary-entropy regulariser       yes       1/4
    ``"soft"``         SOFT top-k (Xie et al. 2020): entropic OT to anchors 0 and 1; at       yes       1/4
                       convergence a sigmoid mask, so with ``temperature`` it *is*
                       ``"sigmoid"``; the option ``epsilon`` gives the paper's ε (relative
                       to max C) instead
    ``"sparse"``       Sander et al. 2023: ``p=2`` (default) φ(z) = z, the Euclidean           yes       1; 1.89
                       projection of x/t; ``p=4/3`` φ(z) = max(z, 0)³. Exact zeros
    ``"lapsum"``       LapSum (Struski et al. 2025): φ = Laplace CDF                          yes       1/2
    ``"perturbed"``    :math:`E[\mathrm{hard}(x + tZ)]` by Monte Carlo (Berthet et al.        yes       0.399;
                       2020), Z Gaussian or Gumbel; stochastic                                           0.347
    =================  ==================================================================  ========  =========

    Args:
        x: scores of any floating dtype and any shape; ``-inf`` entries (padding) get exactly 0, ``+inf`` entries
            exactly 1 (with ``largest=False`` the roles swap: ``+inf`` is the padding).
        k: an int in [0, n], or a tensor broadcastable to the batch shape (``x.shape`` without ``dim``) with one k
            per row. The normalised methods (sigmoid, soft, sparse, lapsum) accept a real k and are differentiable
            with respect to it.
        dim: the dimension to select along.
        method: one of :data:`METHODS` (the table above).
        temperature: T > 0, a number or a per-row tensor (differentiable); None means 1.0. ``"hard"`` takes none.
        largest: select the k largest (default) or the k smallest entries.
        scale: None (T in the units of the scores) or ``"std"`` (T times each row's standard deviation over its
            finite entries, differentiated: the mask is then invariant to rescaling the scores).
        straight_through: forward the exact top-k mask, backward the gradient of ``method``'s mask (k whole). A
            call that nothing differentiates (under ``torch.no_grad()``, or no input requiring grad) computes the
            hard mask alone.
        **options: the method's own options; any other raises ``TypeError``:

            - ``tol``, ``max_iter`` (sigmoid, soft, sparse, lapsum): the threshold search stops at
              :math:`|\sum y - k| \le` ``tol`` (default 1e-5, 1e-9 in float64), after ``max_iter`` (50) at most.
            - ``p`` (sparse): 2 or 4/3. ``epsilon`` (soft): SOFT's ε, replacing ``temperature``.
            - ``max_support`` (sigmoid, soft, sparse, lapsum): an int ≥ k; the mask is computed on the
              ``max_support`` largest entries of each row only and is exactly 0 elsewhere (so a MoE router can size
              its capacity). It changes the result only where the unbounded mask is nonzero outside them.
            - ``n_samples`` (100), ``noise`` (``"gaussian"`` or ``"gumbel"``) and ``generator`` (perturbed); its
              backward is the perturbed-optimizer estimator on the forward's noise (regenerated from a seed).

    Returns:
        A tensor of ``x``'s shape and dtype with entries in [0, 1]; all but ``"dftopk"`` sum to k along ``dim``
        (DFTopK's mask can sum to far more than k at a large temperature: do not use it as weights that must sum
        to k, such as kNN votes).
        Half-precision inputs are computed in float32.

    Example:
        >>> import torch, softtopk
        >>> x = torch.tensor([3.0, 1.0, 2.0, 0.0])
        >>> softtopk.topk_mask(x, 2, method="sparse", temperature=2.0)
        tensor([1.0000, 0.2500, 0.7500, 0.0000])
        >>> softtopk.topk_mask(x, 2, method="hard")
        tensor([1., 0., 1., 0.])
    """
    spec, rows = _prepare_mask("topk_mask", x, k, dim, method, temperature, largest, scale, straight_through, options)
    if rows.x.numel() == 0:
        return x * 0.0
    y = run_mask(spec, rows, options, straight_through=straight_through, fn="topk_mask")
    return rows.restore(y)


class TopK(NamedTuple):
    """The result of :func:`topk`: ``values`` and ``indices`` as ``torch.topk`` returns them, and ``weights``, the
    soft mask at those indices. The attribute ``outside`` is the mask mass outside the returned indices."""

    values: Tensor
    indices: Tensor
    weights: Tensor


class _TopK(TopK):
    """:class:`TopK` with the attribute ``outside`` (batch shape, no gradient)."""

    outside: Tensor


def topk(
    x: Tensor,
    k: Union[int, float, Tensor],
    *,
    dim: int = -1,
    method: str = "sigmoid",
    temperature: Union[float, Tensor, None] = None,
    largest: bool = True,
    sorted: bool = True,
    width: Union[int, None] = None,
    scale: Union[str, None] = None,
    straight_through: bool = False,
    **options,
) -> TopK:
    r"""The top entries of ``x`` along ``dim``, as ``torch.topk`` returns them, with their soft top-k weights.

    ``values, indices = torch.topk(x, width, dim, largest, sorted)`` exactly, and ``weights`` is
    ``topk_mask(x, k, ...)`` (same arguments) gathered at ``indices``: differentiable with respect to **every**
    score, not only the returned ones (the mask couples them through its threshold). This is what a
    mixture-of-experts layer or a kNN needs: which entries to use, and differentiable weights for them.
    ``result.outside`` is the mask mass that falls outside the returned indices (per row, detached): 0 for
    ``"hard"`` and ``straight_through``, and whenever ``width`` covers the mask's support (``"sparse"``, or any
    normalised method with ``max_support=width``); size ``width`` with it.

    The weights of the normalised methods sum to k over the whole row (to k − ``outside`` over the returned
    entries): divide by k for combine weights that sum to 1 (a mixture-of-experts layer), or by their own sum to
    renormalise over the entries actually used. With ``max_support`` the support is bounded, so a router can run
    exactly ``width = max_support`` experts per token and lose nothing (``outside`` = 0); ``max_support`` must
    exceed k, since at k every weight is exactly 1 and no gradient reaches the router.

    Args:
        x: scores, as :func:`topk_mask`.
        k: an int, a real number (normalised methods) or a per-row tensor, as :func:`topk_mask`.
        dim: the dimension to select along.
        method: one of :data:`METHODS`.
        temperature: the width of the transition in score units (None: 1.0), as :func:`topk_mask`.
        largest: the k largest (default) or the k smallest entries.
        sorted: return the entries in order (as ``torch.topk``).
        width: the number of entries returned; default k (⌈k⌉ for a real k, ⌈max k⌉ for a per-row tensor, which
            reads it: pass ``width`` under ``torch.compile``).
        scale: None or ``"std"``, as :func:`topk_mask`.
        straight_through: the hard mask forward, the method's soft gradient backward.
        **options: the method's options, as :func:`topk_mask`.

    Returns:
        A :class:`TopK` ``(values, indices, weights)``, each of ``x``'s shape with ``dim`` of size ``width``.

    Example:
        >>> import torch, softtopk
        >>> x = torch.tensor([3.0, 1.0, 2.0, 0.0])
        >>> r = softtopk.topk(x, 2, method="sparse", temperature=2.0)
        >>> r.indices, r.weights, r.outside
        (tensor([0, 2]), tensor([1.0000, 0.7500]), tensor(0.2500))
    """
    fn = "topk"
    spec, rows = _prepare_mask(fn, x, k, dim, method, temperature, largest, scale, straight_through, options)
    width = _width(width, k, rows, fn)
    values, indices = torch.topk(x, width, dim=rows.dim, largest=largest, sorted=sorted)
    y = run_mask(spec, rows, options, straight_through=straight_through, fn=fn) if x.numel() else rows.x
    idx = indices if rows.dim == x.dim() - 1 else indices.movedim(rows.dim, -1)
    weights = y.gather(-1, idx)
    result = _TopK(values, indices, rows.restore(weights))
    result.outside = y.detach().scatter(-1, idx, 0.0).sum(-1).to(x.dtype)
    return result


def _width(width: object, k: object, rows: Rows, fn: str) -> int:
    """The number of entries :func:`topk` returns: ``width``, or ⌈k⌉ (⌈max k⌉ for a per-row tensor k)."""
    if width is None:
        if isinstance(k, Tensor):  # the caller's tensor (the prepared one of a number k may have no rows)
            k = float(k.detach().max()) if k.numel() else 0.0
        return min(math.ceil(float(k)), rows.n)  # type: ignore[arg-type]
    if isinstance(width, bool) or not isinstance(width, int):
        raise TypeError(f"{fn}: `width` must be an int, got {type(width).__name__}")
    if not 0 <= width <= rows.n:
        raise ValueError(f"{fn}: `width`={width} is out of range [0, n={rows.n}]")
    return width


NORMALIZATIONS = ("sigmoid", "softmax", "none")


def threshold_mask(
    x: Tensor,
    threshold: Union[float, Tensor],
    *,
    dim: int = -1,
    temperature: Union[float, Tensor, None] = None,
    normalize: str = "sigmoid",
    method: str = "sigmoid",
    straight_through: bool = False,
) -> Tensor:
    r"""Soft indicator of the entries of ``x`` whose normalised router score exceeds ``threshold``.

    MoDification (Zhang et al. 2024) replaces the top-k router of Mixture-of-Depths by such a threshold-p
    operator, so that the number of tokens a layer processes adapts to the input. With :math:`s = N(x)` the
    normalised score and p = ``threshold``, the hard mask is :math:`1[s_i > p]` and its relaxation
    :math:`y_i = \sigma(4 (s_i - p)/T)`, T = ``temperature`` the width of the transition on the score axis as in
    :func:`topk_mask` (default 1.0). It tends to the hard mask as T → 0. The normaliser N (``normalize``) is

    - ``"sigmoid"`` (default): :math:`s_i = \sigma(x_i)`, one independent gate per token;
    - ``"softmax"``: :math:`s = \mathrm{softmax}(x)` along ``dim`` (the share of the routing mass);
    - ``"none"``: ``x`` is already a normalised score.

    ``method="hard"`` returns the 0/1 mask with a zero gradient (and takes no temperature);
    ``straight_through=True`` returns the hard mask with the gradient of the relaxation. Unlike top-k, the number
    of selected entries varies from row to row. We could not check MoDification's normaliser against the paper's
    text, so it is an argument here.

    Args:
        x: router logits, any floating dtype and shape (half precision computes in float32).
        threshold: p, a number or a per-row tensor broadcastable to the batch shape (differentiable); in [0, 1]
            unless ``normalize="none"``.
        dim: the dimension of the entries (the softmax axis; the batch otherwise).
        temperature: T > 0, a number or a per-row tensor (differentiable).
        normalize: ``"sigmoid"``, ``"softmax"`` or ``"none"``.
        method: ``"sigmoid"`` (the relaxation) or ``"hard"``.
        straight_through: the hard mask forward, the relaxation's gradient backward.

    Example:
        >>> import torch, softtopk
        >>> x = torch.tensor([2.0, -1.0, 0.5, -3.0])
        >>> softtopk.threshold_mask(x, 0.5, method="hard")
        tensor([1., 0., 1., 0.])
        >>> softtopk.threshold_mask(x, 0.5, temperature=0.4).round(decimals=3)
        tensor([0.9780, 0.0900, 0.7730, 0.0110])
    """
    fn = "threshold_mask"
    check_choice(normalize, "normalize", NORMALIZATIONS, fn=fn)
    check_choice(method, "method", ("sigmoid", "hard"), fn=fn)
    check_bool(straight_through, "straight_through", fn=fn)
    if method == "hard":
        reject_unused(fn, "method='hard'", straight_through=straight_through)
    rows = prepare(fn, x, dim=dim, temperature=temperature, k_kind=None, uses_temperature=method != "hard")
    if normalize == "softmax" and rows.x.numel() and can_read_data(rows.x) and not bool(rows.x.isfinite().all()):
        if bool((rows.x == math.inf).any()) or bool((rows.x == -math.inf).all(-1).any()):
            raise ValueError(f"{fn}: `x` has a row with +inf or with only -inf, whose softmax is undefined")
    s = {"sigmoid": torch.sigmoid, "softmax": lambda v: torch.softmax(v, -1), "none": lambda v: v}[normalize](rows.x)
    p = _threshold(threshold, x, rows, bounded=normalize != "none", fn=fn)
    hard = (s > p).to(s.dtype)
    if method == "hard":
        return rows.restore(hard + 0.0 * s)  # in the graph, with an exact zero gradient
    y = torch.sigmoid((s - p) / (0.25 * rows.t))  # finite even for infinite scores
    return rows.restore(with_soft_gradient(hard, y) if straight_through else y)


def _threshold(p: object, x: Tensor, rows: Rows, *, bounded: bool, fn: str) -> Tensor:
    if isinstance(p, bool) or not isinstance(p, (int, float, Tensor)):
        raise TypeError(f"{fn}: `threshold` must be a number or a tensor, got {type(p).__name__}")
    bad = f"{fn}: `threshold` must be finite{' and lie in [0, 1]' if bounded else ''}"
    if isinstance(p, Tensor):
        if not p.dtype.is_floating_point:
            raise TypeError(f"{fn}: `threshold` must be a floating tensor, got {p.dtype}")
        ok = torch.isfinite(p) & ((p >= 0) & (p <= 1) if bounded else True)
        if p.numel() and can_read_data(p) and not bool(torch.as_tensor(ok).all()):
            raise ValueError(bad)
    elif not (p == p and abs(p) != math.inf and (not bounded or 0 <= p <= 1)):
        raise ValueError(f"{bad}, got {p}")
    return row_param(p, x, rows.dim, name="threshold", fn=fn, dtype=rows.x.dtype)


RELAXATIONS = ("softmax", "sigmoid")


def gumbel_topk(
    x: Tensor,
    k: Union[int, Tensor],
    *,
    dim: int = -1,
    temperature: Union[float, Tensor, None] = None,
    relaxation: str = "softmax",
    straight_through: bool = False,
    generator: Union[torch.Generator, None] = None,
) -> Tensor:
    r"""A relaxed k-hot sample of the Gumbel top-k subset distribution of logits ``x`` (Xie & Ermon 2019).

    The hard sample is :math:`\mathrm{hard}_k(x + G)` with :math:`G` i.i.d. standard Gumbel: k draws from
    softmax(x) without replacement (Gumbel top-k trick). Its relaxation at temperature t (the softmax
    temperature of the Gumbel-softmax, default 1.0):

    - ``relaxation="softmax"`` (the paper's): :math:`a^{(1)} = x + G`, :math:`p^{(j)} = \mathrm{softmax}(a^{(j)}/t)`,
      :math:`a^{(j+1)} = a^{(j)} + \log(1 - p^{(j)})`, output :math:`\sum_{j=1}^k p^{(j)}`. Nonnegative and sums
      to k, but an entry **can exceed 1** (e.g. n = k = 2). O(k · n) time and autograd memory per row.
    - ``relaxation="sigmoid"``: the LML mask of the perturbed logits at the same t, ``topk_mask(x + G, k,
      method="sigmoid", temperature=4 t)``: in [0, 1], sums to k, O(n). Same t → 0 limit.

    Both tend to the hard sample as t → 0. ``straight_through=True`` returns the hard sample in the forward pass
    with the relaxed sample's gradient. ``generator`` makes the noise reproducible. ``k`` is an int or a per-row
    tensor. ``-inf`` logits (padding) are never selected; a row with fewer than k finite logits raises.

    Example:
        >>> import torch, softtopk
        >>> x = torch.tensor([3.0, 1.0, 2.0, -1.0])
        >>> y = softtopk.gumbel_topk(x, 2, temperature=0.5, generator=torch.Generator().manual_seed(0))
        >>> round(float(y.sum()), 4)
        2.0
        >>> softtopk.gumbel_topk(x, 2, straight_through=True, generator=torch.Generator().manual_seed(0)).sum().item()
        2.0
    """
    fn = "gumbel_topk"
    check_choice(relaxation, "relaxation", RELAXATIONS, fn=fn)
    check_bool(straight_through, "straight_through", fn=fn)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: `generator` must be a torch.Generator or None, got {type(generator).__name__}")
    if isinstance(x, Tensor) and x.dtype.is_floating_point and can_read_data(x) and bool((x == math.inf).any()):
        raise ValueError(f"{fn}: `x` contains +inf; logits must be finite or -inf (padding)")
    rows = prepare(fn, x, k, dim=dim, temperature=temperature, k_kind="int")
    if rows.x.numel() == 0:
        return x * 0.0
    perturbed = rows.x + gumbel_noise(rows.x.shape, generator, rows.x.dtype, rows.x.device)
    if relaxation == "sigmoid":
        kf = rows.k.to(rows.x.dtype) if isinstance(rows.k, Tensor) else torch.full_like(rows.t, rows.k)
        y = threshold.normalised_mask("sigmoid", perturbed, kf, rows.t)
    else:
        y = relaxed_subset(perturbed, rows.k, rows.t)
    if straight_through:
        y = with_soft_gradient(hard_topk_mask(perturbed.detach(), rows.k), y)
    return rows.restore(y)
