"""Soft sorted top-k and the soft top-k distribution: the public operators that return a (k, n) matrix per row.

Both dispatch through the method registry to the families :mod:`softtopk.sinkhorn` (SOFT sorted top-k, entropic
optimal transport) and :mod:`softtopk.sorting_networks` (relaxed odd-even and bitonic networks).
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from ._prepare import is_transformed, prepare
from ._registry import internal_temperature, lookup, parse, uses_temperature

__all__ = ["topk_distribution", "topk_permutation"]


def topk_permutation(
    x: Tensor,
    k: int,
    *,
    dim: int = -1,
    method: str = "sinkhorn",
    temperature: Union[float, Tensor, None] = None,
    largest: bool = True,
    **options,
) -> Tensor:
    r"""Soft sorted top-k: Γ of shape (..., k, n) whose row j softly indicates the (j + 1)-th largest entry.

    Every method returns Γ with rows summing to 1 and columns summing to at most 1; ``Γ @ x`` are the soft sorted
    top-k values, in decreasing order, and as the temperature → 0, Γ tends to the rows of the hard permutation that
    sorts the top-k.

    ``method="sinkhorn"`` (default), SOFT sorted top-k (Xie et al. 2020): entropic optimal transport of the n scores
    (mass 1/n each) to the k + 1 anchors :math:`(k, k-1, \dots, 1, 0)` with masses
    :math:`(1/n, \dots, 1/n, (n-k)/n)`,

    .. math::
        P = \arg\min_{P \in U(\mu, \nu)} \langle C, P\rangle - \varepsilon H(P),\qquad
        C_{ji} = \frac{(x_i - a_j)^2}{\max_{j'i'} (x_{i'} - a_{j'})^2},\qquad \Gamma = n P_{0:k, :},

    with ε = the option ``epsilon`` (default 0.1; the paper's parameter, relative to max C, which is why this
    method takes no ``temperature``) and the cost normaliser taken per row (and differentiated). Column i of Γ sums
    to the mass of score i not sent to the "rest" anchor. The k rows summed, :math:`\sum_j \Gamma_{ji}`, form a soft
    top-k mask summing to k; for k = 1 the anchors and costs are those of ``topk_mask(x, 1, method="soft",
    epsilon=ε)`` and the two coincide. ``largest=False`` softly sorts the k smallest entries in increasing
    order: the anchors (0, 1, …, k − 1) take them and anchor k the rest (the paper's convention for the k smallest;
    for k = 1 it coincides with ``topk_mask(x, 1, method="soft", epsilon=ε, largest=False)``). With k = n there is no
    rest anchor and Γ is a soft permutation matrix (doubly stochastic). The plan is computed by log-domain Sinkhorn
    iterations until the score marginals are met to ``tol`` (:math:`\max_i |n (P1)_i - 1| \le` ``tol``; the anchor
    marginals are exact after every iteration), and differentiated implicitly at convergence: the backward solves
    one (k + 1) × (k + 1) linear system per row, O(n k²) time and O(n k) memory, independent of the number of
    iterations. The backward is ``once_differentiable``.

    ``method="odd_even"`` or ``"bitonic"``, differentiable sorting networks (Petersen et al. 2021, 2022): every
    comparator of the network, on values a (on the wire that takes the larger value) and b, swaps with soft
    probability :math:`\alpha = f((b - a)/t)`, t = ``temperature``, f the logistic sigmoid
    (``relaxation="logistic"``, default) or the Cauchy CDF :math:`\tfrac12 + \arctan(z)/\pi` (``"cauchy"``,
    monotonic); Γ = :math:`E_k L_m \cdots L_1` is the first k rows of the product of the layers' doubly stochastic
    mixing matrices (a soft permutation matrix when k = n). The odd-even transposition network has n layers, the
    bitonic one log2 N (log2 N + 1)/2 on N = 2^⌈log2 n⌉ wires (−∞ sentinels pad n to N; they never reach the top
    n). The full n × n matrix is never formed: memory is C + O(√m · k N) numbers a row for C comparators and m
    layers, with a hand-written ``once_differentiable`` backward; definitions, directions and the exact cost in
    :mod:`softtopk.sorting_networks`. ``largest=False`` sorts −x: the k smallest entries in increasing order.

    Args:
        x: scores, any shape (finite values).
        k: the number of rows, an int in [0, n].
        method: ``"sinkhorn"`` (default), ``"odd_even"`` or ``"bitonic"`` (:data:`softtopk.PERMUTATION_METHODS`).
        temperature: the comparators' t > 0 of the sorting networks (default 1.0), a number or a per-row tensor
            broadcastable to the batch shape (differentiable). ``"sinkhorn"`` takes ``epsilon`` instead.
        largest: the k largest (default) or the k smallest entries.
        dim: the dimension of the scores. The result has the batch dimensions of ``x`` (its shape without
            ``dim``, in order), then k, then n: for ``dim != -1`` the score dimension is moved last.
        **options: the method's own options; any other raises ``TypeError``.

            - ``"sinkhorn"``: ``epsilon`` (default 0.1, a number or a per-row tensor, differentiable);
              ``max_iter`` (default 1000), Sinkhorn iterations at most, with a
              ``RuntimeWarning`` if ``tol`` is not met by then; ``tol``, the marginal tolerance, default 1e-5
              (float32) or 1e-10 (float64).
            - ``"odd_even"``, ``"bitonic"``: ``relaxation``, ``"logistic"`` (default) or ``"cauchy"``.

    Half precision runs in float32.

    Returns:
        Γ of shape ``batch + (k, n)`` and ``x``'s dtype.

    Example:
        >>> import torch, softtopk
        >>> x = torch.tensor([0.0, 3.0, 1.0, 2.0])
        >>> g = softtopk.topk_permutation(x, 2, epsilon=1e-3)
        >>> g.round(decimals=3)
        tensor([[0., 1., 0., 0.],
                [0., 0., 0., 1.]])
        >>> (g @ x).round(decimals=3)
        tensor([3., 2.])
        >>> g = softtopk.topk_permutation(x, 2, method="bitonic", temperature=0.5, relaxation="cauchy")
        >>> g.round(decimals=2)
        tensor([[0.0500, 0.7300, 0.0900, 0.1300],
                [0.0800, 0.1300, 0.1300, 0.6600]])
        >>> (g @ x).round(decimals=2)
        tensor([2.5400, 1.8500])
    """
    return _permutation("topk_permutation", x, k, dim, method, temperature, largest, options)


def _permutation(fn, x, k, dim, method, temperature, largest, options) -> Tensor:
    if isinstance(x, Tensor) and not torch.compiler.is_compiling() and is_transformed(x):
        raise NotImplementedError(
            f"{fn}: torch.func transforms (vmap, jacrev, ...) are not supported: the Sinkhorn plan and the sorting "
            f"networks have no batching rule. Every operator takes any batch shape: pass the vmapped dimension as a "
            f"batch dimension"
        )
    spec = lookup("permutation", method, options, fn=fn)
    rows = prepare(
        fn,
        x,
        k,
        dim=dim,
        temperature=temperature,
        largest=largest,
        k_kind="python_int",
        uses_temperature=uses_temperature(spec, options, temperature, fn=fn),
        finite=True,
        method=method,
    )
    parsed = parse(spec, options, fn=fn)
    if rows.x.numel() == 0 or rows.k == 0:
        return x.new_zeros(rows.x.shape[:-1] + (rows.k, rows.n))
    return spec.compute(rows, internal_temperature(spec, rows, parsed), **parsed).to(rows.dtype)


def topk_distribution(
    x: Tensor,
    k: int,
    *,
    dim: int = -1,
    method: str = "bitonic",
    temperature: Union[float, Tensor, None] = None,
    largest: bool = True,
    **options,
) -> Tensor:
    r"""Soft top-k distribution :math:`P_K` (Petersen et al. 2022, "Differentiable Top-k Classification
    Learning"): row j is the soft probability that entry i is among the top j + 1.

    With Γ = ``topk_permutation(x, k, method=method, ...)``, whose row r softly indicates the (r + 1)-th largest
    entry,

    .. math::
        (P_K)_{ji} = \min\Bigl(1, \max\bigl(0, \textstyle\sum_{r=0}^{j} \Gamma_{ri}\bigr)\Bigr),

    the clamp only absorbing rounding (the sums lie in [0, 1]: columns of Γ sum to at most 1). Row j sums to j + 1
    and is a soft top-(j + 1) mask; as t → 0 it tends to the indicator of the j + 1 largest entries (of the j + 1
    smallest with ``largest=False``). For the sorting networks (``"odd_even"``, ``"bitonic"``) see
    :mod:`softtopk.sorting_networks` for the relaxation and the memory cost; ``method="sinkhorn"`` (SOFT optimal
    transport, with ``epsilon``) works too.

    Args:
        x: scores, any shape (finite values).
        k: the number of rows, an int in [0, n].
        dim: the dimension of the scores; the result has the batch dimensions of ``x``, then k, then n.
        method: ``"bitonic"`` (default), ``"odd_even"`` or ``"sinkhorn"``.
        temperature: t > 0 of the networks (default 1.0), a number or a per-row tensor (differentiable).
        largest: the k largest (default) or the k smallest entries.
        **options: the method's options, as for :func:`softtopk.topk_permutation`.

    Returns:
        :math:`P_K` of shape ``batch + (k, n)`` and ``x``'s dtype.

    Example:
        >>> import torch, softtopk
        >>> x = torch.tensor([0.0, 3.0, 1.0, 2.0])
        >>> softtopk.topk_distribution(x, 3, temperature=1e-3)
        tensor([[0., 1., 0., 0.],
                [0., 1., 0., 1.],
                [0., 1., 1., 1.]])
    """
    gam = _permutation("topk_distribution", x, k, dim, method, temperature, largest, options)
    return gam.cumsum(-2).clamp(0.0, 1.0)
