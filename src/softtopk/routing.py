"""Threshold-p routing: select every entry whose normalised score exceeds p, not a fixed number k.

MoDification (Zhang et al. 2024, "MoDification: Mixture of Depths Made Easy") replaces the top-k router of
Mixture-of-Depths by a threshold-p operator, so that the number of tokens a layer processes adapts to the input.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from ._utils import (
    can_read_data,
    check_input,
    check_temperature,
    compute_dtype,
    move_back,
    move_last,
    normalize_dim,
    row_param,
)

__all__ = ["threshold_mask"]

NORMALIZATIONS = ("sigmoid", "softmax", "none")
METHODS = ("sigmoid", "hard", "straight_through")


def threshold_mask(
    x: Tensor,
    p: Union[float, Tensor],
    *,
    temperature: Union[float, Tensor] = 0.1,
    dim: int = -1,
    normalize: str = "sigmoid",
    method: str = "sigmoid",
) -> Tensor:
    r"""Soft indicator of the entries of ``x`` whose normalised router score exceeds ``p``.

    With :math:`s = N(x)` the normalised score, the hard mask is :math:`1[s_i > p]` and its relaxation
    :math:`y_i = \sigma((s_i - p)/t)`, which tends to the hard mask as t → 0. The normaliser N
    (``normalize``) is

    - ``"sigmoid"`` (default): :math:`s_i = \sigma(x_i)`, one independent gate per token, as in a
      Mixture-of-Depths router whose logits are squashed to (0, 1): the count selected is not fixed;
    - ``"softmax"``: :math:`s = \mathrm{softmax}(x)` along ``dim`` (the share of the routing mass);
    - ``"none"``: ``x`` is already a normalised score.

    ``method="hard"`` returns the 0/1 mask with a zero gradient; ``"straight_through"`` returns the hard mask in
    the forward pass and the gradient of the relaxation in the backward pass. Unlike top-k, the number of
    selected entries varies from row to row: it is :math:`\sum_i y_i`. MoDification (Zhang et al. 2024) routes
    with such a threshold-p operator; we could not check its normaliser against the paper's text, so it is an
    argument here.

    Args:
        x: router logits, any floating dtype and shape (half precision computes in float32).
        p: the threshold, a number or a per-row tensor broadcastable to the batch shape (differentiable);
            in [0, 1] unless ``normalize="none"``.
        temperature: t > 0, a number or a per-row tensor (differentiable).
        dim: the dimension of the entries (the softmax axis; the batch otherwise).
        normalize: ``"sigmoid"``, ``"softmax"`` or ``"none"``.
        method: ``"sigmoid"`` (the relaxation), ``"hard"`` or ``"straight_through"``.

    Example:
        >>> import torch, softtopk
        >>> x = torch.tensor([2.0, -1.0, 0.5, -3.0])
        >>> softtopk.threshold_mask(x, 0.5, method="hard")
        tensor([1., 0., 1., 0.])
        >>> softtopk.threshold_mask(x, 0.5, temperature=0.1).round(decimals=3)
        tensor([0.9780, 0.0900, 0.7730, 0.0110])
    """
    fn = "threshold_mask"
    check_input(x, fn=fn)
    d = normalize_dim(x, dim, fn=fn)
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"{fn}: unknown `normalize`={normalize!r}; choose one of {', '.join(NORMALIZATIONS)}")
    if method not in METHODS:
        raise ValueError(f"{fn}: unknown `method`={method!r}; choose one of {', '.join(METHODS)}")
    check_temperature(temperature, fn=fn)
    _check_p(p, bounded=normalize != "none", fn=fn)
    cdtype = compute_dtype(x)
    xl = move_last(x, d).to(cdtype)
    if normalize == "sigmoid":
        s = torch.sigmoid(xl)
    elif normalize == "softmax":
        s = torch.softmax(xl, dim=-1)
    else:
        s = xl
    pt = row_param(p, x, d, name="p", fn=fn, dtype=cdtype)
    t = row_param(temperature, x, d, name="temperature", fn=fn, dtype=cdtype)
    y = torch.sigmoid((s - pt) / t)  # finite even for infinite scores
    if method != "sigmoid":
        hard = (s > pt).to(cdtype)
        # "hard": in the graph with an exact zero gradient; "straight_through": the relaxation's gradient
        y = hard + (0.0 * y if method == "hard" else y - y.detach())
    return move_back(y.to(x.dtype), d)


def _check_p(p: object, *, bounded: bool, fn: str) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float, Tensor)):
        raise TypeError(f"{fn}: `p` must be a number or a tensor, got {type(p).__name__}")
    if isinstance(p, Tensor):
        if not p.dtype.is_floating_point:
            raise TypeError(f"{fn}: `p` must be a floating tensor, got {p.dtype}")
        if not can_read_data(p) or p.numel() == 0:
            return
        ok = torch.isfinite(p) & ((p >= 0) & (p <= 1) if bounded else True)
        if not bool(torch.as_tensor(ok).all()):
            raise ValueError(f"{fn}: `p` must be finite{' and lie in [0, 1]' if bounded else ''}")
    elif not (p == p and abs(p) != float("inf") and (not bounded or 0 <= p <= 1)):
        raise ValueError(f"{fn}: `p` must be finite{' and lie in [0, 1]' if bounded else ''}, got {p}")
